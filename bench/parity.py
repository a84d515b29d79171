"""The parity rule, applied to any implementation before it is timed or reported.

For an implementation ``fn(x, weight, bias)`` the outputs ``y`` and the gradients ``dx``, ``dW``,
``db`` (for an upstream gradient ``g``) are compared with :func:`fusedres.validate.parity`: against
an fp64 reference built from the same rounded inputs, its error may be at most twice eager
PyTorch's error in the same dtype, plus one rounding at the scale of the computation (the same
block computed on absolute values).
"""
from __future__ import annotations

import torch

from fusedres import residual_reference
from fusedres.validate import Parity, parity

NAMES = ("y", "dx", "dW", "db")


def run_outputs(fn, x, weight, bias, g, grads: bool = True) -> dict[str, torch.Tensor]:
    """``{"y", "dx", "dW", "db"}`` of ``fn`` (detached); the gradients only if ``grads``."""
    xs, ws, bs = (t.detach().clone().requires_grad_(grads) for t in (x, weight, bias))
    if not grads:
        with torch.no_grad():
            return {"y": fn(xs, ws, bs).detach()}
    y = fn(xs, ws, bs)
    dx, dw, db = torch.autograd.grad(y, (xs, ws, bs), g)
    return {"y": y.detach(), "dx": dx, "dW": dw, "db": db}


class Baseline:
    """Eager outputs in the inputs' dtype, the fp64 reference, and the absolute-value scale,
    computed once per case and shared by every implementation checked against it."""

    def __init__(self, x, weight, bias, g):
        self.eager = run_outputs(residual_reference, x, weight, bias, g)
        d = [t.detach().double() for t in (x, weight, bias, g)]
        self.reference = run_outputs(residual_reference, *d)
        self.scale = run_outputs(residual_reference, *[t.abs() for t in d])

    def check(self, outputs: dict[str, torch.Tensor]) -> dict[str, Parity]:
        return {k: parity(v, self.eager[k], self.reference[k], self.scale[k]) for k, v in outputs.items()}


def summary(results: dict[str, Parity]) -> str:
    """One line: ``y ok (err 1.2e-06 <= 3.4e-06), dx ok (...)``."""
    parts = []
    for name, p in results.items():
        state = "ok" if p.ok else "FAIL"
        parts.append(f"{name} {state} (err {p.fused_error:.2e} vs bound {p.bound:.2e}, eager {p.eager_error:.2e})")
    return "; ".join(parts)


def all_ok(results: dict[str, Parity]) -> bool:
    return all(p.ok for p in results.values())
