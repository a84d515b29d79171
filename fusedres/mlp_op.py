"""``fused_residual_mlp``: the residual block with a hidden layer, on the single block's kernels.

    h = pre_act(x) @ W1.T + b1                               W1 [H, D], the hidden pre-activation
    y = x + alpha * s * (act(h) @ W2.T + b2)             W2 [D, H], s: stochastic depth's row scale

Every pass is one of the three kernels of :mod:`fusedres.kernels` (the GEMM family: the K loops
exist once), with other operands (``fusedres.kernels.recipe.MLPRecipe``):

| pass | GEMM | prologue | epilogue | kernel |
|---|---|---|---|---|
| forward 1 | ``h = pre_act(x) @ W1.T`` | pre_act on x | + b1; store h | fwd, no residual |
| forward 2 | ``y = act(h) @ W2.T`` | act on h | + b2, * alpha * s, + x | fwd, residual x |
| backward 1 | ``dh = g @ W2`` | per-channel alpha on g | * alpha * s, ``* act'(h)`` | dx, no residual |
| backward 2 | ``dW2 = (s g).T @ act(h)`` | act on h, s on the rows | * alpha; db2, dalpha | dW (split-M) |

Dropout (:mod:`fusedres.dropout`) enters fc2's passes only: the hidden dropout's keep mask on
``act(h)`` (forward 2's and backward 2's A-tile prologue, backward 1's epilogue before ``act'``),
the branch dropout's on the output (forward 2's epilogue) and so on ``g`` (backward 1's A tiles,
backward 2's B tiles and db2). Both are regenerated from two seeds drawn per call; no mask is
stored.
| backward 3 | ``dx = dh @ W1`` | - | ``* pre_act'(x)``, + g | dx, residual g |
| backward 4 | ``dW1 = dh.T @ pre_act(x)`` | pre_act on x | db1 | dW (split-M) |

Two launches forward; four backward, plus a reduce for each weight gradient the launch plan
splits. Saved for the backward: x and h; with ``recompute=True`` x only (h is recomputed by
forward 1, one more launch). ``torch.compile`` sees two custom ops,
``fusedres::residual_mlp_forward`` and ``fusedres::residual_mlp_backward``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from ._layout import plan_rows
from .op import (
    backend_for,
    check_one_device,
    check_sample_scale_arg,
    check_tensor_types,
    gemm_operands,
    _scale,
    refuse_double_backward,
)
from .activations import Activation, ActLike, kernel_args, resolve as resolve_act
from .chain import hand_over, op_arguments
from .droppath import rows_per_sample, sample_rows
from .kernels._common import cdiv
from .kernels.launch import launch_pass
from .kernels.recipe import MLPRecipe
from .norm import NormCall, NormLike, norm_kind, update_running_stats
from .norm_op import sink_stats, stats_sinks
from .recipes import call_alpha_kind, op_passes
from .dropout import check_p, draw_seeds, dropout_operands, keep_mask, note_draw
from .op import (_activation, autocast_off, check_alpha_shape, eager_mode_call, eager_node, warn_if_ungated,
                 weight_grads)


def _acts(pre_act: str, pre_act_param: float, act: str, act_param: float) -> tuple[Activation | None, Activation]:
    """The custom ops' activation arguments as table rows (``pre_act`` ``"none"``: None)."""
    return (None if pre_act == "none" else _activation(pre_act, pre_act_param)), _activation(act, act_param)


