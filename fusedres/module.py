"""``FusedResidualBlock``: the drop-in module over :func:`fusedres.fused_residual`."""
from __future__ import annotations

from torch import Tensor

from .op import fused_residual
from .reference import _ResidualParameters


class FusedResidualBlock(_ResidualParameters):
    """Pre-activation residual block ``y = x + relu(x) @ weight.T + bias`` on fused Triton kernels.

    Args:
        dim: feature width ``D``.
        bias: learn an additive bias, as ``nn.Linear(dim, dim, bias)``.

    Parameters ``weight [dim, dim]`` and ``bias [dim]`` are named and initialised exactly like
    ``nn.Linear``'s, so a state_dict moves to and from :class:`fusedres.ResidualBlock` unchanged.
    ``forward(x)`` takes ``(..., dim)`` in fp16, bf16, fp32 or fp64 and returns ``x``'s shape.
    """

    def forward(self, x: Tensor) -> Tensor:
        return fused_residual(x, self.weight, self.bias)
