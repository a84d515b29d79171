"""Kernels of the fully fused narrow residual stack: L blocks of width D <= 128 in one kernel.

The stack computes, for l = 0 .. L-1 (``W`` is ``[L, D, D]`` in nn.Linear layout, ``b`` ``[L, D]``):

    x_{l+1} = x_l + relu(x_l) @ W_l.T + b_l

and its backward, with ``g_L = dLoss/dx_L`` and ``[x_l > 0]`` the relu mask (relu'(0) = 0):

    g_l   = g_{l+1} + [x_l > 0] * (g_{l+1} @ W_l)
    dW_l  = sum over rows of g_{l+1}.T @ relu(x_l)
    db_l  = sum over rows of g_{l+1}

At D <= 128 one row tile's activations fit in registers, so a program keeps its ``[BLOCK_M, D]``
tile on chip for the whole depth and streams ``W_l`` from L2 (every program reads every layer's
weights; the loads do not depend on the carried tile, so the software pipeline prefetches them).
A framework, or L single-block kernels, writes and re-reads every ``x_l`` instead.

Three kernels, one idea each:

- :func:`residual_stack_fwd_kernel`: the forward, one launch for all layers. The activation is
  carried in fp32 (fp64 for fp64); the GEMM operand ``relu(x_l)`` is rounded to the weight dtype,
  as eager's is. In training it also writes ``x_1 .. x_{L-1}``, rounded to the I/O dtype (what
  eager autograd keeps); in inference only the output.
- :func:`residual_stack_bwd_kernel`: persistent programs, each walking its row tiles down the
  layers with ``g`` in registers. ``dW_l``/``db_l`` are reduced across row tiles into one fp32
  partial per (program, layer), or with ``DETERMINISTIC=False`` added with relaxed atomics into
  one fp32 accumulator per layer.
- :func:`residual_stack_reduce_kernel`: the partials summed over programs in a fixed order and
  stored in the parameter dtype.

Every operand is contiguous and 16-byte aligned (the launcher in ``fusedres`` guarantees it), so
the row stride is the constexpr ``D``: the compiler sees aligned, contiguous rows and vectorises
the activation loads. Without that guarantee (a runtime stride) the D=128 kernels spill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, record_launch, store_rounded, to_gemm_operand
from .activations import KERNELS as ACTIVATION_KERNELS
from . import configs as _configs
from .configs import _launch_lock, gemm_flags, stack_config, stack_operand_class
from .device import limits_for

#: Widths the stack kernels are built for: a row tile of activations fits in registers.
STACK_WIDTHS = (16, 32, 64, 128)


@triton.jit
def residual_stack_fwd_kernel(
    x_ptr, w_ptr, b_ptr, saved_ptr, y_ptr,
    M, L,
    ACT: tl.constexpr,
    ACT_PARAM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Rows ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)`` through all L layers.

    ``saved`` is ``[L - 1, M, D]``: ``saved[l] = x_{l+1}``, written unless ``saved_ptr`` is None
    (inference); ``b_ptr`` None: no bias. The
    per-layer sum runs in the order of the single-block kernel (GEMM, + bias, + residual), so in
    fp32 a stack and L single-block launches differ only by the GEMM's internal summation order.
    The last layer is peeled off the loop: it writes ``y`` instead of a saved activation.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    tile = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]

    h = tl.load(x_ptr + tile, mask=mask, other=0.0).to(ACC_DTYPE)
    for l in range(0, L - 1):
        h = _forward_layer(h, w_ptr, b_ptr, l, ACT, ACT_PARAM, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16, D)
        if saved_ptr is not None:
            store_rounded(saved_ptr + tl.cast(l, tl.int64) * M * D + tile, h, mask, EMULATE_BF16)
    h = _forward_layer(h, w_ptr, b_ptr, L - 1, ACT, ACT_PARAM, ACC_DTYPE, INPUT_PRECISION, EMULATE_BF16, D)
    store_rounded(y_ptr + tile, h, mask, EMULATE_BF16)


@triton.jit
def _forward_layer(h, w_ptr, b_ptr, l, ACT: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   D: tl.constexpr):
    """``h + act(h) @ W_l.T + b_l`` for the carried tile ``h`` (``ACT``: :mod:`.activations`)."""
    GEMM_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    offs_d = tl.arange(0, D)
    # W_l read as stored, [n, k] with rows of k contiguous (whole-row vector loads), transposed on chip.
    w = tl.load(w_ptr + tl.cast(l, tl.int64) * (D * D) + offs_d[:, None] * D + offs_d[None, :])
    a = ACT(h, GEMM_DTYPE, EMULATE_BF16, ACT_PARAM)
    acc = tl.dot(a, tl.trans(to_gemm_operand(w, GEMM_DTYPE, EMULATE_BF16)), input_precision=INPUT_PRECISION,
                 out_dtype=ACC_DTYPE)
    if b_ptr is not None:
        acc += tl.load(b_ptr + l * D + offs_d).to(ACC_DTYPE)[None, :]
    return acc + h


@triton.jit
def _accumulate(ptrs, value, t, first_t, DETERMINISTIC: tl.constexpr):
    """Add ``value`` into a partial: a program's own slot (plain load-add-store; at the program's
    first row tile, ``t == first_t``, a store without a read, so the workspace needs no zero
    fill) or, without determinism, a shared accumulator through relaxed atomics (the default
    ``acq_rel`` would order every add)."""
    if DETERMINISTIC:
        prev = tl.load(ptrs, mask=(tl.zeros(value.shape, tl.int32) + t) > first_t, other=0.0)
        tl.store(ptrs, prev + value)
    else:
        tl.atomic_add(ptrs, value, sem="relaxed")


@triton.jit
def residual_stack_bwd_kernel(
    g_ptr, x_ptr, saved_ptr, w_ptr, dx_ptr, carry_ptr, ws_ptr,
    M, L, LAYERS_PER_CHUNK,
    ACT: tl.constexpr,
    DACT: tl.constexpr,
    ACT_PARAM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DW_COLS: tl.constexpr,
):
    """Persistent backward: program ``pid`` of ``P`` owns row tiles ``pid, pid + P, ...``.

    ``x`` is ``x_0`` and ``saved[l - 1] = x_l``. ``ws`` holds ``[P, L, D*D + D]`` partials
    (``dW_l`` as ``[n, k]``, then ``db_l``), or ``[1, L, D*D + D]`` zeroed accumulators without
    ``DETERMINISTIC``. The layers are walked in chunks of ``LAYERS_PER_CHUNK``, top chunk first,
    all of a program's tiles per chunk: the partials the chunk updates, ``P * chunk * (D*D + D)``
    fp32, are what must stay in L2 while the tiles stream through. Between chunks a tile's ``g``
    waits in ``carry`` (``[M, D]``, fp32), written and read back by the same program, so one
    launch covers every chunk without a grid-wide barrier.

    ``DW_COLS < D`` computes ``dW_l`` in column slices (re-reading those columns of ``x_l``, an
    L1/L2 hit), which keeps the D=128 fp32 partial tile out of the register file at once.

    ``dx_ptr`` None: dx is not wanted; ``ws_ptr`` None: neither are the weight gradients (then
    ``HAS_BIAS``, whether db is summed into ``ws``, is False too).
    """
    GEMM_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    WS_LAYER: tl.constexpr = D * D + D
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    slot = pid if DETERMINISTIC else 0
    num_tiles = tl.cdiv(M, BLOCK_M)
    offs_d = tl.arange(0, D)
    w_tile = offs_d[:, None] * D + offs_d[None, :]           # W_l[n, k], k contiguous
    for chunk in range(0, tl.cdiv(L, LAYERS_PER_CHUNK)):
        l_hi = L - chunk * LAYERS_PER_CHUNK
        l_lo = tl.maximum(l_hi - LAYERS_PER_CHUNK, 0)
        for t in range(pid, num_tiles, programs):
            offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (offs_m < M)[:, None] & (offs_d < D)[None, :]
            tile = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
            if chunk == 0:
                g = tl.load(g_ptr + tile, mask=mask, other=0.0).to(ACC_DTYPE)
            else:
                g = tl.load(carry_ptr + tile, mask=mask, other=0.0).to(ACC_DTYPE)
            for j in range(0, l_hi - l_lo):
                l = l_hi - 1 - j
                if l == 0:
                    x_rows = x_ptr + offs_m.to(tl.int64) * D
                else:
                    x_rows = saved_ptr + (tl.cast(l - 1, tl.int64) * M + offs_m) * D
                x = tl.load(x_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
                g_op = to_gemm_operand(g, GEMM_DTYPE, EMULATE_BF16)
                if ws_ptr is not None:
                    ws = ws_ptr + (tl.cast(slot, tl.int64) * L + l) * WS_LAYER
                    g_t = tl.trans(g_op)
                    if DW_COLS == D:
                        part = tl.dot(g_t, ACT(x, GEMM_DTYPE, EMULATE_BF16, ACT_PARAM),
                                      input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                        _accumulate(ws + w_tile, part, t, pid, DETERMINISTIC)
                    else:
                        for c0 in tl.static_range(0, D, DW_COLS):
                            cols = c0 + tl.arange(0, DW_COLS)
                            # Rows start 16-byte aligned: triton 3.6 infers nothing through the
                            # `if l == 0` above (a tensor scf.if result) and emits 16-bit loads.
                            xc = tl.load(tl.multiple_of(x_rows[:, None] + cols[None, :], [1, 16]),
                                         mask=(offs_m < M)[:, None] & (cols < D)[None, :], other=0.0)
                            part = tl.dot(g_t, ACT(xc, GEMM_DTYPE, EMULATE_BF16, ACT_PARAM),
                                          input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                            _accumulate(ws + offs_d[:, None] * D + cols[None, :], part, t, pid, DETERMINISTIC)
                    if HAS_BIAS:
                        _accumulate(ws + D * D + offs_d, tl.sum(g, axis=0), t, pid, DETERMINISTIC)
                w = tl.load(w_ptr + tl.cast(l, tl.int64) * (D * D) + w_tile)
                gw = tl.dot(g_op, to_gemm_operand(w, GEMM_DTYPE, EMULATE_BF16), input_precision=INPUT_PRECISION,
                            out_dtype=ACC_DTYPE)
                g = g + DACT(gw, x.to(ACC_DTYPE), ACT_PARAM)
            if l_lo == 0:
                if dx_ptr is not None:
                    store_rounded(dx_ptr + tile, g, mask, EMULATE_BF16)
            else:
                tl.store(carry_ptr + tile, g, mask=mask)


@triton.jit
def residual_stack_reduce_kernel(
    ws_ptr, dw_ptr, db_ptr,
    P, L,
    EMULATE_BF16: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``dW[l], db[l] = sum_p ws[p, l]``, p = 0, 1, ..., P-1 in that order: the same grid gives
    the same bits. Each program sums ``BLOCK`` consecutive elements of the ``[L, D*D + D]`` plane
    (``db_ptr`` None: no bias)."""
    WS_LAYER: tl.constexpr = D * D + D
    plane = tl.cast(L, tl.int64) * WS_LAYER
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for p in range(1, P):
        acc += tl.load(ws_ptr + p * plane + offs, mask=mask, other=0.0)
    layer = offs // WS_LAYER
    r = offs % WS_LAYER
    store_rounded(dw_ptr + layer * (D * D) + r, acc, mask & (r < D * D), EMULATE_BF16)
    if db_ptr is not None:
        store_rounded(db_ptr + layer * D + (r - D * D), acc, mask & (r >= D * D), EMULATE_BF16)


