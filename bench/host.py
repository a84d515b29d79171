"""Host time per call: what a fused call costs the CPU beside the device work, against eager's.

Four cases (JSON ``mode``): ``host_fwd`` (forward under ``torch.no_grad``), ``host_fwd_grad`` (forward
with the graph recorded: inputs and parameters require grad), ``host_full`` (forward +
``torch.autograd.grad``), ``host_stack`` (the narrow stack, forward + backward). Fused is
``fusedres.fused_residual`` (``fused_residual_stack``), eager is ``x + F.linear(F.relu(x), W, b)``
as a user writes it (for the stack, L such blocks: :func:`eager_stack`).

How the device work is excluded:
- **CPU** (the Triton interpreter): tiny tensors (``M x D = 8 x 16`` fp32, the stack ``8 x 16 x 4``),
  and every Triton launch of fusedres (``fusedres.kernels.configs.run_kernel``, the one call that
  enters Triton) replaced by a no-op: the wrapper, checks, allocations, autograd and argument
  building are timed, the interpreter is not. Eager's aten ops run for real at that size: a
  ``8 x 16 x 16`` GEMM is about 2K FLOPs, well under 1% of eager's figure; eager's number is its
  dispatch, allocation and autograd cost. Triton's own per-launch cost cannot be measured here
  (the interpreter replaces it); upstream: ``JITFunction.run`` 9-12 us, a compiled kernel's
  launcher 3-4 us.
- **CUDA**: real CPU time per call: a loop of N calls timed with ``perf_counter`` without
  synchronising (the queue stays far below its depth, so the host never waits on the GPU),
  then one synchronisation outside the timed loop. Triton's own per-launch cost is given
  separately: the forward kernel launched through ``kernel[grid](...)`` (autotuner, JIT binder),
  through fusedres's ``launch`` (config resolution, then the JIT) and through the prepared launch
  every call after a signature's first takes (the compiled kernel's launcher), on prebuilt
  arguments.

Each figure is the best of ``repeats`` loops of ``number`` calls (the minimum is the least
disturbed by other work on the machine), in microseconds per call.
"""
from __future__ import annotations

import contextlib
import gc
import time

import torch
import torch.nn.functional as F

CASES = ("host_fwd", "host_fwd_grad", "host_full", "host_stack")
#: the three single-block cases of the target (fused <= eager with device work excluded)
SINGLE_BLOCK = CASES[:3]


@contextlib.contextmanager
def no_triton_launch():
    """Every fusedres launch becomes a no-op (``configs.run_kernel``); launch bookkeeping stays."""
    from fusedres.kernels import configs
    real = configs.run_kernel
    configs.run_kernel = lambda kernel, grid, args, kwargs: None
    try:
        yield
    finally:
        configs.run_kernel = real


def time_per_call(fn, number: int = 200, repeats: int = 7, sync=None) -> float:
    """Best of ``repeats`` loops of ``number`` calls, in us per call."""
    fn()
    fn()
    best = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            t = time.perf_counter() - t0
            if sync is not None:
                sync()
            best = min(best, t / number)
    finally:
        if enabled:
            gc.enable()
    return best * 1e6


def eager_block(x, w, b):
    """Eager PyTorch's block as a user writes it: three ops, no wrapper (the eager and
    torch.compile baselines of the host section and of the GPU timings, bench/gpu.py)."""
    return x + F.linear(F.relu(x), w, b)


def eager_stack(x, w, b):
    """L eager blocks as a user writes them (``fusedres.stack_reference`` is the same sum, but its
    per-block Python, naming each block's recipe, is no part of eager's baseline)."""
    for l in range(w.shape[0]):
        x = eager_block(x, w[l], b[l])
    return x


def _calls(impl: str, case: str, device: str, M: int, D: int, L: int):
    """The zero-argument call timed for ``impl`` in ``case``."""
    import fusedres
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    if case == "host_stack":
        fn = fusedres.fused_residual_stack if impl == "fused" else eager_stack
        x, w, b = rnd(M, D, grad=True), rnd(L, D, D, grad=True) * 0.1, rnd(L, D, grad=True)
        w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
        gy = rnd(M, D)
        return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), gy)
    fn = fusedres.fused_residual if impl == "fused" else eager_block
    grad = case != "host_fwd"
    x, w, b = rnd(M, D, grad=grad), rnd(D, D, grad=grad), rnd(D, grad=grad)
    if case == "host_full":
        gy = rnd(M, D)
        return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), gy)
    if case == "host_fwd":
        def nograd():
            with torch.no_grad():
                return fn(x, w, b)
        return nograd
    return lambda: fn(x, w, b)