def _check_mlp_inputs(x, w1, b1, w2, b2, alpha, sample_scale) -> None:
    who = "fused_residual_mlp"
    named = [("x", x), ("fc1_weight", w1), ("fc2_weight", w2)] + [
        (n, t) for n, t in (("fc1_bias", b1), ("fc2_bias", b2), ("sample_scale", sample_scale)) if t is not None]
    if isinstance(alpha, Tensor):
        named.append(("alpha", alpha))
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{who}: alpha must be a float, a one-element tensor or a per-channel tensor [D], got "
                        f"{type(alpha).__name__}")
    check_tensor_types(who, named)
    if x.dim() == 0:
        raise ValueError(f"{who}: x must have shape (..., D); got a 0-dim tensor")
    D = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != D:
        raise ValueError(f"{who}: fc1_weight must be [H, D] with D = x.shape[-1] = {D}; got {list(w1.shape)}")
    H = w1.shape[0]
    if tuple(w2.shape) != (D, H):
        raise ValueError(f"{who}: fc2_weight must be [D, H] = [{D}, {H}]; got {list(w2.shape)}")
    for name, b, n in (("fc1_bias", b1, H), ("fc2_bias", b2, D)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{who}: {name} must have shape [{n}], got {list(b.shape)}")
    check_alpha_shape(who, alpha, D)
    check_sample_scale_arg(who, x, sample_scale)
    check_one_device(who, named)


def fused_residual_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                       fc2_bias: Optional[Tensor], *, alpha: float | Tensor = 1.0,
                       sample_scale: Optional[Tensor] = None, recompute: bool = False, pre_act: ActLike = "relu",
                       act: ActLike = "relu", norm: NormLike = None, hidden_norm: NormLike = None,
                       dropout: float = 0.0, hidden_dropout: float = 0.0, training: bool = True,
                       _chain=None) -> Tensor:
    """Pre-activation residual block with a hidden layer, fused:
    ``y = x + alpha * s * (act(pre_act(norm(x)) @ fc1_weight.T + fc1_bias) @ fc2_weight.T + fc2_bias)``.

    Args:
        x: ``(..., D)``, any strides; fp16, bf16, fp32 or fp64.
        fc1_weight, fc1_bias: ``[H, D]`` and ``[H]`` (or None), ``nn.Linear(D, H)``'s.
        fc2_weight, fc2_bias: ``[D, H]`` and ``[D]`` (or None), ``nn.Linear(H, D)``'s.
        alpha: residual-branch scale, a float, a one-element tensor or a per-channel tensor ``[D]``
            (LayerScale); a learnable one's gradient rides on the dW2 GEMM.
        sample_scale: stochastic depth's per-sample scale ``s`` (``[x.shape[0]]``; see
            :func:`fusedres.drop_path_scale`), or None.
        recompute: save only ``x`` for the backward and recompute ``h`` there (one more GEMM)
            instead of keeping the ``(..., H)`` hidden pre-activation.
        pre_act: the activation on x before fc1 (default ``"relu"``, the pre-activation block);
            None for none: the pre-norm blocks of timm's ``Mlp`` and rtdl, whose x reaches fc1 as is.
        act: the hidden activation (default ``"relu"``; timm's ``Mlp`` uses ``nn.GELU()``). Both
            take a name or module of :mod:`fusedres.activations`.
        norm: a normalization of x before ``pre_act`` and fc1 (:mod:`fusedres.norm`): None,
            ``"batch"``, ``"layer"``, ``"rms"`` or an ``nn.BatchNorm1d``/``nn.LayerNorm``/
            ``nn.RMSNorm`` instance (its parameters, mode and running statistics, updated as its
            own forward would). rtdl's block is ``norm="batch", pre_act=None``; timm's ViT MLP half
            ``norm=nn.LayerNorm(D, eps=1e-6), pre_act=None, act="gelu"``. The normalized x is never
            written: fc1's GEMM normalizes its A tiles from the statistics.
        hidden_norm: a normalization of the hidden layer, ``act(hidden_norm(h))``, over its ``H``
            features (names or modules as ``norm``): He et al.'s two-layer full pre-activation is
            ``norm="batch", hidden_norm="batch"``. Its batch statistics come from fc1's epilogue (no
            pass over h), and fc2's GEMMs normalize their A tiles.
        dropout: the branch's dropout probability, before the scales and the add (rtdl's
            ``dropout2``, timm's ``drop2``); hidden_dropout: after the hidden activation (rtdl's
            ``dropout1``, timm's ``drop1``); both applied with ``training`` (default True, as
            ``F.dropout``): ``y = x + alpha * s * dropout(dropout_h(act(h)) @ W2.T + b2)``. The keep
            masks are generated inside fc2's kernels from two seeds drawn per call from torch's
            generator, never stored (:mod:`fusedres.dropout`).

        _chain: internal (the modules' :func:`fusedres.chain.call_for`): the norm's statistics
            handed over by the previous block, the next block's norm to emit statistics for.

    Under ``torch.autocast`` the GEMMs run in the autocast dtype, as ``F.linear``'s would.
    """
    _check_mlp_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, alpha, sample_scale)
    pre = resolve_act(pre_act, "fused_residual_mlp: pre_act", allow_none=True)
    hidden = resolve_act(act, "fused_residual_mlp: act")
    dropout = check_p(dropout, "fused_residual_mlp: dropout")      # (checked in eval too, as F.dropout)
    hidden_dropout = check_p(hidden_dropout, "fused_residual_mlp: hidden_dropout")
    if not training:
        dropout = hidden_dropout = 0.0
    seeds = None
    if dropout or hidden_dropout:
        seeds = draw_seeds(2, x.device)      # [hidden, branch]
        if x.device.type != "meta":
            for site, p, seed in (("hidden_dropout", hidden_dropout, seeds[0:1]), ("dropout", dropout, seeds[1:2])):
                if p:
                    note_draw(site, seed, _hidden_shape(x, fc1_weight) if site == "hidden_dropout" else x.shape, p,
                              fc2_weight.dtype)
        if backend_for(x.device) == "eager":
            return _reference_with_masks(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, alpha, sample_scale, pre,
                                         hidden, norm, hidden_norm, dropout, hidden_dropout, seeds)
    calls, norm_args = [], []
    for nm, width in ((norm, x.shape[-1]), (hidden_norm, fc1_weight.shape[0])):
        args, call = ("none", None, None, 0.0, None, None), None
        if nm is not None:
            from .norm_op import check_norm_devices, check_rows, default_eps
            norm_kind(nm, width, "fused_residual_mlp")
            if backend_for(x.device) == "eager":     # (the modules' own forwards update their statistics)
                from .reference import residual_mlp_reference
                return residual_mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, alpha=alpha,
                                              sample_scale=sample_scale, pre_act=pre, act=hidden, norm=norm,
                                              hidden_norm=hidden_norm)
            check_norm_devices("fused_residual_mlp", x, nm)
            call = NormCall(nm, width, "fused_residual_mlp")
            check_rows(call, x.numel() // x.shape[-1] if x.shape[-1] else 0, width)
            args = (call.kind, call.weight, call.bias, float(default_eps(call, x)), *(call.running or (None, None)))
        calls.append(call)
        norm_args += args
    (pre_name, pre_param), (act_name, act_param) = kernel_args(pre), kernel_args(hidden)
    device_type = x.device.type
    w1, b1, w2, b2 = gemm_operands("fused_residual_mlp", x, [("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
                                                             ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias)])
    alpha_value = 1.0
    if not isinstance(alpha, Tensor):
        alpha, alpha_value = None, float(alpha)
    inputs = (x, w1, b1, w2, b2, alpha, alpha_value, sample_scale, bool(recompute), pre_name or "none", pre_param,
              act_name, act_param, *norm_args, float(dropout), float(hidden_dropout), seeds)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    given, next_norm, extra = op_arguments(_chain, calls[0] is not None and calls[0].running is None, rows)
    inputs += extra
    if eager_mode_call(x, w1):
        y, _, mean, var, hmean, hvar, *emitted = _EagerMLP.apply(*inputs)
    else:
        with autocast_off(device_type):
            y, _, mean, var, hmean, hvar, *emitted = torch.ops.fusedres.residual_mlp_forward(*inputs)
    if given is not None:
        mean, var = given
    for call, m, v in zip(calls, (mean, hmean), (var, hvar)):
        if call is not None and call.update is not None and rows:
            update_running_stats(call.update, m, v, rows)
    if next_norm != "none" and rows and backend_for(x.device) != "eager":
        hand_over(y, next_norm, *emitted)
    return y


def _reference_with_masks(x, w1, b1, w2, b2, alpha, sample_scale, pre, act, norm, hidden_norm, dropout,
                          hidden_dropout, seeds) -> Tensor:
    """The eager backend with dropout: the reference, given the kernels' keep masks for the drawn
    seeds (:func:`fusedres.dropout.keep_mask`)."""
    from .reference import residual_mlp_reference
    masks = [keep_mask(seed, shape, p, x.device, w2.dtype) if p else None
             for seed, shape, p in ((seeds[0:1], _hidden_shape(x, w1), hidden_dropout), (seeds[1:2], x.shape, dropout))]
    return residual_mlp_reference(x, w1, b1, w2, b2, alpha=alpha, sample_scale=sample_scale, pre_act=pre, act=act,
                                  norm=norm, hidden_norm=hidden_norm, dropout=dropout, hidden_dropout=hidden_dropout,
                                  hidden_dropout_mask=masks[0], dropout_mask=masks[1])


def _drops(seeds, dropout, hidden_dropout, like) -> tuple:
    """fc2's ``(branch, hidden)`` dropout operands from the call's two seeds (None: none)."""
    if seeds is None:
        return kernels.NO_DROPOUT, kernels.NO_DROPOUT
    return (dropout_operands(seeds[1:2] if dropout else None, dropout, like),
            dropout_operands(seeds[0:1] if hidden_dropout else None, hidden_dropout, like))


def _hidden_shape(x: Tensor, w1: Tensor) -> tuple:
    return (*x.shape[:-1], w1.shape[0])


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels read biases and ``s`` at unit stride."""
    return t if not isinstance(t, Tensor) or t.numel() <= 1 or t.stride(0) == 1 else t.contiguous()


def _call_passes(w2, has_b1: bool, has_b2: bool, alpha, alpha_value, sample_scale, pre: Activation | None,
                 act: Activation, norm: tuple, hidden: tuple, seeds, dropout, hidden_dropout, next_norm="none",
                 needs=None) -> dict:
    """The passes by role of the call's recipe (:func:`fusedres.recipes.op_passes`) for the gradients
    ``needs`` (names of :data:`~fusedres.kernels.recipe.MLP_GRADS`; None: every one). ``norm``
    and ``hidden``: ``(kind, weight, bias, batch statistics?)`` of the norm on x and of h.
    ``has_b1``, ``has_b2``: the linears have biases (the backward saves them only where needed);
    ``w2``: fc2's weight, whose dtype decides a float alpha's kind (fp64: by pointer), as fc2's
    launch decides it."""
    (kind, nw, nb, batch_stats), (hkind, hnw, hnb, hbatch_stats) = norm, hidden
    pre_name, pre_param = kernel_args(pre)
    fields = (pre_name, pre_param, act.name, act.param,
              call_alpha_kind(alpha if alpha is not None else alpha_value, w2.dtype == torch.float64),
              alpha is not None, has_b1, sample_scale is not None, None if kind == "none" else kind,
              nw is not None, nb is not None, batch_stats, None if hkind == "none" else hkind, hnw is not None,
              hnb is not None, hbatch_stats, seeds is not None and bool(dropout),
              seeds is not None and bool(hidden_dropout), None if next_norm == "none" else next_norm, has_b2)
    return op_passes(MLPRecipe, fields, needs)


def _triton_hidden(p, xk, xs, rows, w1, b1, h, norm=kernels.NO_NORM, stats_partials=(None, None)):
    """Forward 1 (fc1's pass ``p``): ``h = pre_act(norm(x)) @ W1.T + b1``, stored as the
    pre-activation (``norm``: the six normalization operands, the A-tile prologue;
    ``stats_partials``: the hidden norm's statistics sinks). Returns the launch."""
    return launch_pass(p, rows, xk, xs, w1, h.view(rows.M, w1.shape[0]), bias=b1, norm=norm,
                       stats_partials=stats_partials)


_NO_NORM_ARGS = ("none", None, None, 0.0, None, None)


def _hidden_stats(kind, launch, parts, M, H):
    """The hidden norm's batch statistics from fc1's epilogue partials: ``(mean, var)``."""
    from .kernels.norm import partial_stats
    cfg = launch.config.kwargs
    if kind == "batch":
        return partial_stats(kind, parts[0], cdiv(M, cfg["BLOCK_M"]), cfg["BLOCK_M"], H, M)
    return partial_stats(kind, parts[1], cdiv(H, cfg["BLOCK_N"]), cfg["BLOCK_N"], M, H)


def _eager_hidden(x, w1, b1, pre: Activation | None):
    return F.linear((x if pre is None else pre(x)).to(w1.dtype), w1, b1)


def _refuse_eager_norms(norm: str, hidden: str, seeds=None) -> None:
    """The custom ops' eager path has no norms and no dropout: ``fused_residual_mlp`` sends such a
    block on the eager backend to the reference (the torch modules) before reaching them."""
    if norm != "none" or hidden != "none" or seeds is not None:
        raise RuntimeError("fusedres::residual_mlp_forward/backward: a norm or dropout on the eager backend is "
                           "computed by fused_residual_mlp through the eager reference; call that, not the custom op")


def _norm_state(x, xs, rows, norm, given=None):
    """``(operands for the kernels, mean, var)`` of a ``(kind, weight, bias, eps, running_mean,
    running_var)`` norm: the batch statistics (``given``, a chain's ``(mean, var)``, else one pass
    over x) or BatchNorm's running ones."""
    kind, weight, bias, eps, running_mean, running_var = norm
    if kind == "none":
        return kernels.NO_NORM, None, None
    from .norm_op import _stats
    mean, var, rstd = _stats(x, xs, rows, kind, eps, running_mean, running_var, given)
    return kernels.norm_operands(kind, mean, rstd, weight, bias), mean, var


def _mlp_forward(x, w1, b1, w2, b2, alpha, alpha_value, sample_scale, recompute, pre, act, norm=_NO_NORM_ARGS,
                 hidden=_NO_NORM_ARGS, dropout=0.0, hidden_dropout=0.0, seeds=None, given=None, next_norm="none"):
    """``(y, h, mean, var, hidden mean, hidden var, next mean, next var)``: the batch statistics of
    the norm (``given``: a chain's, handed over) and of the hidden norm (None: none, or BatchNorm's
    running statistics), and the next block's norm's statistics of y (``next_norm``: a chain's)."""
    b1, b2, sample_scale = _contiguous(b1), _contiguous(b2), _contiguous(sample_scale)
    scale = _contiguous(_scale(alpha, alpha_value))
    if backend_for(x.device) == "eager":
        _refuse_eager_norms(norm[0], hidden[0], seeds)
        h = _eager_hidden(x, w1, b1, pre)
        branch = F.linear(act(h), w2, b2)
        if sample_scale is not None:
            branch = branch * sample_rows(sample_scale, branch)
        if scale is not None:
            branch = scale * branch
        # (the fake kernel's layout; the eager backend emits no chain statistics)
        return (x + branch).contiguous(), h.contiguous(), None, None, None, None, *sink_stats("none", None, None, 0, 0, x)
    warn_if_ungated(pre, x.device)
    warn_if_ungated(act, x.device)
    passes = _call_passes(w2, b1 is not None, b2 is not None, alpha, alpha_value, sample_scale, pre, act,
                          (*norm[:3], norm[4] is None), (*hidden[:3], hidden[4] is None), seeds, dropout,
                          hidden_dropout, next_norm)
    fc1, fc2 = passes["fc1"], passes["fc2"]
    h = x.new_empty(_hidden_shape(x, w1), dtype=w1.dtype)
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, w2.dtype))
    rows, (xs, hs), (xk, hk) = plan_rows(x, h)
    ops, mean, var = _norm_state(xk, xs, rows, norm, given)
    hkind, hw, hb, heps, hrm, hrv = hidden
    hmean = hvar = None
    hops = kernels.NO_NORM
    emitted = sink_stats(next_norm, None, None, 0, w2.shape[0], x)        # (no rows: fc2 launches nothing)
    H = w1.shape[0]
    parts = (None, None)
    if hkind != "none" and hrm is None:      # batch statistics of h: from fc1's epilogue
        acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
        parts = ((torch.empty(cdiv(rows.M, 16) * 2 * H, device=x.device, dtype=acc_t), None) if hkind == "batch"
                 else (None, torch.empty(cdiv(H, 16) * 2 * rows.M, device=x.device, dtype=acc_t)))
    if rows.M:
        launch = _triton_hidden(fc1, xk, xs, rows, w1, b1, h, ops, parts)
        if hkind != "none":
            if hrm is None:
                hmean, hvar = _hidden_stats(hkind, launch, parts, rows.M, H)
                rstd = torch.rsqrt(hvar + heps)
            else:
                acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
                rstd = torch.rsqrt(hrv.to(acc_t) + heps)
            hops = kernels.norm_operands(hkind, hmean if hrm is None else hrm.to(rstd.dtype), rstd, hw, hb)
        drop, hdrop = _drops(seeds, dropout, hidden_dropout, w2)
        sinks = stats_sinks(next_norm, rows.M, w2.shape[0], x)
        launch = launch_pass(fc2, rows, hk, hs, w2, y.view(rows.M, w2.shape[0]), bias=b2, alpha=scale,
                             residual=(xk, xs), sample_scale=sample_scale, rows_per_sample=rows_per_sample(x),
                             norm=hops, stats_partials=sinks, dropout=drop, dropout_a=hdrop)
        emitted = sink_stats(next_norm, launch, sinks, rows.M, w2.shape[0], x)
    elif hkind != "none" and hrm is None:
        acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
        hmean, hvar = torch.zeros(H, device=x.device, dtype=acc_t), torch.zeros(H, device=x.device, dtype=acc_t)
        if hkind != "batch":
            hmean, hvar = hmean[:0], hvar[:0]
        if hkind == "rms":
            hmean = None
    return y, h, mean, var, hmean, hvar, *emitted


def _forward_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                fc2_bias: Optional[Tensor], alpha: Optional[Tensor], alpha_value: float,
                sample_scale: Optional[Tensor], recompute: bool, pre_act: str = "relu",
                pre_act_param: float = 0.0, act: str = "relu", act_param: float = 0.0, norm: str = "none",
                norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, eps: float = 0.0,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                hidden_norm: str = "none", hidden_norm_weight: Optional[Tensor] = None,
                hidden_norm_bias: Optional[Tensor] = None, hidden_eps: float = 0.0,
                hidden_running_mean: Optional[Tensor] = None, hidden_running_var: Optional[Tensor] = None,
                dropout: float = 0.0, hidden_dropout: float = 0.0, seeds: Optional[Tensor] = None,
                stats_mean: Optional[Tensor] = None, stats_var: Optional[Tensor] = None, next_norm: str = "none"
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, h, mean, var)``: the output, the hidden pre-activation (an empty tensor with
    ``recompute``) and the norm's batch statistics (empty without a norm, or with BatchNorm's
    running statistics given). ``pre_act``: a name of the activation table, or ``"none"``;
    ``norm``: ``"none"``, ``"batch"``, ``"layer"`` or ``"rms"``; ``hidden_norm`` the same for h,
    whose batch statistics are the last two outputs. ``seeds`` (two int64: the hidden dropout's,
    the branch dropout's; None: no dropout) with the probabilities ``hidden_dropout`` and
    ``dropout``. ``stats_mean``/``stats_var``: the norm's batch statistics of x handed over by the
    previous block of a chain (no statistics pass; then not returned); ``next_norm``: the next
    block's norm, whose statistics of y fc2's epilogue emits as the last two outputs
    (:mod:`fusedres.chain`). ``fusedres::residual_mlp_forward`` is this
    function as a custom op; the eager-mode node calls it directly."""
    given = (stats_mean, stats_var) if stats_var is not None else None
    y, h, mean, var, hmean, hvar, nmean, nvar = _mlp_forward(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, alpha, alpha_value, sample_scale, recompute,
        *_acts(pre_act, pre_act_param, act, act_param), (norm, norm_weight, norm_bias, eps, running_mean, running_var),
        (hidden_norm, hidden_norm_weight, hidden_norm_bias, hidden_eps, hidden_running_mean, hidden_running_var),
        dropout, hidden_dropout, seeds, given, next_norm)
    return (y, (x.new_empty(0, dtype=fc1_weight.dtype) if recompute else h),
            *_stats_outputs(x, mean, var, running_mean if given is None else stats_var),
            *_stats_outputs(x, hmean, hvar, hidden_running_mean), nmean, nvar)


residual_mlp_forward = torch.library.custom_op("fusedres::residual_mlp_forward", _forward_op, mutates_args=())


def _stats_outputs(x, mean, var, running_mean):
    """A norm's statistics as the op returns them (as the fake kernel: in fp32/fp64 when computed
    here, else empty in x's dtype)."""
    stats = var is not None and running_mean is None
    empty = x.new_empty(0, dtype=var.dtype if stats else x.dtype)
    return mean if stats and mean is not None else empty.clone(), var if stats else empty.clone()


@residual_mlp_forward.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, alpha, alpha_value, sample_scale, recompute, pre_act="relu",
      pre_act_param=0.0, act="relu", act_param=0.0, norm="none", norm_weight=None, norm_bias=None, eps=0.0,
      running_mean=None, running_var=None, hidden_norm="none", hidden_norm_weight=None, hidden_norm_bias=None,
      hidden_eps=0.0, hidden_running_mean=None, hidden_running_var=None, dropout=0.0, hidden_dropout=0.0, seeds=None,
      stats_mean=None, stats_var=None, next_norm="none"):
    from .norm_op import fake_sink_stats
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, fc2_weight.dtype))
    h = x.new_empty(0 if recompute else _hidden_shape(x, fc1_weight), dtype=fc1_weight.dtype)
    return (y, h, *_fake_stats(x, norm, running_mean if stats_var is None else stats_var, x.shape[-1]),
            *_fake_stats(x, hidden_norm, hidden_running_mean, fc1_weight.shape[0]), *fake_sink_stats(next_norm, x, y))


