"""Backward kernels of the pre-activation residual block.

With ``g = dL/dy``, ``h = relu(x)`` and ``[x > 0]`` the relu mask (relu'(0) = 0, as in PyTorch):

    dx[m, k]  = g[m, k] + alpha * [x[m, k] > 0] * sum_n g[m, n] * W[n, k]
                (projection shortcut: sum_n g[m, n] * P[n, k] instead of g[m, k])
    dW[n, k]  = alpha * sum_m g[m, n] * h[m, k]
    dP[n, k]  = sum_m g[m, n] * x[m, k]
    db[n]     = alpha * sum_m g[m, n]
    dalpha    = <g.T @ h, W> + <g.sum(0), b>

With stochastic depth's per-sample scale ``s`` (``s_ptr``), ``g`` is ``s[m // R] * g`` in
every term but the shortcut's (``dx``'s residual ``g`` and ``dP``).

Two kernels, and neither keeps an ``M x D`` temporary: ``h`` is recomputed from the saved ``x`` in
the prologue of the dW GEMM, and the relu mask is read from ``x`` in the dx epilogue. ``dalpha``
costs no extra GEMM: it is a dot of the unscaled dW tile with the W tile (and of the unscaled db
with b), taken in the dW epilogue, one partial per program, summed in a fixed order afterwards.
"""
from __future__ import annotations

import torch
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
)
from . import plan as _plan
from .device import limits_for
from .configs import (
    DW_CONFIGS,
    DX_CONFIGS,
    PreparedLaunch,
    gemm_flags,
    launch_and_prepare,
    launch_limits,
    pinned_config,
    prune_for,
    resolve_config,
)
from .gemm import (
    add_rows,
    dropout_multiplier,
    norm_affine,
    standardize,
    dalpha_of_bias,
    dalpha_of_tile,
    mma_loop,
    row_scale,
    scalar_alpha,
    scale_by_alpha,
    store_db,
)
from .residual_fwd import NO_DROPOUT, NO_NORM, act_consts, alpha_args, alpha_kind, norm_pieces, recipe_key


