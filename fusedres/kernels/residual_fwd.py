"""Forward kernel of the pre-activation residual block.

Square block (``W`` is ``[D, D]``, nn.Linear layout), with an optional residual scale ``alpha``:

    y[m, n] = x[m, n] + alpha * (sum_k relu(x[m, k]) * W[n, k] + b[n])

Projection shortcut (``out != in``: ``W`` and ``P`` are ``[N, K]``):

    y[m, n] = sum_k x[m, k] * P[n, k] + alpha * (sum_k relu(x[m, k]) * W[n, k] + b[n])

The general form, which the MLP block's two forward GEMMs also run (``fusedres.mlp_op``):

    y[m, n] = [r[m, n] | x @ P.T | 0] + s[m // R] * alpha * (sum_k relu(a[m, k]) * W[n, k] + b[n])

with ``a`` the A operand (``x``, or the MLP's hidden pre-activation), ``r`` the residual tensor
(``r_ptr``: ``x`` itself for the block, None for the MLP's first GEMM), ``s`` the per-sample
scale of stochastic depth (``s_ptr``; ``R`` rows per sample) and relu standing for any activation
of :mod:`.activations`. The kernel is composed from the pieces of :mod:`.gemm`.

One kernel, one accumulator, a reduction over the concatenation ``[relu(x), x] @ [W; P].T``: the
relu half runs first, the epilogue-side ``alpha`` and bias are applied to the accumulator between
the halves, and the ``x @ P.T`` half (no relu in its prologue) accumulates on top. The square block
instead adds the residual tile of ``x`` in the epilogue, so ``y`` costs one read of ``x``, one read
of ``W`` per row tile and one write: the compulsory ``e * (2MD + D^2 + D)`` bytes instead of
eager's ``e * (7MD + D^2 + D)``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import cdiv, Rows, RowStrides, grouped_tile, next_pow2_bucket, row_offsets, store_rounded, to_gemm_operand
from .activations import KERNELS as ACTIVATION_KERNELS, identity
from .gemm import add_bias, add_rows, dropout_multiplier, mma_loop, scale_branch, store_stats_partials
from .recipe import pass_recipe
from .configs import FWD_CONFIGS, PreparedLaunch, gemm_flags, launch_and_prepare, prune_for


def alpha_kind(alpha) -> str | None:
    """The residual scale's kind, for the recipe string: None (no scale), ``"value"`` (a Python
    float, passed by value), ``"scalar"`` (a one-element tensor, read through a pointer) or
    ``"channel"`` (a per-channel tensor ``[N]``, timm's LayerScale; the caller has checked its
    shape)."""
    if alpha is None:
        return None
    if hasattr(alpha, "data_ptr"):
        return "scalar" if alpha.numel() == 1 else "channel"
    return "value"


def alpha_args(alpha, like) -> tuple:
    """The kernels' three scale operands ``(alpha_ptr, channel_alpha_ptr, alpha_value)`` for an
    alpha that is None, a Python float, a one-element tensor or a per-channel tensor; at most one
    is given, the others are None. A float is passed by value, which Triton types fp32 (eager
    rounds a Python scalar to fp16/bf16/fp32's fp32 opmath too); for an fp64 launch (``like``: its
    GEMM operand) it is a one-element fp64 tensor, so that it keeps every bit: made once per value
    and device, then reused (no allocation or copy per call after the first)."""
    if alpha is None:
        return None, None, None
    if hasattr(alpha, "data_ptr"):
        return (alpha, None, None) if alpha.numel() == 1 else (None, alpha, None)
    if like.dtype == torch.float64:
        return _fp64_alpha(float(alpha), like.device), None, None
    return None, None, float(alpha)


_FP64 = torch.float64


@functools.lru_cache(maxsize=64)
def _fp64_alpha(value: float, device):
    return torch.tensor(value, dtype=torch.float64, device=device)


def scale_kind(alpha_ptr, channel_alpha_ptr, alpha_value) -> str | None:
    """The kind of residual scale of :func:`alpha_args`'s operands, as a recipe names it."""
    if alpha_ptr is not None:
        return "scalar"
    if channel_alpha_ptr is not None:
        return "channel"
    return None if alpha_value is None else "value"


def recipe_key(pass_: str, act: str | None, act_param: float, scale=(None, None, None), **operands) -> str:
    """A launch's ``RECIPE`` string: the key of the :class:`~.recipe.PassRecipe` it makes, from its
    scale operands (:func:`alpha_args`) and the other operands it is given (present or not),
    e.g. ``"fwd|gelu|alpha=scalar|bias|residual|row_scale"``. It is the autotune key's recipe
    (JSON-safe, saved by :func:`fusedres.save_tuning`): every piece that changes the compiled code
    is in it, since a ``None`` operand leaves the autotuner's own key (the tensors' dtypes)
    unchanged."""
    norm = operands.pop("norm", None)
    present = tuple(n for n, v in operands.items() if v is not None and v is not False)
    return _recipe_key(pass_, act, act_param, math.copysign(1.0, act_param), scale_kind(*scale), norm, present)


