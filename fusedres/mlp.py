"""``ResidualMLP``: input Linear, a stack of pre-activation residual blocks, output Linear."""
from __future__ import annotations

from torch import Tensor, nn

from .module import FusedResidualBlock
from .reference import ResidualBlock


class ResidualMLP(nn.Module):
    """``Linear(in_features, dim)``, then ``depth`` residual blocks of width ``dim``, then
    ``Linear(dim, out_features)``.

    The network starts with a linear layer because a pre-activation block starts with a ReLU: an
    input whose features were all negative would reach the first block's GEMM as zeros.
    ``alpha`` scales every residual branch (``1/sqrt(depth)`` keeps the activation variance from
    growing with depth; 0 with ``learnable_alpha`` is ReZero). ``fused=False`` builds the same model on eager :class:`fusedres.ResidualBlock`\\ s, for A/B
    comparisons; the two state_dicts are interchangeable.

    Shapes: ``(..., in_features) -> (..., out_features)``.
    """

    def __init__(self, in_features: int, dim: int, depth: int, out_features: int, *, fused: bool = True,
                 bias: bool = True, alpha: float = 1.0, learnable_alpha: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        block = FusedResidualBlock if fused else ResidualBlock
        self.input = nn.Linear(in_features, dim, bias=bias, **factory)
        self.blocks = nn.Sequential(*[block(dim, bias=bias, alpha=alpha, learnable_alpha=learnable_alpha, **factory)
                                      for _ in range(depth)])
        self.output = nn.Linear(dim, out_features, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.blocks(self.input(x)))
