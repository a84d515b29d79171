"""The normalization's own small kernels: the statistics before the forward GEMM, and the input
gradient's correction after dx.

The normalization itself never becomes a tensor: the forward and dW GEMMs apply it to their A
tiles from the statistics (:func:`.gemm.normalize`), and dx recomputes it in its epilogue. What
needs a reduction over a whole row or column lives here:

- :func:`row_stats_kernel` (LayerNorm, RMSNorm) and :func:`col_stats_kernel` (BatchNorm): one
  read-only pass over ``x`` that writes only the ``[M]`` or ``[D]`` statistics (BatchNorm: one
  ``(mean, M2)`` partial per row split, combined on the host with Chan's parallel formula in a
  fixed order). Chunks of the reduction are combined with Chan's formula too, in fp32 (fp64 for
  fp64): a sum and a sum of squares cancel when the mean is large against the spread.
- :func:`norm_dx_kernel`: ``dx = g + rstd * (weight * dz - c1 - x_hat * c2)``, the norm's
  backward with its two global means ``c1``, ``c2`` (per feature for BatchNorm, per row for
  LayerNorm and RMSNorm) taken from dx's sinks. It reads dz (in the dx buffer, in place), ``g`` and
  ``x`` and writes dx: the one light finishing pass that the global reduction forces.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Rows, RowStrides, cdiv, record_launch, row_offsets, store_rounded
from .gemm import along, standardize, tile_summary
from .configs import device_guard, gemm_flags

#: The statistics and finishing kernels' one config each (memory-bound; the compile gate compiles
#: exactly these, ``python -m fusedres.aot --features norm-batch,norm-layer,norm-rms``).
STATS_BLOCK_M = 32
STATS_BLOCK_K = 64
NORM_CONFIGS = {
    "norm_row_stats": triton.Config({"BLOCK_M": STATS_BLOCK_M, "BLOCK_K": STATS_BLOCK_K}, num_warps=4, num_stages=1),
    "norm_col_stats": triton.Config({"BLOCK_M": STATS_BLOCK_M, "BLOCK_K": STATS_BLOCK_K}, num_warps=4, num_stages=1),
    "norm_dx": triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=1),
}


@triton.jit
def chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel combination of two ``(count, mean, M2)`` summaries (counts > 0 for
    ``b``)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


@triton.jit
def row_stats_kernel(x_ptr, mean_ptr, var_ptr, M, K, T, stride_xo, stride_xm, stride_xk,
                     TWO_LEVEL_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row of ``x`` ``[M, K]``: ``mean`` and the biased ``var`` (LayerNorm), or with
    ``mean_ptr`` None the mean square (RMSNorm) into ``var_ptr``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows = row_offsets(offs_m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)
    n = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(ACC_DTYPE)
        if mean_ptr is not None:
            count = tl.minimum(K - k0, BLOCK_K).to(ACC_DTYPE)
            chunk_mean, chunk_m2 = tile_summary(x, mask, count, 1)
            n, mean, m2 = chan_combine(n, mean, m2, count, chunk_mean, chunk_m2)
        else:
            m2 += tl.sum(x * x, axis=1)
    if mean_ptr is not None:
        tl.store(mean_ptr + offs_m, mean, mask=mask_m)
    tl.store(var_ptr + offs_m, m2 / K, mask=mask_m)


@triton.jit
def col_stats_kernel(x_ptr, mean_part_ptr, m2_part_ptr, M, K, T, ROWS_PER_SPLIT, stride_xo, stride_xm, stride_xk,
                     TWO_LEVEL_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per feature of ``x`` ``[M, K]``, over the rows of split ``program_id(1)`` (``ROWS_PER_SPLIT``
    rows, a multiple of ``BLOCK_M``): the ``(mean, M2)`` partial, row ``split`` of ``[S, K]``."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    split = tl.program_id(1)
    first = split * ROWS_PER_SPLIT
    n = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    for m0 in range(first, tl.minimum(first + ROWS_PER_SPLIT, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask = mask_m[:, None] & mask_k[None, :]
        x_rows = row_offsets(offs_m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)
        x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(ACC_DTYPE)
        count = tl.minimum(M - m0, BLOCK_M).to(ACC_DTYPE)
        chunk_mean, chunk_m2 = tile_summary(x, mask, count, 0)
        n, mean, m2 = chan_combine(n, mean, m2, count, chunk_mean, chunk_m2)
    tl.store(mean_part_ptr + split.to(tl.int64) * K + offs_k, mean, mask=mask_k)
    tl.store(m2_part_ptr + split.to(tl.int64) * K + offs_k, m2, mask=mask_k)


@triton.jit
def norm_dx_kernel(dx_ptr, g_ptr, x_ptr, row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr, norm_w_ptr,
                   c1_ptr, c2_ptr, M, K, T,
                   stride_go, stride_gm, stride_gk,
                   stride_xo, stride_xm, stride_xk,
                   stride_dxm, stride_dxk,
                   TWO_LEVEL_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """In place on ``dx`` (which holds dz, the norm output's gradient):
    ``dx = g + rstd * (weight * dz - c1 - x_hat * c2)``.

    Per feature (BatchNorm, ``col_*`` given): ``rstd``, ``c1 = weight * mean_m(dz)``, ``c2 = weight
    * mean_m(dz * x_hat)`` are ``[K]`` vectors; per row (LayerNorm, RMSNorm, ``row_*``): ``c1 =
    mean_k(weight * dz)``, ``c2 = mean_k(weight * dz * x_hat)`` are ``[M]``. ``c1_ptr`` None: no
    mean term (RMSNorm); both None: the statistics are constants (BatchNorm on running statistics),
    ``dx = g + rstd * weight * dz``. ``norm_w_ptr`` None: weight 1. ``g`` None: no residual
    gradient to add."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask = mask_m[:, None] & mask_k[None, :]
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    dz = tl.load(dx_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    if norm_w_ptr is not None:
        dz = dz * tl.load(norm_w_ptr + offs_k, mask=mask_k, other=0.0).to(ACC_DTYPE)[None, :]
    if col_rstd_ptr is not None:
        ROW_STATS: tl.constexpr = False
        stat_idx = offs_k
        stat_mask = mask_k
    else:
        ROW_STATS: tl.constexpr = True
        stat_idx = offs_m
        stat_mask = mask_m
    AXIS: tl.constexpr = 0 if ROW_STATS else 1
    if c1_ptr is not None:
        dz = dz - along(tl.load(c1_ptr + stat_idx, mask=stat_mask, other=0.0).to(ACC_DTYPE), AXIS)
    if c2_ptr is not None:
        x_rows = row_offsets(offs_m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)
        x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        x_hat = standardize(x, offs_m, mask_m, offs_k, mask_k, row_mean_ptr, row_rstd_ptr, col_mean_ptr,
                            col_rstd_ptr, 0, ACC_DTYPE)
        dz = dz - x_hat * along(tl.load(c2_ptr + stat_idx, mask=stat_mask, other=0.0).to(ACC_DTYPE), AXIS)
    if ROW_STATS:
        dz = dz * along(tl.load(row_rstd_ptr + stat_idx, mask=stat_mask, other=0.0).to(ACC_DTYPE), AXIS)
    else:
        dz = dz * along(tl.load(col_rstd_ptr + stat_idx, mask=stat_mask, other=0.0).to(ACC_DTYPE), AXIS)
    if g_ptr is not None:
        g_rows = row_offsets(offs_m, T, stride_go, stride_gm, TWO_LEVEL_ROWS)
        dz += tl.load(g_ptr + g_rows[:, None] + offs_k[None, :] * stride_gk, mask=mask, other=0.0).to(ACC_DTYPE)
    store_rounded(dx_ptrs, dz, mask, EMULATE_BF16)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The statistics' dtype: fp32, fp64 for fp64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _launch(kernel, kind: str, grid, args, consts) -> None:
    config = NORM_CONFIGS[kind]
    record_launch(kind)
    with device_guard(args[0].device):
        kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def row_stats_launch_args(x, xs: RowStrides, rows: Rows, mean, var):
    """``(args, consts, grid)`` of :func:`row_stats_kernel` (the launcher's and the gate's)."""
    args = (x, mean, var, rows.M, x.shape[-1], rows.T, *xs)
    return args, dict(TWO_LEVEL_ROWS=rows.two_level, ACC_DTYPE=gemm_flags(var.dtype)["ACC_DTYPE"]), \
        (cdiv(rows.M, STATS_BLOCK_M),)


def row_stats(x, xs: RowStrides, rows: Rows, with_mean: bool):
    """LayerNorm's ``(mean [M], var [M])`` or RMSNorm's ``(None, mean square [M])`` of the rows of
    ``x`` (addressed through ``rows`` and ``xs``): one read of ``x``."""
    acc = acc_dtype(x)
    mean = torch.empty(rows.M, device=x.device, dtype=acc) if with_mean else None
    var = torch.empty(rows.M, device=x.device, dtype=acc)
    if rows.M:
        _launch(row_stats_kernel, "norm_row_stats", *_swap(row_stats_launch_args(x, xs, rows, mean, var)))
    return mean, var


def _swap(launch_args):
    args, consts, grid = launch_args
    return grid, args, consts


def col_splits(M: int, K: int) -> tuple[int, int]:
    """BatchNorm statistics' row splits ``(S, rows per split)``: enough programs to fill a large GPU
    (about 1024 with the feature tiles), at least ``STATS_BLOCK_M`` rows each."""
    tiles = cdiv(M, STATS_BLOCK_M)
    splits = max(1, min(tiles, cdiv(1024, cdiv(K, STATS_BLOCK_K))))
    per = cdiv(tiles, splits) * STATS_BLOCK_M
    return cdiv(M, per), per


def col_stats_launch_args(x, xs: RowStrides, rows: Rows, mean_part, m2_part):
    """``(args, consts, grid)`` of :func:`col_stats_kernel` into ``[S, K]`` partials."""
    K = x.shape[-1]
    S, per = col_splits(rows.M, K)
    args = (x, mean_part, m2_part, rows.M, K, rows.T, per, *xs)
    return args, dict(TWO_LEVEL_ROWS=rows.two_level, ACC_DTYPE=gemm_flags(mean_part.dtype)["ACC_DTYPE"]), \
        (cdiv(K, STATS_BLOCK_K), S)


def col_stats(x, xs: RowStrides, rows: Rows):
    """BatchNorm's ``(mean [K], biased var [K])`` over the rows of ``x``: one read of ``x`` into
    ``[S, K]`` partials, combined with Chan's formula in split order (a fixed order)."""
    K = x.shape[-1]
    acc = acc_dtype(x)
    if rows.M == 0:
        return torch.zeros(K, device=x.device, dtype=acc), torch.zeros(K, device=x.device, dtype=acc)
    S, per = col_splits(rows.M, K)
    mean_part = torch.empty(S, K, device=x.device, dtype=acc)
    m2_part = torch.empty(S, K, device=x.device, dtype=acc)
    _launch(col_stats_kernel, "norm_col_stats", *_swap(col_stats_launch_args(x, xs, rows, mean_part, m2_part)))
    return combine_partials(mean_part, m2_part, per, rows.M)


def combine_partials(mean_part, m2_part, per: int, total: int):
    """``(mean, biased var)`` over ``total`` values from ``[S, n]`` ``(mean, M2)`` partials of ``per``
    values each (the last: the rest), in split order: the weighted mean, corrected by the weighted
    mean of the residuals (exact for equal partial means: a constant column), then Chan's M2,
    ``sum M2_s + sum n_s (mean_s - mean)^2``."""
    S = mean_part.shape[0]
    counts = torch.full((S, 1), float(per), device=mean_part.device, dtype=mean_part.dtype)
    counts[-1] = total - per * (S - 1)
    mean = (mean_part * counts).sum(0) / total
    mean = mean + (counts * (mean_part - mean)).sum(0) / total
    m2 = m2_part.sum(0) + (counts * (mean_part - mean) ** 2).sum(0)
    return mean, m2 / total


def partial_stats(kind: str, part, tiles: int, per: int, n: int, total: int):
    """A norm's statistics from an epilogue's partials (``part``: ``[>= tiles, 2, n]`` flat, the
    first ``tiles`` written by the launch): ``(mean, var)``, RMSNorm ``(None, mean square)``."""
    p = part[:tiles * 2 * n].view(tiles, 2, n)
    mean, var = combine_partials(p[:, 0], p[:, 1], per, total)
    if kind == "rms":
        return None, var + mean * mean
    return mean, var


def norm_dx(dx, g, gs: RowStrides | None, x, xs: RowStrides, rows: Rows, norm: tuple, c1, c2) -> None:
    """Launch :func:`norm_dx_kernel` on ``dx`` ``[M, K]`` (holding dz) in place. ``norm``: the six
    operands of :func:`~.residual_fwd.norm_operands`; ``c1``, ``c2``: the correction's means (None:
    absent). ``g`` None: no residual gradient."""
    if dx.shape[0] == 0:
        return
    _launch(norm_dx_kernel, "norm_dx", *_swap(norm_dx_launch_args(dx, g, gs, x, xs, rows, norm, c1, c2)))


def norm_dx_launch_args(dx, g, gs: RowStrides | None, x, xs: RowStrides, rows: Rows, norm: tuple, c1, c2):
    """``(args, consts, grid)`` of :func:`norm_dx_kernel`."""
    M, K = dx.shape
    row_mean, row_rstd, col_mean, col_rstd, weight, _ = norm
    gst = gs if gs is not None else RowStrides(0, 0, 0)
    flags = gemm_flags(acc_dtype(dx), dx.dtype, x.dtype, *([g.dtype] if g is not None else []))
    config = NORM_CONFIGS["norm_dx"]
    args = (dx, g, x, row_mean, row_rstd, col_mean, col_rstd, weight, c1, c2, M, K, rows.T, *gst, *xs,
            dx.stride(0), dx.stride(1))
    consts = dict(TWO_LEVEL_ROWS=rows.two_level, ACC_DTYPE=flags["ACC_DTYPE"], EMULATE_BF16=flags["EMULATE_BF16"])
    return args, consts, (cdiv(M, config.kwargs["BLOCK_M"]), cdiv(K, config.kwargs["BLOCK_K"]))
