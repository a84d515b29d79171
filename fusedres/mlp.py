"""``ResidualMLP``: input Linear, a stack of pre-activation residual blocks, output Linear."""
from __future__ import annotations

from torch import Tensor, nn

from .activations import ActLike, resolve as resolve_act
from .droppath import check_drop_path
from .module import FusedResidualBlock
from .reference import ResidualBlock, ResidualMLPBlock


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """The stochastic-depth paper's linear decay rule: block ``i`` of ``depth`` drops its branch at
    rate ``drop_path * i / (depth - 1)``, 0 for the first block and ``drop_path`` for the last;
    ``[0.0]`` for a single block."""
    drop_path = check_drop_path(drop_path, "drop_path_rates")
    if depth <= 1:
        return [0.0] * depth
    return [drop_path * i / (depth - 1) for i in range(depth)]


class ResidualMLP(nn.Module):
    """``Linear(in_features, dim)``, then ``depth`` residual blocks of width ``dim``, then
    ``Linear(dim, out_features)``.

    The network starts with a linear layer because a pre-activation block starts with a ReLU: an
    input whose features were all negative would reach the first block's GEMM as zeros.
    ``alpha`` scales every residual branch (``1/sqrt(depth)`` keeps the activation variance from
    growing with depth; 0 with ``learnable_alpha`` is ReZero). ``fused=False`` builds the same model on eager :class:`fusedres.ResidualBlock`\\ s, for A/B
    comparisons; the two state_dicts are interchangeable.

    ``hidden_features``: None (default) for one-layer blocks (``ResidualBlock`` /
    ``FusedResidualBlock``); an int ``H`` for blocks with a hidden layer of width ``H``
    (``ResidualMLPBlock`` / ``FusedResidualMLPBlock``).

    ``drop_path``: stochastic depth. Block ``i`` (0-based) of ``depth`` gets the rate
    ``drop_path * i / (depth - 1)``, rising linearly from 0 for the first block to ``drop_path``
    for the last (the linear decay rule of Huang et al., "Deep Networks with Stochastic Depth");
    with ``depth == 1`` the single block gets 0. See :func:`fusedres.drop_path_scale`.

    ``act``: every block's activation (the hidden one in MLP blocks), ``pre_act`` the MLP blocks'
    activation on x (:mod:`fusedres.activations`); ``alpha_per_channel``: each block's alpha a
    per-channel parameter (LayerScale). ``norm``: a name (``"batch"``, ``"layer"``, ``"rms"``): every
    block gets its own torch norm module (:mod:`fusedres.norm`). ``dropout`` (each branch's) and
    ``hidden_dropout`` (the MLP blocks', after the hidden activation): every block's dropout rates
    (:mod:`fusedres.dropout`).

    Shapes: ``(..., in_features) -> (..., out_features)``.
    """

    def __init__(self, in_features: int, dim: int, depth: int, out_features: int, *, fused: bool = True,
                 bias: bool = True, alpha: float = 1.0, learnable_alpha: bool = False,
                 hidden_features: int | None = None, drop_path: float = 0.0, act: ActLike = "relu",
                 pre_act: ActLike = "relu", alpha_per_channel: bool = False, norm: str | None = None,
                 hidden_norm: str | None = None, dropout: float = 0.0, hidden_dropout: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        rates = drop_path_rates(check_drop_path(drop_path, "ResidualMLP: drop_path"), depth)
        if hidden_features is None:
            block = FusedResidualBlock if fused else ResidualBlock
            args = (dim,)
        else:
            if fused:
                from .module import FusedResidualMLPBlock
                block = FusedResidualMLPBlock
            else:
                block = ResidualMLPBlock
            args = (dim, hidden_features)
        # drop_path is passed only when used: with drop_path=0 the blocks are built exactly as
        # before it existed.
        extra = (lambda rate: {"drop_path": rate}) if drop_path > 0 else (lambda rate: {})
        for name, value in (("norm", norm), ("hidden_norm", hidden_norm)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"ResidualMLP: {name} must be a name ('batch', 'layer', 'rms') or None: each block "
                                f"gets its own module; got {type(value).__name__}")
        if hidden_norm is not None and hidden_features is None:
            raise ValueError("ResidualMLP: hidden_norm is the MLP blocks' (hidden_features=H)")
        options = dict(act=act, alpha_per_channel=alpha_per_channel)
        if norm is not None:
            options["norm"] = norm
        if hidden_norm is not None:
            options["hidden_norm"] = hidden_norm
        if hidden_dropout and hidden_features is None:
            raise ValueError("ResidualMLP: hidden_dropout is the MLP blocks' (hidden_features=H)")
        if dropout:
            options["dropout"] = dropout
        if hidden_dropout:
            options["hidden_dropout"] = hidden_dropout
        if hidden_features is not None:
            options["pre_act"] = pre_act
        elif resolve_act(pre_act, "ResidualMLP: pre_act", allow_none=True) != resolve_act("relu", ""):
            raise ValueError("ResidualMLP: pre_act is the MLP blocks' (hidden_features=H); a one-layer block's "
                             "activation is act")
        self.input = nn.Linear(in_features, dim, bias=bias, **factory)
        self.blocks = nn.Sequential(*[block(*args, bias=bias, alpha=alpha, learnable_alpha=learnable_alpha,
                                            **options, **extra(rate), **factory) for rate in rates])
        self.output = nn.Linear(dim, out_features, bias=bias, **factory)
        if fused:       # each block's forward emits the next one's norm statistics (fusedres.chain)
            from .chain import link_blocks
            link_blocks(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.blocks(self.input(x)))