@triton.jit
def residual_dx_kernel(
    g_ptr, x_ptr, w_ptr, dx_ptr, p_ptr, r_ptr, alpha_ptr, channel_alpha_ptr, alpha_value, s_ptr,
    row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr, norm_w_ptr, norm_b_ptr, col_sums_ptr, row_sums_ptr,
    drop_seed_ptr, drop_ptr, a_drop_seed_ptr, a_drop_ptr,
    M, N, K, T, M_BUCKET, ROWS_PER_SAMPLE,
    stride_go, stride_gm, stride_gn,
    stride_xo, stride_xm, stride_xk,
    stride_ro, stride_rm, stride_rk,
    stride_wn, stride_wk,
    stride_pn, stride_pk,
    stride_dxm, stride_dxk,
    DACT: tl.constexpr,
    ACT_PARAM: tl.constexpr,
    RECIPE: tl.constexpr,
    TWO_LEVEL_ROWS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_K] tile of dx; the loop runs over the N output features.

    The general form, which the MLP block's two data-gradient GEMMs also run:
    ``dx = [r | g @ P | 0] + act'(x) * s[m // R] * ((alpha * g) @ W)``, with ``r`` the residual
    gradient (``r_ptr``: ``g`` itself for the block) and ``x`` the pre-activation whose
    derivative applies (``DACT``, from :mod:`.activations`; the MLP's hidden pre-activation for its
    ``dh``; None: no activation, and ``x`` is not read). A per-channel alpha scales g's columns in
    the loop's A-tile prologue (the features this loop reduces over), rounded once as eager rounds
    ``alpha * g``; a scalar one the accumulator. With a projection (``p_ptr``), the ``g @ P`` loop
    accumulates after the derivative is applied, into the same accumulator.

    Dropout: the branch dropout's multiplier (``drop_*``) on g's A tiles in the loop, beside a
    per-channel alpha (the forward dropped ``act(x) @ W.T + b`` at (row, n), so its gradient is
    ``g * mask * scale``); the hidden dropout's (``a_drop_*``, the MLP's ``dh``: the forward
    dropped ``act(h)`` at (row, k)) in the epilogue, before the derivative. Both regenerated from
    the seed (:func:`.gemm.dropout_multiplier`), neither read from memory.
    """
    GEMM_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    g_rows = row_offsets(offs_m, T, stride_go, stride_gm, TWO_LEVEL_ROWS)
    n_trips = tl.maximum(tl.cdiv(N, BLOCK_N), 1)
    unused = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    acc, _ = mma_loop(acc, unused, g_ptr, g_rows, 0, stride_gn, mask_m,
                      w_ptr, offs_k * stride_wk, 0, stride_wn, mask_k,
                      0, n_trips, N, T, None, 0.0, None, channel_alpha_ptr, None, None,
                      offs_m, None, None, None, None, None, None, drop_seed_ptr, drop_ptr, None, None, None, None,
                      None, True, BLOCK_N, GEMM_DTYPE, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16)

    mask = mask_m[:, None] & mask_k[None, :]
    if alpha_ptr is not None or alpha_value is not None:
        acc = acc * scalar_alpha(alpha_ptr, alpha_value, ACC_DTYPE)
    if s_ptr is not None:
        acc = acc * row_scale(s_ptr, offs_m, mask_m, ROWS_PER_SAMPLE, ACC_DTYPE)[:, None]
    if a_drop_seed_ptr is not None:
        acc = acc * dropout_multiplier(a_drop_seed_ptr, a_drop_ptr, offs_m, pid_k * BLOCK_K, BLOCK_K, ACC_DTYPE)
    if DACT is not None or row_rstd_ptr is not None or col_rstd_ptr is not None:
        x_rows = row_offsets(offs_m, T, stride_xo, stride_xm, TWO_LEVEL_ROWS)
        x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(ACC_DTYPE)
        if row_rstd_ptr is not None or col_rstd_ptr is not None:
            # the activation's input is norm(x): recomputed here from x and the statistics
            x_hat = standardize(x, offs_m, mask_m, offs_k, mask_k, row_mean_ptr, row_rstd_ptr, col_mean_ptr,
                                col_rstd_ptr, 0, ACC_DTYPE)
            x = norm_affine(x_hat, offs_k, mask_k, norm_w_ptr, norm_b_ptr, 1, ACC_DTYPE)
        if DACT is not None:
            acc = DACT(acc, x, ACT_PARAM)
        if col_sums_ptr is not None:
            # sinks of dz (the norm output's gradient): column sums of dz and dz * x_hat per row
            # tile (dbeta, dgamma; BatchNorm's correction), row pid_m of [row tiles, 2, K]
            sums = col_sums_ptr + pid_m.to(tl.int64) * 2 * K + offs_k
            tl.store(sums, tl.sum(acc, axis=0), mask=mask_k)
            tl.store(sums + K, tl.sum(acc * x_hat, axis=0), mask=mask_k)
        if row_sums_ptr is not None:
            # row sums of weight * dz and weight * dz * x_hat per feature tile (LayerNorm's and
            # RMSNorm's correction), row pid_k of [feature tiles, 2, M]
            dzw = norm_affine(acc, offs_k, mask_k, norm_w_ptr, None, 1, ACC_DTYPE)
            sums = row_sums_ptr + pid_k.to(tl.int64) * 2 * M + offs_m
            tl.store(sums, tl.sum(dzw, axis=1), mask=mask_m)
            tl.store(sums + M, tl.sum(dzw * x_hat, axis=1), mask=mask_m)
    if p_ptr is not None:
        acc, _ = mma_loop(acc, unused, g_ptr, g_rows, 0, stride_gn, mask_m,
                          p_ptr, offs_k * stride_pk, 0, stride_pn, mask_k,
                          0, n_trips, N, T, None, 0.0, None, None, None, None,
                          None, None, None, None, None, None, None, None, None, None, None, None, None,
                          None, True, BLOCK_N, GEMM_DTYPE, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16)
    acc = add_rows(acc, r_ptr, row_offsets(offs_m, T, stride_ro, stride_rm, TWO_LEVEL_ROWS), offs_k, stride_rk,
                   mask, ACC_DTYPE)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    store_rounded(dx_ptrs, acc, mask, EMULATE_BF16)


@triton.jit
def residual_dw_kernel(
    g_ptr, x_ptr, dw_ptr, db_ptr, dp_ptr, w_ptr, b_ptr, alpha_ptr, channel_alpha_ptr, alpha_value,
    dalpha_ptr, part_ptr, dbpart_ptr, s_ptr,
    row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr, norm_w_ptr, norm_b_ptr,
    drop_seed_ptr, drop_ptr, a_drop_seed_ptr, a_drop_ptr,
    M, N, K, T, M_BUCKET, TILES_PER_SPLIT, ROWS_PER_SAMPLE,
    stride_go, stride_gm, stride_gn,
    stride_xo, stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_dwn, stride_dwk,
    stride_dpn, stride_dpk,
    ACT: tl.constexpr,
    ACT_PARAM: tl.constexpr,
    RECIPE: tl.constexpr,
    TWO_LEVEL_ROWS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr,
):
    """One [BLOCK_K, BLOCK_N] tile of dW.T = relu(x).T @ g (or dP.T = x.T @ g), reduced over all
    M rows, with db and the dalpha partial in the epilogue.

    Computing the transpose puts the relu on the A operand, as in the forward: on sm_90 that is a
    register-A wgmma that pipelines, while ``g.T @ relu(x)`` (relu on B) makes every wgmma wait on
    an smem -> register -> smem round trip. The tile is stored transposed into dW. With a
    projection the K tiles run over the concatenation ``[relu(x), x]``: the first ``cdiv(K,
    BLOCK_K)`` tiles produce dW, the rest dP, from one launch.

    db is folded in without atomics: the programs of the first K tile also sum their g tiles over
    the rows they already load (``SUM_G``: when db, or dalpha's bias term, or the split's db
    partials need them), so each db element has exactly one writer and a fixed reduction order. Each program writes its own dalpha partial: only the launch's own programs'
    slots are to be summed (``residual_dw`` returns how many), since autotuning runs configs with
    more programs on the same workspace first. The results are bitwise reproducible for a given
    config.

    The column sum loads the g tile a second time, 16 rows at a time, inside the ``pid_k == 0``
    branch, instead of summing the ``g`` the dot consumes: so the GEMM's operands are pipelined as
    in a plain GEMM in every program, and only the first K-tile column pays for db, with one more
    read of tiles that are in L2 (the compile-gate measurements behind this choice:
    docs/kernel-family.md, "Why dW sums g with its own loads"). The summation order is fixed:
    16-row partial sums, in row order.

    Split-M (``part_ptr`` given: when the output tiles alone leave the GPU under one wave): the grid is
    ``tiles x S``; program ``pid`` reduces row tiles ``[s * TILES_PER_SPLIT, (s + 1) *
    TILES_PER_SPLIT)`` (clipped to M) of tile ``pid % tiles``, ``s = pid // tiles``, and stores
    its unscaled fp32 sums into slab ``s`` of ``part_ptr`` (``[S, N, K]``; ``[S, 2N, K]`` with a
    projection, dP's rows after dW's) and, with ``SUM_G``, its column sums of g into
    ``dbpart_ptr`` (``[S, N]``; None: no column sums). No alpha, no dalpha, no cast, no atomics:
    the reduce kernel (:func:`residual_dw_reduce_kernel`) sums the slabs in the order s = 0..S-1
    and runs the epilogue. (The launcher then passes db, W, b, alpha and dalpha as None.)

    ``ACT`` is the activation's A-tile prologue (:mod:`.activations`), recomputing ``act(x)`` from
    the saved ``x``. ``w_ptr`` and ``b_ptr`` are given only for dalpha (``dalpha_ptr``). A
    per-channel alpha (``channel_alpha_ptr``) gets per-feature dalpha partials, row ``pid_k`` of a
    ``[cdiv(K, BLOCK_K), N]`` workspace, instead of one per program.

    Dropout, regenerated (:func:`.gemm.dropout_multiplier`): the branch dropout's multiplier
    (``drop_*``) on the B tile ``g`` and on its column sums (db, and so dalpha, see the masked
    g), not on dP's tiles; the hidden dropout's (``a_drop_*``) on the activated A tile, the MLP's
    ``act(h)`` in dW2.
    """
    GEMM_DTYPE: tl.constexpr = dw_ptr.dtype.element_ty
    SUM_G: tl.constexpr = dbpart_ptr is not None or db_ptr is not None or (dalpha_ptr is not None and b_ptr is not None)
    PER_FEATURE: tl.constexpr = channel_alpha_ptr is not None
    num_k = tl.cdiv(K, BLOCK_K)
    if dp_ptr is not None:
        num_k_tiles = 2 * num_k
    else:
        num_k_tiles = num_k
    pid = tl.program_id(0)
    if part_ptr is not None:
        num_tiles = num_k_tiles * tl.cdiv(N, BLOCK_N)
        split = pid // num_tiles
        m_tile0 = split * TILES_PER_SPLIT
        m_trips = tl.maximum(tl.minimum(TILES_PER_SPLIT, tl.cdiv(M, BLOCK_M) - m_tile0), 1)
        tile = pid % num_tiles
    else:
        m_tile0 = 0
        m_trips = tl.maximum(tl.cdiv(M, BLOCK_M), 1)
        tile = pid
    pid_k, pid_n = grouped_tile(tile, num_k_tiles, tl.cdiv(N, BLOCK_N), GROUP_K)
    is_proj = pid_k >= num_k
    offs_k = (pid_k % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    if dp_ptr is not None:
        plain = is_proj         # dP's tiles: x as it is, rows unscaled
    else:
        plain = None
    if SUM_G:
        sum_g = pid_k == 0
    else:
        sum_g = None

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC_DTYPE)
    db = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    acc, db = mma_loop(acc, db, x_ptr, offs_k * stride_xk, stride_xo, stride_xm, mask_k,
                       g_ptr, offs_n * stride_gn, stride_go, stride_gm, mask_n,
                       m_tile0, m_trips, M, T, ACT, ACT_PARAM, plain, s_ptr, ROWS_PER_SAMPLE, sum_g,
                       offs_k, row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr, norm_w_ptr, norm_b_ptr,
                       a_drop_seed_ptr, a_drop_ptr, (pid_k % num_k) * BLOCK_K, drop_seed_ptr, drop_ptr,
                       pid_n * BLOCK_N,
                       TWO_LEVEL_ROWS, False, BLOCK_M, GEMM_DTYPE, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16)

    tile_mask = mask_k[:, None] & mask_n[None, :]
    if part_ptr is not None:
        # unscaled fp32 partials: row n of slab s (dP's rows after dW's: n + N)
        if dp_ptr is not None:
            rows_per_slab = 2 * N
        else:
            rows_per_slab = N
        slab = part_ptr + split.to(tl.int64) * rows_per_slab * K
        part_rows = offs_n.to(tl.int64)
        if dp_ptr is not None:
            part_rows = part_rows + tl.where(is_proj, N, 0)
        tl.store(slab + part_rows[None, :] * K + offs_k[:, None], acc, mask=tile_mask)
        if dbpart_ptr is not None:
            if pid_k == 0:
                tl.store(dbpart_ptr + split.to(tl.int64) * N + offs_n, db, mask=mask_n)
    else:
        if dalpha_ptr is not None:
            wt = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                         mask=tile_mask, other=0.0).to(ACC_DTYPE)
            partial = dalpha_of_tile(acc, wt, PER_FEATURE, 1)
            if not PER_FEATURE:
                if dp_ptr is not None:
                    partial = tl.where(is_proj, 0.0, partial)
            if b_ptr is not None:
                if pid_k == 0:
                    partial += dalpha_of_bias(db, tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE),
                                              PER_FEATURE)
            if PER_FEATURE:
                # one partial per feature n and K tile: row pid_k of a [K tiles, N] workspace (dP's
                # K tiles write none; the comparison made a vector first: triton 3.9's interpreter
                # refuses a vector mask and'ed with a scalar)
                tl.store(dalpha_ptr + pid_k.to(tl.int64) * N + offs_n, partial,
                         mask=mask_n & ((tl.zeros_like(offs_n) + pid_k) < num_k))
            else:
                tl.store(dalpha_ptr + pid, partial)

        scaled = scale_by_alpha(acc, alpha_ptr, alpha_value, channel_alpha_ptr, offs_n, mask_n, ACC_DTYPE, 1)
        dw_ptrs = dw_ptr + offs_n.to(tl.int64)[None, :] * stride_dwn + offs_k[:, None] * stride_dwk
        if dp_ptr is not None:
            if is_proj:
                dp_ptrs = dp_ptr + offs_n.to(tl.int64)[None, :] * stride_dpn + offs_k[:, None] * stride_dpk
                store_rounded(dp_ptrs, acc, tile_mask, EMULATE_BF16)
            else:
                store_rounded(dw_ptrs, scaled, tile_mask, EMULATE_BF16)
        else:
            store_rounded(dw_ptrs, scaled, tile_mask, EMULATE_BF16)
        if db_ptr is not None:
            if pid_k == 0:
                store_db(db_ptr, db, offs_n, mask_n, alpha_ptr, alpha_value, channel_alpha_ptr, ACC_DTYPE,
                         EMULATE_BF16)


@triton.jit
def residual_dw_reduce_kernel(
    part_ptr, dbpart_ptr, dw_ptr, db_ptr, dp_ptr, w_ptr, b_ptr, alpha_ptr, channel_alpha_ptr,
    alpha_value, dalpha_ptr,
    N, K, S,
    stride_wn, stride_wk,
    stride_dwn, stride_dwk,
    stride_dpn, stride_dpk,
    ACC_DTYPE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The second launch of a split-M dW: one [BLOCK_R, BLOCK_C] tile of the ``[N, K]`` gradient
    (``[2N, K]`` with a projection: dW's rows, then dP's), summed over the ``S`` fp32 slabs in
    the fixed order s = 0..S-1; then the epilogue the single-launch dW runs: dW = alpha * sum, dP
    = sum, cast (rounded) to the parameter dtype; the programs of the first column tile also sum
    the db slabs (db = alpha * sum). With ``dalpha_ptr`` each program writes one dalpha partial,
    ``<sum, W>`` over its dW rows (plus ``<db, b>`` over its db rows) into ``dalpha_ptr[pid]``:
    the launcher returns this kernel's program count, so that op.py sums exactly those. A
    per-channel alpha writes per-feature partials instead, row ``pid_c`` of a ``[cdiv(K, BLOCK_C),
    N]`` workspace (the launcher then returns that row count)."""
    PER_FEATURE: tl.constexpr = channel_alpha_ptr is not None
    pid = tl.program_id(0)
    num_c = tl.cdiv(K, BLOCK_C)
    pid_r = pid // num_c
    pid_c = pid % num_c
    if dp_ptr is not None:
        rows_total = 2 * N
    else:
        rows_total = N
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < K
    mask = (offs_r < rows_total)[:, None] & mask_c[None, :]
    slab_offs = offs_r.to(tl.int64)[:, None] * K + offs_c[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for s in range(0, S):
        acc += tl.load(part_ptr + (s * rows_total).to(tl.int64) * K + slab_offs, mask=mask, other=0.0)

    is_w = offs_r < N
    w_rows = tl.where(is_w, offs_r, 0).to(tl.int64)
    w_mask = mask & is_w[:, None]
    if dalpha_ptr is not None:
        w = tl.load(w_ptr + w_rows[:, None] * stride_wn + offs_c[None, :] * stride_wk, mask=w_mask,
                    other=0.0).to(ACC_DTYPE)
        partial = dalpha_of_tile(acc, w, PER_FEATURE, 0)
    scaled = scale_by_alpha(acc, alpha_ptr, alpha_value, channel_alpha_ptr, w_rows, is_w, ACC_DTYPE, 0)
    store_rounded(dw_ptr + w_rows[:, None] * stride_dwn + offs_c[None, :] * stride_dwk, scaled, w_mask,
                  EMULATE_BF16)
    if dp_ptr is not None:
        p_rows = tl.where(is_w, 0, offs_r - N).to(tl.int64)
        store_rounded(dp_ptr + p_rows[:, None] * stride_dpn + offs_c[None, :] * stride_dpk, acc,
                      mask & (offs_r >= N)[:, None], EMULATE_BF16)
    if dbpart_ptr is not None:
        if pid_c == 0:
            db_mask = offs_r < N
            db = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
            for s in range(0, S):
                db += tl.load(dbpart_ptr + s * N + w_rows, mask=db_mask, other=0.0)
            if dalpha_ptr is not None:
                if b_ptr is not None:
                    partial += dalpha_of_bias(db, tl.load(b_ptr + w_rows, mask=db_mask, other=0.0).to(ACC_DTYPE),
                                              PER_FEATURE)
            if db_ptr is not None:
                store_db(db_ptr, db, w_rows, db_mask, alpha_ptr, alpha_value, channel_alpha_ptr, ACC_DTYPE,
                         EMULATE_BF16)
    if dalpha_ptr is not None:
        if PER_FEATURE:
            # per-feature partials: row pid_c of a [column tiles, N] workspace (dP's rows write none)
            tl.store(dalpha_ptr + pid_c.to(tl.int64) * N + w_rows, partial, mask=is_w)
        else:
            tl.store(dalpha_ptr + pid, partial)


residual_dx_kernel_tuned = triton.autotune(
    configs=DX_CONFIGS, key=["M_BUCKET", "N", "K", "RECIPE", "TWO_LEVEL_ROWS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_for("dx")})(residual_dx_kernel)
residual_dw_kernel_tuned = triton.autotune(
    configs=DW_CONFIGS, key=["M_BUCKET", "N", "K", "RECIPE", "TWO_LEVEL_ROWS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_for("dw")})(residual_dw_kernel)


_NO_SUMS = (None, None)
_NO_TAIL = NO_NORM + _NO_SUMS + NO_DROPOUT + NO_DROPOUT
_NO_DW_TAIL = NO_NORM + NO_DROPOUT + NO_DROPOUT


def dx_head(g, x, weight, dx, alpha=None, proj_weight=None, residual=None, sample_scale=None,
            add_residual: bool = True, norm=NO_NORM, norm_sums=_NO_SUMS, dropout=NO_DROPOUT,
            dropout_a=NO_DROPOUT) -> tuple:
    """The dx kernel's per-call arguments (operands, None where absent): the first
    :data:`DX_HEAD` of :func:`dx_launch_args`. ``residual``: the gradient added in the epilogue
    (None: ``g``, the block's own; none with a projection or without ``add_residual``)."""
    r = None if proj_weight is not None or not add_residual else (g if residual is None else residual)
    if norm is NO_NORM and norm_sums is _NO_SUMS and dropout is NO_DROPOUT and dropout_a is NO_DROPOUT:
        # the hot path: one constant tail
        return (g, x, weight, dx, proj_weight, r, *alpha_args(alpha, weight), sample_scale) + _NO_TAIL
    return (g, x, weight, dx, proj_weight, r, *alpha_args(alpha, weight), sample_scale, *norm, *norm_sums,
            *dropout, *dropout_a)


#: The dx kernel's per-call arguments: those before its sizes.
DX_HEAD = residual_dx_kernel.arg_names.index("M")


def dw_head(g, x, dw, db, weight=None, bias=None, alpha=None, dalpha_partials=None, dp=None, sample_scale=None,
            workspaces=None, norm=NO_NORM, dropout=NO_DROPOUT, dropout_a=NO_DROPOUT) -> tuple:
    """The dW kernel's per-call arguments (operands, None where absent): the first
    :data:`DW_HEAD` of :func:`dw_launch_args`. ``weight`` and ``bias`` go to the kernel only for
    dalpha. ``workspaces``: the split-M slabs ``(slab, db_slab)`` of the split's first launch,
    which writes partials only: then no db, alpha or dalpha."""
    tail = _NO_DW_TAIL if norm is NO_NORM and dropout is NO_DROPOUT and dropout_a is NO_DROPOUT else \
        (*norm, *dropout, *dropout_a)
    if workspaces is not None:
        return (g, x, dw, None, dp, None, None, None, None, None, None, *workspaces, sample_scale) + tail
    alpha_ptr, channel_alpha_ptr, alpha_value = alpha_args(alpha, dw)
    if dalpha_partials is None:
        weight = bias = None
    return (g, x, dw, db, dp, weight, bias, alpha_ptr, channel_alpha_ptr, alpha_value, dalpha_partials, None, None,
            sample_scale) + tail


#: The dW kernel's per-call arguments: those before its sizes.
DW_HEAD = residual_dw_kernel.arg_names.index("M")


def reduce_head(slab, db_slab, dw, db, weight=None, bias=None, alpha=None, dalpha_partials=None, dp=None) -> tuple:
    """The split-M reduce's per-call arguments: the first :data:`REDUCE_HEAD` of
    :func:`dw_reduce_launch_args` (the dW kernel's epilogue operands, after the slabs)."""
    return (slab, db_slab) + dw_head(None, None, dw, db, weight, bias, alpha, dalpha_partials, dp)[2:11]


#: The split reduce's per-call arguments: those before its sizes.
REDUCE_HEAD = residual_dw_reduce_kernel.arg_names.index("N")


def dx_launch_args(g, gs: RowStrides, x, xs: RowStrides, weight, dx, rows: Rows, alpha=None, proj_weight=None, *,
                   residual=None, sample_scale=None, rows_per_sample: int = 1, add_residual: bool = True,
                   act: str | None = "relu", act_param: float = 0.0, norm: tuple = NO_NORM, norm_sums=(None, None),
                   dropout=NO_DROPOUT, dropout_a=NO_DROPOUT):
    """The dx kernel's launch arguments, without launching: ``(args, consts, grid)`` (shared by the
    launcher and the compile gate, ``fusedres.aot``). ``residual``: ``(r, r's RowStrides)``, the
    gradient added in the epilogue (default ``g``); ``add_residual=False``: none (the MLP's
    ``dh``). ``sample_scale``: ``s [B]``, ``rows_per_sample`` rows per sample. ``act``: the
    activation whose derivative at ``x`` applies (None: none, and ``x`` is not read). ``norm``: the
    six normalization operands (:func:`~.residual_fwd.norm_operands`): the derivative then applies
    at ``norm(x)``, and ``dx`` is the norm output's gradient ``dz``; ``norm_sums``: ``(col_sums,
    row_sums)``, fp32 (fp64) workspaces of ``[cdiv(M, BLOCK_M), 2, K]`` and ``[cdiv(K, BLOCK_K),
    2, M]`` for dz's sinks (either None: not wanted). ``dropout``: the branch dropout's ``(seed,
    [p, 1 / (1 - p)])``, on ``g``; ``dropout_a``: the hidden dropout's, before the derivative
    (:data:`~.residual_fwd.NO_DROPOUT`: none)."""
    N, K = weight.shape
    p = proj_weight if proj_weight is not None else weight
    r, rs = residual if residual is not None else (g, gs)
    head = dx_head(g, x, weight, dx, alpha, proj_weight, r, sample_scale, add_residual, norm, norm_sums, dropout,
                   dropout_a)
    args = head + (
        rows.M, N, K, rows.T, next_pow2_bucket(rows.M), rows_per_sample, *gs, *xs, *rs,
        weight.stride(0), weight.stride(1), p.stride(0), p.stride(1), dx.stride(0), dx.stride(1))
    consts = dict(**act_consts(act, act_param, derivative=True),
                  RECIPE=recipe_key("dx", act, act_param, head[6:9], proj=proj_weight,
                                    residual=add_residual and proj_weight is None, row_scale=sample_scale,
                                    norm_col_sums=norm_sums[0], norm_row_sums=norm_sums[1], dropout=dropout[0],
                                    dropout_a=dropout_a[0], **norm_pieces(norm)),
                  TWO_LEVEL_ROWS=rows.two_level, **gemm_flags(weight.dtype, g.dtype, x.dtype, dx.dtype))

    def grid(meta):
        return (cdiv(rows.M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)

    return args, consts, grid


def dalpha_workspace_size(N: int, K: int, proj: bool, per_channel: bool = False) -> int:
    """Room for one dalpha partial per dW program under any config (tiles are at least 16 wide).
    A launch writes the first ``P`` of them, ``P`` its program count (``residual_dw`` returns it):
    sum those only, the rest may hold another config's values (autotuning) or garbage.
    ``per_channel``: room for ``P`` rows of ``N`` per-feature partials, ``P`` the launch's K (or
    column) tiles: dalpha is ``partials[:P * N].view(P, N).sum(0)``."""
    if per_channel:
        return N * max(cdiv(K, 16), *(cdiv(K, c.kwargs["BLOCK_C"]) for c in _plan.REDUCE_CONFIGS))
    return max(cdiv(K, 16) * (2 if proj else 1) * cdiv(N, 16),
               *(_plan.reduce_programs(N, K, c, proj) for c in _plan.REDUCE_CONFIGS))


def dw_launch_args(g, gs: RowStrides, x, xs: RowStrides, dw, db, rows: Rows, *, weight=None, bias=None,
                   alpha=None, dalpha_partials=None, dp=None, split=None, sample_scale=None,
                   rows_per_sample: int = 1, act: str | None = "relu", act_param: float = 0.0,
                   norm: tuple = NO_NORM, dropout=NO_DROPOUT, dropout_a=NO_DROPOUT):
    """The dW kernel's launch arguments, without launching: ``(args, consts, grid)`` (shared by the
    launcher and the compile gate, ``fusedres.aot``). ``weight`` (and ``bias``, if any) are read
    only for the dalpha partials, which go to ``dalpha_partials`` (:func:`dalpha_workspace_size`
    slots, fp32, or fp64 for fp64). ``alpha``: a tensor (one element, or per channel), a Python
    float or None.

    ``split``: ``(slab, db_slab, splits, tiles_per_split)`` for the first launch of a split-M dW:
    the kernel then writes only the fp32 partials (:func:`dw_split_workspaces`), and
    :func:`dw_reduce_launch_args` does the rest. ``sample_scale``: stochastic depth's ``s [B]``
    (``rows_per_sample`` rows per sample), scaling g's rows in dW, db and dalpha (not in dP).
    ``norm``: the six normalization operands, applied to ``x`` before the activation.
    ``dropout``: the branch dropout's ``(seed, [p, 1 / (1 - p)])``, on ``g``; ``dropout_a``: the
    hidden dropout's, on ``act(x)``."""
    N, K = dw.shape
    w = weight if weight is not None else dw
    dpt = dp if dp is not None else dw
    need_dalpha = dalpha_partials is not None
    if need_dalpha and alpha_kind(alpha) not in ("scalar", "channel"):
        raise ValueError("residual_dw: dalpha needs alpha as a tensor")
    splits, per = (split[2], split[3]) if split is not None else (1, 1)
    head = dw_head(g, x, dw, db, weight, bias, alpha, dalpha_partials, dp, sample_scale,
                   split[:2] if split is not None else None, norm, dropout, dropout_a)
    args = head + (
        rows.M, N, K, rows.T, next_pow2_bucket(rows.M), per, rows_per_sample,
        *gs, *xs, w.stride(0), w.stride(1), dw.stride(0), dw.stride(1), dpt.stride(0), dpt.stride(1))
    if split is None:
        pieces = dict(scale=head[7:10], db=db, proj=dp, dalpha=dalpha_partials,
                      dalpha_bias=need_dalpha and bias is not None, row_scale=sample_scale, dropout=dropout[0],
                      dropout_a=dropout_a[0], **norm_pieces(norm))
    else:                   # the split's first launch: partials only, the reduce does the epilogue
        pieces = dict(proj=dp, split=True, col_sums=split[1], row_scale=sample_scale, dropout=dropout[0],
                      dropout_a=dropout_a[0], **norm_pieces(norm))
    consts = dict(**act_consts(act, act_param), RECIPE=recipe_key("dw", act, act_param, **pieces),
                  TWO_LEVEL_ROWS=rows.two_level, **gemm_flags(dw.dtype, g.dtype, x.dtype))

    def grid(meta):
        return (cdiv(K, meta["BLOCK_K"]) * (2 if dp is not None else 1) * cdiv(N, meta["BLOCK_N"]) * splits,)

    return args, consts, grid


def dw_split_workspaces(dw, splits: int, *, proj: bool, sum_g: bool):
    """The split-M dW's fp32 (fp64 for fp64) partials: ``(slab [S, N or 2N, K] flat, db slab [S, N]
    flat)``; the db slab is None when no column sum is needed. No zero fill: every element is
    written by the first launch."""
    N, K = dw.shape
    acc = torch.float64 if dw.dtype == torch.float64 else torch.float32
    slab = torch.empty(splits * (2 if proj else 1) * N * K, device=dw.device, dtype=acc)
    db_slab = torch.empty(splits * N, device=dw.device, dtype=acc) if sum_g else None
    return slab, db_slab


def dw_reduce_launch_args(slab, db_slab, splits: int, dw, db, *, weight=None, bias=None, alpha=None,
                          dalpha_partials=None, dp=None):
    """The split-M reduce's launch arguments: ``(args, consts, grid)`` (launcher and compile gate)."""
    N, K = dw.shape
    w = weight if weight is not None else dw
    dpt = dp if dp is not None else dw
    args = reduce_head(slab, db_slab, dw, db, weight, bias, alpha, dalpha_partials, dp) + (N, K, splits,
            w.stride(0), w.stride(1), dw.stride(0), dw.stride(1), dpt.stride(0), dpt.stride(1))
    flags = gemm_flags(dw.dtype)
    consts = dict(ACC_DTYPE=flags["ACC_DTYPE"], EMULATE_BF16=flags["EMULATE_BF16"])

    def grid(meta):
        return (cdiv((2 if dp is not None else 1) * N, meta["BLOCK_R"]) * cdiv(K, meta["BLOCK_C"]),)

    return args, consts, grid


def residual_dx(g, gs: RowStrides, x, xs: RowStrides, weight, dx, rows: Rows, *, alpha=None, proj_weight=None,
                config: triton.Config | None = None, residual=None, sample_scale=None, rows_per_sample: int = 1,
                add_residual: bool = True, act: str | None = "relu", act_param: float = 0.0,
                norm: tuple = NO_NORM, norm_sums=(None, None), dropout=NO_DROPOUT,
                dropout_a=NO_DROPOUT) -> PreparedLaunch | None:
    """Launch the dx kernel; ``dx`` is ``[M, K]`` row-major (any view of it); the keyword arguments
    after ``config`` are :func:`dx_launch_args`'s. Returns the launch as a :class:`PreparedLaunch`
    (repeat it with :func:`dx_head`'s arguments), None without rows."""
    if rows.M == 0:
        return None
    args, consts, grid = dx_launch_args(g, gs, x, xs, weight, dx, rows, alpha, proj_weight, residual=residual,
                                        sample_scale=sample_scale, rows_per_sample=rows_per_sample,
                                        add_residual=add_residual, act=act, act_param=act_param, norm=norm,
                                        norm_sums=norm_sums, dropout=dropout, dropout_a=dropout_a)
    return launch_and_prepare(residual_dx_kernel, residual_dx_kernel_tuned, "dx", grid, args, consts, rows.M,
                              max(weight.shape), config, n_head=DX_HEAD)


_split_choice: dict = {}


def _gpu_split_config(sms: int, M: int, N: int, K: int, named: dict, consts: dict):
    """The config a GPU dW launch that would autotune runs instead, because the plan splits it (the
    shipped config with the best fill, :func:`fusedres.kernels.plan.choose_dw`), or None (no split:
    autotune as before). Cached per (SMs, device limits, sizes, layout, recipe, dtypes): it runs on every
    backward."""
    proj = named["dp_ptr"] is not None
    key = (sms, launch_limits("dw", named), M, N, K, bool(consts["TWO_LEVEL_ROWS"]), consts["RECIPE"],
           *(str(named[n].dtype) for n in ("dw_ptr", "x_ptr", "g_ptr")))
    if key not in _split_choice:
        tuned = residual_dw_kernel_tuned
        candidates = tuned.early_config_prune(tuned.configs, named, **consts)
        best, best_plan = _plan.choose_dw(sms, M, N, K, candidates, proj=proj)
        _split_choice[key] = best if best_plan.splits > 1 else None
    return _split_choice[key]


def residual_dw(g, gs: RowStrides, x, xs: RowStrides, dw, db, rows: Rows, *, weight=None, bias=None, alpha=None,
                dalpha_partials=None, dp=None, config: triton.Config | None = None,
                splits: int | None = None, sample_scale=None, rows_per_sample: int = 1, act: str | None = "relu",
                act_param: float = 0.0, norm: tuple = NO_NORM, dropout=NO_DROPOUT,
                dropout_a=NO_DROPOUT) -> "PreparedDw":
    """Launch the dW kernel: ``dw = alpha * g.T @ act(x)``, ``db = alpha * g.sum(0)`` if ``db`` is
    given, ``dp = g.T @ x`` if ``dp`` is given, and per-program dalpha partials if
    ``dalpha_partials`` is given (:func:`dalpha_workspace_size` long, fp32 or fp64, needs ``alpha``
    as a tensor; any contents). Returns the launches it made as a :class:`PreparedDw`, whose
    ``programs`` is the number ``P`` of programs that wrote dalpha partials: dalpha is
    ``dalpha_partials[:P].sum()``. (Summing the whole workspace would add the partials that
    autotuning's other configs, with smaller tiles and so more programs, left behind.) With a
    per-channel alpha, ``P`` rows of ``N`` per-feature partials: ``dalpha_partials[:P * N].view(P,
    N).sum(0)``. ``act``: the activation recomputed on ``x`` (None: none).

    It runs for M == 0 too, so that the gradients come out as zeros, as in eager.

    Split-M: the launch plan (:func:`fusedres.kernels.plan.plan_dw`, on the SM count of the
    tensors' GPU) splits the M reduction ``S`` ways when the output tiles would leave the GPU under
    one full wave (``splits`` or :func:`fusedres.kernels.plan.force_splits` force ``S``). With ``S
    > 1`` there are two launches, the dW kernel writing fp32 partials and the reduce summing them
    in a fixed order, and ``programs`` is the reduce's program count (it writes the dalpha
    partials then). With ``S == 1`` it is today's single launch. On a GPU a launch that splits
    runs the plan's config (the shipped config with the best fill) instead of autotuning, since
    the split count depends on the tile; a launch that does not split autotunes as before.
    """
    args, consts, grid = dw_launch_args(g, gs, x, xs, dw, db, rows, weight=weight, bias=bias, alpha=alpha,
                                        dalpha_partials=dalpha_partials, dp=dp, sample_scale=sample_scale,
                                        rows_per_sample=rows_per_sample, act=act, act_param=act_param, norm=norm,
                                        dropout=dropout, dropout_a=dropout_a)
    per_channel = alpha_kind(alpha) == "channel"
    N, K = dw.shape
    proj = dp is not None
    forced = splits if splits is not None else _plan.forced_splits()
    if config is None:
        config = resolve_config(residual_dw_kernel_tuned, "dw", args, consts, rows.M, max(dw.shape))
    sms = _plan.sm_count(dw.device)
    if config is None:      # a GPU launch that would autotune
        named = {**dict(zip(residual_dw_kernel_tuned.arg_names, args)), **consts}
        if forced is not None and forced > 1:
            config = pinned_config("dw", named)
        elif forced is None:
            config = _gpu_split_config(sms, rows.M, N, K, named, consts)
    if config is not None:
        p = _plan.plan_dw(sms, rows.M, N, K, config, proj=proj, splits=forced)
        if p.splits > 1:
            sum_g = db is not None or (dalpha_partials is not None and bias is not None)
            slab, db_slab = dw_split_workspaces(dw, p.splits, proj=proj, sum_g=sum_g)
            args1, consts1, grid1 = dw_launch_args(g, gs, x, xs, dw, db, rows, weight=weight, bias=bias, alpha=alpha,
                                                   dalpha_partials=dalpha_partials, dp=dp,
                                                   split=(slab, db_slab, p.splits, p.tiles_per_split),
                                                   sample_scale=sample_scale, rows_per_sample=rows_per_sample,
                                                   act=act, act_param=act_param, norm=norm, dropout=dropout,
                                                   dropout_a=dropout_a)
            main = launch_and_prepare(residual_dw_kernel, residual_dw_kernel_tuned, "dw", grid1, args1, consts1,
                                      rows.M, max(dw.shape), config, n_head=DW_HEAD)
            args2, consts2, grid2 = dw_reduce_launch_args(slab, db_slab, p.splits, dw, db, weight=weight, bias=bias,
                                                          alpha=alpha, dalpha_partials=dalpha_partials, dp=dp)
            reduce_config, _ = _plan.choose_reduce(
                sms, N, K, p.splits, proj=proj, candidates=_plan.reduce_configs(dw.element_size(), limits_for(dw.device)))
            reduce = launch_and_prepare(residual_dw_reduce_kernel, residual_dw_reduce_kernel, "dw_reduce", grid2,
                                        args2, consts2, rows.M, max(dw.shape), reduce_config, n_head=REDUCE_HEAD)
            programs = cdiv(K, reduce_config.kwargs["BLOCK_C"]) if per_channel else reduce.grid[0]
            return PreparedDw(main, reduce, slab.numel(), db_slab.numel() if sum_g else 0, slab.dtype, programs)
    main = launch_and_prepare(residual_dw_kernel, residual_dw_kernel_tuned, "dw", grid, args, consts, rows.M,
                              max(dw.shape), config, n_head=DW_HEAD)
    return PreparedDw(main, None, 0, 0, None, cdiv(K, main.config.kwargs["BLOCK_K"]) if per_channel else main.grid[0])


class PreparedDw:
    """:func:`residual_dw`'s launches for one input signature, to repeat: the dW launch, and when
    split the reduce with the sizes of the fp32 workspaces it allocates per call. ``programs``: the
    ``P`` whose dalpha partials a call writes."""
    __slots__ = ("main", "reduce", "slab_numel", "db_numel", "acc", "programs")

    def __init__(self, main: PreparedLaunch, reduce: PreparedLaunch | None, slab_numel: int, db_numel: int, acc,
                 programs: int):
        self.main, self.reduce, self.slab_numel, self.db_numel = main, reduce, slab_numel, db_numel
        self.acc, self.programs = acc, programs

    def __call__(self, g, x, dw, db, *, weight=None, bias=None, alpha=None, dalpha_partials=None, dp=None,
                 sample_scale=None, norm=NO_NORM, dropout=NO_DROPOUT, dropout_a=NO_DROPOUT) -> int:
        if self.reduce is None:
            self.main.run(dw_head(g, x, dw, db, weight, bias, alpha, dalpha_partials, dp, sample_scale, None, norm,
                                  dropout, dropout_a))
            return self.programs
        slab = torch.empty(self.slab_numel, device=dw.device, dtype=self.acc)
        db_slab = torch.empty(self.db_numel, device=dw.device, dtype=self.acc) if self.db_numel else None
        self.main.run(dw_head(g, x, dw, db, weight, bias, alpha, dalpha_partials, dp, sample_scale, (slab, db_slab),
                              norm, dropout, dropout_a))
        self.reduce(*reduce_head(slab, db_slab, dw, db, weight, bias, alpha, dalpha_partials, dp))
        return self.programs