@functools.lru_cache(maxsize=4096)
def _recipe_key(pass_, act, act_param, _sign, alpha, norm, present) -> str:
    """(made once per distinct launch: the norm, dropout and MLP paths launch through the
    launchers on every call; ``_sign`` tells -0.0 from 0.0)"""
    return pass_recipe(pass_, act, act_param, alpha=alpha, norm=norm, **dict.fromkeys(present, True)).key


@triton.jit
def residual_fwd_kernel(
    x_ptr, w_ptr, y_ptr, b_ptr, p_ptr, r_ptr, alpha_ptr, channel_alpha_ptr, alpha_value, s_ptr,
    row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr, norm_w_ptr, norm_b_ptr, col_stats_ptr, row_stats_ptr,
    drop_seed_ptr, drop_ptr, a_drop_seed_ptr, a_drop_ptr,
    M, N, K, T, M_BUCKET, ROWS_PER_SAMPLE,
    stride_xo, stride_xm, stride_xk,
    stride_ro, stride_rm, stride_rn,
    stride_wn, stride_wk,
    stride_pn, stride_pk,
    stride_ym, stride_yn,
    ACT: tl.constexpr,
    ACT_PARAM: tl.constexpr,
    RECIPE: tl.constexpr,
    TWO_LEVEL_ROWS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y (see the module docstring for the math).

    The skeleton: the K loop with the A-tile prologue (a normalization with precomputed
    statistics, ``row_*``: per row, LayerNorm and RMSNorm; ``col_*``: per feature, BatchNorm;
    ``norm_w_ptr``/``norm_b_ptr``: its affine; all None: none; then the activation; then the hidden
    dropout's multiplier, ``a_drop_*``), then the epilogue steps: bias (``b_ptr``), the branch
    dropout's multiplier (``drop_*``; :func:`.gemm.dropout_multiplier`), the scales (``s_ptr``, and ``alpha_ptr``, ``channel_alpha_ptr`` or
    ``alpha_value``), then the shortcut, which is the projection's K loop (``p_ptr``) or the
    residual tensor (``r_ptr``) or nothing. Every optional operand may be None.

    Each K loop runs at least once (``tl.maximum(cdiv(K, BLOCK_K), 1)``). Without that bound, the
    path on which the loop is skipped keeps the zero-initialised accumulator live into the
    epilogue, and on sm_90 ptxas then serialises every wgmma (advisory C7515). With it the
    activated A tile feeds a register-A wgmma that Triton pipelines normally.
    """
    GEMM_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = row_offsets(offs_m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)
    k_trips = tl.maximum(tl.cdiv(K, BLOCK_K), 1)
    unused = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc, _ = mma_loop(acc, unused, x_ptr, x_rows, 0, stride_xk, mask_m,
                      w_ptr, offs_n.to(tl.int64) * stride_wn, 0, stride_wk, mask_n,
                      0, k_trips, K, T, ACT, ACT_PARAM, None, None, None, None,
                      offs_m, row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr, norm_w_ptr, norm_b_ptr,
                      a_drop_seed_ptr, a_drop_ptr, None, None, None, None,
                      None, False, BLOCK_K, GEMM_DTYPE, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16)

    mask = mask_m[:, None] & mask_n[None, :]
    acc = add_bias(acc, b_ptr, offs_n, mask_n, ACC_DTYPE)
    if drop_seed_ptr is not None:
        acc = acc * dropout_multiplier(drop_seed_ptr, drop_ptr, offs_m, pid_n * BLOCK_N, BLOCK_N, ACC_DTYPE)
    acc = scale_branch(acc, alpha_ptr, alpha_value, channel_alpha_ptr, s_ptr, offs_m, mask_m, offs_n, mask_n,
                       ROWS_PER_SAMPLE, ACC_DTYPE)
    if p_ptr is not None:
        acc, _ = mma_loop(acc, unused, x_ptr, x_rows, 0, stride_xk, mask_m,
                          p_ptr, offs_n.to(tl.int64) * stride_pn, 0, stride_pk, mask_n,
                          0, k_trips, K, T, None, 0.0, None, None, None, None,
                          None, None, None, None, None, None, None, None, None, None, None, None, None,
                          None, False, BLOCK_K, GEMM_DTYPE, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16)
    acc = add_rows(acc, r_ptr, row_offsets(offs_m, T, stride_ro, stride_rm, TWO_LEVEL_ROWS), offs_n, stride_rn,
                   mask, ACC_DTYPE)
    if col_stats_ptr is not None or row_stats_ptr is not None:
        # the next norm's statistics partials of y as stored (rounded to its dtype), beside the store
        store_stats_partials(to_gemm_operand(acc, y_ptr.dtype.element_ty, EMULATE_BF16).to(ACC_DTYPE), mask,
                             offs_m, mask_m, offs_n, mask_n, pid_m, pid_n, M, N, col_stats_ptr, row_stats_ptr,
                             BLOCK_M, BLOCK_N)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    store_rounded(y_ptrs, acc, mask, EMULATE_BF16)


residual_fwd_kernel_tuned = triton.autotune(
    configs=FWD_CONFIGS, key=["M_BUCKET", "N", "K", "RECIPE", "TWO_LEVEL_ROWS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_for("fwd")})(residual_fwd_kernel)


#: The normalization operands of a launch without one (see :func:`norm_operands`).
NO_NORM = (None,) * 6
_NO_STATS = (None, None)
#: The dropout operands of a launch without one: ``(seed, [p, 1 / (1 - p)])`` (see
#: :func:`fusedres.dropout.dropout_operands`).
NO_DROPOUT = (None, None)
_NO_TAIL = NO_NORM + _NO_STATS + NO_DROPOUT + NO_DROPOUT


def norm_operands(kind: str | None, mean=None, rstd=None, weight=None, bias=None) -> tuple:
    """The kernels' six normalization operands ``(row_mean, row_rstd, col_mean, col_rstd,
    norm_weight, norm_bias)`` for a norm ``kind``: ``"batch"`` (statistics per feature, ``[K]``),
    ``"layer"`` or ``"rms"`` (per row, ``[M]``; RMSNorm has no mean), or None (none)."""
    if kind is None:
        return NO_NORM
    if kind == "batch":
        return (None, None, mean, rstd, weight, bias)
    return (mean if kind == "layer" else None, rstd, None, None, weight, bias)


def norm_pieces(norm: tuple) -> dict:
    """A launch's normalization pieces for its recipe, from its six operands."""
    row_mean, row_rstd, col_mean, col_rstd, weight, bias = norm
    kind = None if row_rstd is None and col_rstd is None else \
        "batch" if col_rstd is not None else "layer" if row_mean is not None else "rms"
    return dict(norm=kind, norm_weight=weight, norm_bias=bias)


