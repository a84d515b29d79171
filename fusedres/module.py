"""``FusedResidualBlock``: the drop-in module over :func:`fusedres.fused_residual`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import chain as _chain
from .chain import call_for as _chain_call, produced as _produced
from .mlp_op import fused_residual_mlp
from .op import fused_residual
from .reference import _ResidualMLPParameters, _ResidualParameters


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
        act: the activation (``"relu"`` default, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``,
            ``"relu_sq"``, ``"leaky_relu"``, or a torch module: :mod:`fusedres.activations`).
        alpha_per_channel: make ``alpha`` a parameter of shape ``[out_features]`` filled with
            ``alpha`` (timm's LayerScale: e.g. ``alpha=1e-5``); its gradient is a column sum in the
            dW epilogue.
        norm: a normalization before the activation (He et al.'s full pre-activation, ``x + alpha *
            (act(norm(x)) @ weight.T + bias)``): None, ``"batch"``, ``"layer"``, ``"rms"`` (a new
            ``nn.BatchNorm1d(dim)``, ``nn.LayerNorm(dim)``, ``nn.RMSNorm(dim)``) or such an instance,
            held as the submodule ``norm`` (state_dict keys ``norm.weight``, ``norm.running_mean``,
            ...). BatchNorm normalizes over every row of ``x.reshape(-1, dim)``.
        drop_path: stochastic depth's rate ``p``: in training each sample (index of x's first
            dimension) keeps its branch, scaled by ``1/(1 - p)``, with probability ``1 - p``
            (timm's ``DropPath``; :func:`fusedres.drop_path_scale` draws the scale with torch's
            RNG). The scale is a row scale in the kernels' epilogues; eval mode and ``p = 0`` run
            the plain block.
        dropout: the branch's dropout rate (rtdl's ``dropout2``, timm's ``drop2``): in training,
            ``x + alpha * dropout(act(x) @ weight.T + bias)``. The keep mask is generated inside
            the kernels from a seed drawn per call from torch's generator, never stored
            (:mod:`fusedres.dropout`); ``train()``/``eval()`` switch it as ``nn.Dropout``'s.

    Parameters ``weight [out, dim]`` and ``bias [out]`` are named and initialised exactly like
    ``nn.Linear``'s, so a state_dict moves to and from :class:`fusedres.ResidualBlock` unchanged.
    ``forward(x)`` takes ``(..., dim)`` in fp16, bf16, fp32 or fp64 and returns ``(..., out)``.
    """

    _fused_kernels = True

    def forward(self, x: Tensor) -> Tensor:
        norm, proj, training = self.norm, self.proj_weight, self.training      # (each read once: nn.Module lookups)
        chain = _chain_call(self, norm, x, training, proj) if norm is not None or _chain._ANY_LINK else None
        y = fused_residual(x, self.weight, self.bias, alpha=self.alpha, proj_weight=proj,
                           sample_scale=self._sample_scale(x), act=self.act, norm=norm, dropout=self.dropout,
                           training=training, _chain=chain)
        if _chain._NORMS_SEEN:      # (a chain of blocks: fusedres.chain)
            _produced(y, self)
        return y

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
        (weight, bias, alpha, proj_weight, a per-channel alpha included) and its activation: no copy."""
        fused = cls(block.in_features, block.out_features, bias=block.bias is not None,
                    learnable_alpha=isinstance(block.alpha, nn.Parameter), drop_path=getattr(block, "drop_path", 0.0),
                    act=getattr(block, "act", "relu"), device="meta")
        if getattr(block, "dropout", 0.0) and block.proj_weight is not None:
            raise ValueError(f"{cls.__name__}.from_block: dropout with a projection shortcut is not supported by the "
                             "fused kernels; keep this block a fusedres.ResidualBlock")
        fused.norm = getattr(block, "norm", None)
        fused.dropout = getattr(block, "dropout", 0.0)
        for name in ("weight", "bias", "proj_weight", "alpha"):
            setattr(fused, name, getattr(block, name))
        fused._alpha_init = getattr(block, "_alpha_init", 1.0)
        return fused


class FusedResidualMLPBlock(_ResidualMLPParameters):
    """Pre-activation residual block with a hidden layer, on fused Triton kernels:

    ``y = x + alpha * s * (relu(relu(x) @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias)``

    Args:
        dim: the block's width ``D``.
        hidden_features: the hidden width ``H`` (``4 * dim``: a transformer's feed-forward shape).
        bias: learn ``fc1.bias`` and ``fc2.bias``.
        alpha: residual-branch scale (a buffer named ``alpha``); 0 with ``learnable_alpha`` is ReZero.
        learnable_alpha: make ``alpha`` a parameter (its gradient rides on the dW2 GEMM).
        drop_path: stochastic depth's rate (see :class:`FusedResidualBlock`): a row scale in the
            second GEMM's epilogue and on the backward's g.
        recompute: save only x for the backward and recompute the hidden pre-activation there
            (one more GEMM) instead of keeping the ``(..., H)`` tensor.
        pre_act: the activation on x before fc1 (``"relu"`` default; None: none, timm's and rtdl's
            pre-norm blocks).
        act: the hidden activation (``"relu"`` default; timm's ``Mlp`` is ``nn.GELU()``).
        alpha_per_channel: ``alpha`` a parameter of shape ``[dim]`` (LayerScale).
        norm: a normalization of x before ``pre_act`` and fc1 (``"batch"``, ``"layer"``, ``"rms"`` or
            a torch norm module, held as the submodule ``norm``): rtdl's block is
            ``norm="batch", pre_act=None``, timm's ``norm=nn.LayerNorm(dim, eps=1e-6), pre_act=None,
            act="gelu"``.
        hidden_norm: a normalization of the hidden layer before ``act`` (held as ``hidden_norm``):
            He et al.'s two-layer full pre-activation is ``norm="batch", hidden_norm="batch"``.
        dropout: the branch's dropout rate, before alpha and the add (rtdl's ``dropout2``, timm's
            ``drop2``); hidden_dropout: after the hidden activation (rtdl's ``dropout1``, timm's
            ``drop1``). Masks generated in the kernels, never stored (:mod:`fusedres.dropout`).

    ``fc1 = nn.Linear(dim, hidden_features)`` and ``fc2 = nn.Linear(hidden_features, dim)`` (timm's
    ``Mlp`` names and ``nn.Linear``'s init): a state_dict moves to and from
    :class:`fusedres.ResidualMLPBlock`, and a timm-style ``Mlp``'s loads. Two kernel launches
    forward, four backward (plus split-M reduces): :mod:`fusedres.mlp_op`.
    """

    def forward(self, x: Tensor) -> Tensor:
        norm, training = self.norm, self.training
        y = fused_residual_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, alpha=self.alpha,
                               sample_scale=self._sample_scale(x), recompute=self.recompute, pre_act=self.pre_act,
                               act=self.act, norm=norm, hidden_norm=self.hidden_norm,
                               dropout=self.dropout, hidden_dropout=self.hidden_dropout, training=training,
                               _chain=_chain_call(self, norm, x, training))
        if _chain._NORMS_SEEN:      # (a chain of blocks: fusedres.chain)
            _produced(y, self)
        return y

    @classmethod
    def from_block(cls, block: _ResidualMLPParameters) -> "FusedResidualMLPBlock":
        """A fused block sharing every parameter and buffer of a :class:`fusedres.ResidualMLPBlock`
        (fc1, fc2, alpha) and its settings (drop_path, recompute): no copy."""
        fused = cls(block.dim, block.hidden_features, bias=block.fc1.bias is not None,
                    learnable_alpha=isinstance(block.alpha, nn.Parameter), drop_path=block.drop_path,
                    recompute=block.recompute, pre_act=block.pre_act, act=block.act, device="meta")
        fused.fc1, fused.fc2, fused.alpha = block.fc1, block.fc2, block.alpha
        fused.norm = getattr(block, "norm", None)
        fused.hidden_norm = getattr(block, "hidden_norm", None)
        fused.dropout = getattr(block, "dropout", 0.0)
        fused.hidden_dropout = getattr(block, "hidden_dropout", 0.0)
        fused._alpha_init = getattr(block, "_alpha_init", 1.0)
        return fused
