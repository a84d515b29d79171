"""GPU mode: real timings of the fused kernels against eager and torch.compile.

For each case (dtype, M, D) and implementation (fused, eager, torch.compile default, torch.compile
max-autotune without CUDA graphs, as every other implementation runs), the outputs and gradients
are first checked against the fp64 reference under the parity rule; an implementation that fails
is reported and not timed. A case whose fp64 reference would not fit in the free GPU memory
(:func:`baseline_bytes`) is skipped with a message. Then each mode is timed with
``triton.testing.do_bench`` (L2 flushed between runs, quantiles 0.2/0.5/0.8):

- ``fwd``: the forward with autograd recording (inputs require grad), as in training;
- ``bwd``: the backward alone (``torch.autograd.grad`` on a retained graph; torch.compile's
  backward is therefore compiled without buffer donation, which AOTAutograd requires for it);
- ``full``: forward and backward;
- ``nograd``: the forward under ``torch.no_grad()``.

Reported: ms, TFLOP/s (GEMM FLOPs), GB/s of the minimal-bytes model (the fused compulsory minimum
over the measured time: an effective bandwidth), % of the roofline of the detected GPU, speedup over
each peer, and peak memory (``torch.cuda.max_memory_allocated``).

The pipeline takes a :class:`Device` (how to time, how to read memory, what the GPU is), so it can
be exercised on a CPU with a stand-in timer in the tests. Rows are marked ``measured`` only when the
device is a real GPU.
"""
from __future__ import annotations

import datetime
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fusedres.kernels import configs

from . import model
from .model import ELEMENT_SIZE, GpuSpec

IMPLS = ("fused", "eager", "compile", "compile-max-autotune")
#: torch.compile mode per peer. "max-autotune" also captures CUDA graphs, which would time that peer
#: without the launch overheads every other implementation pays: its autotuning without graphs.
COMPILE_MODES = {"compile": None, "compile-max-autotune": "max-autotune-no-cudagraphs"}
MODES = ("fwd", "bwd", "full", "nograd")
SWEEP_D = (256, 512, 1024, 2048, 4096, 8192)
SWEEP_M = (8192, 65536)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEPS = {
    # default: a quick subset that still shows the memory-bound and the compute-bound regimes
    "quick": {"D": (1024, 4096), "M": (8192,), "dtypes": ("bf16",)},
    "full": {"D": SWEEP_D, "M": SWEEP_M, "dtypes": ("bf16", "fp16", "fp32")},
}
QUANTILES = (0.2, 0.5, 0.8)

CSV_COLUMNS = ["impl", "mode", "M", "D", "dtype", "gpu", "measured", "ms", "ms_p20", "ms_p80", "tflops", "gbs",
               "roofline_pct", "roofline_ms_model", "speedup_vs_eager", "speedup_vs_compile",
               "speedup_vs_compile-max-autotune", "speedup_vs_fused", "peak_mem_mb", "extra_mem_mb", "parity",
               "compile_mode",
               "parity_detail", "min_bytes_model", "flops", "fp32_precision", "gpu_spec", "driver", "torch", "triton",
               "cuda", "python", "git_commit", "timestamp", "error"]


@dataclass
class Device:
    name: str                                   # what the CSV's gpu column says
    torch_device: str                           # "cuda" or "cpu"
    is_gpu: bool                                # True only for a real GPU: rows are then "measured"
    driver: str
    spec: GpuSpec | None                        # datasheet peaks for % of roofline, if known
    time_ms: Callable[[Callable], tuple]        # fn -> (p20, p50, p80) in ms
    peak_memory: Callable[[Callable], tuple] | None = None   # fn -> (peak bytes, bytes over the start)
    free_memory: Callable[[], int] | None = None              # -> free device bytes (the fp64 size check)


def compiled_gpu_missing(command: str, without_gpu: str) -> str | None:
    """Why ``command`` cannot time or check the compiled kernels here (None: it can): no CUDA
    device (``without_gpu`` says what to run instead), or ``TRITON_INTERPRET=1``, under which the
    kernels would run in the interpreter."""
    import os
    if not torch.cuda.is_available():
        return f"{command}: no CUDA device here. {without_gpu}"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return (f"{command}: TRITON_INTERPRET=1 is set, so the kernels would run in the interpreter, not "
                "compiled on the GPU. Unset it.")
    return None