def fwd_head(x, weight, bias, y, alpha=None, proj_weight=None, residual=None, sample_scale=None,
             add_residual: bool = True, norm=NO_NORM, stats_partials=_NO_STATS, dropout=NO_DROPOUT,
             dropout_a=NO_DROPOUT) -> tuple:
    """The forward kernel's per-call arguments (its operands, None where absent, and
    ``alpha_value``): the first :data:`FWD_HEAD` of :func:`fwd_launch_args`; the rest is fixed by
    the input signature. ``residual``: the tensor added in the epilogue (None: ``x``, the block's
    own input; none with a projection or without ``add_residual``)."""
    # alpha_args and the shortcut rule, inline: a prepared launch calls this on every step
    alpha_ptr = channel_alpha_ptr = alpha_value = None
    if alpha is None:
        pass
    elif hasattr(alpha, "data_ptr"):
        if alpha.numel() == 1:
            alpha_ptr = alpha
        else:
            channel_alpha_ptr = alpha
    elif weight.dtype is not _FP64:
        alpha_value = float(alpha)
    else:
        alpha_ptr = _fp64_alpha(float(alpha), weight.device)
    r = None if proj_weight is not None or not add_residual else (x if residual is None else residual)
    if norm is NO_NORM and stats_partials is _NO_STATS and dropout is NO_DROPOUT and dropout_a is NO_DROPOUT:
        # the hot path: one constant tail
        return (x, weight, y, bias, proj_weight, r, alpha_ptr, channel_alpha_ptr, alpha_value, sample_scale) + _NO_TAIL
    return (x, weight, y, bias, proj_weight, r, alpha_ptr, channel_alpha_ptr, alpha_value, sample_scale, *norm,
            *stats_partials, *dropout, *dropout_a)


#: The forward kernel's per-call arguments: those before its sizes.
FWD_HEAD = residual_fwd_kernel.arg_names.index("M")


def act_consts(act: str | None, act_param: float, derivative: bool = False) -> dict:
    """The activation's constexprs: ``ACT`` (the A-tile prologue; :func:`activations.identity`
    for None) or, with ``derivative``, ``DACT`` (None for no activation: nothing to mask), and
    ``ACT_PARAM``. ``act``: a name of :data:`activations.KERNELS`."""
    if derivative:
        return dict(DACT=ACTIVATION_KERNELS[act][1] if act is not None else None, ACT_PARAM=float(act_param))
    return dict(ACT=ACTIVATION_KERNELS[act][0] if act is not None else identity, ACT_PARAM=float(act_param))