def _fake_stats(x, norm, running_mean, width):
    if norm == "none" or running_mean is not None:
        return x.new_empty(0), x.new_empty(0)
    from .kernels.norm import acc_dtype
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    mean_shape, var_shape = ((width,), (width,)) if norm == "batch" else (((M,) if norm == "layer" else (0,)), (M,))
    return x.new_empty(mean_shape, dtype=acc_dtype(x)), x.new_empty(var_shape, dtype=acc_dtype(x))


def _eager_mlp_backward(grad, x, h, w1, b1, w2, b2, alpha, sample_scale, needs, pre, act):
    """The reference gradients, as eager autograd computes them: (dx, dW1, db1, dW2, db2, dalpha)."""
    need_dx, need_w1, need_b1, need_w2, need_b2, need_alpha = needs
    D, H = w2.shape
    g = grad.to(w2.dtype)
    gs = g if sample_scale is None else g * sample_rows(sample_scale, g)
    ga = gs if alpha is None else (alpha * gs).to(w2.dtype)    # (a per-channel alpha would promote)
    r = act(h)
    dh = act.backward(h, ga @ w2).to(h.dtype)
    dx = None
    if need_dx:
        dxb = dh @ w1
        dx = (grad + (dxb if pre is None else pre.backward(x, dxb))).to(x.dtype).contiguous()
    x2, dh2, ga2, r2 = x.reshape(-1, D).to(w1.dtype), dh.reshape(-1, H), ga.reshape(-1, D), r.reshape(-1, H)
    dw1 = (dh2.T @ (x2 if pre is None else pre(x2))).to(w1.dtype) if need_w1 else None
    db1 = dh2.sum(0).to(w1.dtype) if need_b1 else None
    dw2 = (ga2.T @ r2).to(w2.dtype) if need_w2 else None
    db2 = ga2.sum(0).to(w2.dtype) if need_b2 else None
    dalpha = None
    if need_alpha:
        lin = F.linear(r2, w2, b2)
        prod = gs.reshape(-1, D) * lin
        dalpha = (prod.sum(0) if alpha.numel() > 1 else prod.sum()).to(alpha.dtype).reshape(alpha.shape)
    return dx, dw1, db1, dw2, db2, dalpha


