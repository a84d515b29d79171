"""Forward kernel of the pre-activation residual block.

    y[m, n] = x[m, n] + sum_k relu(x[m, k]) * W[n, k] + b[n]        (W is [D, D], nn.Linear layout)

One GEMM ``relu(x) @ W.T`` with the relu as a prologue on the A operand and the bias and residual
add as the epilogue, so ``y`` costs one read of ``x`` (plus a second touch of the tile that is
added back, usually an L2 hit), one read of ``W`` per row tile, and one write: the compulsory
``e * (2MD + D^2 + D)`` bytes instead of eager's ``e * (7MD + D^2 + D)``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    Rows,
    RowStrides,
    grouped_tile,
    next_pow2_bucket,
    relu_nan,
    row_offsets,
    store_rounded,
    to_gemm_operand,
)
from .configs import FWD_CONFIGS, gemm_flags, launch, prune_for


@triton.jit
def residual_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, D, T, M_BUCKET,
    stride_xo, stride_xm, stride_xd,
    stride_wn, stride_wk,
    stride_ym, stride_yd,
    HAS_BIAS: tl.constexpr,
    TWO_LEVEL_ROWS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x + relu(x) @ W.T + b for one [BLOCK_M, BLOCK_N] tile of y.

    The K loop runs at least once (``tl.maximum(cdiv(D, BLOCK_K), 1)``). Without that bound, the
    path on which the loop is skipped keeps the zero-initialised accumulator live into the
    epilogue, and on sm_90 ptxas then serialises every wgmma (advisory C7515). With it the relu'd
    A tile feeds a register-A wgmma that Triton pipelines normally.
    """
    GEMM_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < D
    x_rows = row_offsets(offs_m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)
    w_cols = offs_n.to(tl.int64) * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kt in range(0, tl.maximum(tl.cdiv(D, BLOCK_K), 1)):
        k = kt * BLOCK_K + offs_k
        mask_k = k < D
        a = tl.load(x_ptr + x_rows[:, None] + k[None, :] * stride_xd,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + w_cols[None, :] + k[:, None] * stride_wk,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = relu_nan(to_gemm_operand(a, GEMM_DTYPE, EMULATE_BF16))
        wt = to_gemm_operand(wt, GEMM_DTYPE, EMULATE_BF16)
        acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    residual = tl.load(x_ptr + x_rows[:, None] + offs_n[None, :] * stride_xd, mask=mask, other=0.0)
    acc += residual.to(ACC_DTYPE)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yd
    store_rounded(y_ptrs, acc, mask, EMULATE_BF16)


residual_fwd_kernel_tuned = triton.autotune(configs=FWD_CONFIGS, key=["M_BUCKET", "D", "TWO_LEVEL_ROWS"],
    prune_configs_by={"early_config_prune": prune_for("fwd")})(residual_fwd_kernel)


def fwd_launch_args(x, xs: RowStrides, weight, bias, y, rows: Rows):
    """The forward kernel's launch arguments, without launching: ``(args, consts, grid)``.

    The launcher and the compile gate (``fusedres.aot``) both build them here, so the gate
    compiles the signature a real launch specialises on.
    """
    D = weight.shape[0]
    args = (x, weight, bias if bias is not None else weight, y,
            rows.M, D, rows.T, next_pow2_bucket(rows.M),
            *xs, weight.stride(0), weight.stride(1), y.stride(0), y.stride(1))
    consts = dict(HAS_BIAS=bias is not None, TWO_LEVEL_ROWS=rows.two_level, **gemm_flags(weight.dtype, x.dtype, y.dtype))

    def grid(meta):
        return (triton.cdiv(rows.M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)

    return args, consts, grid


def residual_fwd(x, xs: RowStrides, weight, bias, y, rows: Rows, *, config: triton.Config | None = None) -> None:
    """Launch the forward kernel: ``y = x + relu(x) @ weight.T + bias`` (``bias`` may be None).

    ``x`` is addressed through ``rows`` and its strides ``xs``; ``y`` is a ``[M, D]`` 2-D view.
    """
    if rows.M == 0:
        return
    args, consts, grid = fwd_launch_args(x, xs, weight, bias, y, rows)
    launch(residual_fwd_kernel, residual_fwd_kernel_tuned, "fwd", grid, args, consts, rows.M, weight.shape[0], config)
