"""The kernel configurations fusedres ships, and how one is chosen.

On a GPU each kernel autotunes among its list, keyed on (power-of-two bucket of M, D, dtypes), so
a new batch size re-tunes only when it crosses a power of two. The interpreter cannot autotune
(Triton's benchmarker needs a GPU driver), so there a deterministic per-size rule picks one
config. ``python -m fusedres.aot`` compiles every config of every list for sm_80 and sm_90 and
fails on spills, shared-memory overflow or a missing tensor-core instruction.
"""
from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, record_launch

# Shared memory the operand pipeline may take: sm_80's opt-in limit (166912 B) minus headroom for
# the epilogue's layout-conversion scratch. A safety net: every listed tile fits for its element
# size, and the compile gate checks the real figure.
SMEM_BUDGET = 160 * 1024

# (rows of the output tile, columns of the output tile, reduction step, warps, stages), per
# operand element size. ``python -m fusedres.aot`` compiles every entry of fwd, dx and dW for
# sm_80 and sm_90 and requires: no spills, shared memory within the opt-in limit, mma.sync on
# sm_80, wgmma on sm_90 with no serialisation advisory (C7515). What it measured, and dropped:
# - 128x256x64 at 8 warps spills (404 B fwd on sm_90), and 128x128 at 4 warps spills on sm_90
#   (fwd, dx): a 128x128 fp32 accumulator is 128 registers per thread at 4 warps.
# - fp32 runs either tf32 tensor cores or, by default (torch's matmul precision 'highest'), IEEE
#   FMA on CUDA cores, where each thread holds its rows of A for the whole reduction step: a
#   step of 64 spilled in every tile tried, 64x64x32 spills in dW: fp32 keeps steps of 16 and 32.
# - ptxas 12.9 (sm_80) caps some kernels at 128 registers and spills rather than exceed it:
#   128x64x16 at 4 warps spills 8 B in dW with tf32; with a projection shortcut (two K loops)
#   IEEE fp32 128x128x32 at 8 warps spills 24 B (fwd) and 200 B (dx).
_TILES = {
    2: [  # fp16, bf16
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 5),
    ],
    4: [  # fp32 (tf32 or IEEE)
        (128, 128, 16, 8, 4),
        (64, 128, 16, 4, 4),
        (64, 64, 16, 4, 4),
    ],
    8: [  # fp64 (gradcheck-sized work; not in the default gate)
        (64, 64, 16, 4, 3),
    ],
}
# Rows addressed through two strides (TWO_LEVEL_ROWS, e.g. a [B, T, D].transpose(0, 1) input)
# cost int64 row offsets per operand: with fp32 operands every larger tile above spills (up to
# 23 KB in dW), with fp64 64x64x16 spills in dx, so those launches get their own lists
# (``--two-level yes`` in the gate).
_TILES_TWO_LEVEL = {
    4: [(64, 64, 16, 4, 4)],
    8: [(32, 64, 16, 4, 3)],
}
_ALL_TILES = list(dict.fromkeys(t for tiles in (_TILES, _TILES_TWO_LEVEL) for size in sorted(tiles)
                                for t in tiles[size]))
GROUP = 8


def _gemm_configs(out_rows: str, out_cols: str, reduce: str, group: str) -> list[triton.Config]:
    return [triton.Config({out_rows: r, out_cols: c, reduce: k, group: GROUP}, num_warps=w, num_stages=s)
            for r, c, k, w, s in _ALL_TILES]