def _saved_norm_operands(x, state):
    """The kernels' norm operands from a saved ``(kind, weight, bias, eps, mean, var, ...)`` state."""
    if state is None:
        return kernels.NO_NORM
    from .norm_op import saved_norm_operands
    return saved_norm_operands(x, *state[:6])


def _mlp_backward(grad, x, h, w1, b1, w2, b2, alpha, alpha_value, sample_scale, needs, pre, act, norm=None,
                  hidden=None, dropout=0.0, hidden_dropout=0.0, seeds=None):
    """(dx, dW1, db1, dW2, db2, dalpha, dnorm_weight, dnorm_bias, dhidden_norm_weight,
    dhidden_norm_bias), None for each not asked for. ``norm`` and ``hidden``: None, or ``(kind,
    weight, bias, eps, mean, var, batch_stats, need_weight, need_bias)`` of the norm on x and of the
    hidden norm, with their saved statistics (BatchNorm's running ones when not ``batch_stats``)."""
    b1, b2, sample_scale = _contiguous(b1), _contiguous(b2), _contiguous(sample_scale)
    scale = _contiguous(_scale(alpha, alpha_value))
    if backend_for(x.device) == "eager":
        _refuse_eager_norms(norm[0] if norm else "none", hidden[0] if hidden else "none", seeds)
        if h is None:                                            # recompute: forward 1 again
            h = _eager_hidden(x, w1, b1, pre)
        return (*_eager_mlp_backward(grad, x, h, w1, b1, w2, b2, scale, sample_scale, needs, pre, act),
                None, None, None, None)
    need_dx, need_w1, need_b1, need_w2, need_b2, need_alpha = needs
    need_nw, need_nb = (norm[7], norm[8]) if norm is not None else (False, False)
    need_hnw, need_hnb = (hidden[7], hidden[8]) if hidden is not None else (False, False)
    wanted = frozenset(n for n, need in zip(("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "alpha",
                                             "norm_weight", "norm_bias", "hidden_norm_weight", "hidden_norm_bias"),
                                            (*needs, need_nw, need_nb, need_hnw, need_hnb)) if need)
    no_norm = ("none", None, None, True)
    passes = _call_passes(w2, b1 is not None or need_b1, b2 is not None or need_b2, alpha, alpha_value,
                          sample_scale, pre, act, no_norm if norm is None else (norm[0], norm[1], norm[2], norm[6]),
                          no_norm if hidden is None else (hidden[0], hidden[1], hidden[2], hidden[6]),
                          seeds, dropout, hidden_dropout, needs=wanted)
    ops, hops = _saved_norm_operands(x, norm), _saved_norm_operands(x, hidden)
    if h is None:                                                # recompute: forward 1 again
        h = x.new_empty(_hidden_shape(x, w1), dtype=w1.dtype)
        rows, (xs,), (xk,) = plan_rows(x)
        if rows.M:      # (fc1's pass without the hidden norm's statistics sink: they were saved)
            _triton_hidden(_without_stats(passes["fc1"]), xk, xs, rows, w1, b1, h, ops)
    dh_pass, dw2_pass, dx_pass, dw1_pass = passes["dh"], passes["dw2"], passes["dx"], passes["dw1"]
    dnw = dnb = dhnw = dhnb = None
    D, H = w2.shape
    rps = rows_per_sample(x)
    dh = h.new_empty(h.shape) if dh_pass is not None else None
    rows, strides, (gk, xk, hk, *dhk) = plan_rows(grad, x, h, *([dh] if dh is not None else []))
    gs, xs, hs = strides[:3]
    dx = dw1 = db1 = dw2 = db2 = dalpha = None
    drop, hdrop = _drops(seeds, dropout, hidden_dropout, w2)
    fc2_operands = dict(alpha=scale, sample_scale=sample_scale, rows_per_sample=rps, dropout=drop, dropout_a=hdrop)
    if dh_pass is not None and hidden is not None:
        # backward 1 with the hidden norm: dz = act'(hidden_norm(h)) * (s * alpha * g @ W2) and its
        # sinks, then the finishing pass (no residual gradient: dh is the norm's input gradient)
        from .norm_op import norm_input_grad
        need_dh = need_dx or need_w1 or need_b1 or need_nw or need_nb      # (else only the hidden affine's)
        _, dhnw, dhnb = norm_input_grad(dh_pass, gk, gs, hk, hs, w2, rows, h, hops, hidden, None, None, need_dh,
                                        fc2_operands, out=dhk[0].view(rows.M, H))
    elif dh_pass is not None:
        # backward 1: dh = [h > 0] * (s * alpha * g @ W2)
        launch_pass(dh_pass, rows, hk, hs, w2, dhk[0].view(rows.M, H), g=gk, gs=gs, **fc2_operands)
    if dw2_pass is not None:
        # backward 2: dW2 = alpha * (s g).T @ relu(h), db2, the dalpha partials
        dw2, db2, dalpha = weight_grads(dw2_pass, gk, gs, hk, hs, rows, w2, b2, need_w2, norm=hops, **fc2_operands)
    if dx_pass is not None and norm is not None:
        # backward 3 with a norm: dz = pre_act'(z) * (dh @ W1) and its sinks, then the finishing pass
        from .norm_op import norm_input_grad
        dx, dnw, dnb = norm_input_grad(dx_pass, dhk[0], strides[3], xk, xs, w1, rows, x, ops, norm, gk, gs, need_dx,
                                       {})
    elif dx_pass is not None:
        # backward 3: dx = g + [x > 0] * (dh @ W1)
        dx = x.new_empty(x.shape)
        launch_pass(dx_pass, rows, xk, xs, w1, dx.view(rows.M, D), g=dhk[0], gs=strides[3], residual=(gk, gs))
    if dw1_pass is not None:
        # backward 4: dW1 = dh.T @ relu(norm(x)), db1
        dw1 = w1.new_empty(H, D)
        db1 = w1.new_empty(H) if "db" in dw1_pass.pieces else None
        launch_pass(dw1_pass, rows, xk, xs, w1, dw1, g=dhk[0], gs=strides[3], norm=ops, db=db1)
        if not need_w1:
            dw1 = None
    return dx, dw1, db1, dw2, db2, dalpha, dnw, dnb, dhnw, dhnb


