"""``FusedResidualBlock``: the drop-in module over :func:`fusedres.fused_residual`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .op import fused_residual
from .reference import _ResidualParameters


class FusedResidualBlock(_ResidualParameters):
    """Pre-activation residual block on fused Triton kernels:
    ``y = x + alpha * (relu(x) @ weight.T + bias)``, or, when ``out_features != dim``,
    ``y = x @ proj_weight.T + alpha * (relu(x) @ weight.T + bias)``.

    Args:
        dim: input width (``in_features``).
        out_features: output width; None (default) for a square block.
        bias: learn an additive bias, as ``nn.Linear(dim, out_features, bias)``.
        alpha: residual-branch scale (a buffer named ``alpha``); 0 with ``learnable_alpha`` is ReZero.
        learnable_alpha: make ``alpha`` a parameter; its gradient costs no extra GEMM.

    Parameters ``weight [out, dim]`` and ``bias [out]`` are named and initialised exactly like
    ``nn.Linear``'s, so a state_dict moves to and from :class:`fusedres.ResidualBlock` unchanged.
    ``forward(x)`` takes ``(..., dim)`` in fp16, bf16, fp32 or fp64 and returns ``(..., out)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return fused_residual(x, self.weight, self.bias, alpha=self.alpha, proj_weight=self.proj_weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FusedResidualBlock":
        """The block ``x + linear(relu(x))``, sharing ``linear``'s weight and bias (no copy).
        ``linear`` must be square (``in_features == out_features``)."""
        if linear.in_features != linear.out_features:
            raise ValueError(f"{cls.__name__}.from_linear: a residual block needs a square Linear, got "
                             f"{linear.in_features} -> {linear.out_features}")
        block = cls(linear.in_features, bias=linear.bias is not None, device="meta")
        block.weight, block.bias = linear.weight, linear.bias
        block.alpha = torch.ones((), device=linear.weight.device, dtype=linear.weight.dtype)
        return block

    @classmethod
    def from_block(cls, block: _ResidualParameters) -> "FusedResidualBlock":
        """A fused block sharing every parameter and buffer of a :class:`fusedres.ResidualBlock`
        (weight, bias, alpha, proj_weight): no copy."""
        fused = cls(block.in_features, block.out_features, bias=block.bias is not None,
                    learnable_alpha=isinstance(block.alpha, nn.Parameter), device="meta")
        for name in ("weight", "bias", "proj_weight", "alpha"):
            setattr(fused, name, getattr(block, name))
        return fused
