"""``python -m bench --gpu-check``: a first GPU run that fits in minutes.

- **Parity, compiled**: every single-block kernel variant (bias, Python-float alpha without bias,
  learnable tensor alpha with dalpha, projection shortcut with dP, two-level rows) in every dtype
  (fp16, bf16, fp32 IEEE, tf32, and autocast: fp32 activations meeting bf16 or fp16 GEMMs), and
  the narrow stack (every width in bf16; each dtype at D = 64; training, inference and the
  atomic backward), forward and backward, held to the parity rule against fp64.
- **Pinned configs**: one config per kernel and operand dtypes
  (:func:`fusedres.kernels.configs.pin_configs`), so nothing autotunes and each variant compiles
  once. The stack's configs are fixed anyway.
- **A quick timing** of the fused kernels and eager at two bf16 sizes (fwd, bwd, full), with the
  device's timer (``triton.testing.do_bench`` on a GPU), beside the roofline MODEL's time of the
  fused minimum (``bench/model.py``, labelled MODEL). The configs are pinned, not tuned.
- **A JSON report**: every case, the timings, versions and the wall time.

Its cost on a first run is the compiles: :func:`planned_compiles` counts them (each case is its
own specialisation of each kernel it launches); docs/benchmarks.md turns that count into the runtime
estimate. The same pipeline runs on a CPU in the interpreter with a stand-in timer (the tests do);
its rows then say ``measured: false`` and carry the stand-in's name, never a GPU's.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from fusedres.kernels import configs

from . import model

#: name -> (activation dtype, parameter dtype, autocast dtype or None, fp32 matmul precision)
DTYPES = {
    "fp16": (torch.float16, torch.float16, None, "ieee"),
    "bf16": (torch.bfloat16, torch.bfloat16, None, "ieee"),
    "fp32": (torch.float32, torch.float32, None, "ieee"),
    "tf32": (torch.float32, torch.float32, None, "tf32"),
    "autocast-bf16": (torch.float32, torch.float32, torch.bfloat16, "ieee"),
    "autocast-fp16": (torch.float32, torch.float32, torch.float16, "ieee"),
}
#: single-block variants: name -> (bias, alpha: None / "float" / "tensor", projection, two-level rows)
BLOCK_VARIANTS = {
    "base": (True, None, False, False),
    "alpha-float-nobias": (False, "float", False, False),
    "alpha-tensor": (True, "tensor", False, False),
    "projection": (True, "tensor", True, False),
    "two-level": (True, None, False, True),
}
#: stack variants: name -> kernels launched (forward training or inference; deterministic or atomic backward)
STACK_VARIANTS = {
    "train": ("residual_stack_fwd", "residual_stack_bwd", "residual_stack_reduce"),
    "inference": ("residual_stack_fwd",),
    "atomic": ("residual_stack_fwd", "residual_stack_bwd", "residual_stack_reduce"),   # the reduce casts dW
}
STACK_DTYPES = ("fp16", "bf16", "fp32", "tf32")   # the stack under autocast is gated, not checked here yet
TIMING_MODES = ("fwd", "bwd", "full")


@dataclass
class CheckPlan:
    dtypes: tuple = tuple(DTYPES)
    block_variants: tuple = tuple(BLOCK_VARIANTS)
    M: int = 300                      # ragged: not a multiple of 16 or of any tile
    D: int = 96                       # several K tiles of 64 or 16, and a partial one of 64
    stack_widths: tuple = (16, 32, 64, 128)    # all of them in bf16 (training)
    stack_width: int = 64                      # the width of every other stack case
    stack_M: int = 300
    stack_L: int = 3
    timing_sizes: tuple = ((8192, 1024), (65536, 4096))
    timing_dtype: str = "bf16"
    seed: int = 0

    def block_cases(self) -> list[tuple[str, str]]:
        return [(v, d) for d in self.dtypes for v in self.block_variants]

    def stack_cases(self) -> list[tuple[str, str, int]]:
        """The stack's cases; none where the installed triton does not ship the stack (older than
        ``configs.STACK_MIN_TRITON``; the report's header says so)."""
        if not configs.stack_supported():
            return []
        cases = [("train", "bf16", w) for w in self.stack_widths if "bf16" in self.dtypes]
        for d in (d for d in STACK_DTYPES if d in self.dtypes):
            for v in STACK_VARIANTS:
                if (v, d, self.stack_width) not in cases:
                    cases.append((v, d, self.stack_width))
        return cases


