"""The pieces every GEMM skeleton of the family is composed from: one K-loop helper, the A-tile
prologue inside it, and the epilogue steps between the loop and the store.

A kernel of the family (forward, dx, dW with split-M, and the split-M reduce) keeps only its
tile layout, numerics and tile constexprs. What varies between blocks enters as a piece:

- **the A-tile prologue** (in :func:`mma_loop`): the activation, a jit function from
  :mod:`.activations` passed as a ``tl.constexpr`` (Triton's matmul tutorial, quack's
  ``act_fn_map``), and a scale along the reduction (a per-channel alpha on dx's ``g``, stochastic
  depth's per-sample scale on dW's rows);
- **the epilogue steps**: bias (:func:`add_bias`), the residual scale (:func:`scale_branch`,
  :func:`scale_by_alpha`), the residual or shortcut (:func:`add_rows`, or a second
  :func:`mma_loop`), the activation's derivative (``DACT``, from :mod:`.activations`);
- **dropout's keep mask** (:func:`dropout_multiplier`): a pure function of (seed, row, column),
  regenerated wherever a pass needs it: on the A tile in the loop (the MLP's hidden dropout; the
  branch dropout on dx's ``g``), on dW's B tile ``g``, and in the forward's epilogue;
- **the column sums** (db and dalpha; :func:`dalpha_of_tile`, :func:`dalpha_of_bias`,
  :func:`store_db`), the same code in dW's epilogue and in the split reduce.

Every optional operand is a pointer that may be ``None``: Triton specialises ``None`` as a
constexpr, so ``if ptr is not None`` is decided at compile time and a block without the piece
compiles without its code. No placeholder tensor, and no flag beside the pointer.
"""
from __future__ import annotations

import triton
import triton.language as tl

from triton.language.random import philox, uint_to_uniform_float

from ._common import row_offsets, store_rounded, to_gemm_operand