# ---------------------------------------------------------------------------------------------
# Launchers. Operands: contiguous and 16-byte aligned (checked here, guaranteed by fusedres).

#: Programs of the persistent backward in the interpreter, where there is no GPU to size it to:
#: fewer than the row tiles of a test-sized M, so that programs own several tiles (and unequal numbers of them), as on a GPU.
INTERPRETER_PROGRAMS = 2
#: L2 assumed when no GPU can be asked (the interpreter): H100 SXM's 50 MiB.
DEFAULT_L2_BYTES = 50 * 1024 * 1024


def _limits(t):
    """The limits of the device ``t`` is on (None: the interpreter), for :func:`stack_config`."""
    return limits_for(t.device)


def _check_operands(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and (not t.is_contiguous() or t.data_ptr() % 16):
            raise ValueError(f"residual_stack: {name} must be contiguous and 16-byte aligned (the kernels' "
                             f"vector loads assume it); got strides {t.stride()}, address {t.data_ptr():#x}")


def _launch(kernel, name: str, grid, args, consts: dict, config: triton.Config) -> None:
    """Launch on the first argument's device; never compile during CUDA-graph capture. On a GPU
    with a triton that does not ship the stack's kernels (:func:`configs.stack_supported`), refuse."""
    if not INTERPRET and not _configs.stack_supported():
        raise RuntimeError(
            f"fusedres: the narrow stack (FusedResidualStack) needs triton >= "
            f"{'.'.join(map(str, _configs.STACK_MIN_TRITON))}; this is triton {triton.__version__}, whose "
            "compiler its kernels have not been checked with (no entries for it in the compile gate). Use "
            "FusedResidualBlock (fusedres.fuse(model) without stacks=True), or torch >= 2.11 with the triton it "
            "brings.")
    kw = {**consts, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    with _launch_lock, _configs.device_guard(args[0].device):
        _configs._check_capture_safe(name, kernel, args, kw)
        _configs.run_kernel(kernel, grid, args, kw)
    record_launch(name)


def stack_fwd_launch_args(x, weight, bias, saved, y, config: triton.Config, act: str = "relu",
                          act_param: float = 0.0):
    """The forward's launch arguments ``(args, consts, grid)``: built here for the launcher and
    for the compile gate alike. ``x``, ``y`` ``[M, D]``; ``weight`` ``[L, D, D]``; ``bias``
    ``[L, D]`` or None; ``saved`` ``[L-1, M, D]`` (training) or None (inference)."""
    L, D, _ = weight.shape
    M = x.shape[0]
    args = (x, weight, bias, saved, y, M, L)
    consts = dict(ACT=ACTIVATION_KERNELS[act][0], ACT_PARAM=float(act_param), D=D,
                  **gemm_flags(weight.dtype, x.dtype, y.dtype))
    return args, consts, (cdiv(M, config.kwargs["BLOCK_M"]),)


def residual_stack_fwd(x, weight, bias, y, saved=None, *, config: triton.Config | None = None, act: str = "relu",
                       act_param: float = 0.0) -> None:
    """``y = x_L`` of the stack, and ``saved[l] = x_{l+1}`` (l < L-1) if ``saved`` is given.
    ``act``: the activation (a name of :data:`activations.KERNELS`) with its ``act_param``."""
    _check_operands(x=x, weight=weight, bias=bias, y=y, saved=saved)
    if x.shape[0] == 0:
        return
    config = config or stack_config("stack_fwd", weight.shape[-1], stack_operand_class(weight.dtype, x.dtype),
                                    limits=_limits(x))
    args, consts, grid = stack_fwd_launch_args(x, weight, bias, saved, y, config, act, act_param)
    _launch(residual_stack_fwd_kernel, "residual_stack_fwd", grid, args, consts, config)


def stack_programs(M: int, D: int, device, config: triton.Config, programs: int | None = None) -> int:
    """Programs of the persistent backward: one per SM (the interpreter: a few), never more than
    row tiles, so that every program owns a tile and writes each of its partials."""
    if programs is None:
        limits = limits_for(torch.device(device))
        programs = limits.sms if limits is not None else INTERPRETER_PROGRAMS
    return max(1, min(programs, cdiv(M, config.kwargs["BLOCK_M"])))


def l2_bytes(device) -> int:
    """The L2 cache of ``device``'s GPU; for the interpreter, :data:`DEFAULT_L2_BYTES`."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return DEFAULT_L2_BYTES


def layers_per_chunk(L: int, D: int, programs: int, acc_size: int, l2: int, deterministic: bool = True) -> int:
    """Layers whose partials (``programs * (D*D + D)`` accumulator elements each) fit in half of
    an ``l2``-byte L2 cache: the slice of the workspace that the row tiles update while they
    stream by. Atomics keep no per-program partials: one chunk."""
    if not deterministic:
        return max(L, 1)
    return max(1, min(L, (l2 // 2) // (programs * (D * D + D) * acc_size)))


def stack_bwd_launch_args(grad, x, saved, weight, dx, carry, ws, *, chunk: int, need_dx: bool, need_params: bool,
                          has_bias: bool, deterministic: bool, programs: int, config: triton.Config,
                          act: str = "relu", act_param: float = 0.0):
    L, D, _ = weight.shape
    M = x.shape[0]
    args = (grad, x, saved if saved is not None else x, weight, dx if need_dx else None,
            carry if carry is not None else grad, ws if need_params else None, M, L, chunk)
    prologue, derivative = ACTIVATION_KERNELS[act]
    consts = dict(ACT=prologue, DACT=derivative, ACT_PARAM=float(act_param), HAS_BIAS=has_bias and need_params,
                  DETERMINISTIC=deterministic, D=D,
                  **gemm_flags(weight.dtype, x.dtype, grad.dtype))
    return args, consts, (programs,)


def reduce_launch_args(ws, dw, db, programs: int, config: triton.Config):
    L, D, _ = dw.shape
    args = (ws, dw, db, programs, L)
    consts = dict(D=D, EMULATE_BF16=gemm_flags(dw.dtype)["EMULATE_BF16"])
    return args, consts, (cdiv(L * (D * D + D), config.kwargs["BLOCK"]),)


def residual_stack_bwd(grad, x, saved, weight, *, has_bias: bool, need_dx: bool, need_params: bool,
                       deterministic: bool = True, programs: int | None = None, chunk: int | None = None,
                       config: triton.Config | None = None, act: str = "relu", act_param: float = 0.0):
    """Gradients of the stack: ``(dx, dW, db)``, None for what is not asked for (``need_params``
    covers dW and, with ``has_bias``, db).

    Launches: the backward kernel, then, for the parameters, the reduce. ``programs`` and
    ``chunk`` (layers per chunk) override the GPU-derived defaults (tests use them to reach
    multi-tile programs and chunk boundaries).
    """
    _check_operands(grad=grad, x=x, saved=saved, weight=weight)
    L, D, _ = weight.shape
    M = x.shape[0]
    config = config or stack_config("stack_bwd", D, stack_operand_class(weight.dtype, x.dtype), limits=_limits(x))
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty_like(weight) if need_params else None
    db = weight.new_empty(L, D) if need_params and has_bias else None
    if M == 0:
        if need_params:
            dw.zero_()
            if db is not None:
                db.zero_()
        return dx, dw, db
    if not (need_dx or need_params):
        return dx, dw, db
    P = stack_programs(M, D, x.device, config, programs)
    chunk = chunk or layers_per_chunk(L, D, P, acc.itemsize, l2_bytes(x.device), deterministic)
    chunk = max(1, min(chunk, L))
    ws = None
    if need_params:
        slots = P if deterministic else 1
        # Deterministic partials are written before they are read; atomics need zeros.
        ws = (torch.empty if deterministic else torch.zeros)(slots * L * (D * D + D), device=x.device, dtype=acc)
    carry = torch.empty(M, D, device=x.device, dtype=acc) if chunk < L else None
    args, consts, grid = stack_bwd_launch_args(grad, x, saved, weight, dx, carry, ws, chunk=chunk, need_dx=need_dx,
                                               need_params=need_params, has_bias=has_bias,
                                               deterministic=deterministic, programs=P, config=config,
                                               act=act, act_param=act_param)
    _launch(residual_stack_bwd_kernel, "residual_stack_bwd", grid, args, consts, config)
    if need_params:
        rconfig = stack_config("stack_reduce", D, limits=_limits(x))
        args, consts, grid = reduce_launch_args(ws, dw, db, P if deterministic else 1, rconfig)
        _launch(residual_stack_reduce_kernel, "residual_stack_reduce", grid, args, consts, rconfig)
    return dx, dw, db