def planned_compiles(plan: CheckPlan) -> int:
    """Kernel specialisations a first run compiles: each block case launches fwd, dx and dW in a
    specialisation of its own (dtypes, operands, layout); the timing adds the bf16 base variant at
    16-divisible sizes; each stack case compiles its kernels not compiled by an earlier case (its
    width and operand class are constexprs; the training forward is the atomic case's forward too).
    Assumes ``stack_M`` spans several row tiles (more than one backward program)."""
    n = 3 * len(plan.block_cases()) + (3 if plan.timing_sizes else 0)
    seen = set()
    for variant, dtype, width in plan.stack_cases():
        for k in STACK_VARIANTS[variant]:
            save = variant != "inference" if k == "residual_stack_fwd" else None
            # the atomic backward reduces 1 slot, not one per program: a program count of 1 specialises
            det = variant != "atomic" if k != "residual_stack_fwd" else None
            # the reduce has no GEMM: fp32 and tf32 share it
            operands = str(DTYPES[dtype][1]) if k == "residual_stack_reduce" else dtype
            seen.add((k, operands, width, save, det))
    return n + len(seen)


@contextlib.contextmanager
def _numerics(dtype: str, device_type: str):
    """The fp32 matmul precision and autocast of a dtype variant."""
    _, _, amp, precision = DTYPES[dtype]
    with configs.fp32_matmul_precision_set(precision), \
            torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        yield


def _launched(since: dict) -> dict:
    from fusedres import kernels
    now = kernels.launch_counts()
    return {k: now[k] - since.get(k, 0) for k in now if now[k] != since.get(k, 0)}


# ---------------------------------------------------------------------------------------------
# Parity


