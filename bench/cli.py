"""Command line of ``python -m bench``.

GPU mode (CUDA present, or ``--mode gpu``): times fused vs eager vs torch.compile (default and
max-autotune) in fwd, bwd, full and no-grad modes; writes ``OUT/gpu_results.csv`` (upserted on
impl, mode, M, D, dtype, gpu), ``OUT/gpu_results.md`` and ``OUT/plots/*.png``.

CPU mode (no CUDA, or ``--mode cpu``): measures memory traffic per call, reads what Inductor
generated here, projects onto GPUs with a roofline MODEL, checks parity and summarises the compile
gate; writes ``OUT/cpu_traffic.md``, ``OUT/cpu_records.json`` (or ``--json PATH``),
``OUT/cpu_bytes.png`` and ``OUT/cpu_model_time.png``. Its sections: the single block, the narrow
stack (``--no-stack``), the MLP block's bytes against its formulas and eager (``--no-mlp``), the
normalized block's bytes (BatchNorm, LayerNorm, RMSNorm) against eager and the compulsory minimum
(``--no-norm``), dropout's bytes, fused and eager (``--no-dropout``), host overhead (``--no-host``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _ints(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in v.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {v!r}")


def _choices(allowed):
    def parse(v: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in v.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return items
    return parse


def _size(v: str) -> tuple[int, int]:
    try:
        m, d = v.lower().split("x")
        return int(m), int(d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxD, e.g. 2048x512, got {v!r}")


def _stack_size(v: str) -> tuple[int, int, int]:
    try:
        m, d, l = (int(s) for s in v.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxDxL, e.g. 1024x64x8, got {v!r}")
    if d not in (16, 32, 64, 128):
        raise argparse.ArgumentTypeError(f"the stack's D must be 16, 32, 64 or 128, got {d}")
    return m, d, l


def build_parser() -> argparse.ArgumentParser:
    impls = ("fused", "eager", "compile", "compile-max-autotune")
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="fusedres benchmark. With CUDA: real timings against eager and torch.compile. Without: "
                    "measured memory traffic and a labelled roofline model (no GPU time is ever invented).")
    p.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto (default): gpu if CUDA is available, else cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the records as a JSON list to PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--gpu-check", action="store_true",
                   help="CUDA only: compiled parity of every kernel variant and dtype with pinned configs, a quick "
                        "timing at 2 sizes beside the MODEL, a JSON report (OUT/gpu_check.json or --json); minutes")
    p.add_argument("--plan", action="store_true",
                   help="print the launch plan (programs, splits, waves, fill) of every kernel in every shipped "
                        "config for --gpu at --size and --dtype, and exit; runs no kernel")
    p.add_argument("--gpu", choices=("h100", "a100", "h200"), default="h100", help="--plan: the GPU (default h100)")
    p.add_argument("--stack-table", action="store_true",
                   help="with --plan: also print the MODEL v2 table of the narrow stack against L=8 single blocks "
                        "(D 16..128, bf16 and tf32, H100 and A100, M 65536), with the backward's L2 partial traffic")
    p.add_argument("--small-m", action="store_true",
                   help="with --plan: also print fill and MODEL time of fwd and dx at M 512, 2048, 8192 x D 1024, 4096, "
                        "bf16, H100 and A100 (they tile over M and underfill at small M)")
    p.add_argument("--stack-layers", type=int, default=8, metavar="L",
                   help="with --plan at D <= 128: the narrow stack's depth for its rows (default 8; 0: no stack rows)")
    g = p.add_argument_group("GPU mode")
    g.add_argument("--sweep", choices=("quick", "full"), default="quick",
                   help="quick (default): D 1024,4096 x M 8192, bf16; full: D 256..8192 x M 8192,65536 x bf16,fp16,fp32")
    g.add_argument("--D", type=_ints, help="comma list of D (overrides the sweep's)")
    g.add_argument("--M", type=_ints, help="comma list of M (overrides the sweep's)")
    g.add_argument("--dtypes", type=_choices(("bf16", "fp16", "fp32")), help="comma list (overrides the sweep's)")
    g.add_argument("--modes", type=_choices(("fwd", "bwd", "full", "nograd")), default=("fwd", "bwd", "full", "nograd"),
                   help="comma list of fwd,bwd,full,nograd (default: all)")
    g.add_argument("--impls", type=_choices(impls), default=impls, help=f"comma list of {','.join(impls)} (default: all)")
    g.add_argument("--csv", type=Path, help="CSV to upsert (default OUT/gpu_results.csv)")
    g.add_argument("--no-plots", action="store_true")
    c = p.add_argument_group("CPU mode")
    c.add_argument("--size", type=_size, default=(2048, 512),
                   help="MxD of the traffic measurement (default 2048x512: M/D = 4 as design.md's 4096x1024, "
                        "which takes about 8x longer in the interpreter)")
    c.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype measured (default fp32)")
    c.add_argument("--project-dtype", choices=("bf16", "fp16", "fp32", "tf32"), default="bf16",
                   help="dtype of the roofline projection (default bf16; tf32 = fp32 operands on tf32 tensor cores)")
    c.add_argument("--gate", choices=("quick", "full", "off"), default="quick",
                   help="compile gate summary (python -m fusedres.aot in a subprocess): quick (default: the forward "
                        "kernel's configs, sm_90, bf16), full (the gate's own defaults), off")
    c.add_argument("--gate-json", type=Path, metavar="PATH",
                   help="summarise this existing python -m fusedres.aot --json output instead of running the gate")
    c.add_argument("--stack", type=_stack_size, default=(1024, 64, 8), metavar="MxDxL",
                   help="narrow-stack section: M rows, width D (16/32/64/128), depth L (default 1024x64x8, bf16)")
    c.add_argument("--no-stack", action="store_true", help="skip the narrow-stack section (both modes)")
    c.add_argument("--mlp-size", type=_size, default=(512, 128), metavar="MxD",
                   help="MLP-block section: M rows, width D; hidden widths H = 4D and H = D (default 512x128, in "
                        "--dtype): the fused MLP block's measured bytes against its formulas and eager")
    c.add_argument("--no-mlp", action="store_true", help="skip the MLP-block section (CPU mode)")
    c.add_argument("--norm-size", type=_size, default=(512, 128), metavar="MxD",
                   help="the normalized block's section: M rows of width D (default 512x128)")
    c.add_argument("--no-norm", action="store_true",
                   help="skip the normalized block's section (BatchNorm, LayerNorm, RMSNorm bytes; CPU mode)")
    c.add_argument("--dropout-size", type=_size, default=(512, 128), metavar="MxD",
                   help="the dropout section: M rows of width D (default 512x128)")
    c.add_argument("--no-dropout", action="store_true",
                   help="skip the dropout section (the blocks' bytes with and without dropout, fused and eager; "
                        "CPU mode)")
    g.add_argument("--stack-gpu", type=_stack_size, default=(65536, 64, 8), metavar="MxDxL",
                   help="GPU mode: the narrow stack timed against L single-block kernels and eager "
                        "(default 65536x64x8, bf16; written to OUT/gpu_stack.md)")
    p.add_argument("--no-host", action="store_true",
                   help="skip the host-overhead section (both modes): host us per call, fused vs eager")
    c.add_argument("--no-inductor-probe", action="store_true",
                   help="skip reading what torch.compile generates on this CPU")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # numpy's BLAS threads fight the interpreter's many tiny matmuls on a small machine: one
    # thread is ~3x faster here. Must be set before numpy is imported (torch imports it).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import torch

    cuda = torch.cuda.is_available()
    if args.plan:
        from . import plan
        return plan.main(args)
    if args.gpu_check:
        from . import gpucheck
        return gpucheck.main(args)
    mode = args.mode if args.mode != "auto" else ("gpu" if cuda else "cpu")
    if mode == "gpu":
        from .gpu import compiled_gpu_missing
        why = compiled_gpu_missing("python -m bench --mode gpu", "GPU timings come only from a GPU; run without "
                                   "--mode gpu for the CPU traffic measurement and the roofline model.")
        if why:
            print(why, file=sys.stderr)
            return 2
        return gpu_main(args)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        if "triton" in sys.modules:
            # triton was imported without the interpreter (main() called from a live process): start afresh.
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.call([sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
                                   env=env, cwd=str(ROOT))
        os.environ["TRITON_INTERPRET"] = "1"
    return cpu_main(args)


# ---------------------------------------------------------------------------------------------


def gpu_main(args) -> int:
    from . import gpu
    from .report import PLOTS_HINT, have_matplotlib, versions, write_json

    t0 = time.perf_counter()
    sweep = gpu.SWEEPS[args.sweep]
    cfg = gpu.GpuConfig(D=args.D or sweep["D"], M=args.M or sweep["M"], dtypes=args.dtypes or sweep["dtypes"],
                        modes=args.modes, impls=args.impls, seed=args.seed)
    device = gpu.cuda_device()
    meta = versions()
    print(f"fusedres bench: GPU mode on {device.name} (driver {device.driver}; torch {meta['torch']}, triton "
          f"{meta['triton']}, CUDA {meta['cuda']}; commit {meta['git_commit']})")
    if device.spec is None:
        print("  this GPU is not in bench.model's table: % of roofline is left empty")
    print(f"  sweep: D {list(cfg.D)} x M {list(cfg.M)} x {list(cfg.dtypes)}; modes {list(cfg.modes)}; "
          f"impls {list(cfg.impls)}")
    rows = gpu.run_gpu(cfg, device, meta, progress=not args.no_progress)
    paths = gpu.write_outputs(rows, args.out, args.csv, plots=not args.no_plots)
    print()
    print(gpu.markdown(rows))
    stack_rows = []
    if not args.no_stack:
        from . import stack
        M, D, L = args.stack_gpu
        stack_rows = stack.time_stack(device, M, D, L, "bf16", seed=args.seed, meta=meta)
        text = stack.gpu_markdown(stack_rows)
        (Path(args.out) / "gpu_stack.md").write_text(text + "\n")
        print("\n" + text)
    host_rows = []
    if not args.no_host:
        from . import host
        host_rows = host.measure("cuda")
        for r in host_rows:
            r.update(meta)
        text = host.table(host_rows, host.triton_launch_us("cuda", 8192, 1024))
        (Path(args.out) / "gpu_host.md").write_text(text + "\n")
        print("\n## Host overhead per call\n\n" + text)
    print("\nGB/s is the fused compulsory minimum of bytes over the measured time (an effective bandwidth); "
          "% roofline compares the measured time with the roofline MODEL of the fused minimum on this GPU's "
          "datasheet peaks.")
    if args.json:
        write_json(args.json, rows + stack_rows + host_rows)
    print(f"\nwrote {paths['csv']} (upserted), {paths['markdown']}, {len(paths['plots'])} plots in "
          f"{Path(args.out) / 'plots'}" + (f", {args.json}" if args.json else ""))
    if not args.no_plots and not have_matplotlib():
        print(PLOTS_HINT)
    bad = [r for r in rows + stack_rows if r.get("parity") not in ("ok", "skipped")]
    for r in bad:
        print(f"  {r['impl']} {r['mode']} {r['dtype']} M={r['M']} D={r['D']}: parity {r.get('parity')}: "
              f"{r.get('error') or r.get('parity_detail')}")
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")
    return 1 if any(r["impl"] in ("fused", "stack") for r in bad) else 0


def cpu_main(args) -> int:
    from . import cpu, gate
    from .model import PROJECTION_GPUS
    from .report import PLOTS_HINT, versions, write_json

    t_start = time.perf_counter()
    M, D = args.size
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    gate_run = None
    if args.gate_json is None and args.gate != "off":
        gate_run = gate.start(args.gate, jobs=1)      # in the background, while the interpreter works

    meta = versions()
    header = [
        f"fusedres bench: CPU mode (no CUDA device here; torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['git_commit']})",
        "Bytes are MEASURED on this CPU: the fused Triton kernels through an instrumented Triton interpreter, "
        "eager PyTorch through an aten dispatch counter. torch.compile's GPU bytes and every time figure below "
        "are a MODEL. No GPU time is measured or reported here (ms: null, measured: false).",
        f"size: M={M}, D={D}, {args.dtype}",
    ]
    print("\n".join(header), flush=True)

    res = cpu.run_cpu(M, D, args.dtype, seed=args.seed, probe=not args.no_inductor_probe, progress=progress)
    recs = cpu.records(res, args.project_dtype)

    if args.gate_json is not None:
        try:
            gate_records, gate_note = gate.load(str(args.gate_json)), f"read from {args.gate_json}"
        except (OSError, ValueError) as exc:
            gate_records, gate_note = None, f"could not read {args.gate_json}: {exc}"
    elif gate_run is not None:
        t0 = time.perf_counter()
        gate_records, gate_note = gate.collect(gate_run, progress=progress)
        res.timings["compile gate (waited after the rest)"] = time.perf_counter() - t0
    else:
        gate_records, gate_note = None, "compile gate off (--gate off)"

    lines = header + [""]
    lines += ["## Memory traffic per call (measured vs MODEL)", "", cpu.traffic_table(res), ""]
    lines += ["- " + s for s in cpu.ratio_lines(res)]
    lines += ["- requests = every active lane of every load and store (tile re-reads included); unique = distinct "
              "bytes per kernel launch (read + written), what a perfect cache would move from DRAM",
              "- eager counts each aten op's tensor inputs and outputs once; MODEL rows are formulas "
              "(bench/model.py), not measurements", ""]
    if res.probes:
        lines += ["## torch.compile: what Inductor generated on this CPU vs the GPU MODEL", "",
                  f"Compiled here at M={res.probes[0].M}, D={res.probes[0].D} (C++ kernels on a CPU; elements "
                  "counted from each kernel's buffer arguments in the generated code, not measured at run time). "
                  "The GPU MODEL columns are what bench/model.py assumes Inductor does on a GPU.", "",
                  cpu.probe_table(res), ""]
    specs = ", ".join(f"{s.name} {s.bf16:g} TFLOP/s bf16, {s.tbps:g} TB/s" for s in PROJECTION_GPUS)
    lines += [f"## Roofline MODEL: projected time per call, {args.project_dtype} (not a measurement)", "",
              f"Per kernel max(bytes / bandwidth, FLOPs / peak), summed over the kernels; {specs}. "
              f"Bytes measured in {args.dtype} are scaled to {args.project_dtype} by the element size (exact: every "
              "tensor of the block has the one dtype). Kernel launch latency (a few us per kernel) is not modelled: "
              "at small sizes it dominates a real GPU run, so read these as ratios; the ceiling table below is the "
              "large-M limit. The v1 us column is that byte roofline; beside it, MODEL v2 (bench/model.py): per "
              "launch max(wave-quantised compute, HBM, L2) + launch latency, the fused kernels in the launch plan's "
              "chosen config for that GPU, their L2 term from the request bytes measured here (table below); "
              "eager's and torch.compile's GEMMs are modelled at full fill (cuBLAS picks its own split-K, so no "
              "wave term), their L2 term = their bytes plus their GEMMs' operand re-reads at a 128 x 128 output tile "
              "(the fused kernels' accounting). v2 speedup over eager = eager's v2 time / the row's.",
              "", cpu.projection_table(res, args.project_dtype), "",
              "### Fused request bytes: measured here vs the v2 formula", "",
              "Every active lane of every load and store of each fused kernel, counted by the interpreter "
              f"instrument at M={M}, D={D}, {args.dtype}, in the config the interpreter ran, against the formula "
              "of bench/model.py (v2_fwd / v2_dx / v2_dw) at that config and size.", "", cpu.l2_check_table(res), "",
              f"### MODEL v2 of the fused kernels per GPU, {args.project_dtype} (not a measurement)", "",
              "L2 bytes from: measured = the request bytes counted here, scaled to the projection dtype (the "
              "interpreter ran the same output tile, unsplit: request bytes do not depend on the reduction step); otherwise the formula at the chosen tile times measured / "
              "formula at the interpreter's tile.", "", cpu.v2_kernel_table(res, args.project_dtype), "",
              "## Ceiling speedup of the fused kernels, fwd+bwd, bf16, M=65536 (MODEL)", "",
              "v1: byte roofline; v2: MODEL v2, fused in the plan's chosen configs (formulas), eager's kernels at "
              "full fill (cuBLAS picks its own split-K), its GEMMs' L2 re-reads at a 128 x 128 output tile.", "", cpu.ceiling_table(), ""]
    stack_exact = True
    if not args.no_stack:
        from . import stack
        t0 = time.perf_counter()
        sm = stack.measure(*args.stack, seed=args.seed)
        res.timings["narrow stack"] = time.perf_counter() - t0
        stack_lines, stack_exact = stack.section(sm)
        lines += stack_lines
        recs += stack.records(sm)
    mlp_exact = True
    if not args.no_mlp:
        from . import mlp
        t0 = time.perf_counter()
        mm = mlp.measure(*args.mlp_size, dtype=args.dtype, seed=args.seed)
        res.timings["MLP block"] = time.perf_counter() - t0
        mlp_lines, mlp_exact = mlp.section(mm)
        lines += mlp_lines
        recs += mlp.records(mm)
    sections_ok = True
    from . import dropout, norm
    for label, section, skip, size in (("normalized block", norm, args.no_norm, args.norm_size),
                                       ("dropout", dropout, args.no_dropout, args.dropout_size)):
        if skip:
            continue
        t0 = time.perf_counter()
        measured = section.measure(*size)
        res.timings[label] = time.perf_counter() - t0
        section_lines, ok = section.section(measured)
        sections_ok = sections_ok and ok
        lines += section_lines
        recs += section.records(measured)
    if not args.no_host:
        from . import host
        t0 = time.perf_counter()
        host_recs = host.measure("cpu")
        res.timings["host overhead"] = time.perf_counter() - t0
        lines += ["## Host overhead per call (device work excluded)", "", host.table(host_recs), ""]
        recs += host_recs
    lines += ["## Parity", "", cpu.parity_line(res), ""]
    if res.violations:
        lines += [f"BOUNDS: {len(res.violations)} out-of-bounds accesses recorded in the fused kernels:"]
        lines += [f"  {v}" for v in res.violations[:10]]
    else:
        lines += ["bounds: every active lane of every fused load and store stayed inside its tensor", ""]
    lines += ["## Compile gate", ""]
    if gate_records is not None:
        lines += [gate.summarize(gate_records), f"({gate_note})"]
    else:
        lines += [f"compile gate: {gate_note}"]
    lines += [""]

    md = out / "cpu_traffic.md"
    json_path = args.json or out / "cpu_records.json"
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items())
    wall = time.perf_counter() - t_start
    lines += [f"bench wall time on this CPU: {wall:.0f} s ({timing})"]
    text = "\n".join(lines)
    md.write_text(text + "\n")
    write_json(json_path, recs)
    if args.json and args.json != out / "cpu_records.json":
        write_json(out / "cpu_records.json", recs)
    print("\n" + "\n".join(lines[len(header) + 1:]))
    pngs = cpu.plot_cpu(res, out, args.project_dtype)        # after the records: plots are optional
    print(f"wrote {md}, {json_path}" + "".join(f", {p}" for p in pngs))
    if not pngs:
        print(PLOTS_HINT)

    from .model import ELEMENT_SIZE, minimum_bytes
    from .parity import all_ok
    e = ELEMENT_SIZE[args.dtype]
    within = all(abs(res.traffic[("fused", m)].unique_bytes / minimum_bytes(m, M, D, e) - 1) <= 0.01
                 for m in ("fwd", "bwd"))
    return 0 if all_ok(res.parity) and within and stack_exact and mlp_exact and sections_ok and not res.violations else 1
