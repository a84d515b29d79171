"""Forward kernel of the pre-activation residual block.

Square block (``W`` is ``[D, D]``, nn.Linear layout), with an optional residual scale ``alpha``:

    y[m, n] = x[m, n] + alpha * (sum_k relu(x[m, k]) * W[n, k] + b[n])

Projection shortcut (``out != in``: ``W`` and ``P`` are ``[N, K]``):

    y[m, n] = sum_k x[m, k] * P[n, k] + alpha * (sum_k relu(x[m, k]) * W[n, k] + b[n])

The general form, which the MLP block's two forward GEMMs also run (``fusedres.mlp_op``):

    y[m, n] = [r[m, n] | x @ P.T | 0] + s[m // R] * alpha * (sum_k relu(a[m, k]) * W[n, k] + b[n])

with ``a`` the A operand (``x``, or the MLP's hidden pre-activation), ``r`` the residual tensor
(``RESIDUAL``; ``x`` itself for the block, none for the MLP's first GEMM) and ``s`` the
per-sample scale of stochastic depth (``ROW_SCALE``; ``R`` rows per sample).

One kernel, one accumulator, a reduction over the concatenation ``[relu(x), x] @ [W; P].T``: the
relu half runs first, the epilogue-side ``alpha`` and bias are applied to the accumulator between
the halves, and the ``x @ P.T`` half (no relu in its prologue) accumulates on top. The square block
instead adds the residual tile of ``x`` in the epilogue, so ``y`` costs one read of ``x``, one read
of ``W`` per row tile and one write: the compulsory ``e * (2MD + D^2 + D)`` bytes instead of
eager's ``e * (7MD + D^2 + D)``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    cdiv,
    Rows,
    RowStrides,
    grouped_tile,
    next_pow2_bucket,
    row_offsets,
    store_rounded,
    to_gemm_operand,
)
from .activations import KERNELS as ACTIVATION_KERNELS, identity
from .configs import FWD_CONFIGS, PreparedLaunch, gemm_flags, launch_and_prepare, prune_for


@triton.jit
def residual_scale(alpha_ptr, alpha_value, offs, mask, FROM_PTR: tl.constexpr, PER_CHANNEL: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, AXIS: tl.constexpr = 1):
    """The residual scale alpha as a factor, in the accumulator dtype. The kernels take its kind as
    ``ALPHA`` (:func:`alpha_args`) and pass ``FROM_PTR = ALPHA != "value"`` and ``PER_CHANNEL =
    ALPHA == "channel"`` (triton 3.6 cannot pass a string constexpr into a jit function):

    - ``"value"``: the Python float passed by value (no host-to-device copy). It arrives as fp64
      and is rounded here as eager rounds a Python scalar (to the fp32 opmath of fp16/bf16/fp32);
    - ``"scalar"``: a one-element tensor (which may be learnable), read through ``alpha_ptr``;
    - ``"channel"``: a per-channel tensor ``[N]`` (timm's LayerScale), read at the output features
      ``offs`` and shaped for the tile: ``[1, n]`` (``AXIS=1``: features along the tile's second
      axis), ``[n, 1]`` (``AXIS=0``) or ``[n]`` (``AXIS=-1``).
    """
    if PER_CHANNEL:
        scale = tl.load(alpha_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if AXIS == 1:
            return scale[None, :]
        elif AXIS == 0:
            return scale[:, None]
        else:
            return scale
    elif FROM_PTR:
        return tl.load(alpha_ptr).to(ACC_DTYPE)
    else:
        return tl.full((), alpha_value, ACC_DTYPE)


#: The kinds of residual scale a kernel takes (``ALPHA``): None (no scale) or one of these.
ALPHA_KINDS = ("value", "scalar", "channel")


def alpha_kind(alpha) -> str | None:
    """``ALPHA`` for an alpha that is None, a Python float, a one-element tensor or a per-channel
    tensor (more than one element: the caller has checked its shape)."""
    if alpha is None:
        return None
    if hasattr(alpha, "data_ptr"):
        return "scalar" if alpha.numel() == 1 else "channel"
    return "value"


def alpha_args(alpha, placeholder) -> tuple:
    """``(alpha_ptr, alpha_value, ALPHA)`` for an alpha that is a tensor (a pointer), a Python
    float (by value) or None (no scale)."""
    if alpha is None:
        return placeholder, 1.0, None
    if hasattr(alpha, "data_ptr"):
        return alpha, 1.0, alpha_kind(alpha)
    return placeholder, float(alpha), "value"


def recipe_key(act: str | None, act_param: float, alpha) -> str:
    """The launch's recipe string: the pieces that change the kernel's code beyond its flags,
    JSON-safe (the autotune key's ``RECIPE``, saved by :func:`fusedres.save_tuning`)."""
    name = act or "identity"
    if name == "leaky_relu":
        name = f"leaky_relu({act_param!r})"
    return f"{name}|{alpha_kind(alpha) or 'none'}"


@triton.jit
def row_scale(s_ptr, offs_m, mask_m, ROWS_PER_SAMPLE, ACC_DTYPE: tl.constexpr):
    """Stochastic depth's per-sample scale of each row of a tile: ``s[m // ROWS_PER_SAMPLE]``
    (rows are flattened ``(B, ...)`` indices; one scale per index of the first dimension)."""
    return tl.load(s_ptr + offs_m // ROWS_PER_SAMPLE, mask=mask_m, other=0.0).to(ACC_DTYPE)


@triton.jit
def residual_fwd_kernel(
    x_ptr, w_ptr, b_ptr, p_ptr, alpha_ptr, alpha_value: tl.float64, r_ptr, s_ptr, y_ptr,
    M, N, K, T, M_BUCKET, ROWS_PER_SAMPLE,
    stride_xo, stride_xm, stride_xk,
    stride_ro, stride_rm, stride_rn,
    stride_wn, stride_wk,
    stride_pn, stride_pk,
    stride_ym, stride_yn,
    ACT: tl.constexpr,
    ACT_PARAM: tl.constexpr,
    RECIPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ALPHA: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    TWO_LEVEL_ROWS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y (see the module docstring for the math).

    Each K loop runs at least once (``tl.maximum(cdiv(K, BLOCK_K), 1)``). Without that bound, the
    path on which the loop is skipped keeps the zero-initialised accumulator live into the
    epilogue, and on sm_90 ptxas then serialises every wgmma (advisory C7515). With it the relu'd
    A tile feeds a register-A wgmma that Triton pipelines normally.
    """
    GEMM_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    # the scale kind as the constexprs residual_scale takes (triton 3.6 passes no string into a jit function)
    ALPHA_PTR: tl.constexpr = ALPHA == "scalar" or ALPHA == "channel"
    PER_CHANNEL: tl.constexpr = ALPHA == "channel"
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = row_offsets(offs_m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)
    w_cols = offs_n.to(tl.int64) * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kt in range(0, tl.maximum(tl.cdiv(K, BLOCK_K), 1)):
        k = kt * BLOCK_K + offs_k
        mask_k = k < K
        a = tl.load(x_ptr + x_rows[:, None] + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + w_cols[None, :] + k[:, None] * stride_wk,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = ACT(a, GEMM_DTYPE, EMULATE_BF16, ACT_PARAM)
        wt = to_gemm_operand(wt, GEMM_DTYPE, EMULATE_BF16)
        acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    if ROW_SCALE:
        # alpha folded into the per-row factor: one multiply of the tile (a second one spilled
        # 16 B at 128x128x32, 8 warps, on sm_80)
        rs = row_scale(s_ptr, offs_m, mask_m, ROWS_PER_SAMPLE, ACC_DTYPE)
        if ALPHA == "channel":
            acc = acc * rs[:, None] * residual_scale(alpha_ptr, alpha_value, offs_n, mask_n,
                                                     ALPHA_PTR, PER_CHANNEL, ACC_DTYPE)
        else:
            if ALPHA is not None:
                rs = rs * residual_scale(alpha_ptr, alpha_value, offs_n, mask_n, ALPHA_PTR, PER_CHANNEL, ACC_DTYPE)
            acc = acc * rs[:, None]
    elif ALPHA is not None:
        acc = acc * residual_scale(alpha_ptr, alpha_value, offs_n, mask_n, ALPHA_PTR, PER_CHANNEL, ACC_DTYPE)
    if HAS_PROJ:
        p_cols = offs_n.to(tl.int64) * stride_pn
        for kt in range(0, tl.maximum(tl.cdiv(K, BLOCK_K), 1)):
            k = kt * BLOCK_K + offs_k
            mask_k = k < K
            a = tl.load(x_ptr + x_rows[:, None] + k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            pt = tl.load(p_ptr + p_cols[None, :] + k[:, None] * stride_pk,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            a = to_gemm_operand(a, GEMM_DTYPE, EMULATE_BF16)
            pt = to_gemm_operand(pt, GEMM_DTYPE, EMULATE_BF16)
            acc = tl.dot(a, pt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    elif RESIDUAL:
        r_rows = row_offsets(offs_m, T, stride_ro, stride_rm, TWO_LEVEL_ROWS)
        residual = tl.load(r_ptr + r_rows[:, None] + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
        acc += residual.to(ACC_DTYPE)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    store_rounded(y_ptrs, acc, mask, EMULATE_BF16)


residual_fwd_kernel_tuned = triton.autotune(
    configs=FWD_CONFIGS, key=["M_BUCKET", "N", "K", "RECIPE", "TWO_LEVEL_ROWS", "HAS_PROJ", "ROW_SCALE",
                                 "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_for("fwd")})(residual_fwd_kernel)


def fwd_head(x, weight, bias, y, alpha=None, proj_weight=None, residual=None, sample_scale=None) -> tuple:
    """The forward kernel's per-call arguments (its tensors and ``alpha_value``): the first
    :data:`FWD_HEAD` of :func:`fwd_launch_args`; the rest is fixed by the input signature.
    ``residual``: the tensor added in the epilogue (None: ``x``, the block's own input)."""
    if alpha is None:       # alpha_args, inline: this runs on every call
        alpha_ptr, alpha_value = weight, 1.0
    elif hasattr(alpha, "data_ptr"):
        alpha_ptr, alpha_value = alpha, 1.0
    else:
        alpha_ptr, alpha_value = weight, float(alpha)
    return (x, weight, bias if bias is not None else weight, proj_weight if proj_weight is not None else weight,
            alpha_ptr, alpha_value, residual if residual is not None else x,
            sample_scale if sample_scale is not None else weight, y)


FWD_HEAD = 9


def act_consts(act: str | None, act_param: float, derivative: bool = False) -> dict:
    """The activation's constexprs: ``ACT`` (the A-tile prologue; :func:`activations.identity`
    for None) or, with ``derivative``, ``DACT`` (None for no activation: nothing to mask), and
    ``ACT_PARAM``. ``act``: a name of :data:`activations.KERNELS`."""
    if derivative:
        return dict(DACT=ACTIVATION_KERNELS[act][1] if act is not None else None, ACT_PARAM=float(act_param))
    return dict(ACT=ACTIVATION_KERNELS[act][0] if act is not None else identity, ACT_PARAM=float(act_param))


def fwd_launch_args(x, xs: RowStrides, weight, bias, y, rows: Rows, alpha=None, proj_weight=None, *,
                    residual=None, sample_scale=None, rows_per_sample: int = 1, add_residual: bool = True,
                    act: str | None = "relu", act_param: float = 0.0):
    """The forward kernel's launch arguments, without launching: ``(args, consts, grid)``.

    The launcher and the compile gate (``fusedres.aot``) both build them here, so the gate
    compiles the signature a real launch specialises on. ``residual``: ``(r, r's RowStrides)``
    added in the epilogue, default ``x`` itself; ``add_residual=False``: no residual (the MLP's
    first GEMM). ``sample_scale``: ``s [B]`` with ``rows_per_sample`` rows per sample. ``act``:
    the activation on the A operand (a name of :data:`activations.KERNELS`, None: none) with its
    ``act_param``.
    """
    N, K = weight.shape
    p = proj_weight if proj_weight is not None else weight
    r, rs = residual if residual is not None else (x, xs)
    args = fwd_head(x, weight, bias, y, alpha, proj_weight, r, sample_scale) + (
        rows.M, N, K, rows.T, next_pow2_bucket(rows.M), rows_per_sample,
        *xs, *rs, weight.stride(0), weight.stride(1), p.stride(0), p.stride(1), y.stride(0), y.stride(1))
    consts = dict(**act_consts(act, act_param), RECIPE=recipe_key(act, act_param, alpha),
                  HAS_BIAS=bias is not None, ALPHA=alpha_kind(alpha),
                  HAS_PROJ=proj_weight is not None, RESIDUAL=add_residual and proj_weight is None,
                  ROW_SCALE=sample_scale is not None,
                  TWO_LEVEL_ROWS=rows.two_level, **gemm_flags(weight.dtype, x.dtype, y.dtype))

    def grid(meta):
        return (cdiv(rows.M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    return args, consts, grid


def residual_fwd(x, xs: RowStrides, weight, bias, y, rows: Rows, *, alpha=None, proj_weight=None,
                 config: triton.Config | None = None, residual=None, sample_scale=None, rows_per_sample: int = 1,
                 add_residual: bool = True, act: str | None = "relu", act_param: float = 0.0
                 ) -> PreparedLaunch | None:
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
                                         add_residual=add_residual, act=act, act_param=act_param)
    return launch_and_prepare(residual_fwd_kernel, residual_fwd_kernel_tuned, "fwd", grid, args, consts, rows.M,
                              max(weight.shape), config, n_head=FWD_HEAD)