def block_case(variant: str, dtype: str, device: str, M: int, D: int, seed: int = 0) -> dict:
    """One single-block variant in one dtype: fused, eager and fp64 (and the absolute-value scale)
    from the same rounded inputs, forward and backward, under the parity rule."""
    import fusedres
    from fusedres import kernels
    from fusedres.validate import parity

    act, param, amp, _ = DTYPES[dtype]
    has_bias, alpha_kind, proj, two_level = BLOCK_VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    N = D + 64 if proj else D
    if two_level:                      # [T, B, D] storage seen as [B, T, D]: two row strides
        x = torch.randn(M // 5, 5, D, generator=gen).transpose(0, 1)
    else:
        x = torch.randn(M, D, generator=gen)
    x[..., ::5] = 0                    # exact zeros, where relu'(0) = 1 would show
    bound = D ** -0.5
    w = torch.empty(N, D).uniform_(-bound, bound, generator=gen)
    b = torch.empty(N).uniform_(-bound, bound, generator=gen) if has_bias else None
    p = torch.empty(N, D).uniform_(-bound, bound, generator=gen) if proj else None
    alpha = {None: None, "float": 0.5, "tensor": torch.tensor(0.5)}[alpha_kind]
    g = torch.randn(*x.shape[:-1], N, generator=gen)

    def to(t, dt):
        if t is None:
            return None
        base = t._base if t._base is not None else t        # keep x's layout
        return base.to(device=device, dtype=dt).as_strided(t.shape, t.stride(), t.storage_offset())

    inputs = dict(x=to(x, act), weight=to(w, param), bias=to(b, param), proj_weight=to(p, param),
                  alpha=to(alpha, param) if isinstance(alpha, torch.Tensor) else alpha)
    g = g.to(device=device, dtype=act)

    def run(fn, cast=None, numerics=True):
        leaves = {k: (v if not isinstance(v, torch.Tensor) else (cast(v) if cast else v.detach().clone())
                      .requires_grad_()) for k, v in inputs.items() if v is not None}
        kwargs = {k: leaves[k] for k in ("alpha", "proj_weight") if k in leaves}
        with _numerics(dtype, torch.device(device).type) if numerics else contextlib.nullcontext():
            y = fn(leaves["x"], leaves["weight"], leaves.get("bias"), **kwargs)
            y.backward(cast(g) if cast else g)      # the backward reads the fp32 matmul precision too
        grads = {f"d{k}": v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}
        return {"y": y.detach(), **grads}

    before = kernels.launch_counts()
    fused = run(fusedres.fused_residual)
    launches = _launched(before)
    eager = run(fusedres.residual_reference)
    ref = run(fusedres.residual_reference, lambda t: t.detach().double(), numerics=False)
    inputs_abs = inputs
    inputs = {k: (v.abs() if isinstance(v, torch.Tensor) else (abs(v) if v is not None else None))
              for k, v in inputs_abs.items()}
    g = g.abs()
    scale = run(fusedres.residual_reference, lambda t: t.detach().double(), numerics=False)
    checks = {name: parity(fused[name], eager[name], ref[name], scale[name]) for name in fused}
    expected = {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}
    return _record("block", variant, dtype, checks, launches, expected, M=M, D=D)


def stack_case(variant: str, dtype: str, device: str, M: int, D: int, L: int, seed: int = 0) -> dict:
    """One stack variant in one dtype at width ``D``: the forward against the fp64 chain, and
    (training, atomic) the backward against an fp64 backward given the stack's own saved layer
    inputs (:func:`bench.stack.stack_parity`)."""
    import fusedres
    from fusedres import kernels
    from fusedres.validate import parity

    from .stack import stack_parity

    act, param, _, _ = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    bound = D ** -0.5
    x = torch.randn(M, D, generator=gen)
    x[:, ::5] = 0
    w = torch.empty(L, D, D).uniform_(-bound, bound, generator=gen)
    b = torch.empty(L, D).uniform_(-bound, bound, generator=gen)
    g = torch.randn(M, D, generator=gen)
    x, w, b, g = (t.to(device=device, dtype=act) for t in (x, w, b, g))
    with _numerics(dtype, torch.device(device).type):
        eager_y = fusedres.stack_reference(x, w, b)
        reference_y = fusedres.stack_reference(x.double(), w.double(), b.double())
        before = kernels.launch_counts()
        if variant == "inference":
            with torch.no_grad():
                y = fusedres.fused_residual_stack(x, w, b)
            checks = {"y": parity(y, eager_y, reference_y)}
            ok, detail = checks["y"].ok, f"y {'ok' if checks['y'].ok else 'FAIL'} ({checks['y']})"
        else:
            def fn(x, w, b):
                return fusedres.fused_residual_stack(x, w, b, deterministic=variant != "atomic")
            ok, detail = stack_parity("stack", fn, x, w, b, g, eager_y, reference_y)
        launches = _launched(before)
    expected = {k: 1 for k in STACK_VARIANTS[variant]}
    rec = _record("stack", variant, dtype, {}, launches, expected, M=M, D=D, L=L)
    rec["ok"] = ok and rec["launches_ok"]
    rec["detail"] = detail
    return rec


def _record(section, variant, dtype, checks, launches, expected, **size) -> dict:
    launches_ok = all(launches.get(k) == n for k, n in expected.items())
    ok = launches_ok and all(p.ok for p in checks.values())
    return dict(section=section, variant=variant, dtype=dtype, **size, ok=ok, launches=launches,
                launches_ok=launches_ok, error=None,
                checks={n: dict(ok=p.ok, fused_error=p.fused_error, eager_error=p.eager_error, bound=p.bound)
                        for n, p in checks.items()},
                detail="; ".join(f"{n} {'ok' if p.ok else 'FAIL'} ({p})" for n, p in checks.items()))


# ---------------------------------------------------------------------------------------------
# Timing


def time_cases(device, sizes, dtype: str = "bf16", seed: int = 0) -> list[dict]:
    """fused and eager at each (M, D) in fwd, bwd and full with the device's timer, beside the
    roofline MODEL of the fused minimum on the device's GPU spec."""
    import fusedres

    from .gpu import DTYPES as GPU_DTYPES, make_inputs, mode_fn

    rows = []
    e = model.ELEMENT_SIZE[dtype]
    for M, D in sizes:
        x, w, b, g = make_inputs(M, D, GPU_DTYPES[dtype], device.torch_device, seed)
        for mode in TIMING_MODES:
            row = dict(section="timing", M=M, D=D, dtype=dtype, mode=mode, gpu=device.name, measured=device.is_gpu,
                       config="pinned (not autotuned)", model_gpu=device.spec.name if device.spec else None,
                       model_ms=None)
            if device.spec is not None:
                row["model_ms"] = 1e3 * model.roofline_time_s(model.kernels("fused-min", mode, M, D, e), device.spec,
                                                              dtype)
            for impl, fn in (("fused", fusedres.fused_residual), ("eager", fusedres.residual_reference)):
                try:
                    row[f"{impl}_ms"] = device.time_ms(mode_fn(mode, fn, x, w, b, g))[1]
                except Exception as exc:  # noqa: BLE001 - reported, the check goes on
                    row[f"{impl}_ms"], row["error"] = None, f"{impl}: {type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
        del x, w, b, g
        if device.torch_device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# The check


@dataclass
class CheckResult:
    device: str
    measured: bool
    cases: list = field(default_factory=list)
    timing: list = field(default_factory=list)
    planned_compiles: int = 0
    compiled_kernels: int | None = None
    wall_s: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c["ok"] for c in self.cases)

    def as_json(self) -> dict:
        return dict(device=self.device, measured=self.measured, ok=self.ok, planned_compiles=self.planned_compiles,
                    compiled_kernels=self.compiled_kernels, wall_s=round(self.wall_s, 1), **self.meta,
                    cases=self.cases, timing=self.timing)