def cuda_device(spec_override: GpuSpec | None = None) -> Device:
    """The real thing: ``triton.testing.do_bench`` and the CUDA caching allocator's peak."""
    import triton.testing

    name = torch.cuda.get_device_name()

    def time_ms(fn):
        q = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
        return tuple(float(v) for v in q)

    def peak_memory(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak, peak - base

    return Device(name, "cuda", True, _driver_version(), spec_override or model.detect_gpu(name), time_ms,
                  peak_memory, free_memory=lambda: torch.cuda.mem_get_info()[0])


def cpu_standin_device(name: str = "cpu-standin (not a GPU)", reps: int = 3) -> Device:
    """A stand-in that exercises the GPU pipeline on a CPU: wall-clock quantiles of a few calls.
    Its rows say ``measured: False`` and carry this device's name, never a GPU's."""

    def time_ms(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        qs = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
        return qs[1], statistics.median(ts), qs[7]

    return Device(name, "cpu", False, "n/a", model.H100, time_ms, None)


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = torch._C._cuda_getDriverVersion()
        return f"CUDA driver API {v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Implementations and modes


def make_impl(name: str) -> Callable:
    import fusedres
    if name == "fused":
        return fusedres.fused_residual
    # eager and torch.compile time the block as a user writes it (bench.host.eager_block), not
    # fusedres.residual_reference: the reference's own Python (checks, naming its recipe) is no
    # part of the eager baseline
    from .host import eager_block
    if name == "eager":
        return eager_block
    if name in ("compile", "compile-max-autotune"):
        # run_gpu resets Dynamo at each case: the sweep compiles many shapes, and the recompile
        # limit (or automatic dynamic shapes) must not turn a case into an eager fallback.
        # The bwd mode replays one backward (retain_graph=True), which AOTAutograd refuses for a
        # backward compiled with donated buffers. Donation saves memory, not time; it is switched
        # off for this process (a scoped config.patch does not reach the cached compile).
        import torch._functorch.config     # (not imported by torch itself until something compiles)
        torch._functorch.config.donated_buffer = False
        return torch.compile(eager_block, dynamic=False, mode=COMPILE_MODES[name])
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}")


def mode_fn(mode: str, fn: Callable, x, w, b, g) -> Callable:
    """The callable that ``mode`` times, its inputs already made."""
    if mode == "nograd":
        x0, w0, b0 = (t.detach() for t in (x, w, b))

        def run():
            with torch.no_grad():
                return fn(x0, w0, b0)
        return run
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    if mode == "fwd":
        return lambda: fn(xs, ws, bs)
    if mode == "bwd":
        y = fn(xs, ws, bs)
        return lambda: torch.autograd.grad(y, (xs, ws, bs), g, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(fn(xs, ws, bs), (xs, ws, bs), g)
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class GpuConfig:
    D: tuple = SWEEPS["quick"]["D"]
    M: tuple = SWEEPS["quick"]["M"]
    dtypes: tuple = SWEEPS["quick"]["dtypes"]
    modes: tuple = MODES
    impls: tuple = IMPLS
    seed: int = 0


def make_inputs(M, D, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = 1 / math.sqrt(D)
    x = torch.randn(M, D, generator=gen, device=device).to(dtype)
    w = ((torch.rand(D, D, generator=gen, device=device) * 2 - 1) * bound).to(dtype)
    b = ((torch.rand(D, generator=gen, device=device) * 2 - 1) * bound).to(dtype)
    g = torch.randn(M, D, generator=gen, device=device).to(dtype)
    return x, w, b, g


def baseline_bytes(M: int, D: int) -> int:
    """Bytes the fp64 parity baseline takes at its peak (``bench.parity.Baseline``: eager outputs,
    fp64 copies, the fp64 reference and its absolute-value scale, with their autograd
    intermediates): measured on the CPU as 13-14.4 fp64 ``M x D`` tensors and 6-7 fp64 ``D x D``,
    rounded up. M = 65536, D = 8192: 64 GiB."""
    return 8 * (15 * M * D + 8 * D * D)


def _baseline_skip(device: Device, M: int, D: int) -> str | None:
    """Why the fp64 baseline of this case is not built (it would not fit), or None."""
    if device.free_memory is None:
        return None
    need, free = baseline_bytes(M, D), device.free_memory()
    if need <= 0.9 * free:
        return None
    return (f"skipped: the fp64 parity baseline needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free "
            "(not timed: parity could not be checked)")


def run_gpu(cfg: GpuConfig, device: Device, meta: dict | None = None, progress: bool = True) -> list[dict]:
    """Check and time every (dtype, M, D, impl, mode); returns the rows (not yet written)."""
    from . import parity as parity_mod
    from .report import versions

    meta = dict(meta or versions())
    # the CSV's fp32_precision column keeps torch's legacy names, whichever API set it
    precision = "highest" if configs.fp32_matmul_precision() == "ieee" else "high"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cases = [(dt, M, D) for dt in cfg.dtypes for M in cfg.M for D in cfg.D]
    total = len(cases) * len(cfg.impls)
    bar = None
    if progress:
        from .report import progress_bar        # None without tqdm; off when stderr is not a TTY
        bar = progress_bar(total=total, desc=f"timing on {device.name}", unit="impl")
    rows: list[dict] = []
    for dt, M, D in cases:
        e = ELEMENT_SIZE[dt]
        x, w, b, g = make_inputs(M, D, DTYPES[dt], device.torch_device, cfg.seed)
        # Phase 1: build and check every implementation (this also compiles the torch.compile
        # peers). The fp64 reference is freed before anything is timed, so that it neither
        # crowds the GPU nor shows in the peak-memory figures.
        torch._dynamo.reset()
        skip = _baseline_skip(device, M, D)
        baseline = None
        if skip is None:
            try:
                baseline = parity_mod.Baseline(x, w, b, g)
            except Exception as exc:  # out of memory, typically: this case only
                skip = f"skipped: the fp64 parity baseline failed: {type(exc).__name__}: {str(exc)[:200]}"
        if skip is not None:
            print(f"\n{dt} M={M} D={D}: {skip}", file=sys.stderr, flush=True)
        checked = {}
        for impl in cfg.impls:
            if skip is not None:
                checked[impl] = (None, False, "", skip)
                continue
            if bar:
                bar.set_postfix_str(f"{dt} M={M} D={D} {impl}: parity")
            try:
                fn = make_impl(impl)
                checks = baseline.check(parity_mod.run_outputs(fn, x, w, b, g))
                checked[impl] = (fn, parity_mod.all_ok(checks), parity_mod.summary(checks), None)
            except Exception as exc:  # a failing peer must not sink the sweep
                checked[impl] = (None, False, "", f"{type(exc).__name__}: {str(exc)[:300]}")
        del baseline
        if device.torch_device == "cuda":
            torch.cuda.empty_cache()
        # Phase 2: time what passed.
        case_rows = []
        for impl in cfg.impls:
            fn, par_ok, par_detail, error = checked[impl]
            if bar:
                bar.set_postfix_str(f"{dt} M={M} D={D} {impl}: timing")
            base = {"impl": impl, "M": M, "D": D, "dtype": dt, "gpu": device.name, "measured": device.is_gpu,
                    "driver": device.driver, "fp32_precision": precision, "timestamp": stamp,
                    "compile_mode": COMPILE_MODES.get(impl) or "",
                    "gpu_spec": device.spec.name if device.spec else "unknown", **meta}
            for mode in cfg.modes:
                row = {**base, "mode": mode, "min_bytes_model": model.minimum_bytes(mode, M, D, e),
                       "flops": model.gemm_flops(mode, M, D), "ms": None,
                       "parity": ("skipped" if error == skip else "error") if error else ("ok" if par_ok else "FAIL"),
                       "parity_detail": par_detail}
                if error or not par_ok:
                    row["error"] = error or "parity rule broken: not timed"
                    case_rows.append(row)
                    continue
                try:
                    run = mode_fn(mode, fn, x, w, b, g)
                    p20, p50, p80 = device.time_ms(run)
                    row.update(ms=p50, ms_p20=p20, ms_p80=p80)
                    row.update(_derived(row, device.spec, dt, precision))
                    if device.peak_memory is not None:
                        peak, extra = device.peak_memory(run)
                        row.update(peak_mem_mb=peak / 2**20, extra_mem_mb=extra / 2**20)
                    del run
                except Exception as exc:
                    row.update(ms=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                case_rows.append(row)
            if bar:
                bar.update(1)
        _speedups(case_rows)
        rows += case_rows
        del x, w, b, g, checked
        if device.torch_device == "cuda":
            torch.cuda.empty_cache()
    if bar:
        bar.close()
    return rows


def _derived(row: dict, spec: GpuSpec | None, dtype: str, precision: str) -> dict:
    s = row["ms"] / 1e3
    out = {"tflops": row["flops"] / s / 1e12, "gbs": row["min_bytes_model"] / s / 1e9}
    if spec is not None:
        e = ELEMENT_SIZE[dtype]
        mode = "fwd" if row["mode"] == "nograd" else row["mode"]
        roof = model.roofline_time_s(model.kernels("fused-min", mode, row["M"], row["D"], e), spec, dtype, precision)
        out.update(roofline_ms_model=roof * 1e3, roofline_pct=100 * roof / s)
    return out


def _speedups(rows: list[dict]) -> None:
    """speedup_vs_<peer> = peer's ms / this row's ms, within one (case, mode)."""
    by_mode: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], {})[r["impl"]] = r
    for impls in by_mode.values():
        for impl, r in impls.items():
            for peer, pr in impls.items():
                if peer != impl and r.get("ms") and pr.get("ms"):
                    r[f"speedup_vs_{peer}"] = pr["ms"] / r["ms"]


# ---------------------------------------------------------------------------------------------
# Output


def markdown(rows: list[dict]) -> str:
    from .report import markdown_table
    heads = ["impl", "mode", "dtype", "M", "D", "ms p50 [p20-p80]", "TFLOP/s", "GB/s (min-bytes)",
             "% roofline", "vs eager", "vs compile", "vs max-autotune", "peak MB", "parity"]
    body = []
    for r in rows:
        ms = r.get("ms")
        span = f"{ms:.4f} [{r['ms_p20']:.4f}-{r['ms_p80']:.4f}]" if ms else (r.get("error") or "-")[:40]
        sp = [f"{r[k]:.2f}x" if r.get(k) else "-" for k in
              ("speedup_vs_eager", "speedup_vs_compile", "speedup_vs_compile-max-autotune")]
        body.append([r["impl"], r["mode"], r["dtype"], r["M"], r["D"], span, r.get("tflops"), r.get("gbs"),
                     r.get("roofline_pct"), *sp, r.get("peak_mem_mb"), r.get("parity")])
    return markdown_table(heads, body)


def write_outputs(rows: list[dict], out_dir: Path, csv_path: Path | None = None, plots: bool = True) -> dict:
    """Upsert the CSV, write the markdown table of this run, and draw the plots from the CSV."""
    from .report import plot_gpu, upsert_csv
    out_dir = Path(out_dir)
    csv_path = Path(csv_path) if csv_path else out_dir / "gpu_results.csv"
    all_rows = upsert_csv(csv_path, rows, CSV_COLUMNS)
    md = out_dir / "gpu_results.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    gpu = rows[0]["gpu"] if rows else "?"
    kind = "measured on the GPU" if rows and rows[0].get("measured") else "NOT a GPU measurement (stand-in)"
    md.write_text(f"# fusedres bench: {gpu} ({kind})\n\n{markdown(rows)}\n")
    pngs = plot_gpu(all_rows, out_dir / "plots", gpu) if plots and rows else []
    return {"csv": csv_path, "markdown": md, "plots": pngs}
