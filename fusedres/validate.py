"""The parity rule, and ``FUSEDRES_VALIDATE=1``: check every fused call against eager.

The rule: against an fp64 reference computed from the same rounded inputs, the fused result's
largest error may be at most twice eager PyTorch's error in the same dtype, plus a floor of one
rounding, ``eps(dtype)``, at the scale of the computation: the largest value of the same block
computed on absolute values (``|x| + |relu(x)| @ |W|.T + |b|``, ``sum |g|``, ...), which is the
scale any summation order's rounding error is proportional to. Non-finite values must sit where
eager puts them, NaN for NaN and Inf for Inf of the same sign.

``FUSEDRES_VALIDATE=1`` is a debugging aid: each fused forward and backward also runs the eager
reference in the same dtype and in fp64, and raises :class:`ParityError` naming the op, the
shapes, the dtype and the errors. It costs several times the op itself; it is off by default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import configs as _configs
from .activations import ACTIVATIONS, Activation
from .reference import eager_backward, eager_forward


class ParityError(RuntimeError):
    """A fused result broke the parity rule."""


@dataclass
class Parity:
    fused_error: float
    eager_error: float
    floor: float
    nonfinite_match: bool

    @property
    def bound(self) -> float:
        return 2 * self.eager_error + self.floor

    @property
    def ok(self) -> bool:
        return self.nonfinite_match and self.fused_error <= self.bound

    def __str__(self) -> str:
        return (f"fused error {self.fused_error:.3e}, eager error {self.eager_error:.3e}, bound "
                f"2 x eager + floor = {self.bound:.3e}, non-finite pattern "
                f"{'matches' if self.nonfinite_match else 'DIFFERS from'} eager")


def parity(fused: Tensor, eager: Tensor, reference: Tensor, scale: Tensor | None = None) -> Parity:
    """Measure ``fused`` and ``eager`` (same dtype) against the fp64 ``reference``.

    ``scale`` is the computation redone on absolute values (defaults to ``|reference|``); the
    floor is ``eps(dtype) * max(scale)``.
    """
    f, e, r = fused.detach().double(), eager.detach().double(), reference.detach().double()
    same_nan = torch.equal(f.isnan(), e.isnan())
    same_inf = torch.equal(torch.where(f.isinf(), f, 0), torch.where(e.isinf(), e, 0))
    finite = r.isfinite() & e.isfinite()

    def max_abs(t: Tensor) -> float:
        t = t[finite]
        return t.abs().max().item() if t.numel() else 0.0

    s = r.abs() if scale is None else scale.detach().double().abs()
    s = s[s.isfinite()]
    floor = torch.finfo(fused.dtype).eps * (s.max().item() if s.numel() else 0.0)
    return Parity(max_abs(f - r), max_abs(e - r), floor, same_nan and same_inf)


#: Whether every fused call is checked against eager: ``FUSEDRES_VALIDATE=1`` at import, or
#: :func:`set_validate` at run time (no call reads the environment).
ENABLED = False


def read_environment() -> None:
    """Read ``FUSEDRES_VALIDATE`` (once at import; again when called)."""
    global ENABLED
    ENABLED = os.environ.get("FUSEDRES_VALIDATE", "0") == "1"


read_environment()


def set_validate(on: bool) -> bool:
    """Turn the parity check of every fused call on or off at run time; returns the previous
    setting. ``FUSEDRES_VALIDATE=1`` sets the initial value, read once at import."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(on)
    _configs.clear_prepared()
    return previous


def enabled() -> bool:
    return ENABLED


def _raise_if_broken(op, name, fused, eager, reference, scale, shapes: str) -> None:
    p = parity(fused, eager, reference, scale)
    if not p.ok:
        raise ParityError(f"FUSEDRES_VALIDATE: {op} broke the parity rule for {name}: {shapes}, "
                          f"dtype {fused.dtype}: {p}")


def _shapes(**tensors: Tensor) -> str:
    return ", ".join(f"{n} {list(t.shape)}" for n, t in tensors.items())


def _double(t: Tensor | float | None, absolute: bool = False) -> Tensor | float | None:
    if not isinstance(t, Tensor):   # None, or a float alpha
        return abs(t) if absolute and t is not None else t
    return t.double().abs() if absolute else t.double()


def check_forward(y: Tensor, x: Tensor, weight: Tensor, bias, alpha, proj_weight, sample_scale=None,
                  act: Activation = ACTIVATIONS["relu"]) -> None:
    if not ENABLED:
        return
    inputs = (x, weight, bias, alpha, proj_weight, sample_scale)
    eager = eager_forward(*inputs, act=act)
    reference = eager_forward(*(_double(t) for t in inputs), act=act)
    scale = eager_forward(*(_double(t, absolute=True) for t in inputs), act=act)
    _raise_if_broken("fusedres::residual_forward", "y", y, eager, reference, scale, _shapes(x=x, weight=weight))


def check_backward(grads, grad: Tensor, x: Tensor, weight: Tensor, bias, alpha, proj_weight,
                   sample_scale=None, act: Activation = ACTIVATIONS["relu"]) -> None:
    if not ENABLED:
        return
    needs = [g is not None for g in grads]
    inputs = (grad, x, weight, bias, alpha, proj_weight)
    s = (sample_scale, _double(sample_scale), _double(sample_scale, absolute=True))
    eager = eager_backward(*inputs, *needs, sample_scale=s[0], act=act)
    reference = eager_backward(*(_double(t) for t in inputs), *needs, sample_scale=s[1], act=act)
    scale = eager_backward(*(_double(t, absolute=True) for t in inputs), *needs, sample_scale=s[2], act=act)
    for name, f, e, r, sc in zip(("dx", "dweight", "dbias", "dalpha", "dproj_weight"), grads, eager, reference,
                                 scale):
        if f is not None:
            _raise_if_broken("fusedres::residual_backward", name, f, e, r, sc,
                             _shapes(grad=grad, x=x, weight=weight))