def compiled_kernels() -> int | None:
    """Compiled specialisations in the JIT caches of every fusedres kernel (None in the interpreter)."""
    from fusedres.kernels import residual_bwd, residual_fwd, residual_stack
    fns = (residual_fwd.residual_fwd_kernel, residual_bwd.residual_dx_kernel, residual_bwd.residual_dw_kernel,
           residual_stack.residual_stack_fwd_kernel, residual_stack.residual_stack_bwd_kernel,
           residual_stack.residual_stack_reduce_kernel)
    try:
        return sum(len(entry[0]) for fn in fns for entry in fn.device_caches.values())
    except (AttributeError, TypeError, IndexError):
        return None


def run_check(device, plan: CheckPlan | None = None, meta: dict | None = None, log=print) -> CheckResult:
    """Parity of every case with pinned configs, then the timing; ``device`` is a
    :class:`bench.gpu.Device` (the CUDA one, or a CPU stand-in in the interpreter)."""
    from fusedres.kernels import configs

    plan = plan or CheckPlan()
    t0 = time.perf_counter()
    res = CheckResult(device.name, device.is_gpu, planned_compiles=planned_compiles(plan), meta=dict(meta or {}))
    with configs.pin_configs():
        for variant, dtype in plan.block_cases():
            res.cases.append(_guarded(lambda: block_case(variant, dtype, device.torch_device, plan.M, plan.D,
                                                         plan.seed), "block", variant, dtype))
            log(_line(res.cases[-1]))
        for variant, dtype, width in plan.stack_cases():
            res.cases.append(_guarded(lambda: stack_case(variant, dtype, device.torch_device, plan.stack_M, width,
                                                         plan.stack_L, plan.seed), "stack", variant, dtype))
            log(_line(res.cases[-1]))
        if plan.timing_sizes:
            res.timing = time_cases(device, plan.timing_sizes, plan.timing_dtype, plan.seed)
    res.compiled_kernels = compiled_kernels() if device.is_gpu else None
    res.wall_s = time.perf_counter() - t0
    return res