def triton_launch_us(device: str, M: int, D: int, number: int = 200, repeats: int = 7) -> dict:
    """CUDA only: Triton's own cost of one forward launch on prebuilt arguments: through
    ``kernel[grid]`` (the autotuner's cache lookup, then the JIT binder and cache key) and through
    fusedres's first-call path (``configs.launch_and_prepare``: config resolution, the JIT, the
    prepared launch) and the prepared launch every later call takes. Empty off CUDA."""
    if device != "cuda":
        return {}
    from fusedres._layout import plan_rows
    from fusedres.kernels import configs
    from fusedres.kernels import residual_fwd as rf
    x = torch.randn(M, D, device=device)
    w = torch.randn(D, D, device=device)
    b = torch.randn(D, device=device)
    y = torch.empty_like(x)
    rows, (xs,), (xk,) = plan_rows(x)
    args, consts, grid = rf.fwd_launch_args(xk, xs, w, b, y, rows)
    prepared = rf.residual_fwd(xk, xs, w, b, y, rows)             # tunes and compiles
    head = args[:rf.FWD_HEAD]
    prepared(*head)                                               # finds the compiled kernel
    sync = torch.cuda.synchronize
    out = {"triton_kernel_grid_us": time_per_call(
        lambda: configs.run_kernel(rf.residual_fwd_kernel_tuned, grid, args, consts), number, repeats, sync)}
    out["fusedres_first_launch_us"] = time_per_call(
        lambda: configs.launch_and_prepare(rf.residual_fwd_kernel, rf.residual_fwd_kernel_tuned, "fwd", grid, args,
                                           consts, rows.M, D, n_head=rf.FWD_HEAD), number, repeats, sync)
    out["fusedres_prepared_launch_us"] = time_per_call(lambda: prepared(*head), number, repeats, sync)
    return out


def measure(device: str | None = None, M: int = 8, D: int = 16, L: int = 4, number: int = 200,
            repeats: int = 7, cases=CASES) -> list[dict]:
    """One record per (impl, case): ``{"section": "host", "mode": case, "impl", "host_us", "device",
    "how", "fused_over_eager", ...}``; no GPU time (``host_us`` is CPU-side time only)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else None
    stub = no_triton_launch() if device == "cpu" else contextlib.nullcontext()
    how = ("cpu: Triton launch stubbed to a no-op (configs.run_kernel); eager aten ops run for real at "
           f"{M}x{D} fp32" if device == "cpu" else "cuda: CPU time of a loop of calls, no synchronisation inside")
    records = []
    with stub:
        for case in cases:
            for impl in ("fused", "eager"):
                fn = _calls(impl, case, device, M, D, L)
                us = time_per_call(fn, number, repeats, sync)
                records.append({"section": "host", "mode": case, "impl": impl, "host_us": round(us, 2), "device": device,
                                "M": M, "D": D, "L": L if case == "host_stack" else None, "dtype": "fp32",
                                "how": how})
    for r in records:
        eager = next(e["host_us"] for e in records if e["mode"] == r["mode"] and e["impl"] == "eager")
        r["fused_over_eager"] = round(next(f["host_us"] for f in records if f["mode"] == r["mode"]
                                           and f["impl"] == "fused") / eager, 3)
    return records


def table(records: list[dict], launch: dict | None = None) -> str:
    from .report import markdown_table
    rows = []
    for case in dict.fromkeys(r["mode"] for r in records):
        f = next(r for r in records if r["mode"] == case and r["impl"] == "fused")
        e = next(r for r in records if r["mode"] == case and r["impl"] == "eager")
        rows.append([case, f["host_us"], e["host_us"], f"{f['host_us'] / e['host_us']:.2f}"])
    text = markdown_table(["case", "fused host us/call", "eager host us/call", "fused / eager"], rows)
    r0 = records[0]
    text += (f"\n\nMeasured on {r0['device']}, M x D = {r0['M']} x {r0['D']} fp32 (stack: L = "
             f"{next((r['L'] for r in records if r['L']), '-')}); best of repeated loops. {r0['how']}.")
    if launch:
        text += "\n\nTriton's own per-launch cost (forward, prebuilt arguments): " + ", ".join(
            f"{k} = {v:.1f} us" for k, v in launch.items())
    else:
        text += ("\n\nTriton's own per-launch cost: not measurable on a CPU (the interpreter replaces the launch); "
                 "upstream figures: JITFunction.run 9-12 us, a compiled kernel's launcher 3-4 us.")
    return text