@triton.jit
def mma_loop(acc, colsum,
             a_ptr, a_fixed, a_stride_outer, a_stride_inner, mask_a,
             b_ptr, b_fixed, b_stride_outer, b_stride_inner, mask_b,
             first, trips, L, T,
             ACT: tl.constexpr, ACT_PARAM: tl.constexpr, plain, scale_ptr, scale_div, sum_b,
             a_idx, row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr, norm_w_ptr, norm_b_ptr,
             a_drop_seed_ptr, a_drop_ptr, a_col0, b_drop_seed_ptr, b_drop_ptr, b_col0,
             REDUCE_ROWS: tl.constexpr, B_WIDE: tl.constexpr, BLOCK_L: tl.constexpr, GEMM_DTYPE: tl.constexpr,
             ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``acc[r, c] += sum_l prologue(A)[r, l] * B[l, c]`` over the reduction tiles ``first ..
    first + trips - 1`` (``BLOCK_L`` wide, clipped to ``L``): the one K loop of every GEMM here,
    the projection's second loop included. Returns ``(acc, colsum)``.

    Addressing: ``A[r, l]`` is at ``a_ptr + a_fixed[r] + off(l)`` and ``B[l, c]`` at ``b_ptr +
    off(l) + b_fixed[c]`` (``a_fixed``, ``b_fixed``: the element offsets of the tile's own rows and
    columns, as the caller computed them). ``REDUCE_ROWS`` None: the reduction runs over features
    (the forward, dx), ``off(l) = l * stride_inner``, in int32, or in int64 for a B whose
    reduction runs along a weight's rows (``B_WIDE``: dx's ``W``, where ``l * K`` may pass
    2**31); True or False: it runs over flattened rows (dW), ``off(l)`` is :func:`row_offsets`
    with the operand's (outer, inner) strides, two-level if True. The row (large-stride) offset is
    added to the pointer first and the contiguous one last, as Triton's tutorials write it: the
    order changes what ptxas keeps live (the other order spilled 8 B in two sm_80 tiles).

    The prologue on the A tile, in registers (where sm_90's register-A wgmma keeps pipelining): a
    normalization with precomputed statistics (:func:`normalize`; ``a_idx``: the indices of the
    tile's own rows ``r``, flattened rows in the forward, features in dW; every statistics pointer
    None: none), then ``ACT`` (None: the tile as loaded), then ``scale_ptr[l // scale_div]`` on its columns
    (``scale_ptr`` None: none; ``scale_div`` None: ``l``), rounded once to the GEMM dtype. ``plain``
    (None, or a runtime bool): dW with a projection, whose dP tiles take ``x`` without the
    activation and without the scale. Then dropout's multiplier (:func:`dropout_multiplier`;
    ``a_drop_seed_ptr`` None: none) at the A tile's (row, feature) positions: the MLP's hidden
    dropout on ``act(h)``, or the branch dropout on dx's ``g`` (over features, the tile's rows
    are ``a_idx``; over rows, in dW, its features start at ``a_col0``).

    ``b_drop_seed_ptr`` (dW only, where B is ``g`` over flattened rows; None: none): the branch
    dropout's multiplier on the B tile at (row ``l``, the features from ``b_col0``), in registers
    before the dot, and on the column sums; dP's tiles (``plain``) take ``g`` as it is.

    ``sum_b`` (None, or a runtime bool): also add B's column sums over the reduction, scaled by
    the same ``scale_ptr``, to ``colsum`` (db). They are read as a copy of the B tile, 16 rows at a
    time, so that B stays a pure shared-memory operand of the dot (see dW's docstring). Callers
    without column sums pass any tensor as ``colsum`` (triton 3.6 carries no ``None`` through a
    loop) and get it back unchanged.
    """
    offs_l = tl.arange(0, BLOCK_L)
    for i in range(0, trips):
        l_tile = first + i
        l = l_tile * BLOCK_L + offs_l
        mask_l = l < L
        if REDUCE_ROWS is None:
            a = tl.load(a_ptr + a_fixed[:, None] + (l * a_stride_inner)[None, :],
                        mask=mask_a[:, None] & mask_l[None, :], other=0.0)
        else:
            a_rows = row_offsets(l, T, a_stride_outer, a_stride_inner, REDUCE_ROWS)
            b_rows = row_offsets(l, T, b_stride_outer, b_stride_inner, REDUCE_ROWS)
            a = tl.load(a_ptr + a_rows[None, :] + a_fixed[:, None], mask=mask_a[:, None] & mask_l[None, :], other=0.0)
        if REDUCE_ROWS is None and not B_WIDE:
            b = tl.load(b_ptr + b_fixed[None, :] + (l * b_stride_inner)[:, None],
                        mask=mask_l[:, None] & mask_b[None, :], other=0.0)
        elif REDUCE_ROWS is None:
            b = tl.load(b_ptr + (l.to(tl.int64) * b_stride_inner)[:, None] + b_fixed[None, :],
                        mask=mask_l[:, None] & mask_b[None, :], other=0.0)
        else:
            b = tl.load(b_ptr + b_rows[:, None] + b_fixed[None, :], mask=mask_l[:, None] & mask_b[None, :], other=0.0)
        if row_rstd_ptr is not None or col_rstd_ptr is not None:
            # rows along the loop in dW (its A is x.T), along the tile's own rows in the forward
            if REDUCE_ROWS is None:
                a = normalize(a, a_idx, mask_a, l, mask_l, row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr,
                              norm_w_ptr, norm_b_ptr, 0, ACC_DTYPE)
            else:
                a = normalize(a, l, mask_l, a_idx, mask_a, row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr,
                              norm_w_ptr, norm_b_ptr, 1, ACC_DTYPE)
            # masked lanes were loaded as 0, which normalizes to -mean * rstd * w + b, not 0: zero
            # them, or a large one rounds to inf in a 16-bit operand and meets the other operand's
            # masked 0 in the dot (inf * 0 = NaN)
            a = tl.where(mask_a[:, None] & mask_l[None, :], a, 0.0)
        if plain is not None:
            a = tl.where(plain, to_gemm_operand(a, GEMM_DTYPE, EMULATE_BF16), ACT(a, GEMM_DTYPE, EMULATE_BF16, ACT_PARAM))
        elif ACT is not None:
            a = ACT(a, GEMM_DTYPE, EMULATE_BF16, ACT_PARAM)
        if scale_ptr is not None or a_drop_seed_ptr is not None:
            # after the activation, so any scale is exact (relu(s x) = s relu(x) only for s >= 0);
            # one rounding to the GEMM dtype, as eager rounds act(h) * mask * scale
            a = a.to(ACC_DTYPE)
            if scale_ptr is not None:
                sv = reduction_scale(scale_ptr, l, mask_l, scale_div, ACC_DTYPE)
                if plain is not None:
                    sv = tl.where(plain, 1.0, sv)
                a = a * sv[None, :]
            if a_drop_seed_ptr is not None:
                if REDUCE_ROWS is None:
                    a = a * dropout_multiplier(a_drop_seed_ptr, a_drop_ptr, a_idx, l_tile * BLOCK_L, BLOCK_L, ACC_DTYPE)
                else:       # dW's A is x.T: the mask made in (row, feature) order, transposed
                    a = a * tl.trans(dropout_multiplier(a_drop_seed_ptr, a_drop_ptr, l, a_col0, a_idx.shape[0],
                                                        ACC_DTYPE))
            a = to_gemm_operand(a, GEMM_DTYPE, EMULATE_BF16)
        elif ACT is None:
            a = to_gemm_operand(a, GEMM_DTYPE, EMULATE_BF16)
        if b_drop_seed_ptr is not None:
            keep = dropout_multiplier(b_drop_seed_ptr, b_drop_ptr, l, b_col0, b.shape[1], ACC_DTYPE)
            if plain is not None:
                keep = tl.where(plain, 1.0, keep)
            b = b.to(ACC_DTYPE) * keep
        b = to_gemm_operand(b, GEMM_DTYPE, EMULATE_BF16)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if sum_b is not None:
            if sum_b:
                SUM_ROWS: tl.constexpr = 16 if BLOCK_L > 16 else BLOCK_L
                for r in tl.static_range(0, BLOCK_L, SUM_ROWS):
                    l_sum = l_tile * BLOCK_L + r + tl.arange(0, SUM_ROWS)
                    mask_sum = l_sum < L
                    b_sum = tl.load(b_ptr + reduction_offsets(l_sum, T, b_stride_outer, b_stride_inner,
                                                              REDUCE_ROWS)[:, None] + b_fixed[None, :],
                                    mask=mask_sum[:, None] & mask_b[None, :], other=0.0)
                    if b_drop_seed_ptr is not None:
                        b_sum = b_sum.to(ACC_DTYPE) * dropout_multiplier(b_drop_seed_ptr, b_drop_ptr, l_sum, b_col0,
                                                                         b.shape[1], ACC_DTYPE)
                    b_sum = to_gemm_operand(b_sum, GEMM_DTYPE, EMULATE_BF16).to(ACC_DTYPE)
                    if scale_ptr is not None:
                        b_sum = b_sum * reduction_scale(scale_ptr, l_sum, mask_sum, scale_div, ACC_DTYPE)[:, None]
                    colsum += tl.sum(b_sum, axis=0)
    return acc, colsum


@triton.jit
def dropout_multiplier(seed_ptr, drop_ptr, rows, col0, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Dropout's multiplier on the tile of rows ``rows`` (a vector of flattened row indices of
    ``x.reshape(-1, D)``) and the ``BLOCK_C`` features from ``col0`` (a multiple of 4):
    ``1 / (1 - p)`` where the element is kept, 0 where dropped, in the accumulator dtype, as a
    ``[len(rows), BLOCK_C]`` tile.

    The keep mask is a pure function of (seed, row, column): element ``(m, n)`` takes word ``n %
    4`` of one Philox4x32-10 draw (Triton's ``philox``) under the 64-bit key ``seed_ptr[0]``
    (drawn per call from torch's generator on the device) and the counter ``(n // 4, m mod 2**32,
    m // 2**32, 0)``, made a uniform ``u`` in [0, 1) by ``uint_to_uniform_float``; kept iff ``u
    >= p``. One draw serves four features, so the live state is one word per element (four
    words per element spilled 2 KB at 128x128, 8 warps on sm_90), and the words are interleaved
    back into feature order with two joins. No tile, split or config enters the mask: every pass
    regenerates exactly the bits the forward used, and :func:`fusedres.dropout.keep_mask`
    computes the same bits with torch ops. ``drop_ptr``: ``[p, 1 / (1 - p)]`` in the accumulator
    dtype (``[1, 0]`` for ``p = 1``). A multiply, not a select: a dropped NaN or inf stays NaN, as
    in eager's ``x * mask * scale``."""
    seed = tl.load(seed_ptr)
    groups = col0 // 4 + tl.arange(0, BLOCK_C // 4)
    r = rows.to(tl.int64)[:, None] + (groups * 0).to(tl.int64)[None, :]
    c = (groups[None, :] + (rows * 0)[:, None]).to(tl.uint32)
    w0, w1, w2, w3 = philox(seed, c, (r & 0xFFFFFFFF).to(tl.uint32), (r >> 32).to(tl.uint32), (c * 0))
    # join(join(w0, w2), join(w1, w3))[j, i, k] is word 2 i + k of group j: feature 4 j + 2 i + k
    bits = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rows.shape[0], BLOCK_C))
    u = uint_to_uniform_float(bits)
    return tl.where(u >= tl.load(drop_ptr).to(ACC_DTYPE), tl.load(drop_ptr + 1).to(ACC_DTYPE), 0.0)