def _without_stats(p):
    """Pass ``p`` without a statistics sink (recompute's fc1: the statistics were saved)."""
    return dataclasses.replace(p, pieces=p.pieces - {"stats_col_partials", "stats_row_partials"})


def _backward_op(grad: Tensor, x: Tensor, h: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                 fc2_weight: Tensor, fc2_bias: Optional[Tensor], alpha: Optional[Tensor], alpha_value: float,
                 sample_scale: Optional[Tensor], recompute: bool, need_dx: bool, need_w1: bool,
                 need_b1: bool, need_w2: bool, need_b2: bool, need_alpha: bool, pre_act: str = "relu",
                 pre_act_param: float = 0.0, act: str = "relu", act_param: float = 0.0, norm: str = "none",
                 norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, eps: float = 0.0,
                 mean: Optional[Tensor] = None, var: Optional[Tensor] = None, batch_stats: bool = True,
                 need_norm_weight: bool = False, need_norm_bias: bool = False, hidden_norm: str = "none",
                 hidden_norm_weight: Optional[Tensor] = None, hidden_norm_bias: Optional[Tensor] = None,
                 hidden_eps: float = 0.0, hidden_mean: Optional[Tensor] = None,
                 hidden_var: Optional[Tensor] = None, hidden_batch_stats: bool = True,
                 need_hidden_norm_weight: bool = False, need_hidden_norm_bias: bool = False,
                 dropout: float = 0.0, hidden_dropout: float = 0.0, seeds: Optional[Tensor] = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``residual_mlp_forward`` with respect to (x, fc1_weight, fc1_bias, fc2_weight,
    fc2_bias, alpha, norm_weight, norm_bias); an empty tensor stands for each not asked for. ``h``
    is ignored (recomputed) with ``recompute``. ``mean``, ``var``: the norm's saved statistics. ``fusedres::residual_mlp_backward`` is this
    function as a custom op; the eager-mode node calls it directly."""
    state = None if norm == "none" else (norm, norm_weight, norm_bias, eps, mean, var, batch_stats,
                                         need_norm_weight, need_norm_bias)
    hidden = None if hidden_norm == "none" else (hidden_norm, hidden_norm_weight, hidden_norm_bias, hidden_eps,
                                                 hidden_mean, hidden_var, hidden_batch_stats,
                                                 need_hidden_norm_weight, need_hidden_norm_bias)
    grads = _mlp_backward(grad, x, None if recompute else h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, alpha,
                          alpha_value, sample_scale, (need_dx, need_w1, need_b1, need_w2, need_b2, need_alpha),
                          *_acts(pre_act, pre_act_param, act, act_param), state, hidden, dropout, hidden_dropout,
                          seeds)
    likes = (x, fc1_weight, fc1_weight, fc2_weight, fc2_weight, fc2_weight, x, x, x, x)
    return tuple(t if t is not None else like.new_empty(0) for t, like in zip(grads, likes))


residual_mlp_backward = torch.library.custom_op("fusedres::residual_mlp_backward", _backward_op, mutates_args=())


@residual_mlp_backward.register_fake
def _(grad, x, h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, alpha, alpha_value, sample_scale, recompute, need_dx,
      need_w1, need_b1, need_w2, need_b2, need_alpha, pre_act="relu", pre_act_param=0.0, act="relu", act_param=0.0,
      norm="none", norm_weight=None, norm_bias=None, eps=0.0, mean=None, var=None, batch_stats=True,
      need_norm_weight=False, need_norm_bias=False, hidden_norm="none", hidden_norm_weight=None,
      hidden_norm_bias=None, hidden_eps=0.0, hidden_mean=None, hidden_var=None, hidden_batch_stats=True,
      need_hidden_norm_weight=False, need_hidden_norm_bias=False, dropout=0.0, hidden_dropout=0.0, seeds=None):
    H, D = fc1_weight.shape
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            fc1_weight.new_empty(H, D) if need_w1 else fc1_weight.new_empty(0),
            fc1_weight.new_empty(H) if need_b1 else fc1_weight.new_empty(0),
            fc2_weight.new_empty(D, H) if need_w2 else fc2_weight.new_empty(0),
            fc2_weight.new_empty(D) if need_b2 else fc2_weight.new_empty(0),
            alpha.new_empty(alpha.shape) if need_alpha else fc2_weight.new_empty(0),
            norm_weight.new_empty(norm_weight.shape) if need_norm_weight else x.new_empty(0),
            norm_bias.new_empty(norm_bias.shape) if need_norm_bias else x.new_empty(0),
            hidden_norm_weight.new_empty(hidden_norm_weight.shape) if need_hidden_norm_weight else x.new_empty(0),
            hidden_norm_bias.new_empty(hidden_norm_bias.shape) if need_hidden_norm_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    (x, w1, b1, w2, b2, alpha, alpha_value, sample_scale, recompute, pre_act, pre_param, act, act_param, *norms) = inputs
    norm, norm_weight, norm_bias, eps, running_mean, running_var = norms[:6]
    hnorm, hnorm_weight, hnorm_bias, heps, hrunning_mean, hrunning_var = norms[6:12]
    given = tuple(norms[12:])       # (a direct call may leave the dropout and chain arguments at their defaults)
    dropout, hidden_dropout, seeds, stats_mean, stats_var, _ = given + (0.0, 0.0, None, None, None, "none")[len(given):]
    ctx.dropout = (dropout, hidden_dropout)
    ctx.has = (b1 is not None, b2 is not None, alpha is not None, norm_weight is not None, norm_bias is not None,
               hnorm_weight is not None, hnorm_bias is not None)
    ctx.acts = (pre_act, pre_param, act, act_param)
    ctx.alpha_value, ctx.recompute = alpha_value, recompute
    ctx.norm = (norm, eps, running_mean is None, hnorm, heps, hrunning_mean is None)
    ctx.mark_non_differentiable(*output[2:])
    # Saved: x, the weights, alpha, s and h (not with recompute); b1 only to recompute h, b2 only
    # for dalpha's <g.sum(0), b2> term; with norms their affines and statistic vectors, never a
    # normalized tensor; with dropout its two seeds, never a mask.
    keep_b1 = b1 if recompute else None
    keep_b2 = b2 if (alpha is not None and alpha.requires_grad) else None
    x_stats = ((running_mean, running_var) if running_mean is not None
               else (stats_mean if stats_mean is not None else output[2], stats_var) if stats_var is not None
               else output[2:4])
    h_stats = (hrunning_mean, hrunning_var) if hrunning_mean is not None else output[4:6]
    ctx.save_for_backward(x, output[1], w1, keep_b1, w2, keep_b2, alpha, sample_scale, norm_weight, norm_bias,
                          *x_stats, hnorm_weight, hnorm_bias, *h_stats, seeds)


#: Input positions of the norms' affines in ``residual_mlp_forward``.
_NORM_WEIGHT, _NORM_BIAS, _HIDDEN_WEIGHT, _HIDDEN_BIAS = 14, 15, 20, 21


def _backward(ctx, grad, _grad_h, *_grad_stats, direct: bool = False):
    x, h, w1, b1, w2, b2, alpha, sample_scale, nw, nb, mean, var, hnw, hnb, hmean, hvar, seeds = ctx.saved_tensors
    has_b1, has_b2, has_alpha, has_nw, has_nb, has_hnw, has_hnb = ctx.has
    n = ctx.needs_input_grad

    def need(i, has):       # (a call may leave the norms' arguments at their defaults)
        return len(n) > i and n[i] and has
    needs = (n[0], n[1], n[2] and has_b1, n[3], n[4] and has_b2, n[5] and has_alpha)
    norm, eps, batch_stats, hnorm, heps, hbatch_stats = ctx.norm
    norm_needs = (need(_NORM_WEIGHT, has_nw), need(_NORM_BIAS, has_nb))
    hidden_needs = (need(_HIDDEN_WEIGHT, has_hnw), need(_HIDDEN_BIAS, has_hnb))
    # (direct: the eager-mode node calls the implementation; the op's autograd refuses a double backward)
    backward = _backward_op if direct else torch.ops.fusedres.residual_mlp_backward
    grads = backward(grad, x, h, w1, b1, w2, b2, alpha, ctx.alpha_value, sample_scale, ctx.recompute, *needs,
                     *ctx.acts, norm, nw, nb, eps, mean, var, batch_stats, *norm_needs, hnorm, hnw, hnb, heps, hmean,
                     hvar, hbatch_stats, *hidden_needs, *ctx.dropout, seeds)
    out = [None] * 31
    for i, (g, ok) in enumerate(zip(grads[:6], needs)):
        out[i] = g if ok else None
    for i, g, ok in zip((_NORM_WEIGHT, _NORM_BIAS, _HIDDEN_WEIGHT, _HIDDEN_BIAS), grads[6:],
                        (*norm_needs, *hidden_needs)):
        out[i] = g if ok else None
    return tuple(out[:len(n)])


#: The eager-mode autograd node: the ops' implementations without their dispatch.
_EagerMLP = eager_node("_EagerMLP", _forward_op, _setup_context, _backward)
residual_mlp_forward.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(residual_mlp_backward, "fused_residual_mlp", "ResidualMLPBlock")
