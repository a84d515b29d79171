"""Backward kernels of the pre-activation residual block.

With ``g = dL/dy`` and ``h = relu(x)``:

    dx[m, k] = g[m, k] + [x[m, k] > 0] * sum_n g[m, n] * W[n, k]     (relu'(0) = 0, as in PyTorch)
    dW[n, k] = sum_m g[m, n] * h[m, k]
    db[n]    = sum_m g[m, n]

Two kernels, and neither keeps an ``M x D`` temporary: ``h`` is recomputed from the saved ``x``
in the prologue of the dW GEMM, and the relu mask is read from ``x`` in the dx epilogue.
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
from .configs import DW_CONFIGS, DX_CONFIGS, gemm_flags, launch, prune_for


@triton.jit
def residual_dx_kernel(
    g_ptr, x_ptr, w_ptr, dx_ptr,
    M, D, T, M_BUCKET,
    stride_go, stride_gm, stride_gd,
    stride_xo, stride_xm, stride_xd,
    stride_wn, stride_wk,
    stride_dxm, stride_dxd,
    TWO_LEVEL_ROWS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = g + (g @ W) * [x > 0] for one [BLOCK_M, BLOCK_K] tile of dx; the loop runs over n.

    The mask is ``x <= 0 -> 0``, not ``x > 0 -> 1``: for ``x = NaN`` PyTorch's relu backward
    (``threshold_backward``) passes the gradient through, and so does this kernel.
    ``x`` and ``g`` share the flattened row layout ``x`` was given in (``g`` is made to match).
    """
    GEMM_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < D
    g_rows = row_offsets(offs_m, T, stride_go, stride_gm, TWO_LEVEL_ROWS)
    x_rows = row_offsets(offs_m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for nt in range(0, tl.maximum(tl.cdiv(D, BLOCK_N), 1)):
        n = nt * BLOCK_N + offs_n
        mask_n = n < D
        g = tl.load(g_ptr + g_rows[:, None] + n[None, :] * stride_gd,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptr + n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        g = to_gemm_operand(g, GEMM_DTYPE, EMULATE_BF16)
        w = to_gemm_operand(w, GEMM_DTYPE, EMULATE_BF16)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    mask = mask_m[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :] * stride_xd, mask=mask, other=0.0).to(ACC_DTYPE)
    g_res = tl.load(g_ptr + g_rows[:, None] + offs_k[None, :] * stride_gd, mask=mask, other=0.0).to(ACC_DTYPE)
    dx = g_res + tl.where(x <= 0, 0.0, acc)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxd
    store_rounded(dx_ptrs, dx, mask, EMULATE_BF16)


@triton.jit
def _dw_tile_loop(acc, db, g_ptr, x_ptr, offs_k, offs_n, mask_k, mask_n, M, T,
                  stride_go, stride_gm, stride_gd, stride_xo, stride_xm, stride_xd,
                  WITH_DB: tl.constexpr, TWO_LEVEL_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, GEMM_DTYPE: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """The reduction over all M rows of one dW.T tile; with WITH_DB also the column sums of g."""
    offs_m = tl.arange(0, BLOCK_M)
    for mt in range(0, tl.maximum(tl.cdiv(M, BLOCK_M), 1)):
        m = mt * BLOCK_M + offs_m
        mask_m = m < M
        x_rows = row_offsets(m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)
        g_rows = row_offsets(m, T, stride_go, stride_gm, TWO_LEVEL_ROWS)
        xt = tl.load(x_ptr + x_rows[None, :] + offs_k[:, None] * stride_xd,
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        g = tl.load(g_ptr + g_rows[:, None] + offs_n[None, :] * stride_gd,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        ht = relu_nan(to_gemm_operand(xt, GEMM_DTYPE, EMULATE_BF16))
        g = to_gemm_operand(g, GEMM_DTYPE, EMULATE_BF16)
        acc = tl.dot(ht, g, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if WITH_DB:
            db += tl.sum(g.to(ACC_DTYPE), axis=0)
    return acc, db


@triton.jit
def residual_dw_kernel(
    g_ptr, x_ptr, dw_ptr, db_ptr,
    M, D, T, M_BUCKET,
    stride_go, stride_gm, stride_gd,
    stride_xo, stride_xm, stride_xd,
    stride_dwn, stride_dwk,
    HAS_DB: tl.constexpr,
    TWO_LEVEL_ROWS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
):
    """One [BLOCK_K, BLOCK_N] tile of dW.T = relu(x).T @ g, reduced over all M rows, and db.

    Computing the transpose puts the relu on the A operand, as in the forward: on sm_90 that is a
    register-A wgmma that pipelines, while ``g.T @ relu(x)`` (relu on B) makes every wgmma wait on
    an smem -> register -> smem round trip. The tile is stored transposed into dW.

    db is folded in without atomics: the programs of the first K tile (``pid_k == 0``) also sum
    their g tiles over the rows they already load, so each db element has exactly one writer and
    a fixed reduction order. The result is bitwise reproducible for a given config.

    The branch on ``pid_k`` is taken once, outside the loop, and each side runs its own copy of
    the loop (``_dw_tile_loop`` with WITH_DB a constexpr). An ``if pid_k == 0: db += ...`` inside
    the loop did not serialise the wgmma on sm_90 (no C7515; it stayed async with one group in
    flight), but it made every program read each g tile from shared memory into registers for the
    sum, and so the pipeliner gave g one shared-memory buffer fewer (2 instead of 3 at
    num_stages=3) and ptxas spent more registers (spills in some fp32 configs). Now only the
    first K-tile column pays for db; the other programs run the plain pipelined GEMM loop.
    """
    GEMM_DTYPE: tl.constexpr = dw_ptr.dtype.element_ty
    pid_k, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(D, BLOCK_K), tl.cdiv(D, BLOCK_N), GROUP_K)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < D
    mask_n = offs_n < D

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC_DTYPE)
    db = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    if HAS_DB and pid_k == 0:
        acc, db = _dw_tile_loop(acc, db, g_ptr, x_ptr, offs_k, offs_n, mask_k, mask_n, M, T,
                                stride_go, stride_gm, stride_gd, stride_xo, stride_xm, stride_xd,
                                True, TWO_LEVEL_ROWS, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16, GEMM_DTYPE,
                                BLOCK_M)
        store_rounded(db_ptr + offs_n, db, mask_n, EMULATE_BF16)
    else:
        acc, db = _dw_tile_loop(acc, db, g_ptr, x_ptr, offs_k, offs_n, mask_k, mask_n, M, T,
                                stride_go, stride_gm, stride_gd, stride_xo, stride_xm, stride_xd,
                                False, TWO_LEVEL_ROWS, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16, GEMM_DTYPE,
                                BLOCK_M)

    dw_ptrs = dw_ptr + offs_n.to(tl.int64)[None, :] * stride_dwn + offs_k[:, None] * stride_dwk
    store_rounded(dw_ptrs, acc, mask_k[:, None] & mask_n[None, :], EMULATE_BF16)


residual_dx_kernel_tuned = triton.autotune(configs=DX_CONFIGS, key=["M_BUCKET", "D", "TWO_LEVEL_ROWS"],
    prune_configs_by={"early_config_prune": prune_for("dx")})(residual_dx_kernel)
residual_dw_kernel_tuned = triton.autotune(configs=DW_CONFIGS, key=["M_BUCKET", "D", "TWO_LEVEL_ROWS", "HAS_DB"],
    prune_configs_by={"early_config_prune": prune_for("dw")})(residual_dw_kernel)


def dx_launch_args(g, gs: RowStrides, x, xs: RowStrides, weight, dx, rows: Rows):
    """The dx kernel's launch arguments, without launching: ``(args, consts, grid)`` (shared by the
    launcher and the compile gate, ``fusedres.aot``)."""
    D = weight.shape[0]
    args = (g, x, weight, dx, rows.M, D, rows.T, next_pow2_bucket(rows.M),
            *gs, *xs, weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1))
    consts = dict(TWO_LEVEL_ROWS=rows.two_level, **gemm_flags(weight.dtype, g.dtype, x.dtype, dx.dtype))

    def grid(meta):
        return (triton.cdiv(rows.M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_K"]),)

    return args, consts, grid


def dw_launch_args(g, gs: RowStrides, x, xs: RowStrides, dw, db, rows: Rows):
    """The dW kernel's launch arguments, without launching: ``(args, consts, grid)`` (shared by the
    launcher and the compile gate, ``fusedres.aot``)."""
    D = dw.shape[0]
    args = (g, x, dw, db if db is not None else dw, rows.M, D, rows.T, next_pow2_bucket(rows.M),
            *gs, *xs, dw.stride(0), dw.stride(1))
    consts = dict(HAS_DB=db is not None, TWO_LEVEL_ROWS=rows.two_level, **gemm_flags(dw.dtype, g.dtype, x.dtype))

    def grid(meta):
        return (triton.cdiv(D, meta["BLOCK_K"]) * triton.cdiv(D, meta["BLOCK_N"]),)

    return args, consts, grid


def residual_dx(g, gs: RowStrides, x, xs: RowStrides, weight, dx, rows: Rows, *,
                config: triton.Config | None = None) -> None:
    """Launch the dx kernel: ``dx = g + (g @ weight) * [x > 0]``; ``dx`` is a ``[M, D]`` 2-D view."""
    if rows.M == 0:
        return
    args, consts, grid = dx_launch_args(g, gs, x, xs, weight, dx, rows)
    launch(residual_dx_kernel, residual_dx_kernel_tuned, "dx", grid, args, consts, rows.M, weight.shape[0], config)


def residual_dw(g, gs: RowStrides, x, xs: RowStrides, dw, db, rows: Rows, *,
                config: triton.Config | None = None) -> None:
    """Launch the dW kernel: ``dw = g.T @ relu(x)`` and, if ``db`` is given, ``db = g.sum(0)``.

    It runs for M == 0 too, so that the gradients come out as zeros, as in eager.
    """
    args, consts, grid = dw_launch_args(g, gs, x, xs, dw, db, rows)
    launch(residual_dw_kernel, residual_dw_kernel_tuned, "dw", grid, args, consts, rows.M, dw.shape[0], config)