@triton.jit
def along(v, AXIS: tl.constexpr):
    """A vector as a row (``AXIS`` 1: it runs along a tile's columns) or a column (0) of a tile."""
    if AXIS == 1:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def standardize(x, m_idx, mask_m, k_idx, mask_k, row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr,
                M_AXIS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``x_hat``: a tile of ``x`` (rows ``m_idx`` along ``M_AXIS``, features ``k_idx`` along the
    other axis) standardized with precomputed statistics, in the accumulator dtype. Per row (LayerNorm,
    RMSNorm: ``(x - mean[m]) * rstd[m]``, RMSNorm without a mean) or per feature (BatchNorm:
    ``(x - mean[k]) * rstd[k]``); pointers None: that part absent. ``x - mean`` is subtracted before
    the multiply, as torch's norms do: folding the mean into a shift (``x * rstd - mean * rstd``)
    loses the digits that cancel when the mean is large against the spread."""
    v = x.to(ACC_DTYPE)
    if row_rstd_ptr is not None:
        if row_mean_ptr is not None:
            v = v - along(tl.load(row_mean_ptr + m_idx, mask=mask_m, other=0.0).to(ACC_DTYPE), M_AXIS)
        v = v * along(tl.load(row_rstd_ptr + m_idx, mask=mask_m, other=0.0).to(ACC_DTYPE), M_AXIS)
    if col_rstd_ptr is not None:
        if col_mean_ptr is not None:
            v = v - along(tl.load(col_mean_ptr + k_idx, mask=mask_k, other=0.0).to(ACC_DTYPE), 1 - M_AXIS)
        v = v * along(tl.load(col_rstd_ptr + k_idx, mask=mask_k, other=0.0).to(ACC_DTYPE), 1 - M_AXIS)
    return v


@triton.jit
def norm_affine(x_hat, k_idx, mask_k, norm_w_ptr, norm_b_ptr, K_AXIS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The norm's per-feature affine, ``x_hat * weight[k] + bias[k]`` (either None: absent)."""
    if norm_w_ptr is not None:
        x_hat = x_hat * along(tl.load(norm_w_ptr + k_idx, mask=mask_k, other=0.0).to(ACC_DTYPE), K_AXIS)
    if norm_b_ptr is not None:
        x_hat = x_hat + along(tl.load(norm_b_ptr + k_idx, mask=mask_k, other=0.0).to(ACC_DTYPE), K_AXIS)
    return x_hat


@triton.jit
def normalize(x, m_idx, mask_m, k_idx, mask_k, row_mean_ptr, row_rstd_ptr, col_mean_ptr, col_rstd_ptr,
              norm_w_ptr, norm_b_ptr, M_AXIS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The A-tile prologue of a normalization: :func:`standardize`, then :func:`norm_affine`."""
    return norm_affine(standardize(x, m_idx, mask_m, k_idx, mask_k, row_mean_ptr, row_rstd_ptr, col_mean_ptr,
                                   col_rstd_ptr, M_AXIS, ACC_DTYPE),
                       k_idx, mask_k, norm_w_ptr, norm_b_ptr, 1 - M_AXIS, ACC_DTYPE)


@triton.jit
def tile_summary(x, mask, count, AXIS: tl.constexpr):
    """``(mean, M2)`` of a tile along ``AXIS`` over its unmasked lanes (``count`` of them; the
    masked lanes must hold 0): the corrected two-pass mean (the mean of the residuals added back,
    so a constant chunk's mean is its value exactly and its M2 is 0, as torch's norms give), then
    the sum of squared residuals. The partial that Chan's formula combines."""
    mean = tl.sum(x, axis=AXIS) / count
    d = tl.where(mask, x - along(mean, 1 - AXIS), 0.0)
    mean += tl.sum(d, axis=AXIS) / count
    d = tl.where(mask, x - along(mean, 1 - AXIS), 0.0)
    return mean, tl.sum(d * d, axis=AXIS)


@triton.jit
def store_stats_partials(v, mask, offs_m, mask_m, offs_n, mask_n, pid_m, pid_n, M, N, col_part_ptr, row_part_ptr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Epilogue sink: the next norm's statistics partials of the output tile ``v`` (the values as
    stored), so that no pass over the output is needed for them. Per column over the tile's rows
    (BatchNorm: ``(mean, M2)`` into row ``pid_m`` of ``[row tiles, 2, N]``) and per row over its
    columns (LayerNorm, RMSNorm: into row ``pid_n`` of ``[column tiles, 2, M]``); either pointer
    None: not wanted."""
    v = tl.where(mask, v, 0.0)
    if col_part_ptr is not None:
        mean, m2 = tile_summary(v, mask, tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(v.dtype), 0)
        part = col_part_ptr + pid_m.to(tl.int64) * 2 * N + offs_n
        tl.store(part, mean, mask=mask_n)
        tl.store(part + N, m2, mask=mask_n)
    if row_part_ptr is not None:
        mean, m2 = tile_summary(v, mask, tl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(v.dtype), 1)
        part = row_part_ptr + pid_n.to(tl.int64) * 2 * M + offs_m
        tl.store(part, mean, mask=mask_m)
        tl.store(part + M, m2, mask=mask_m)


@triton.jit
def reduction_offsets(l, T, stride_outer, stride_inner, REDUCE_ROWS: tl.constexpr):
    """int64 element offsets of the reduction indices ``l`` (see :func:`mma_loop`): over flattened
    rows (``REDUCE_ROWS`` True/False: two-level or not), or over a weight's rows at
    ``stride_inner`` (None)."""
    if REDUCE_ROWS is not None:
        return row_offsets(l, T, stride_outer, stride_inner, REDUCE_ROWS)
    else:
        return l.to(tl.int64) * stride_inner


@triton.jit
def reduction_scale(scale_ptr, l, mask_l, scale_div, ACC_DTYPE: tl.constexpr):
    """``scale[l // scale_div]`` (``scale_div`` None: ``scale[l]``) in the accumulator dtype: a
    per-channel alpha at the features ``l``, or stochastic depth's per-sample scale of the
    flattened rows ``l`` (``scale_div`` rows per sample)."""
    if scale_div is not None:
        return row_scale(scale_ptr, l, mask_l, scale_div, ACC_DTYPE)
    else:
        return tl.load(scale_ptr + l, mask=mask_l, other=0.0).to(ACC_DTYPE)


@triton.jit
def scalar_alpha(alpha_ptr, alpha_value, ACC_DTYPE: tl.constexpr):
    """The scalar residual scale: the one-element tensor ``alpha_ptr`` (a learnable alpha), else
    ``alpha_value``, the Python float passed by value (Triton types it fp32, and the interpreter
    rounds it here: eager rounds a Python scalar to the fp32 opmath of fp16/bf16/fp32 too; an fp64
    launch gets its float as a tensor). Call it only when one of them is given (not None)."""
    if alpha_ptr is not None:
        return tl.load(alpha_ptr).to(ACC_DTYPE)
    else:
        return tl.full((), alpha_value, ACC_DTYPE)



@triton.jit
def scale_by_alpha(v, alpha_ptr, alpha_value, channel_alpha_ptr, offs, mask, ACC_DTYPE: tl.constexpr,
                   FEATURE_AXIS: tl.constexpr):
    """``v`` times the residual scale: per channel (``channel_alpha_ptr``, ``[N]``, timm's
    LayerScale, read at the features ``offs``, which lie along ``v``'s ``FEATURE_AXIS``: 1, 0, or
    -1 for a vector), or the scalar one (:func:`scalar_alpha`), or none (all three None: ``v``)."""
    if channel_alpha_ptr is not None:
        scale = tl.load(channel_alpha_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if FEATURE_AXIS == 1:
            return v * scale[None, :]
        elif FEATURE_AXIS == 0:
            return v * scale[:, None]
        else:
            return v * scale
    elif alpha_ptr is not None or alpha_value is not None:
        return v * scalar_alpha(alpha_ptr, alpha_value, ACC_DTYPE)
    else:
        return v


@triton.jit
def row_scale(s_ptr, offs_m, mask_m, ROWS_PER_SAMPLE, ACC_DTYPE: tl.constexpr):
    """Stochastic depth's per-sample scale of each row of a tile: ``s[m // ROWS_PER_SAMPLE]``
    (rows are flattened ``(B, ...)`` indices; one scale per index of the first dimension)."""
    return tl.load(s_ptr + offs_m // ROWS_PER_SAMPLE, mask=mask_m, other=0.0).to(ACC_DTYPE)


@triton.jit
def add_bias(acc, b_ptr, offs_n, mask_n, ACC_DTYPE: tl.constexpr):
    """Epilogue: ``acc + b[n]`` (``b_ptr`` None: ``acc``)."""
    if b_ptr is not None:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    return acc


@triton.jit
def scale_branch(acc, alpha_ptr, alpha_value, channel_alpha_ptr, s_ptr, offs_m, mask_m, offs_n, mask_n,
                 ROWS_PER_SAMPLE, ACC_DTYPE: tl.constexpr):
    """Epilogue: the branch times its scales, ``s[m // R] * alpha`` (``s_ptr`` None: no row
    scale). A scalar alpha is folded into the per-row factor first: one multiply of the tile (a
    second one spilled 16 B at 128x128x32, 8 warps, on sm_80)."""
    if s_ptr is not None:
        rs = row_scale(s_ptr, offs_m, mask_m, ROWS_PER_SAMPLE, ACC_DTYPE)
        if channel_alpha_ptr is not None:
            return scale_by_alpha(acc * rs[:, None], alpha_ptr, alpha_value, channel_alpha_ptr, offs_n, mask_n,
                                  ACC_DTYPE, 1)
        elif alpha_ptr is not None or alpha_value is not None:
            return acc * (rs * scalar_alpha(alpha_ptr, alpha_value, ACC_DTYPE))[:, None]
        else:
            return acc * rs[:, None]
    else:
        return scale_by_alpha(acc, alpha_ptr, alpha_value, channel_alpha_ptr, offs_n, mask_n, ACC_DTYPE, 1)


@triton.jit
def add_rows(acc, r_ptr, r_rows, offs_n, stride_rn, mask, ACC_DTYPE: tl.constexpr):
    """Epilogue: ``acc + r`` for the tensor ``r`` of the same shape (the residual; ``r_ptr`` None:
    ``acc``). ``r_rows``: the int64 row offsets of the tile's rows (:func:`row_offsets`)."""
    if r_ptr is not None:
        acc += tl.load(r_ptr + r_rows[:, None] + offs_n[None, :] * stride_rn, mask=mask, other=0.0).to(ACC_DTYPE)
    return acc


@triton.jit
def dalpha_of_tile(acc, w, PER_FEATURE: tl.constexpr, FEATURE_AXIS: tl.constexpr):
    """dalpha's share of an unscaled weight-gradient tile: ``<acc, W>`` over the tile, or with
    ``PER_FEATURE`` one sum per output feature (a vector along ``FEATURE_AXIS``)."""
    if PER_FEATURE:
        return tl.sum(acc * w, axis=1 - FEATURE_AXIS)
    else:
        return tl.sum(tl.sum(acc * w, axis=1), axis=0)


@triton.jit
def dalpha_of_bias(db, b, PER_FEATURE: tl.constexpr):
    """dalpha's share of the unscaled bias gradient: ``<db, b>``, or per feature ``db * b``."""
    if PER_FEATURE:
        return db * b
    else:
        return tl.sum(db * b, axis=0)


@triton.jit
def store_db(db_ptr, db, offs, mask, alpha_ptr, alpha_value, channel_alpha_ptr, ACC_DTYPE: tl.constexpr,
             EMULATE_BF16: tl.constexpr):
    """Store db = alpha * (the column sum of g), rounded to db's dtype."""
    store_rounded(db_ptr + offs, scale_by_alpha(db, alpha_ptr, alpha_value, channel_alpha_ptr, offs, mask,
                                                ACC_DTYPE, -1), mask, EMULATE_BF16)
