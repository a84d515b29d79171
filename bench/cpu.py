"""CPU mode (no CUDA): measured memory traffic, a read of Inductor's code, and a roofline MODEL.

What is measured here, per call of the block at one size:

- **fused**: the real Triton kernels run in Triton's interpreter under
  :class:`fusedres.traffic.InterpreterTraffic`: exact request bytes (every active lane of every
  load and store, tile re-reads included), unique bytes (distinct addresses), dot FLOPs;
- **eager**: the reference block under :class:`bench.counters.DispatchTraffic`: the bytes of every
  aten op's tensor inputs and outputs;
- **torch.compile**: not measurable here (Inductor emits C++ on a CPU and its byte metric stays
  0). What Inductor generated on this CPU is read from its code (:mod:`bench.inductor_probe`), and
  the GPU figures are the MODEL in :mod:`bench.model`.

Every time figure in CPU mode is a roofline MODEL (``max(bytes / bandwidth, FLOPs / peak)`` per
kernel) and is labelled so; no GPU time is printed or written (``ms`` is null, ``measured`` false).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model
from .model import ELEMENT_SIZE, PROJECTION_GPUS, Kernel

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FUSED_KERNELS = {"fwd": ("residual_fwd_kernel",), "bwd": ("residual_dx_kernel", "residual_dw_kernel")}
MB = 1e6


@dataclass
class Traffic:
    """One implementation and mode: bytes (measured or model) and the kernels they come from."""
    impl: str
    mode: str
    source: str                     # human-readable provenance
    measured_bytes: bool            # True: counted on this machine; False: model
    bytes_read: int
    bytes_written: int
    flops: int
    kernels: list                   # Kernel-like (bytes, flops) used for the roofline projection
    unique_read: int | None = None
    unique_written: int | None = None

    @property
    def bytes_total(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def unique_bytes(self) -> int | None:
        if self.unique_read is None:
            return None
        return self.unique_read + self.unique_written

    @property
    def traffic(self) -> int:
        """The figure to compare and project: unique bytes where known (a perfect cache), else total."""
        return self.unique_bytes if self.unique_bytes is not None else self.bytes_total


@dataclass
class CpuResult:
    M: int
    D: int
    dtype: str
    traffic: dict = field(default_factory=dict)          # (impl, mode) -> Traffic
    parity: dict = field(default_factory=dict)           # name -> Parity
    probes: list = field(default_factory=list)           # inductor_probe.ProbeResult
    fused_launches: list = field(default_factory=list)
    violations: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)          # stage -> seconds (wall, this CPU)


# ---------------------------------------------------------------------------------------------
# Inputs and measurements


def make_inputs(M: int, D: int, dtype: torch.dtype, seed: int = 0):
    """x, g ~ N(0, 1); W, b ~ U(-1/sqrt(D), 1/sqrt(D)) as nn.Linear initialises them."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(D)
    x = torch.randn(M, D, generator=gen).to(dtype)
    w = ((torch.rand(D, D, generator=gen) * 2 - 1) * bound).to(dtype)
    b = ((torch.rand(D, generator=gen) * 2 - 1) * bound).to(dtype)
    g = torch.randn(M, D, generator=gen).to(dtype)
    return x, w, b, g


def require_interpreter() -> None:
    import fusedres
    if fusedres.backend_for("cpu") != "triton":
        raise RuntimeError(
            "bench CPU mode measures the fused kernels in Triton's interpreter, but fusedres runs the eager "
            "reference on CPU tensors in this process: TRITON_INTERPRET=1 must be set before triton or fusedres "
            "is imported (python -m bench sets it itself when CUDA is absent)")


def measure_fused(x, w, b, g, progress: bool = True):
    """Run the fused forward and backward in the interpreter under the traffic instrument.
    Returns ``(InterpreterTraffic, outputs)`` with outputs ``{"y", "dx", "dW", "db"}``."""
    import fusedres
    from fusedres.traffic import InterpreterTraffic

    require_interpreter()
    bar = _program_bar(progress)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with InterpreterTraffic(progress=bar.update if bar else None) as t:
        y = fusedres.fused_residual(xs, ws, bs)
        dx, dw, db = torch.autograd.grad(y, (xs, ws, bs), g)
    if bar:
        bar.close()
    names = {launch.kernel for launch in t.launches}
    expected = set(FUSED_KERNELS["fwd"] + FUSED_KERNELS["bwd"])
    if not expected <= names:
        raise RuntimeError(f"the fused path launched {sorted(names)}, expected {sorted(expected)}: "
                           "the Triton kernels did not all run")
    return t, {"y": y.detach(), "dx": dx, "dW": dw, "db": db}