def fwd_launch_args(x, xs: RowStrides, weight, bias, y, rows: Rows, alpha=None, proj_weight=None, *,
                    residual=None, sample_scale=None, rows_per_sample: int = 1, add_residual: bool = True,
                    act: str | None = "relu", act_param: float = 0.0, norm: tuple = NO_NORM,
                    stats_partials=(None, None), dropout=NO_DROPOUT, dropout_a=NO_DROPOUT):
    """The forward kernel's launch arguments, without launching: ``(args, consts, grid)``.

    The launcher and the compile gate (``fusedres.aot``) both build them here, so the gate
    compiles the signature a real launch specialises on. ``residual``: ``(r, r's RowStrides)``
    added in the epilogue, default ``x`` itself; ``add_residual=False``: no residual (the MLP's
    first GEMM). ``sample_scale``: ``s [B]`` with ``rows_per_sample`` rows per sample. ``act``:
    the activation on the A operand (a name of :data:`activations.KERNELS`, None: none) with its
    ``act_param``. ``norm``: the six operands of :func:`norm_operands` (the normalization of the A
    operand, before the activation). ``stats_partials``: ``(col, row)`` fp32 (fp64) workspaces of
    ``[cdiv(M, BLOCK_M), 2, N]`` and ``[cdiv(N, BLOCK_N), 2, M]`` for the next norm's statistics
    partials of y (the MLP block's hidden norm; either None: not wanted). ``dropout``: the branch
    dropout's ``(seed, [p, 1 / (1 - p)])`` operands, applied after the bias
    (:func:`fusedres.dropout.dropout_operands`; :data:`NO_DROPOUT`: none); ``dropout_a``: the
    hidden dropout's, on the activated A tile (the MLP's fc2).
    """
    N, K = weight.shape
    p = proj_weight if proj_weight is not None else weight
    r, rs = residual if residual is not None else (x, xs)
    head = fwd_head(x, weight, bias, y, alpha, proj_weight, r, sample_scale, add_residual, norm, stats_partials,
                    dropout, dropout_a)
    args = head + (
        rows.M, N, K, rows.T, next_pow2_bucket(rows.M), rows_per_sample,
        *xs, *rs, weight.stride(0), weight.stride(1), p.stride(0), p.stride(1), y.stride(0), y.stride(1))
    consts = dict(**act_consts(act, act_param),
                  RECIPE=recipe_key("fwd", act, act_param, head[6:9], bias=bias, proj=proj_weight,
                                    residual=add_residual and proj_weight is None, row_scale=sample_scale,
                                    stats_col_partials=stats_partials[0], stats_row_partials=stats_partials[1],
                                    dropout=dropout[0], dropout_a=dropout_a[0], **norm_pieces(norm)),
                  TWO_LEVEL_ROWS=rows.two_level, **gemm_flags(weight.dtype, x.dtype, y.dtype))

    def grid(meta):
        return (cdiv(rows.M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    return args, consts, grid


def residual_fwd(x, xs: RowStrides, weight, bias, y, rows: Rows, *, alpha=None, proj_weight=None,
                 config: triton.Config | None = None, residual=None, sample_scale=None, rows_per_sample: int = 1,
                 add_residual: bool = True, act: str | None = "relu", act_param: float = 0.0,
                 norm: tuple = NO_NORM, stats_partials=(None, None), dropout=NO_DROPOUT,
                 dropout_a=NO_DROPOUT) -> PreparedLaunch | None:
    """Launch the forward kernel.

    ``x`` ``(..., K)`` is addressed through ``rows`` and its strides ``xs``; ``weight`` (and
    ``proj_weight``) are ``[N, K]``; ``bias`` ``[N]`` contiguous, or None; ``alpha`` a one-element
    tensor, a per-channel tensor ``[N]`` (contiguous), a Python float (passed by value) or None
    (1); ``y`` is ``[M, N]`` row-major (any view of it). Without ``proj_weight`` and with the default residual (``x``), ``N == K``. The keyword
    arguments after ``config`` are :func:`fwd_launch_args`'s (the MLP block's and stochastic
    depth's). Returns the launch as a :class:`PreparedLaunch`
    (call it with :func:`fwd_head`'s arguments to repeat it for the same signature), or None when
    there are no rows.
    """
    if rows.M == 0:
        return None
    args, consts, grid = fwd_launch_args(x, xs, weight, bias, y, rows, alpha, proj_weight, residual=residual,
                                         sample_scale=sample_scale, rows_per_sample=rows_per_sample,
                                         add_residual=add_residual, act=act, act_param=act_param, norm=norm,
                                         stats_partials=stats_partials, dropout=dropout, dropout_a=dropout_a)
    return launch_and_prepare(residual_fwd_kernel, residual_fwd_kernel_tuned, "fwd", grid, args, consts, rows.M,
                              max(weight.shape), config, n_head=FWD_HEAD)

