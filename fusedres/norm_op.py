"""The block with a normalization or dropout, fused: ``y = x + alpha * s * dropout(act(norm(x)) @
W.T + b)``, He et al.'s full pre-activation (BatchNorm), the pre-norm blocks (LayerNorm,
RMSNorm), and the branch dropout of rtdl's and timm's blocks (either may be absent).

No tensor of ``x``'s size is written but the output: the forward GEMM normalizes its A tiles from
the statistics (``kernels.gemm.normalize``), and those come from one read-only pass over ``x``
(``kernels.norm``), which writes only ``[D]`` (BatchNorm) or ``[M]`` (LayerNorm, RMSNorm)
vectors. The autograd saves ``x`` and those vectors, never ``norm(x)``.

The backward, in four launches (plus dW's split-M reduce):

1. dx's GEMM ``dz = act'(z) * s * ((alpha * g) @ W)`` at ``z = norm(x)``, recomputed in its
   epilogue; its sinks write dz's column sums (``sum dz``, ``sum dz * x_hat`` per row tile: dbeta,
   dgamma and BatchNorm's correction) and row sums (LayerNorm's and RMSNorm's correction), and it
   stores dz into the dx buffer;
2. the fixed-order sums of those partials (tiny);
3. the finishing pass ``dx = g + rstd * (gamma * dz - c1 - x_hat * c2)`` in place
   (``kernels.norm.norm_dx_kernel``): the one pass the global reduction forces;
4. dW's GEMM with the same normalizing prologue on ``x``.

Two custom ops carry it, so that ``torch.compile`` sees opaque, shape-known nodes:
``fusedres::norm_residual_forward -> (y, mean, var)`` and ``fusedres::norm_residual_backward``.
BatchNorm's running statistics are updated outside them, from the returned batch statistics, as
``nn.BatchNorm1d`` updates them.

Dropout (:mod:`fusedres.dropout`): the call draws one seed on the device and passes it to the
ops as a tensor; the forward's epilogue, dx's loop over g and dW's tiles of g regenerate the keep
mask from it. Without a norm, the backward is the plain block's two launches (dx adds g itself).
This path has no prepared launches (per-call Python dispatch, as the custom ops): a block
without norm and dropout takes :func:`fusedres.fused_residual`'s prepared path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .chain import hand_over, op_arguments
from ._layout import plan_rows
from .activations import ActLike, resolve as resolve_act
from .droppath import rows_per_sample
from .dropout import draw_seeds, dropout_operands, keep_mask, note_draw
from .kernels._common import cdiv
from .kernels.launch import launch_pass
from .kernels.norm import acc_dtype, col_stats, norm_dx, row_stats
from .norm import NormCall, NormLike, norm_kind, update_running_stats
from .recipes import single_passes

WHO = "fused_residual"


def fused_norm_residual(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha, sample_scale: Optional[Tensor],
                        act: ActLike, norm: NormLike, dropout: float = 0.0, chain=None) -> Tensor:
    """:func:`fusedres.fused_residual` with ``norm``, an active ``dropout`` (training, ``p > 0``)
    or a chain call (:class:`fusedres.chain.ChainCall`: the batch statistics of x handed over, the
    next norm's statistics of y to emit) given (its inputs checked there)."""
    from .op import autocast_off, backend_for, eager_mode_call, gemm_operands
    if norm is not None:
        norm_kind(norm, x.shape[-1] if x.dim() else None, WHO)
    act = resolve_act(act, WHO)
    seed = draw_seeds(1, x.device) if dropout else None
    if seed is not None and x.device.type != "meta":
        note_draw("dropout", seed, (*x.shape[:-1], weight.shape[0]), dropout, weight.dtype)
    if backend_for(x.device) == "eager":       # (the module's own forward updates its statistics)
        return _eager(x, weight, bias, alpha, sample_scale, act, norm, dropout, seed)
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    call = None
    if norm is not None:
        check_norm_devices(WHO, x, norm)
        call = NormCall(norm, x.shape[-1], WHO)
        check_rows(call, M, D)
    weight, bias = gemm_operands(WHO, x, [("weight", weight), ("bias", bias)])
    alpha_value = 1.0
    if not isinstance(alpha, Tensor):
        alpha, alpha_value = None, float(alpha)
    if call is not None:
        running_mean, running_var = call.running if call.running is not None else (None, None)
        norm_args = (call.kind, call.weight, call.bias, float(default_eps(call, x)), running_mean, running_var)
    else:
        norm_args = ("none", None, None, 0.0, None, None)
    inputs = (x, weight, bias, alpha, alpha_value, sample_scale, act.name, act.param, *norm_args, float(dropout), seed)
    given, next_norm, extra = op_arguments(chain, call is not None and call.running is None, M)
    inputs += extra
    if eager_mode_call(x, weight):
        y, mean, var, *emitted = _EagerNormResidual.apply(*inputs)
    else:
        with autocast_off(x.device.type):
            y, mean, var, *emitted = torch.ops.fusedres.norm_residual_forward(*inputs)
    if given is not None:
        mean, var = given
    if call is not None and call.update is not None and M:
        update_running_stats(call.update, mean, var, M)
    if next_norm != "none" and M:
        hand_over(y, next_norm, *emitted)
    return y


def default_eps(call: NormCall, x: Tensor) -> float:
    """The norm's eps; RMSNorm's None is the machine epsilon of the dtype torch computes it in (its
    opmath: fp32 for fp16 and bf16), as ``F.rms_norm``."""
    return call.eps if call.eps is not None else torch.finfo(acc_dtype(x)).eps


def check_rows(call: NormCall, M: int, D: int) -> None:
    """BatchNorm on batch statistics needs two rows, as torch's (none is an empty output)."""
    if call.kind == "batch" and call.running is None and M == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {[M, D]}")


def check_norm_devices(who: str, x: Tensor, norm) -> None:
    """A norm module's parameters and running statistics on x's device, or a clear error."""
    if isinstance(norm, str):
        return
    from .op import check_one_device
    named = [(f"norm.{n}", t) for n, t in (*norm.named_parameters(recurse=False), *norm.named_buffers(recurse=False))
             if t is not None and n != "num_batches_tracked"]
    check_one_device(who, [("x", x), *named])


def _eager(x, weight, bias, alpha, sample_scale, act, norm, dropout=0.0, seed=None) -> Tensor:
    """The eager path (a CPU without the interpreter, or ``set_backend("eager")``): the reference,
    with the kernels' keep mask for the drawn seed (:func:`fusedres.dropout.keep_mask`)."""
    from .reference import residual_reference
    mask = None
    if seed is not None:
        mask = keep_mask(seed, (*x.shape[:-1], weight.shape[0]), dropout, x.device, weight.dtype)
    return residual_reference(x, weight, bias, alpha=alpha, sample_scale=sample_scale, act=act, norm=norm,
                              dropout=dropout, dropout_mask=mask)


# ---------------------------------------------------------------------------------------------
# The launches


def _stats(x, xs, rows, kind, eps, running_mean, running_var, given=None):
    """``(mean, var, rstd)`` in the accumulator dtype: the batch statistics (``given``: ``(mean,
    var)`` handed over by the previous block of a chain, else one pass over ``x``) or BatchNorm's
    running ones; ``mean`` None for RMSNorm (``var`` is then the mean square)."""
    acc = acc_dtype(x)
    if running_mean is not None:
        mean, var = running_mean.to(acc), running_var.to(acc)
    elif given is not None and given[1] is not None:
        mean, var = given[0] if kind != "rms" else None, given[1]
    elif kind == "batch":
        mean, var = col_stats(x, xs, rows)
    else:
        mean, var = row_stats(x, xs, rows, with_mean=kind == "layer")
    return mean, var, torch.rsqrt(var + eps)


def _scale(alpha, alpha_value):
    return alpha if alpha is not None else (None if alpha_value == 1.0 else alpha_value)


def _forward(x, weight, bias, alpha, alpha_value, sample_scale, act, act_param, kind, norm_weight, norm_bias, eps,
             running_mean, running_var, dropout=0.0, seed=None, stats_mean=None, stats_var=None, next_norm="none"):
    fwd = single_passes(weight, bias is not None, alpha, alpha_value, sample_scale, act, act_param, norm=kind,
                        norm_weight=norm_weight, norm_bias=norm_bias, batch_stats=running_mean is None,
                        dropout=seed is not None, next_norm=next_norm)["fwd"]
    rows, (xs,), (xk,) = plan_rows(x)
    N = weight.shape[0]
    y = x.new_empty((*x.shape[:-1], N), dtype=torch.promote_types(x.dtype, weight.dtype))
    if kind == "none":
        ops = kernels.NO_NORM
    else:
        mean, var, rstd = _stats(xk, xs, rows, kind, eps, running_mean, running_var, (stats_mean, stats_var))
        ops = kernels.norm_operands(kind, mean, rstd, norm_weight, norm_bias)
    sinks = stats_sinks(next_norm, rows.M, N, x)
    launch = launch_pass(fwd, rows, xk, xs, weight, y.view(rows.M, N), bias=bias, alpha=_scale(alpha, alpha_value),
                         sample_scale=sample_scale, rows_per_sample=rows_per_sample(x), norm=ops, stats_partials=sinks,
                         dropout=dropout_operands(seed, dropout, weight))
    emitted = sink_stats(next_norm, launch, sinks, rows.M, N, x)
    if running_mean is not None or kind == "none" or stats_var is not None:
        # (no statistics computed here: none, the running ones, or the chain's, which the caller has)
        return y, x.new_empty(0), x.new_empty(0), *emitted
    return y, (mean if mean is not None else x.new_empty(0, dtype=var.dtype)), var, *emitted


def stats_sinks(next_norm: str, M: int, N: int, like: Tensor) -> tuple:
    """The forward's ``(col, row)`` workspaces for the next norm's statistics partials of its
    ``[M, N]`` output (sized for the smallest tile, 16), in the accumulator dtype; ``(None,
    None)`` for ``next_norm`` ``"none"``."""
    if next_norm == "none" or not M:
        return (None, None)
    acc = acc_dtype(like)
    if next_norm == "batch":
        return (torch.empty(cdiv(M, 16) * 2 * N, device=like.device, dtype=acc), None)
    return (None, torch.empty(cdiv(N, 16) * 2 * M, device=like.device, dtype=acc))


def sink_stats(next_norm: str, launch, sinks: tuple, M: int, N: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The next norm's batch statistics ``(mean, var)`` of an ``[M, N]`` output from its forward's
    partials (Chan's merge in tile order): ``[N]`` for BatchNorm, ``[M]`` for LayerNorm; RMSNorm
    ``(empty, mean square)``. Empty tensors for ``"none"``."""
    from .kernels.norm import partial_stats
    acc = acc_dtype(like)
    if next_norm == "none":
        return like.new_empty(0, dtype=acc), like.new_empty(0, dtype=acc)
    width = N if next_norm == "batch" else M
    if launch is None:      # no rows: BatchNorm's error is the consumer's; a row norm has no rows
        return (like.new_zeros(width if next_norm != "rms" else 0, dtype=acc), like.new_zeros(width, dtype=acc))
    cfg = launch.config.kwargs
    if next_norm == "batch":
        mean, var = partial_stats("batch", sinks[0], cdiv(M, cfg["BLOCK_M"]), cfg["BLOCK_M"], N, M)
    else:
        mean, var = partial_stats(next_norm, sinks[1], cdiv(N, cfg["BLOCK_N"]), cfg["BLOCK_N"], M, N)
    return (mean if mean is not None else like.new_empty(0, dtype=acc)), var


def _backward(grad, x, weight, bias, alpha, alpha_value, sample_scale, act, act_param, kind, norm_weight,
              norm_bias, eps, mean, var, batch_stats, need_dx, need_weight, need_bias, need_alpha,
              need_norm_weight, need_norm_bias, dropout=0.0, seed=None):
    """(dx, dW, db, dalpha, dnorm_weight, dnorm_bias), None for each not asked for."""
    from .op import bias_grad, weight_grads
    needs = frozenset(n for n, need in (("x", need_dx), ("weight", need_weight), ("bias", need_bias),
                                        ("alpha", need_alpha), ("norm_weight", need_norm_weight),
                                        ("norm_bias", need_norm_bias)) if need)
    by_kind = single_passes(weight, bias is not None or need_bias, alpha, alpha_value, sample_scale, act, act_param,
                            norm=kind, norm_weight=norm_weight, norm_bias=norm_bias, batch_stats=batch_stats,
                            dropout=seed is not None, needs=needs)
    rows, (gs, xs), (gk, xk) = plan_rows(grad, x)
    ops = kernels.NO_NORM if kind == "none" else saved_norm_operands(x, kind, norm_weight, norm_bias, eps, mean, var)
    scale = _scale(alpha, alpha_value)
    operands = dict(alpha=scale, sample_scale=sample_scale, rows_per_sample=rows_per_sample(x),
                    dropout=dropout_operands(seed, dropout, weight))
    dx = dw = db = dalpha = dnw = dnb = None
    if by_kind["dx"] is not None and kind == "none":
        dx = x.new_empty(x.shape)
        launch_pass(by_kind["dx"], rows, xk, xs, weight, dx.view(rows.M, x.shape[-1]), g=gk, gs=gs, **operands)
    elif by_kind["dx"] is not None:
        state = (kind, norm_weight, norm_bias, eps, mean, var, batch_stats, need_norm_weight, need_norm_bias)
        dx, dnw, dnb = norm_input_grad(by_kind["dx"], gk, gs, xk, xs, weight, rows, x, ops, state, gk, gs, need_dx,
                                       operands)
    if by_kind["dw"] is not None:
        # (with dropout, db is the column sum of the masked g: dW's kernel makes it)
        dw, db, dalpha = weight_grads(by_kind["dw"], gk, gs, xk, xs, rows, weight, bias, need_weight, norm=ops,
                                      **operands)
    elif need_bias:
        db = bias_grad(grad, sample_scale, scale, weight)
    return dx, dw, db, dalpha, dnw, dnb


def saved_norm_operands(x, kind, weight, bias, eps, mean, var) -> tuple:
    """The kernels' norm operands from the statistics a forward saved (``mean`` empty: none, as
    RMSNorm's), in the accumulator dtype."""
    acc = acc_dtype(x)
    # (RMSNorm has no mean; a LayerNorm's over no rows is empty, and still a LayerNorm's)
    mean = mean.to(acc) if mean is not None and kind != "rms" else None
    return kernels.norm_operands(kind, mean, torch.rsqrt(var.to(acc) + eps), weight, bias)


def norm_input_grad(p, a, a_strides, xk, xs, weight, rows, x, ops, state, g, gs, need_dx, operands, out=None):
    """``(dx, dnorm_weight, dnorm_bias)`` (None where not wanted) of a GEMM ``z -> act(z) @ W.T``
    fed by ``z = norm(x)``, given the gradient ``a`` reaching that GEMM's output (the block's g,
    or the MLP block's dh) and the residual gradient ``g`` to add to dx. ``p``: the dx pass, whose
    pieces name the sinks the wanted gradients use. ``state``: ``(kind, weight, bias, eps, mean,
    var, batch_stats, need_weight, need_bias)``.

    dx's GEMM writes dz (``act'(z) * (a @ W)``, with ``operands``: the scale, row scale and
    dropout of the block's branch) into the dx buffer with its sinks; the partials are summed in a
    fixed order (tiny); the finishing pass makes dx in place (in ``out``, ``[M, K]``, if given).
    ``g`` None: no residual gradient (the MLP block's hidden norm: dh is the norm's input
    gradient)."""
    kind, norm_weight, norm_bias, eps, mean, var, batch_stats, need_nw, need_nb = state
    M, K = rows.M, weight.shape[1]
    acc = acc_dtype(xk)
    dz = out if out is not None else x.new_empty((M, K))
    col_sums = (torch.empty(cdiv(M, 16) * 2 * K, device=x.device, dtype=acc) if "norm_col_sums" in p.pieces
                else None)
    row_sums = (torch.empty(cdiv(K, 16) * 2 * M, device=x.device, dtype=acc) if "norm_row_sums" in p.pieces
                else None)
    launch = launch_pass(p, rows, xk, xs, weight, dz, g=a, gs=a_strides, norm=ops, norm_sums=(col_sums, row_sums),
                         **operands)
    c1 = c2 = None
    sum_dz = sum_dz_xhat = torch.zeros(K, device=x.device, dtype=acc)       # (no rows)
    if launch is not None and col_sums is not None:
        tiles = cdiv(M, launch.config.kwargs["BLOCK_M"])
        sum_dz, sum_dz_xhat = col_sums[:tiles * 2 * K].view(tiles, 2, K).sum(0)
        if need_dx and kind == "batch" and batch_stats:
            w = norm_weight.to(acc) if norm_weight is not None else 1.0
            c1, c2 = w * sum_dz / M, w * sum_dz_xhat / M
    if launch is not None and row_sums is not None:
        tiles = cdiv(K, launch.config.kwargs["BLOCK_K"])
        rsum = row_sums[:tiles * 2 * M].view(tiles, 2, M).sum(0)
        c1, c2 = (rsum[0] / K if kind == "layer" else None), rsum[1] / K
    dx = None
    if need_dx:
        norm_dx(dz, g, gs, xk, xs, rows, ops, c1, c2)
        dx = dz.view(x.shape)
    # (copies: the two sums are views of one tensor, and a custom op's outputs must not alias)
    dnw = sum_dz_xhat.to(norm_weight.dtype, copy=True) if need_nw else None
    dnb = sum_dz.to(norm_bias.dtype, copy=True) if need_nb else None
    return dx, dnw, dnb


# ---------------------------------------------------------------------------------------------
# The custom ops and their autograd


def _stat_shapes(x: Tensor, kind: str, given: bool):
    if given or kind == "none":
        return (0,), (0,)
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    if kind == "batch":
        return (D,), (D,)
    return ((M,) if kind == "layer" else (0,)), (M,)


@torch.library.custom_op("fusedres::norm_residual_forward", mutates_args=())
def norm_residual_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor],
                          alpha_value: float, sample_scale: Optional[Tensor], act: str, act_param: float, norm: str,
                          norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
                          running_mean: Optional[Tensor], running_var: Optional[Tensor], dropout: float = 0.0,
                          seed: Optional[Tensor] = None, stats_mean: Optional[Tensor] = None,
                          stats_var: Optional[Tensor] = None, next_norm: str = "none"
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, next_mean, next_var)``: the block's output and the batch statistics it
    normalized with (empty when ``running_mean``/``running_var`` or ``stats_var`` were given, or
    ``norm`` is ``"none"``; RMSNorm: no mean, ``var`` the mean square). ``seed`` (one int64, or
    None: no dropout): the branch dropout's. ``stats_mean``/``stats_var``: the batch statistics of
    x handed over by the previous block of a chain (no statistics pass); ``next_norm``: the next
    block's norm, whose batch statistics of y the epilogue emits as ``next_mean``/``next_var``
    (empty for ``"none"``)."""
    return _forward(x, weight, bias, alpha, alpha_value, sample_scale, act, act_param, norm, norm_weight, norm_bias,
                    eps, running_mean, running_var, dropout, seed, stats_mean, stats_var, next_norm)


@norm_residual_forward.register_fake
def _(x, weight, bias, alpha, alpha_value, sample_scale, act, act_param, norm, norm_weight, norm_bias, eps,
      running_mean, running_var, dropout=0.0, seed=None, stats_mean=None, stats_var=None, next_norm="none"):
    acc = acc_dtype(x)
    mean_shape, var_shape = _stat_shapes(x, norm, running_mean is not None or stats_var is not None)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.promote_types(x.dtype, weight.dtype))
    given = running_mean is not None or norm == "none" or stats_var is not None
    return (y, x.new_empty(mean_shape, dtype=x.dtype if given else acc),
            x.new_empty(var_shape, dtype=x.dtype if given else acc), *fake_sink_stats(next_norm, x, y))


def fake_sink_stats(next_norm: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The shapes :func:`sink_stats` returns, for the fake kernels."""
    acc = acc_dtype(x)
    N = y.shape[-1]
    M = y.numel() // N if N else 0
    if next_norm == "none":
        return x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    if next_norm == "batch":
        return x.new_empty(N, dtype=acc), x.new_empty(N, dtype=acc)
    return x.new_empty(M if next_norm == "layer" else 0, dtype=acc), x.new_empty(M, dtype=acc)


@torch.library.custom_op("fusedres::norm_residual_backward", mutates_args=())
def norm_residual_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor],
                           alpha_value: float, sample_scale: Optional[Tensor], act: str, act_param: float, norm: str,
                           norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float, mean: Tensor,
                           var: Tensor, batch_stats: bool, need_dx: bool, need_weight: bool, need_bias: bool,
                           need_alpha: bool, need_norm_weight: bool, need_norm_bias: bool, dropout: float = 0.0,
                           seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``norm_residual_forward``'s ``y`` with respect to (x, weight, bias, alpha,
    norm_weight, norm_bias); an empty tensor for each not asked for."""
    grads = _backward(grad, x, weight, bias, alpha, alpha_value, sample_scale, act, act_param, norm, norm_weight,
                      norm_bias, eps, mean, var, batch_stats, need_dx, need_weight, need_bias, need_alpha,
                      need_norm_weight, need_norm_bias, dropout, seed)
    return tuple(t if t is not None else x.new_empty(0) for t in grads)


@norm_residual_backward.register_fake
def _(grad, x, weight, bias, alpha, alpha_value, sample_scale, act, act_param, norm, norm_weight, norm_bias, eps,
      mean, var, batch_stats, need_dx, need_weight, need_bias, need_alpha, need_norm_weight, need_norm_bias,
      dropout=0.0, seed=None):
    N, K = weight.shape
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(N, K) if need_weight else x.new_empty(0),
            weight.new_empty(N) if need_bias else x.new_empty(0),
            alpha.new_empty(alpha.shape) if need_alpha else x.new_empty(0),
            norm_weight.new_empty(norm_weight.shape) if need_norm_weight else x.new_empty(0),
            norm_bias.new_empty(norm_bias.shape) if need_norm_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    (x, weight, bias, alpha, alpha_value, sample_scale, act, act_param, norm, norm_weight, norm_bias, eps,
     running_mean, running_var, *drop) = inputs
    _, mean, var, *emitted = output
    given = running_mean is not None
    if len(drop) > 3 and drop[3] is not None:       # a chain's statistics: saved as the batch statistics
        mean, var = (drop[2] if drop[2] is not None else mean), drop[3]
    ctx.mark_non_differentiable(*output[1:])
    ctx.settings = (alpha_value, act, act_param, norm, eps, not given, bias is not None, alpha is not None,
                    norm_weight is not None, norm_bias is not None, drop[0] if drop else 0.0)
    # Saved: x, the vectors of the statistics and the parameters, dropout's seed; never norm(x)
    # and never a mask. The bias only when alpha needs its gradient (dalpha's bias term).
    keep_bias = bias if (alpha is not None and alpha.requires_grad) else None
    ctx.save_for_backward(x, weight, keep_bias, alpha, sample_scale, norm_weight, norm_bias,
                          running_mean if given else mean, running_var if given else var,
                          drop[1] if len(drop) > 1 else None)


def _backward_rule(ctx, grad, *_grad_stats, direct: bool = False):
    x, weight, bias, alpha, sample_scale, norm_weight, norm_bias, mean, var, seed = ctx.saved_tensors
    alpha_value, act, act_param, norm, eps, batch_stats, has_bias, has_alpha, has_nw, has_nb, dropout = ctx.settings
    need = ctx.needs_input_grad
    needs = (need[0], need[1], need[2] and has_bias, need[3] and has_alpha, need[9] and has_nw, need[10] and has_nb)
    # (direct: the eager-mode node calls the implementation; the op's autograd refuses a double backward)
    backward = _backward if direct else torch.ops.fusedres.norm_residual_backward
    grads = backward(grad, x, weight, bias, alpha, alpha_value, sample_scale, act, act_param, norm, norm_weight,
                     norm_bias, eps, mean, var, batch_stats, *needs, dropout, seed)
    dx, dw, db, dalpha, dnw, dnb = (g if n else None for g, n in zip(grads, needs))
    return (dx, dw, db, dalpha, None, None, None, None, None, dnw, dnb, None, None, None, None, None, None, None,
            None)[:len(need)]


def _register() -> type:
    """Register the ops' autograd; return the eager-mode node (:func:`fusedres.op.eager_node`)."""
    from .op import eager_node, refuse_double_backward
    norm_residual_forward.register_autograd(_backward_rule, setup_context=_setup_context)
    refuse_double_backward(norm_residual_backward, "fused_residual with a norm", "ResidualBlock")
    return eager_node("_EagerNormResidual", _forward, _setup_context, _backward_rule)


_EagerNormResidual = _register()
