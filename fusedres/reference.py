"""The eager reference: the spec that every fused path is measured against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def residual_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x + F.linear(F.relu(x), weight, bias)`` in plain PyTorch: the definition of the block."""
    return x + F.linear(F.relu(x), weight, bias)


def eager_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The reference forward in the dtypes the kernels see: the GEMM in ``weight``'s dtype (under
    autocast the wrapper has cast the parameters), the residual add in eager's type promotion."""
    return x + F.linear(F.relu(x).to(weight.dtype), weight, bias)


def eager_backward(grad: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_weight: bool,
                   need_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The reference gradients of :func:`eager_forward`, as eager autograd computes them:
    ``dx = g + threshold_backward(g @ W, relu(x), 0)`` (NaN in ``x`` lets the gradient through),
    ``dW = g.T @ relu(x)``, ``db = g.sum(0)``; None where not asked for."""
    D = weight.shape[0]
    g = grad.to(weight.dtype)
    dx = dw = db = None
    if need_dx:
        dx = (grad + torch.where(x <= 0, 0, g @ weight)).to(x.dtype)
    if need_weight:
        dw = g.reshape(-1, D).T @ F.relu(x).to(weight.dtype).reshape(-1, D)
    if need_bias:
        db = g.reshape(-1, D).sum(0)
    return dx, dw, db


class _ResidualParameters(nn.Module):
    """``weight [dim, dim]`` and ``bias [dim]``, named and initialised exactly as in ``nn.Linear``,
    so a state_dict moves between the eager and the fused block unchanged."""

    def __init__(self, dim: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be a positive int, got {dim!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(dim, dim, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(dim, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear.reset_parameters, verbatim in effect: kaiming_uniform(a=sqrt(5)) and a
        # uniform bias in +-1/sqrt(fan_in). The same RNG draws in the same order.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.dim)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bias={self.bias is not None}"


class ResidualBlock(_ResidualParameters):
    """Pre-activation residual block ``y = x + relu(x) @ weight.T + bias``, in eager PyTorch.

    Shapes: ``x`` is ``(..., dim)``; ``y`` has ``x``'s shape and dtype. This module is the
    reference that :class:`fusedres.FusedResidualBlock` must match.
    """

    def forward(self, x: Tensor) -> Tensor:
        return residual_reference(x, self.weight, self.bias)
