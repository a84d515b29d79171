"""The activation table: each activation a block can apply, as one row.

A row gives the name, its one number (leaky_relu's negative slope), the torch reference (the
forward, whose autograd is the reference derivative) and, through :mod:`fusedres.kernels.activations`,
the kernels' forward prologue and derivative, recomputed from the saved pre-activation. Adding an
activation is a row here and a pair of jit functions there.

Every API takes ``act`` as a name or as a torch module instance:

====================  ======================================  ===================================
name                  torch                                   module
====================  ======================================  ===================================
``"relu"``            ``F.relu``                              ``nn.ReLU()``
``"gelu"``            ``F.gelu`` (erf)                        ``nn.GELU()``
``"gelu_tanh"``       ``F.gelu(approximate="tanh")``          ``nn.GELU(approximate="tanh")``
``"silu"``            ``F.silu``                              ``nn.SiLU()``
``"relu_sq"``         ``F.relu(x).square()``                  (none in torch)
``"leaky_relu"``      ``F.leaky_relu`` (slope 0.01)           ``nn.LeakyReLU(negative_slope)``
====================  ======================================  ===================================
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels.activations import KERNELS

#: The leaky_relu slope when none is given: ``F.leaky_relu``'s and ``nn.LeakyReLU``'s default.
LEAKY_RELU_SLOPE = 0.01


@dataclasses.dataclass(frozen=True)
class Activation:
    """One row of the table: ``name`` (a key of :data:`ACTIVATIONS`) and ``param`` (leaky_relu's
    negative slope; 0.0 for the others)."""
    name: str
    param: float = 0.0

    def __call__(self, x: Tensor) -> Tensor:
        """The torch reference: what eager PyTorch computes."""
        return _TORCH[self.name](x, self.param)

    def backward(self, x: Tensor, grad: Tensor) -> Tensor:
        """``grad * act'(x)`` as torch's autograd computes it (the reference derivative): the aten
        backward op autograd itself runs, callable where no graph is recorded (inside a custom
        op's body, below the autograd key). ``grad`` is cast to ``x``'s dtype first, as autograd
        hands the activation a gradient of its output's dtype."""
        return _BACKWARD[self.name](grad.to(x.dtype), x, self.param)

    def module(self) -> nn.Module:
        """The torch module that computes it (relu_sq, which torch has none of: a small one)."""
        if self.name == "leaky_relu":
            return nn.LeakyReLU(self.param)
        return _MODULES[self.name]()

    @property
    def spec(self) -> str:
        """The name, with leaky_relu's slope when it is not the default: ``"leaky_relu(0.2)"``."""
        if self.name == "leaky_relu" and self.param != LEAKY_RELU_SLOPE:
            return f"leaky_relu({self.param!r})"
        return self.name

    def __repr__(self) -> str:
        return repr(self.spec)


class ReLUSquared(nn.Module):
    """``relu(x)**2`` (Primer's squared ReLU), as a module: torch has none."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


_TORCH: dict[str, Callable[[Tensor, float], Tensor]] = {
    "relu": lambda x, p: F.relu(x),
    "gelu": lambda x, p: F.gelu(x),
    "gelu_tanh": lambda x, p: F.gelu(x, approximate="tanh"),
    "silu": lambda x, p: F.silu(x),
    "relu_sq": lambda x, p: F.relu(x).square(),
    "leaky_relu": lambda x, p: F.leaky_relu(x, p),
}
_aten = torch.ops.aten
_BACKWARD: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "relu": lambda g, x, p: _aten.threshold_backward(g, x, 0),
    "gelu": lambda g, x, p: _aten.gelu_backward(g, x, approximate="none"),
    "gelu_tanh": lambda g, x, p: _aten.gelu_backward(g, x, approximate="tanh"),
    "silu": lambda g, x, p: _aten.silu_backward(g, x),
    # relu(x)**2: pow's backward (2 relu(x) g), then relu's threshold_backward
    "relu_sq": lambda g, x, p: _aten.threshold_backward(g * 2 * F.relu(x), x, 0),
    "leaky_relu": lambda g, x, p: _aten.leaky_relu_backward(g, x, p, False),
}
_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
            "relu_sq": ReLUSquared}

#: Every activation, by name (the default parameters).
ACTIVATIONS: dict[str, Activation] = {
    name: Activation(name, LEAKY_RELU_SLOPE if name == "leaky_relu" else 0.0) for name in _TORCH}
assert set(ACTIVATIONS) == set(KERNELS), "the torch and Triton halves of the table must name the same rows"

ActLike = Union[str, nn.Module, Activation, None]


def _supported() -> str:
    return (", ".join(repr(n) for n in ACTIVATIONS) + "; or nn.ReLU(), nn.GELU(), nn.GELU(approximate='tanh'), "
            "nn.SiLU(), nn.LeakyReLU(negative_slope)")


def resolve(act: ActLike, who: str, *, allow_none: bool = False) -> Activation | None:
    """The table row for ``act``: a name, a torch module instance, an :class:`Activation`, or
    (with ``allow_none``) None for no activation. Anything else is a ``ValueError`` (a
    ``TypeError`` for a value of the wrong type) that lists what is supported."""
    if act is None:
        if allow_none:
            return None
        raise ValueError(f"{who}: an activation is required here; supported: {_supported()}")
    if isinstance(act, Activation):
        if act.name not in ACTIVATIONS:
            raise ValueError(f"{who}: unknown activation {act.name!r}; supported: {_supported()}")
        if not math.isfinite(act.param):
            raise ValueError(f"{who}: the activation's parameter must be finite, got {act.param}")
        return act
    if isinstance(act, str):
        row = ACTIVATIONS.get(act.strip().lower())
        if row is None:
            raise ValueError(f"{who}: unknown activation {act!r}; supported: {_supported()}")
        return row
    if isinstance(act, nn.Module):
        kind = type(act)
        if kind is nn.ReLU:
            return ACTIVATIONS["relu"]
        if kind is nn.GELU:
            approximate = getattr(act, "approximate", "none")
            return ACTIVATIONS["gelu_tanh" if approximate == "tanh" else "gelu"]
        if kind is nn.SiLU:
            return ACTIVATIONS["silu"]
        if kind is ReLUSquared:
            return ACTIVATIONS["relu_sq"]
        if kind is nn.LeakyReLU:
            slope = float(act.negative_slope)
            if slope != slope or slope in (float("inf"), float("-inf")):
                raise ValueError(f"{who}: nn.LeakyReLU's negative_slope must be finite, got {slope}")
            return Activation("leaky_relu", slope)
        raise ValueError(f"{who}: unsupported activation module {act!r}; supported: {_supported()}")
    raise TypeError(f"{who}: act must be a name or a torch activation module, got {type(act).__name__}; "
                    f"supported: {_supported()}")


def kernel_args(act: Activation | None) -> tuple[str | None, float]:
    """``(name, param)`` as the kernels' launchers take them (None: no activation)."""
    return (None, 0.0) if act is None else (act.name, act.param)
