"""``FusedResidualBlock``: the drop-in module over :func:`fusedres.fused_residual`."""
from __future__ import annotations

from torch import Tensor, nn

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

    @classmethod
    def _sharing(cls, weight: nn.Parameter, bias: nn.Parameter | None) -> "FusedResidualBlock":
        dim = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != dim:
            raise ValueError(f"{cls.__name__}: a residual block needs a square weight, got {list(weight.shape)}")
        block = cls(dim, bias=bias is not None, device="meta")
        block.weight = weight
        block.bias = bias
        return block

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FusedResidualBlock":
        """The block ``x + linear(relu(x))``, sharing ``linear``'s weight and bias (no copy).
        ``linear`` must be square (``in_features == out_features``)."""
        return cls._sharing(linear.weight, linear.bias)

    @classmethod
    def from_block(cls, block: _ResidualParameters) -> "FusedResidualBlock":
        """A fused block sharing the parameters of a :class:`fusedres.ResidualBlock` (no copy)."""
        return cls._sharing(block.weight, block.bias)