def _guarded(fn, section, variant, dtype) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one broken variant must not hide the others
        return dict(section=section, variant=variant, dtype=dtype, ok=False, launches={}, launches_ok=False,
                    checks={}, detail="", error=f"{type(exc).__name__}: {str(exc)[:400]}")


def _line(c: dict) -> str:
    where = f"{c['section']} {c['variant']} {c['dtype']}" + (f" D={c['D']}" if c["section"] == "stack" else "")
    if c.get("error"):
        return f"  FAIL {where}: {c['error']}"
    if not c["launches_ok"]:
        return f"  FAIL {where}: launches {c['launches']} (the Triton kernels did not all run)"
    return f"  {'ok  ' if c['ok'] else 'FAIL'} {where}" + ("" if c["ok"] else f": {c['detail']}")


def timing_table(rows: list[dict]) -> str:
    from .report import markdown_table
    measured = bool(rows) and all(r["measured"] for r in rows)
    head = ["M", "D", "dtype", "mode", "fused ms" + ("" if measured else " (NOT a GPU)"),
            "eager ms" + ("" if measured else " (NOT a GPU)"), "fused MODEL ms (roofline, not measured)"]
    body = [[r["M"], r["D"], r["dtype"], r["mode"], r.get("fused_ms"), r.get("eager_ms"), r.get("model_ms")]
            for r in rows]
    return markdown_table(head, body)


def main(args) -> int:
    """``python -m bench --gpu-check`` (CUDA only): run the check, print it, write the JSON report."""
    import sys
    from pathlib import Path

    from .gpu import compiled_gpu_missing, cuda_device
    from .report import versions, write_json

    why = compiled_gpu_missing("python -m bench --gpu-check", "It checks the compiled kernels on a GPU; on a CPU "
                               "the test suite runs the same check in Triton's interpreter (tests/test_bench.py).")
    if why:
        print(why, file=sys.stderr)
        return 2
    device = cuda_device()
    meta = versions()
    plan = CheckPlan(seed=args.seed)
    print(f"fusedres GPU check on {device.name} (torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
          f"commit {meta['git_commit']}): {len(plan.block_cases())} single-block and {len(plan.stack_cases())} stack "
          f"cases with pinned configs, about {planned_compiles(plan)} kernel compiles on a first run", flush=True)
    if not configs.stack_supported():
        print(f"(no stack cases: triton {meta['triton']} does not ship the narrow stack, configs.STACK_MIN_TRITON)",
              flush=True)
    res = run_check(device, plan, meta, log=lambda s: print(s, flush=True))
    print(f"\n## Quick timing, {plan.timing_dtype}, pinned configs (not autotuned); MODEL = roofline of the fused "
          f"minimum on {device.spec.name if device.spec else 'an unknown GPU (no MODEL)'}\n")
    print(timing_table(res.timing))
    path = Path(args.json) if args.json else Path(args.out) / "gpu_check.json"
    write_json(path, res.as_json())
    failed = [c for c in res.cases if not c["ok"]]
    print(f"\n{len(res.cases)} parity cases, {len(failed)} failed; {res.compiled_kernels} kernels compiled "
          f"(JIT caches; planned {res.planned_compiles}); wall time {res.wall_s:.0f} s; wrote {path}")
    for c in failed:
        print(_line(c))
    return 0 if res.ok else 1