class _ProgramBar:
    """A tqdm bar over interpreted programs, one segment per kernel launch."""

    def __init__(self, bar):
        self.bar = bar
        self.launch = None

    def update(self, kernel: str, index: int, total: int) -> None:
        if index == 0:
            self.bar.total += total
            self.bar.set_postfix_str(kernel, refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def _program_bar(progress: bool):
    if not progress:
        return None
    from .report import progress_bar
    bar = progress_bar(total=0, desc="fused kernels in the Triton interpreter", unit="program", leave=False)
    if bar is None or bar.disable:          # no tqdm, or stderr is not a TTY: no per-program callback
        if bar is not None:
            bar.close()
        return None
    return _ProgramBar(bar)


def fused_traffic(t, mode: str) -> Traffic:
    names = FUSED_KERNELS["fwd"] + FUSED_KERNELS["bwd"] if mode == "full" else FUSED_KERNELS[mode]
    launches = t.select(names)
    ks = [Kernel(lc.kernel, lc.unique_read, lc.unique_written, lc.dot_flops) for lc in launches]
    return Traffic("fused", mode, "measured: Triton interpreter instrument (fusedres.traffic)", True,
                   sum(lc.bytes_read for lc in launches), sum(lc.bytes_written for lc in launches),
                   sum(lc.dot_flops for lc in launches), ks,
                   sum(lc.unique_read for lc in launches), sum(lc.unique_written for lc in launches))


def measure_eager(x, w, b, g) -> dict[str, Traffic]:
    """The eager reference's forward and backward under the aten dispatch byte counter."""
    from fusedres import residual_reference

    from .counters import DispatchTraffic

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with DispatchTraffic() as fwd:
        y = residual_reference(xs, ws, bs)
    with DispatchTraffic() as bwd:
        torch.autograd.grad(y, (xs, ws, bs), g)
    out = {}
    for mode, ops in (("fwd", fwd.ops), ("bwd", bwd.ops), ("full", fwd.ops + bwd.ops)):
        out[mode] = Traffic("eager", mode, "measured: aten dispatch byte counter (bench.counters)", True,
                            sum(o.bytes_read for o in ops), sum(o.bytes_written for o in ops),
                            sum(o.flops for o in ops), [Kernel(o.op, o.bytes_read, o.bytes_written, o.flops)
                                                        for o in ops])
    return out


def model_traffic(impl: str, mode: str, M: int, D: int, e: int) -> Traffic:
    ks = model.kernels(impl, mode, M, D, e)
    src = "model: " + model.DESCRIPTIONS[impl] + (" (not measured)" if impl != "fused-min" else "")
    return Traffic(impl, mode, src, False, sum(k.read for k in ks), sum(k.written for k in ks),
                   sum(k.flops for k in ks), ks)


# ---------------------------------------------------------------------------------------------
# The run


def run_cpu(M: int = 2048, D: int = 512, dtype: str = "fp32", seed: int = 0, probe: bool = True,
            progress: bool = True) -> CpuResult:
    """Measure, read and model everything of CPU mode at one size (no output written)."""
    from . import parity as parity_mod

    res = CpuResult(M, D, dtype)
    e = ELEMENT_SIZE[dtype]
    x, w, b, g = make_inputs(M, D, DTYPES[dtype], seed)

    if probe:
        from .inductor_probe import probe as run_probe
        t0 = time.perf_counter()
        modes = ("default", "max-autotune")
        it = modes
        if progress:
            from .report import progress_bar
            bar = progress_bar(iterable=modes, desc="torch.compile on this CPU (read the generated code)",
                               unit="mode", leave=False)
            it = modes if bar is None else bar
        res.probes = [run_probe(m) for m in it]
        res.timings["inductor probe"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eager = measure_eager(x, w, b, g)
    res.timings["eager dispatch counter"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    t, outputs = measure_fused(x, w, b, g, progress)
    res.timings["fused in the interpreter"] = time.perf_counter() - t0
    res.fused_launches = list(t.launches)
    res.violations = t.violations

    t0 = time.perf_counter()
    res.parity = parity_mod.Baseline(x, w, b, g).check(outputs)
    res.timings["parity check"] = time.perf_counter() - t0

    for mode in model.MODES:
        res.traffic[("fused", mode)] = fused_traffic(t, mode)
        res.traffic[("eager", mode)] = eager[mode]
        for impl in ("fused-min", "compile", "compile-max-autotune", "compile-max-autotune+prologue"):
            res.traffic[(impl, mode)] = model_traffic(impl, mode, M, D, e)
    return res


# ---------------------------------------------------------------------------------------------
# Projection (MODEL)


def projected_us(tr: Traffic, spec, measured_dtype: str, project_dtype: str) -> float:
    """MODEL: roofline time in microseconds of ``tr``'s kernels on ``spec``, in ``project_dtype``.

    Bytes measured in one dtype scale exactly with the element size (every tensor of the block
    has the same dtype), so the projection to bf16 of an fp32 measurement halves its bytes."""
    precision = "high" if project_dtype == "tf32" else "highest"
    dt = "fp32" if project_dtype == "tf32" else project_dtype
    scale = ELEMENT_SIZE[dt] / ELEMENT_SIZE[measured_dtype]
    ks = [Kernel(k.name, round(k.read * scale), round(k.written * scale), k.flops) for k in tr.kernels]
    return model.roofline_time_s(ks, spec, dt, precision) * 1e6


# ---------------------------------------------------------------------------------------------
# MODEL v2 (bench.model, bench.plan): wave-quantised compute, HBM, L2, launch latency
#
# Fused: each kernel in its plan-chosen config on the named GPU (fwd; dx, dW and, if it splits, the
# reduce). Its L2 term takes the interpreter's MEASURED request bytes (every active lane of every load
# and store) where the interpreter ran the same output tile unsplit, scaled to the projection dtype; else the
# request-bytes formula at the chosen tile, times the ratio measured / formula at the tile the
# interpreter ran (:func:`fused_l2_check`; 1.000 when the formula is exact, which the tests check).
# Eager and torch.compile: their kernels (eager: the measured aten ops; compile: the formulas) at FULL
# FILL: cuBLAS picks its own split-K, so their GEMMs pay no wave quantisation; their L2 term is their
# bytes plus their GEMMs' operand re-reads at a 128 x 128 output tile (bench.model.v2_full_fill), the
# same accounting as the fused kernels'. MODEL, never a measurement.

V2_GPUS = {"H100 SXM": "h100", "A100 SXM 80GB": "a100", "H200 SXM": "h200"}
_V2_KINDS = {"fwd": ("fwd",), "bwd": ("dx", "dw", "dw_reduce"), "full": ("fwd", "dx", "dw", "dw_reduce")}


def fused_l2_check(res: CpuResult) -> dict:
    """Per fused kernel measured here (fwd, dx, dw): the config the interpreter ran (its per-size
    config, checked against the launch grid), the MEASURED request bytes, the v2 formula's request
    bytes at that config and size, and their ratio (None where the grid does not match the plan)."""
    from fusedres.aot import config_name
    from fusedres.kernels import configs, plan

    e = ELEMENT_SIZE[res.dtype]
    M, D = res.M, res.D
    out = {}
    for kind in ("fwd", "dx", "dw"):
        launches = [lc for lc in res.fused_launches if lc.kernel == f"residual_{kind}_kernel"]
        if not launches:
            continue
        measured = sum(lc.bytes_read + lc.bytes_written for lc in launches)
        c = configs.interpreter_config(kind, M, D)
        sms = plan.INTERPRETER_SMS
        p = {"fwd": plan.plan_fwd, "dx": plan.plan_dx, "dw": plan.plan_dw}[kind](sms, M, D, D, c)
        k = _v2_kernel(kind, M, D, e, c.kwargs, p)
        grid_ok = len(launches) == 1 and math.prod(launches[0].grid or (0,)) == p.programs
        out[kind] = dict(config=config_name(kind, c), tile=_tile_key(kind, c.kwargs), splits=p.splits,
                         programs=p.programs, measured=measured, formula=k.l2_bytes,
                         ratio=(measured / k.l2_bytes) if grid_ok and k.l2_bytes else None)
    return out


def _tile_key(kind: str, kw: dict) -> tuple:
    """The output tile of a kernel's programs: its request bytes depend on it (and on dW's split
    count), not on the reduction's step (bench.model.v2_fwd / v2_dx / v2_dw)."""
    return tuple(kw[n] for n in {"fwd": ("BLOCK_M", "BLOCK_N"), "dx": ("BLOCK_M", "BLOCK_K"),
                                 "dw": ("BLOCK_K", "BLOCK_N")}[kind])


def _v2_kernel(kind, M, D, e, kw, p):
    if kind == "fwd":
        return model.v2_fwd(M, D, e, kw, p.programs, p.waves)
    if kind == "dx":
        return model.v2_dx(M, D, e, kw, p.programs, p.waves)
    return model.v2_dw(M, D, e, kw, p.programs, p.waves, p.splits, p.tiles_per_split)


def fused_v2_kernels(res: CpuResult, gpu: str, project_dtype: str, measured: bool = True) -> list[dict]:
    """The fused kernels' MODEL v2 on ``gpu`` ("h100", "a100", "h200"): the plan's chosen records of
    fwd, dx, dw and dw_reduce (if it launches), each with ``l2_source`` and ``model_us`` recomputed
    with the L2 term described above (``measured=False``: the formulas only)."""
    import dataclasses

    from .plan import plan_records

    dt = model.v2_dtype(project_dtype)
    gv2 = model.GPUS_V2[gpu]
    scale = ELEMENT_SIZE[dt] / ELEMENT_SIZE[res.dtype]
    check = fused_l2_check(res) if measured else {}
    out = []
    for r in plan_records(gpu, res.M, res.D, dt, stack_layers=None):
        if not r["chosen"] or r["kernel"] not in _V2_KINDS["full"]:
            continue
        k = r["_k"]
        src = "formula"
        c = check.get(r["kernel"])
        if c is not None and c["ratio"] is not None:
            kw = _config_kwargs(r["kernel"], r["config"], ELEMENT_SIZE[dt])
            if kw is not None and _tile_key(r["kernel"], kw) == c["tile"] and r["splits"] == c["splits"]:
                k = dataclasses.replace(k, l2_bytes=round(c["measured"] * scale))
                src = "measured"
            else:
                k = dataclasses.replace(k, l2_bytes=round(k.l2_bytes * c["ratio"]))
                src = f"formula x {c['ratio']:.3f} (measured / formula at the interpreter's tile)"
        terms = model.terms_us(k, gv2, dt)
        out.append(dict(kernel=r["kernel"], config=r["config"], programs=r["programs"], splits=r["splits"],
                        waves=r["waves"], fill=r["fill"], l2_source=src, l2_bytes=k.l2_bytes,
                        **{f"{t}_us": v for t, v in terms.items()}, model_us=model.time_us(k, gv2, dt), _k=k))
    return out


def _config_kwargs(kind: str, name: str, elem: int) -> dict | None:
    from fusedres.aot import config_name
    from fusedres.kernels import configs
    for c in configs.shipped_configs(kind, elem):
        if config_name(kind, c) == name:
            return c.kwargs
    return None


def v2_us(res: CpuResult, impl: str, mode: str, gpu: str, project_dtype: str) -> float:
    """MODEL v2 time, us, of ``impl`` in ``mode`` on ``gpu``: fused (measured L2) and fused-min
    (formulas) from the plan's chosen configs; the peers' kernels at full fill."""
    if impl in ("fused", "fused-min"):
        ks = fused_v2_kernels(res, gpu, project_dtype, measured=impl == "fused")
        return sum(k["model_us"] for k in ks if k["kernel"] in _V2_KINDS[mode])
    dt = model.v2_dtype(project_dtype)
    scale = ELEMENT_SIZE[dt] / ELEMENT_SIZE[res.dtype]
    tr = res.traffic[(impl, mode)]
    ks = [Kernel(k.name, round(k.read * scale), round(k.written * scale), k.flops) for k in tr.kernels]
    return model.peer_v2_us(ks, model.GPUS_V2[gpu], dt, res.M, res.D)


def records(res: CpuResult, project_dtype: str = "bf16") -> list[dict]:
    """The JSON records of CPU mode (``measured`` false and ``ms`` null throughout)."""
    out = []
    e = ELEMENT_SIZE[res.dtype]
    v2 = {key: {name: round(v2_us(res, key[0], key[1], gpu, project_dtype), 3) for name, gpu in V2_GPUS.items()}
          for key in res.traffic}
    for (impl, mode), tr in res.traffic.items():
        minimum = model.minimum_bytes(mode, res.M, res.D, e)
        proj = {spec.name: round(projected_us(tr, spec, res.dtype, project_dtype), 3) for spec in PROJECTION_GPUS}
        fused_proj = {spec.name: projected_us(res.traffic[("fused", mode)], spec, res.dtype, project_dtype)
                      for spec in PROJECTION_GPUS}
        out.append({
            "impl": impl, "mode": mode, "M": res.M, "D": res.D, "dtype": res.dtype,
            "bytes_read": tr.bytes_read, "bytes_written": tr.bytes_written,
            "unique_bytes": tr.unique_bytes, "unique_read": tr.unique_read, "unique_written": tr.unique_written,
            "bytes_source": "measured" if tr.measured_bytes else "model",
            "source": tr.source,
            "flops": tr.flops,
            "min_bytes_model": minimum,
            "traffic_over_min": tr.traffic / minimum,
            "kernels": [k.name for k in tr.kernels],
            "measured": False,
            "ms": None,
            "model_projection": {
                "note": f"MODEL, not a measurement: per-kernel roofline max(bytes/BW, FLOPs/peak), summed; "
                        f"{project_dtype} peaks; bytes scaled from {res.dtype} to {project_dtype}",
                "dtype": project_dtype,
                "time_us_model": proj,
                "fused_speedup_model": {k: (proj[k] / fused_proj[k] if fused_proj[k] else None) for k in proj},
            },
            "model_v2": {
                "note": "MODEL v2, not a measurement: per launch max(wave-quantised compute, HBM, L2) + launch "
                        "latency, summed; fused kernels in the plan's chosen configs (L2: measured request bytes "
                        "where the interpreter ran that tile, else the formula); eager's and torch.compile's "
                        "kernels at full fill (cuBLAS picks its own split-K)",
                "dtype": project_dtype,
                "time_us_model": v2[(impl, mode)],
                "speedup_over_eager_model": {k: (v2[("eager", mode)][k] / t if t else None)
                                             for k, t in v2[(impl, mode)].items()},
            },
        })
    return out


# ---------------------------------------------------------------------------------------------
# Text


def _mb(n):
    return None if n is None else n / MB


def traffic_table(res: CpuResult) -> str:
    from .report import markdown_table
    e = ELEMENT_SIZE[res.dtype]
    unit = res.M * res.D * e
    order = ["fused", "eager", "compile", "compile-max-autotune", "compile-max-autotune+prologue", "fused-min"]
    rows = []
    for mode in model.MODES:
        minimum = model.minimum_bytes(mode, res.M, res.D, e)
        for impl in order:
            tr = res.traffic[(impl, mode)]
            label = "measured" if tr.measured_bytes else "MODEL"
            rows.append([impl, mode, label, _mb(tr.bytes_read), _mb(tr.bytes_written), _mb(tr.bytes_total),
                         _mb(tr.unique_bytes), f"{tr.traffic / unit:.2f}", f"{tr.traffic / minimum:.2f}x"])
    return markdown_table(["impl", "mode", "bytes", "read MB", "written MB", "total MB (fused: requests)", "unique MB",
                           "traffic / (M*D*e)", "traffic / fused minimum"], rows)


def ratio_lines(res: CpuResult) -> list[str]:
    e = ELEMENT_SIZE[res.dtype]
    lines = []
    parts = []
    for mode in model.MODES:
        ea, fu = res.traffic[("eager", mode)], res.traffic[("fused", mode)]
        parts.append(f"{mode} {ea.traffic / fu.traffic:.2f}x")
    lines.append("eager / fused traffic (both measured; fused = unique bytes): " + ", ".join(parts))
    checks = []
    for mode, formula in (("fwd", "e(2MD + D^2 + D)"), ("bwd", "e(5MD + 2D^2 + D)")):
        fu = res.traffic[("fused", mode)]
        minimum = model.minimum_bytes(mode, res.M, res.D, e)
        dev = fu.unique_bytes / minimum - 1
        checks.append(f"{mode} {fu.unique_bytes} B vs {formula} = {minimum} B ({dev:+.2%}, "
                      f"{'within' if abs(dev) <= 0.01 else 'OUTSIDE'} 1%)")
    lines.append("fused unique bytes vs compulsory minimum: " + "; ".join(checks))
    req = [f"{m} {res.traffic[('fused', m)].bytes_total / res.traffic[('fused', m)].unique_bytes:.2f}x"
           for m in model.MODES]
    lines.append("fused request bytes / unique bytes (tile re-reads that a cache must absorb): " + ", ".join(req))
    return lines


def probe_table(res: CpuResult) -> str:
    from .report import markdown_table
    rows = []
    for p in res.probes:
        impl = "compile" if p.mode == "default" else "compile-max-autotune"
        if p.error:
            rows.append([p.mode, "-", f"probe failed: {p.error[:80]}", "-", "-", "-"])
            continue
        for direction, graph in (("fwd", p.forward), ("bwd", p.backward)):
            ks = model.kernels(impl, direction, p.M, p.D, 1)
            gpu_multiple = sum(k.bytes for k in ks) / (p.M * p.D)
            mult = p.md_multiple(graph)
            rows.append([p.mode, direction, graph.describe() if graph else "-",
                         f"{mult:.2f}" if mult is not None else "unparsed",
                         "; ".join(k.name for k in ks), f"{gpu_multiple:.2f}"])
    return markdown_table(["torch.compile mode", "graph", f"generated on this CPU (read from the code)",
                           "elems / MD (code)", "GPU MODEL kernels", "elems / MD (model)"], rows)


def projection_table(res: CpuResult, project_dtype: str) -> str:
    """Per impl and mode, per named GPU: the v1 byte-roofline time (one column), the MODEL v2 time and
    the v2 speedup over eager (eager's v2 time / this one's; the fused rows' is the fused speedup)."""
    from .report import markdown_table
    rows = []
    order = ["fused", "eager", "compile", "compile-max-autotune", "compile-max-autotune+prologue", "fused-min"]
    for mode in model.MODES:
        eager_v2 = {s.name: v2_us(res, "eager", mode, V2_GPUS[s.name], project_dtype) for s in PROJECTION_GPUS}
        for impl in order:
            tr = res.traffic[(impl, mode)]
            row = [impl, mode, "measured" if tr.measured_bytes else "model"]
            for s in PROJECTION_GPUS:
                t2 = v2_us(res, impl, mode, V2_GPUS[s.name], project_dtype)
                row += [f"{projected_us(tr, s, res.dtype, project_dtype):.3g}", f"{t2:.3g}",
                        f"{eager_v2[s.name] / t2:.2f}x"]
            rows.append(row)
    heads = ["impl", "mode", "bytes"]
    for s in PROJECTION_GPUS:
        heads += [f"{s.name} v1 us", f"{s.name} v2 us", f"{s.name} v2 speedup over eager"]
    return markdown_table(heads, rows)


def l2_check_table(res: CpuResult) -> str:
    """The fused kernels' request bytes: MEASURED here against the v2 formula at the config run."""
    from .report import markdown_table
    rows = []
    for kind, c in fused_l2_check(res).items():
        rows.append([kind, c["config"], c["programs"], f"{c['measured']:,}", f"{c['formula']:,}",
                     "-" if c["ratio"] is None else f"{c['ratio']:.4f}"])
    return markdown_table(["kernel", "config run (interpreter)", "programs", "request bytes (measured)",
                           "request bytes (v2 formula)", "measured / formula"], rows)


def v2_kernel_table(res: CpuResult, project_dtype: str) -> str:
    """The fused kernels' MODEL v2 per named GPU: chosen config, fill, the three terms, the L2 source."""
    from .report import markdown_table
    rows = []
    for s in PROJECTION_GPUS:
        for k in fused_v2_kernels(res, V2_GPUS[s.name], project_dtype):
            rows.append([s.name, k["kernel"], k["config"], k["programs"], k["splits"], f"{k['fill']:.2f}",
                         f"{k['compute_us']:.3g}", f"{k['hbm_us']:.3g}", f"{k['l2_us']:.3g}", f"{k['model_us']:.3g}",
                         k["l2_source"]])
    return markdown_table(["GPU", "kernel", "chosen config", "programs", "splits", "fill", "compute us", "HBM us",
                           "L2 us", "v2 us (MODEL)", "L2 bytes from"], rows)


def ceiling_table(M: int = 65536, dtype: str = "bf16") -> str:
    """v1 ceiling speedups (byte roofline) and, beside them, the MODEL v2 speedups of the fused kernels
    (plan-chosen configs, formulas) over eager (full fill), fwd+bwd."""
    from .plan import fused_v2_us
    from .report import markdown_table
    rows = []
    H100, A100, H200 = PROJECTION_GPUS
    for D in (256, 512, 1024, 2048, 4096, 8192):
        v2 = []
        for gpu in ("h100", "a100", "h200"):
            eager = model.peer_v2_us(model.kernels("eager", "full", M, D, ELEMENT_SIZE[dtype]), model.GPUS_V2[gpu],
                                     dtype, M, D)
            v2.append(f"{eager / fused_v2_us(gpu, M, D, dtype, 'full'):.2f}x")
        rows.append([D] + [f"{model.ceiling_speedup(p, 'full', M, D, dtype, H100):.2f}x"
                           for p in ("eager", "compile", "compile-max-autotune", "compile-max-autotune+prologue")]
                    + [f"{model.ceiling_speedup('eager', 'full', M, D, dtype, s):.2f}x" for s in (A100, H200)] + v2)
    return markdown_table(["D", "H100 vs eager", "H100 vs compile", "H100 vs max-autotune",
                           "H100 vs max-autotune+prologue", "A100 vs eager", "H200 vs eager",
                           "H100 v2 vs eager", "A100 v2 vs eager", "H200 v2 vs eager"], rows)


def parity_line(res: CpuResult) -> str:
    from .parity import all_ok, summary
    state = "PASS" if all_ok(res.parity) else "FAIL"
    return f"parity (fused in the interpreter vs eager, fp64 reference, the parity rule): {state}: {summary(res.parity)}"


# ---------------------------------------------------------------------------------------------
# Plots


def _save_bars(fig, ax, path: Path) -> Path:
    """The bar charts' common finish: legend, grid, tight layout, PNG, figure closed."""
    from .report import _pyplot
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_cpu(res: CpuResult, out_dir: Path, project_dtype: str) -> list[Path]:
    """The two bar charts; none (``[]``) without matplotlib (see report.PLOTS_HINT)."""
    from .report import _pyplot, have_matplotlib
    if not have_matplotlib():
        return []
    plt = _pyplot()
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    bars = [("fused", "unique", "fused unique (measured)"),
            ("fused", "requests", "fused requests (measured)"),
            ("eager", "total", "eager (measured)"),
            ("compile", "total", "compile default (MODEL)"),
            ("compile-max-autotune", "total", "max-autotune (MODEL)"),
            ("compile-max-autotune+prologue", "total", "max-autotune+prologue (MODEL)"),
            ("fused-min", "total", "compulsory minimum (MODEL)")]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    xs = np.arange(len(model.MODES))
    width = 0.8 / len(bars)
    for i, (impl, kind, label) in enumerate(bars):
        vals = []
        for mode in model.MODES:
            tr = res.traffic[(impl, mode)]
            vals.append((tr.unique_bytes if kind == "unique" else tr.bytes_total) / MB)
        ax.bar(xs + (i - len(bars) / 2 + 0.5) * width, vals, width, label=label,
               hatch="//" if "MODEL" in label else None, edgecolor="black", linewidth=0.4)
    ax.set_xticks(xs, model.MODES)
    ax.set_ylabel("MB per call")
    ax.set_title(f"Memory traffic per call, M={res.M} D={res.D} {res.dtype}: measured on CPU; hatched = MODEL")
    paths.append(_save_bars(fig, ax, out_dir / "cpu_bytes.png"))

    impls = ["fused", "eager", "compile", "compile-max-autotune", "compile-max-autotune+prologue"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    xs = np.arange(len(PROJECTION_GPUS))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [projected_us(res.traffic[(impl, "full")], s, res.dtype, project_dtype) for s in PROJECTION_GPUS]
        src = "measured bytes" if res.traffic[(impl, "full")].measured_bytes else "model bytes"
        ax.bar(xs + (i - len(impls) / 2 + 0.5) * width, vals, width, label=f"{impl} ({src})",
               edgecolor="black", linewidth=0.4)
    ax.set_xticks(xs, [s.name for s in PROJECTION_GPUS])
    ax.set_ylabel("projected us per fwd+bwd (MODEL)")
    ax.set_title(f"MODEL, not a measurement: roofline projection of fwd+bwd, {project_dtype}, "
                 f"M={res.M} D={res.D}")
    paths.append(_save_bars(fig, ax, out_dir / "cpu_model_time.png"))
    return paths