#: forward: y tile [BLOCK_M, BLOCK_N], reduction over k.
FWD_CONFIGS = _gemm_configs("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
#: dx: dx tile [BLOCK_M, BLOCK_K], reduction over n.
DX_CONFIGS = _gemm_configs("BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M")
#: dW: dW.T tile [BLOCK_K, BLOCK_N], reduction over the M rows.
DW_CONFIGS = _gemm_configs("BLOCK_K", "BLOCK_N", "BLOCK_M", "GROUP_K")

_TILE_NAMES = {"fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "dx": ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
               "dw": ("BLOCK_K", "BLOCK_N", "BLOCK_M")}
CONFIGS = {"fwd": FWD_CONFIGS, "dx": DX_CONFIGS, "dw": DW_CONFIGS}
#: the constexpr that sets each kernel's grouped tile order
GROUP_NAME = {"fwd": "GROUP_M", "dx": "GROUP_M", "dw": "GROUP_K"}


def pipeline_smem_bytes(kind: str, config: triton.Config, elem_size: int) -> int:
    """Operand bytes the software pipeline keeps in shared memory: stages x (A tile + B tile)."""
    rows, cols, red = (config.kwargs[n] for n in _TILE_NAMES[kind])
    return config.num_stages * (rows * red + red * cols) * elem_size


def _tile(kind: str, config: triton.Config) -> tuple:
    rows, cols, red = (config.kwargs[n] for n in _TILE_NAMES[kind])
    return rows, cols, red, config.num_warps, config.num_stages


def shipped_configs(kind: str, elem_size: int, two_level: bool = False) -> list[triton.Config]:
    """The configs of ``kind`` that a GEMM with ``elem_size``-byte operands (and two-level rows,
    if ``two_level``) may run: the tiles listed for it (all tiles for an unlisted element size)
    whose pipeline fits."""
    listed = (_TILES_TWO_LEVEL.get(elem_size) if two_level else None) or _TILES.get(elem_size)
    fits = [c for c in CONFIGS[kind] if (listed is None or _tile(kind, c) in listed)
            and pipeline_smem_bytes(kind, c, elem_size) <= SMEM_BUDGET]
    return fits or [min(CONFIGS[kind], key=lambda c: pipeline_smem_bytes(kind, c, elem_size))]


def prune_for(kind: str):
    """``early_config_prune`` for ``triton.autotune``: keep :func:`shipped_configs` for the
    launch's operand element size and row layout (``TWO_LEVEL_ROWS``, a launch constexpr)."""
    def prune(configs, named_args, **kwargs):
        elem_size = _GEMM_OPERAND[kind](named_args).element_size()
        two_level = bool(named_args.get("TWO_LEVEL_ROWS", kwargs.get("TWO_LEVEL_ROWS", False)))
        keep = {id(c) for c in shipped_configs(kind, elem_size, two_level)}
        return [c for c in configs if id(c) in keep] or configs[-1:]
    return prune


# Which launch argument carries the GEMM's operand dtype, per kernel.
_GEMM_OPERAND = {"fwd": lambda a: a["w_ptr"], "dx": lambda a: a["w_ptr"], "dw": lambda a: a["dw_ptr"]}


def interpreter_config(kind: str, M: int, D: int) -> triton.Config:
    """One config per size for the interpreter, where cost is per program and per loop trip,
    almost regardless of tile size: the largest tiles that the problem fills, up to 128."""
    def fit(n):
        return max(16, min(128, triton.next_power_of_2(max(n, 1))))
    rows, cols, red = _TILE_NAMES[kind]
    group = GROUP_NAME[kind]
    sizes = {"BLOCK_M": fit(M), "BLOCK_N": fit(D), "BLOCK_K": fit(D)}
    return triton.Config({rows: sizes[rows], cols: sizes[cols], red: sizes[red], group: GROUP},
                         num_warps=4, num_stages=1)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def gemm_flags(gemm_dtype: torch.dtype, *io_dtypes: torch.dtype) -> dict:
    """Numerics constexprs: accumulator dtype, tf32 or not, and bf16 emulation.

    fp32 GEMMs follow ``torch.get_float32_matmul_precision()`` ('highest' is IEEE fp32, anything
    else allows tf32), the rule nn.Linear follows on CUDA. fp64 accumulates in fp64 (Triton
    cannot compile an fp64 dot into an fp32 accumulator); everything else in fp32. ``io_dtypes``
    are the dtypes of the other operands and outputs: any bf16 among them needs the emulation.
    """
    tf32 = gemm_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return dict(
        ACC_DTYPE=tl.float64 if gemm_dtype == torch.float64 else tl.float32,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        EMULATE_BF16=INTERPRET and torch.bfloat16 in (gemm_dtype, *io_dtypes),
    )


# Triton's Autotuner keeps per-launch state on the shared object (``nargs``) and the interpreter
# patches ``triton.language`` for the duration of a launch: neither is safe across Python threads.
# Launches are asynchronous on a GPU, so holding a lock across the launch call costs little.
_launch_lock = threading.RLock()


def autotune_key(tuned, args: tuple, kwargs: dict) -> tuple:
    """The key Triton's ``Autotuner.run`` files a launch under: the values of its ``key``
    arguments, then the dtype of every tensor argument in signature order."""
    named = {**dict(zip(tuned.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuned.arg_names}
    key = [named[k] for k in tuned.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _check_capture_safe(kind: str, tuned, args: tuple, kwargs: dict) -> None:
    """Autotuning launches every candidate several times: never during CUDA-graph capture."""
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    key = autotune_key(tuned, args, kwargs)
    if len(tuned.configs) > 1 and key not in tuned.cache:
        raise RuntimeError(
            f"fusedres: the {kind} kernel would autotune during CUDA-graph capture (key {key}). Run "
            "fusedres.warmup(...) for this shape and dtype before capturing, or fusedres.load_tuning(path).")


def launch(kernel, tuned, kind: str, grid, args, consts: dict, M: int, D: int, config=None) -> None:
    """Launch ``kernel`` with ``config``, or the autotuned ``tuned`` on a GPU, or the interpreter's
    per-size config when interpreting."""
    if config is None and INTERPRET:
        config = interpreter_config(kind, M, D)
    with _launch_lock:
        if config is None:
            _check_capture_safe(kind, tuned, args, consts)
            tuned[grid](*args, **consts)
        else:
            kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps,
                         num_stages=config.num_stages)
    record_launch("residual_" + kind)


# ---------------------------------------------------------------------------------------------
# The narrow stack (residual_stack.py): one config per (kernel, operand class, width, arch), no
# autotuning. The forward is one launch per step and the backward grid is persistent, sized to
# the GPU: the row tile is what there is to choose, and ``python -m fusedres.aot`` compiles every
# entry below for sm_80 and sm_90 (no spills, tensor cores, 128-bit loads, relaxed atomics only).
#
# Operand classes: "16bit" (fp16, bf16 on tensor cores), "tf32", "ieee" (fp32 under torch's
# default matmul precision: FMA on CUDA cores, where each thread holds its rows of the A operand
# for the whole reduction over D), "fp64" (interpreter-sized work; gradcheck; not in the gate).
# Forward: (BLOCK_M, warps, stages). Backward: (BLOCK_M, warps, stages, DW_COLS).
#
# Chosen with the compile gate (fusedres.aot, sm_90 and sm_80, both feature variants of each
# kernel; candidates BLOCK_M 128..16, warps 4/8/16, stages 3..1, DW_COLS D..16): the largest
# BLOCK_M with no spills, shared memory in the limit, no ptxas advisory and no scalar 16-bit
# loads; then the fewest warps; then 2-3 stages over 1; then the widest DW_COLS.
# - fwd 16bit/tf32 sm_90: 128 rows at 4 warps draw C7517 (wgmma.wait_group injected) at every
#   num_stages (1-3); 8 warps do not. 16bit D=16 at (128, 8) emits scalar 16-bit loads: (64, 4).
#   tf32 D=128 spills at 128 rows (712+ B, also at 16 warps, where the register cap is 128).
# - fwd ieee (FMA, each thread holds its rows for the whole reduction over D): D=32 spills
#   16-40 B at 3 stages, not at 2; D=64 spills at 128 rows (16 B at 8 warps; sm_80 also at 64
#   rows with 4 warps); D=128 passes only at 32 rows (8 warps sm_80, 16 warps sm_90).
# - fwd sm_80 (ptxas caps registers lower): 16bit D=128 spills 108-200 B at (128, 8);
#   tf32 D=128 spills at 64 rows (24-184 B at 8 or 16 warps).
# - bwd: g, x, gW and the dW slice share the registers; a narrower DW_COLS relieves them.
#   tf32 D=128 spills at 64 rows (32-636 B; over shared memory at 2 stages on sm_90), on sm_80
#   also at 32 rows. bf16 on sm_80 spills at D=32 (48 B, DW_COLS=32), D=64 (DW_COLS 32-64) and
#   D=128 (64 rows: 344-800 B; (32, 4, 2, 16): 64 B), hence (32, 4, 1, 32) there.
# - bwd ieee: dW is an FMA dot with K = BLOCK_M, so small row tiles; at 4 warps ptxas falls back
#   to 32 registers and spills tens of KB. D=128 spills at 32 rows (23-78 KB) and at (16, 8, 1, 16)
#   (3.6 KB), but compiles clean at (16, 8, 2, 32) on both archs (246/228 registers).
STACK_FWD_TILES = {
    "16bit": {16: (64, 4, 3), 32: (128, 8, 3), 64: (128, 8, 3), 128: (128, 8, 3)},
    "tf32": {16: (128, 8, 3), 32: (128, 8, 3), 64: (128, 8, 3), 128: (64, 8, 3)},
    "ieee": {16: (128, 4, 3), 32: (128, 4, 2), 64: (64, 4, 3), 128: (32, 16, 3)},
    "fp64": {16: (32, 4, 1), 32: (32, 4, 1), 64: (32, 4, 1), 128: (32, 4, 1)},
}
STACK_BWD_TILES = {
    "16bit": {16: (128, 4, 2, 16), 32: (128, 4, 2, 32), 64: (128, 8, 2, 64), 128: (64, 8, 2, 64)},
    "tf32": {16: (128, 4, 2, 16), 32: (128, 8, 2, 32), 64: (128, 8, 2, 64), 128: (32, 4, 2, 16)},
    "ieee": {16: (64, 4, 2, 16), 32: (64, 4, 1, 16), 64: (32, 8, 2, 32), 128: (16, 8, 2, 32)},
    "fp64": {16: (32, 4, 1, 16), 32: (32, 4, 1, 32), 64: (32, 4, 1, 32), 128: (32, 4, 1, 32)},
}
#: sm_80 entries that differ from the lists above (ptxas 12.x there caps registers lower)
STACK_FWD_TILES_SM80: dict = {
    "16bit": {16: (128, 4, 3), 32: (128, 4, 3), 64: (128, 4, 3), 128: (64, 8, 3)},
    "tf32": {16: (128, 4, 3), 32: (128, 4, 3), 128: (32, 8, 3)},
    "ieee": {64: (64, 8, 3), 128: (32, 8, 3)},
    "fp64": {},
}
STACK_BWD_TILES_SM80: dict = {
    "16bit": {32: (128, 4, 2, 16), 64: (128, 8, 2, 16), 128: (32, 4, 1, 32)},
    "tf32": {16: (128, 4, 1, 16), 32: (128, 8, 1, 16), 64: (64, 8, 2, 16), 128: (16, 4, 2, 32)},
    "ieee": {},
    "fp64": {},
}
STACK_REDUCE_BLOCK, STACK_REDUCE_WARPS = 1024, 4


def stack_operand_class(dtype: torch.dtype) -> str:
    """The operand class of a stack whose weights are ``dtype``, under the current fp32 matmul
    precision (see :func:`gemm_flags`)."""
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "ieee" if gemm_flags(dtype)["INPUT_PRECISION"] == "ieee" else "tf32"
    return "16bit"


def stack_config(kind: str, D: int, operands: str = "16bit", capability: tuple[int, int] | None = None
                 ) -> triton.Config:
    """The shipped config of a stack kernel (``"stack_fwd"``, ``"stack_bwd"``, ``"stack_reduce"``)
    at width ``D`` for an operand class (:func:`stack_operand_class`) on a GPU of compute
    ``capability`` (None: the sm_90 entries, which the interpreter also uses)."""
    if kind == "stack_reduce":
        return triton.Config({"BLOCK": STACK_REDUCE_BLOCK}, num_warps=STACK_REDUCE_WARPS, num_stages=1)
    sm80 = capability is not None and capability[0] < 9
    if kind == "stack_fwd":
        tiles = {**STACK_FWD_TILES[operands], **(STACK_FWD_TILES_SM80[operands] if sm80 else {})}
        m, w, s = tiles[D]
        return triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
    if kind == "stack_bwd":
        tiles = {**STACK_BWD_TILES[operands], **(STACK_BWD_TILES_SM80[operands] if sm80 else {})}
        m, w, s, cols = tiles[D]
        return triton.Config({"BLOCK_M": m, "DW_COLS": cols}, num_warps=w, num_stages=s)
    raise ValueError(f"unknown stack kernel {kind!r}")
