"""The kernel configurations fusedres ships, and how one is chosen.

On a GPU each kernel autotunes among its list, keyed on (power-of-two bucket of M, D, dtypes), so
a new batch size re-tunes only when it crosses a power of two. The interpreter cannot autotune
(Triton's benchmarker needs a GPU driver), so there a deterministic per-size rule picks one
config. ``python -m fusedres.aot`` compiles every config of every list for sm_80 and sm_90 and
fails on spills, shared-memory overflow or a missing tensor-core instruction.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver as _triton_driver

from . import _common
from . import device as _device
from ._common import INTERPRET, next_pow2_bucket, record_launch
from .device import DeviceLimits, limits_for

# Shared memory the operand pipeline may take: sm_80's opt-in limit (166912 B) minus headroom for
# the epilogue's layout-conversion scratch. A safety net: every listed tile fits for its element
# size, and the compile gate checks the real figure.
SMEM_BUDGET = 160 * 1024
#: What :func:`pipeline_smem_bytes` leaves out under a device's opt-in limit (the epilogue's
#: layout-conversion scratch): sm_80's 166912 B less this is :data:`SMEM_BUDGET`.
SMEM_HEADROOM = 3 * 1024


def smem_budget(limits: DeviceLimits | None) -> int:
    """The pipeline shared memory a config may take on a device with ``limits`` (None: no GPU,
    the sm_80/sm_90 lists' :data:`SMEM_BUDGET`): 96 KB on the 99 KB parts (sm_86, sm_89, sm_120)."""
    if limits is None:
        return SMEM_BUDGET
    return min(SMEM_BUDGET, limits.shared_per_block - SMEM_HEADROOM)


def fits_device(num_warps: int, smem: int, limits: DeviceLimits | None) -> bool:
    """Whether a config of ``num_warps`` warps whose estimated shared memory is ``smem`` fits."""
    return smem <= smem_budget(limits) and (limits is None or num_warps * 32 <= limits.max_threads_per_block)

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
# With 16-bit operands, 128x64x64 at 4 warps spills there too (fwd 8 B, dx 72-88 B: sm_80, with a
# projection; triton 3.7.1, 3.8.0 and 3.9.0 alike).
_TILES_TWO_LEVEL = {
    2: [t for t in _TILES[2] if t != (128, 64, 64, 4, 4)],
    4: [(64, 64, 16, 4, 4)],
    8: [(32, 64, 16, 4, 3)],
}
# fp32 activations meeting a 16-bit GEMM (autocast) keep fp32 tiles of x or g in registers until
# the cast. With a projection's second K loop or two-level row offsets on top, these 16-bit tiles
# spill (compile gate, sm_80 and sm_90, fp16 and bf16, triton 3.7.1, 3.8.0 and 3.9.0: 8-460 B,
# the union over releases); without either, every 16-bit tile compiles clean with fp32 activations.
_MIXED_HEAVY_SPILLS = {
    "fwd": {(128, 64, 64, 4, 4), (64, 128, 64, 4, 4)},
    "dx": {(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
           (64, 128, 64, 4, 4)},
    "dw": {(64, 64, 64, 4, 4)},
}
#: The installed triton, (major, minor): each supported release compiles a few tiles differently.
TRITON_VERSION: tuple[int, int] = tuple(int(p) for p in triton.__version__.split(".")[:2])
#: Supported releases: the triton each supported torch pins (2.11 -> 3.6.0, 2.12 -> 3.7.0,
#: 2.13 -> 3.7.1, 2.14 -> 3.8.x, 2.15 -> 3.9.x).
SUPPORTED_TRITON = ((3, 6), (3, 7), (3, 8), (3, 9))
if TRITON_VERSION not in SUPPORTED_TRITON:
    import warnings
    warnings.warn(f"fusedres is tested with triton {', '.join('%d.%d' % v for v in SUPPORTED_TRITON)}; this is "
                  f"triton {triton.__version__}. Run `python -m fusedres.aot` and the test suite to check this pair.",
                  RuntimeWarning, stacklevel=2)
# Tiles a release's compiler spills on that the lists above take from 3.9 (compile gate, sm_80 and
# sm_90, every dtype and feature variant; each an 8 B spill on one arch in one variant). They are
# dropped on that release for every arch: the autotuner's prune cannot tell archs apart. Keyed by
# (element size, two-level rows).
# - triton 3.7.1 (ptxas 12.8 for both archs): fwd 16-bit 128x64x64 w4 s4 (alpha+proj, sm_80);
#   dx fp32 64x64x16 w4 s4 (alpha+proj, sm_90); dW fp32 128x128x16 w8 s4 (sm_80) and 64x64x16
#   w4 s4 (sm_90), which leaves dW fp32 one tile.
# - triton 3.8.0: dx fp32 64x64x16 w4 s4 (alpha+proj, sm_90), dW fp32 64x64x16 w4 s4 (float
#   alpha, sm_90).
# - triton 3.7.1, two-level rows: dW 16-bit 64x128x64 w4 s4 spills 12 B in the split-M variant on
#   sm_80 (fp16; found when the gate first compiled split variants with two-level rows).
_DROPPED_BY_TRITON: dict[tuple[int, int], dict[str, dict[tuple[int, bool], set]]] = {
    (3, 6): {"fwd": {(2, False): {(128, 64, 64, 4, 4)}}},
    (3, 7): {"fwd": {(2, False): {(128, 64, 64, 4, 4)}},
             "dx": {(4, False): {(64, 64, 16, 4, 4)}},
             "dw": {(4, False): {(128, 128, 16, 8, 4), (64, 64, 16, 4, 4)},
                    (2, True): {(64, 128, 64, 4, 4)}}},
    (3, 8): {"dx": {(4, False): {(64, 64, 16, 4, 4)}},
             "dw": {(4, False): {(64, 64, 16, 4, 4)}}},
}
# - triton 3.6.0 (ptxas 12.8 for sm_80-sm_90; covering set over sm_80-sm_120): fwd 16-bit
#   128x64x64 w4 s4 (8 B, alpha+proj, sm_80); its fp32 dW spills differ per arch
#   (:data:`_DROPPED_ON_ARCH`).

#: Per release and arch, tiles dropped beside :data:`_MIXED_HEAVY_SPILLS` for the same mix (fp32
#: activations, 16-bit GEMMs, with a projection or two-level rows). triton 3.6.0 on sm_90: the
#: forward's 128x128x64 (3 and 4 stages) and 64x64x64, and dx's 64x64x64, get C7513 (wgmma
#: serialised: non-wgmma instructions define its input registers inside the pipeline stage).
_MIXED_HEAVY_BY_TRITON: dict[tuple[int, int], dict[str, dict[str, set]]] = {
    (3, 6): {"sm_90": {"fwd": {(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 64, 64, 4, 4)},
                       "dx": {(64, 64, 64, 4, 4)}}},
    # triton 3.9.0 (ptxas 12.9): the forward's 64x64x64 w4 s4 spills 64 B on sm_86 and sm_89
    (3, 9): {"sm_86": {"fwd": {(64, 64, 64, 4, 4)}}, "sm_89": {"fwd": {(64, 64, 64, 4, 4)}}},
}
#: Per release, the tiles of a kind and element size with a projection (two K loops) where every
#: listed tile spills: triton 3.6.0, dx fp32 with a projection spills 8-40 B in all three fp32
#: tiles (sm_80 to sm_120, IEEE and tf32); 64x64x16 at 8 warps compiles clean on every arch.
_PROJ_TILES_BY_TRITON: dict[tuple[int, int], dict[tuple[str, int], list]] = {
    (3, 6): {("dx", 4): [(64, 64, 16, 8, 4)]},
}


#: Tiles the row-scale variants (stochastic depth's ``s_ptr``: the MLP block's passes and
#: drop_path) do not ship, on every release. dW scales its relu'd A tile by ``s[m // R]`` in the
#: reduction loop; measured with the compile gate (triton 3.7.1, ptxas 12.8): fp32 64x128x16 at
#: 4 warps and 4 stages spills 8 B on sm_80 (IEEE; with the scale before or after the relu, and
#: on g instead in the split variant); at 3 stages it compiles clean, so the row-scale dW takes that tile
#: instead (:data:`_ROW_SCALE_TILES`; on 3.7 the only other fp32 dW tile is dropped, and
#: 32x64x16, the fallback when nothing is left, loses its wgmma on sm_90 with tf32). Not on the
#: general fp32 list: dx with a projection spills 64 B there. Keyed by (kind, element size).
_ROW_SCALE_SPILLS: dict[tuple[str, int], set] = {("dw", 4): {(64, 128, 16, 4, 4)}}
_ROW_SCALE_TILES: dict[tuple[str, int], list] = {("dw", 4): [(64, 128, 16, 4, 3)]}


#: Tiles dropped on one arch only, where the compile gate found them spilling there (the prune
#: knows the launching device's arch, :func:`gate_arch`): release (None: every release) -> arch ->
#: kind -> (element size, two-level rows) -> tiles. A tile is dropped for its element size whichever
#: variant spilled. Measured with the full gate (every default dtype and variant, contiguous rows)
#: on triton 3.7.1 for sm_86, sm_89 and sm_120 (1494 compiles, 20 failed, 8-144 B spills; ptxas
#: 12.8 for sm_86/sm_89, 13.1 for sm_120) and dropped on every release; each release's covering
#: set adds its own.
# - sm_86, sm_89: dx 16-bit 128x64x64 w4 s4 (64 B, bf16 alpha+proj); dW 16-bit 64x128x64 w4 s4
#   (8 B, fp16 split+drop-path).
# - sm_120: fwd 16-bit 64x128x64 w4 s4 (24 B) and fp32 64x128x16 w4 s4 (36 B, tf32), both
#   alpha+proj; dx 16-bit 128x64x64 w4 s4 (144 B) and 64x64x32 w4 s5 (32 B), alpha+proj; dW
#   16-bit 128x128x32 w8 s4 (8 B, bf16 split).
_ON_8X = {"dx": {(2, False): {(128, 64, 64, 4, 4)}}, "dw": {(2, False): {(64, 128, 64, 4, 4)}}}
_DROPPED_ON_ARCH: dict = {
    None: {
        "sm_86": _ON_8X,
        "sm_89": _ON_8X,
        "sm_120": {"fwd": {(2, False): {(64, 128, 64, 4, 4)}, (4, False): {(64, 128, 16, 4, 4)}},
                   "dx": {(2, False): {(128, 64, 64, 4, 4), (64, 64, 32, 4, 5)}},
                   "dw": {(2, False): {(128, 128, 32, 8, 4)}}},
    },
    # triton 3.6.0 (covering set): fwd fp32 64x64x16 w4 s4 spills 16 B on sm_120 (alpha+proj);
    # dW fp32 (8-28 B): 64x128x16 w4 s4 (split+alpha+proj) on sm_80 and sm_90, 64x64x16 w4 s4 on
    # sm_80, the row-scale 64x128x16 w4 s3 on sm_90 (split+drop-path), 128x128x16 w8 s4 on sm_86
    # and sm_89 (tf32, split+alpha+proj). Every 8-warp fp32 dW tile tried in their place (64x64x16,
    # 128x64x16, 64x128x16) spills 8 B in split+drop-path on some arch.
    (3, 6): {
        "sm_80": {"dw": {(4, False): {(64, 128, 16, 4, 4), (64, 64, 16, 4, 4)}}},
        "sm_86": {"dw": {(4, False): {(128, 128, 16, 8, 4)}}},
        "sm_89": {"dw": {(4, False): {(128, 128, 16, 8, 4)}}},
        "sm_90": {"dw": {(4, False): {(64, 128, 16, 4, 4), (64, 128, 16, 4, 3)}}},
        "sm_120": {"fwd": {(4, False): {(64, 64, 16, 4, 4)}}},
    },
    # triton 3.8.0 (covering set; ptxas 12.9, 13.3 for sm_120): fwd 16-bit 128x64x64 w4 s4 (16 B,
    # alpha+proj) on sm_120; dW 16-bit 128x128x32 w8 s4 (32 B, split+alpha+proj) on sm_86 and sm_89;
    # every fp32 dW tile on sm_120 (1.6-2.2 KB, IEEE split variants: see _ADDED_ON_ARCH).
    (3, 8): {
        "sm_86": {"dw": {(2, False): {(128, 128, 32, 8, 4)}}},
        "sm_89": {"dw": {(2, False): {(128, 128, 32, 8, 4)}}},
        "sm_120": {"fwd": {(2, False): {(128, 64, 64, 4, 4)}},
                   "dw": {(4, False): {(128, 128, 16, 8, 4), (64, 128, 16, 4, 4), (64, 128, 16, 4, 3)}}},
    },
    # triton 3.9.0 (covering set; ptxas 12.9, 13.4 for sm_90 and sm_120): as 3.8.0, plus dW fp32
    # 64x64x16 w4 s4 (8 B on sm_86/sm_89, 84 B on sm_120, split+alpha+proj).
    (3, 9): {
        "sm_86": {"dw": {(2, False): {(128, 128, 32, 8, 4)}, (4, False): {(64, 64, 16, 4, 4)}}},
        "sm_89": {"dw": {(2, False): {(128, 128, 32, 8, 4)}, (4, False): {(64, 64, 16, 4, 4)}}},
        "sm_120": {"fwd": {(2, False): {(128, 64, 64, 4, 4)}},
                   "dw": {(4, False): {(128, 128, 16, 8, 4), (64, 128, 16, 4, 4), (64, 128, 16, 4, 3),
                                       (64, 64, 16, 4, 4)}}},
    },
}


#: Tiles added on one arch where its compiler spills every listed tile of a kind, element size and
#: row layout: release -> arch -> kind -> (element size, two-level rows) -> tiles (found with the
#: compile gate in every variant of the kind).
# - triton 3.8.0 and 3.9.0, sm_120 (ptxas 13.3, 13.4): every fp32 dW tile spills 84 B-2.2 KB with
#   IEEE fp32 in the split variants; 64x64x16 at 8 warps compiles clean in every dW variant, IEEE
#   and tf32, on both.
_ADDED_ON_ARCH: dict = {
    (3, 8): {"sm_120": {"dw": {(4, False): [(64, 64, 16, 8, 4)]}}},
    (3, 9): {"sm_120": {"dw": {(4, False): [(64, 64, 16, 8, 4)]}}},
}


#: Tiles dropped for an activation other than relu, whose prologue (fwd, dW: the A tile computed in
#: fp32, torch's opmath) or derivative (dx: on the accumulator tile, with x loaded) costs registers
#: relu's does not: activation -> table arch ("sm_80": the mma.sync parts, "sm_90": Hopper) ->
#: kind -> (element size, projection) -> tiles. Derived from the compile gate's records by
#: ``fusedres.aot.derive_act_drops`` (``python -m fusedres.aot --acts gelu,... --derive-act-drops``),
#: triton 3.7.1 on sm_80 and sm_90, every default dtype, the covering sets with and without a
#: projection: each tile listed spilled (or serialised its wgmma) in some variant there. A tile's
#: drop applies to its element size whatever the dtype (fp32 covers IEEE and tf32; 2 covers fp16,
#: bf16 and autocast's 16-bit GEMMs). Filled below from the gate's output.
ACT_DROPPED: dict = {
    'identity': {
        'sm_80': {
            'dx': {
                (2, True): {(128, 64, 64, 4, 4)},
            },
        },
    },
    'gelu': {
        'sm_80': {
            'dw': {
                (2, False): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)},
            },
            'dx': {
                (2, False): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                             (64, 128, 64, 4, 4), (64, 64, 32, 4, 5)},
                (2, True): {(64, 128, 64, 4, 4)},
                (4, False): {(128, 128, 16, 8, 4), (64, 128, 16, 4, 4)},
            },
            'fwd': {
                (2, False): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4)},
                (2, True): {(64, 64, 64, 4, 4)},
            },
        },
        'sm_90': {
            'dw': {
                (2, True): {(128, 64, 64, 4, 4)},
            },
            'dx': {
                (2, False): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4)},
                (2, True): {(64, 128, 64, 4, 4)},
                (4, False): {(128, 128, 16, 8, 4), (64, 128, 16, 4, 4)},
                (4, True): {(32, 64, 16, 4, 3)},
            },
        },
    },
    'gelu_tanh': {
        'sm_80': {
            'dw': {
                (2, False): {(64, 128, 64, 4, 4), (64, 64, 64, 4, 4)},
            },
            'dx': {
                (2, False): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                             (64, 128, 64, 4, 4)},
                (2, True): {(64, 128, 64, 4, 4), (64, 64, 64, 4, 4)},
                (4, False): {(128, 128, 16, 8, 4)},
                (4, True): {(64, 128, 16, 4, 4)},
            },
            'fwd': {
                (2, False): {(128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 5)},
                (2, True): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)},
            },
        },
        'sm_90': {
            'dx': {
                (2, False): {(128, 128, 32, 8, 4), (128, 64, 64, 4, 4)},
                (2, True): {(64, 128, 64, 4, 4)},
                (4, False): {(128, 128, 16, 8, 4)},
                (4, True): {(32, 64, 16, 4, 3)},
            },
        },
    },
    'leaky_relu': {
        'sm_80': {
            'fwd': {
                (2, False): {(64, 128, 64, 4, 4)},
                (2, True): {(128, 128, 64, 8, 4)},
            },
        },
        'sm_90': {
            'dx': {
                (4, True): {(32, 64, 16, 4, 3)},
            },
        },
    },
    'relu_sq': {
        'sm_80': {
            'dx': {
                (2, False): {(128, 64, 64, 4, 4)},
                (4, True): {(128, 128, 16, 8, 4), (64, 128, 16, 4, 4)},
            },
        },
        'sm_90': {
            'dx': {
                (2, False): {(128, 64, 64, 4, 4)},
                (4, True): {(128, 128, 16, 8, 4), (64, 128, 16, 4, 4), (32, 64, 16, 4, 3)},
            },
        },
    },
    'silu': {
        'sm_80': {
            'dx': {
                (2, False): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                             (64, 128, 64, 4, 4)},
                (2, True): {(64, 128, 64, 4, 4)},
                (4, False): {(128, 128, 16, 8, 4), (64, 128, 16, 4, 4)},
            },
            'fwd': {
                (2, False): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4)},
                (2, True): {(64, 128, 64, 4, 4), (64, 64, 64, 4, 4)},
            },
        },
        'sm_90': {
            'dx': {
                (2, False): {(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                             (64, 128, 64, 4, 4)},
                (2, True): {(64, 128, 64, 4, 4)},
                (4, False): {(128, 128, 16, 8, 4), (64, 128, 16, 4, 4)},
                (4, True): {(32, 64, 16, 4, 3)},
            },
        },
    },
}




#: Tiles added for an activation other than relu where it drops every listed one: (kind, element
#: size) -> tiles. dx fp32 (gelu, silu: both fp32 tiles spill; 3.7 drops the third with a
#: projection) would fall back to 32x64x16, which has no wgmma on sm_90; 64x64x16 at 8 warps is the
#: fp32 tile that compiled clean in every variant and arch when triton 3.6 needed one (see
#: _PROJ_TILES_BY_TRITON).
ACT_ADDED: dict = {("dx", 4): [(64, 64, 16, 8, 4)]}
#: Tiles a launch with a per-channel alpha (``channel_alpha_ptr``: timm's LayerScale) does not ship,
#: per gate arch (the interpreter: every arch's): 16-bit dW 64x128x64 at 4 warps and 4 stages
#: spills 8 B on sm_80 (fp16, with DropPath's row scale; ptxas 12.8 allots it 168 registers), since
#: the kernels are composed from pieces (issue 21; ptxas allotted the flag-built kernel 187). Every
#: other variant and arch compiles it clean. Keyed by arch, then (kind, element size).
_CHANNEL_ALPHA_SPILLS: dict[str, dict[tuple[str, int], set]] = {"sm_80": {("dw", 2): {(64, 128, 64, 4, 4)}}}
#: Tiles a launch with a normalization (issue 22: the prologue's statistics loads, dx's sinks)
#: does not ship, as the compile gate derived them: gate arch -> kind -> (element size, mixed) ->
#: tiles, mixed being autocast's fp32 activations beside 16-bit weights. Derived with triton 3.7.1
#: (ptxas 12.8; 13.1 for sm_120) from every norm variant's covering set: fp16, bf16, fp32, tf32 and
#: autocast-bf16 on all five archs (``python -m fusedres.aot --cover --features norm-batch,norm-layer,
#: norm-rms,norm-hidden-batch,norm-hidden-layer --derive-norm-drops``, run with this table emptied);
#: ``tests/test_aot.py`` checks it against the saved failing records
#: (``tests/data/norm_gate_failures.json``). An arch not in it takes the union of every arch's.
NORM_DROPPED: dict = {'sm_120': {'dw': {(2, False): [(64, 128, 64, 4, 4)]}, 'fwd': {(4, False): [(128, 128, 16, 8, 4)]}},
 'sm_80': {'dw': {(2, False): [(128, 128, 64, 8, 4)],
                  (2, True): [(128, 128, 64, 8, 3),
                              (128, 64, 64, 4, 4),
                              (64, 128, 64, 4, 4),
                              (64, 64, 64, 4, 4)],
                  (4, False): [(64, 128, 16, 4, 4), (64, 128, 16, 4, 3)]},
           'fwd': {(4, False): [(64, 128, 16, 4, 4)]}},
 'sm_86': {'dw': {(4, False): [(64, 128, 16, 4, 4)]}},
 'sm_89': {'dw': {(4, False): [(64, 128, 16, 4, 4)]}},
 'sm_90': {'dw': {(2, True): [(128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]},
           'dx': {(2, True): [(128, 128, 64, 8, 4),
                              (128, 128, 64, 8, 3),
                              (128, 128, 32, 8, 4),
                              (128, 64, 64, 4, 4),
                              (64, 128, 64, 4, 4)],
                  (4, False): [(64, 128, 16, 4, 4)]},
           'fwd': {(4, False): [(64, 128, 16, 4, 4)]}}}
#: What the norm launches of another triton release drop besides :data:`NORM_DROPPED` (the same
#: keys), from its own gate run: triton 3.6.0 (torch 2.11's pin; ptxas 12.8), fp16 covering sets of
#: every norm variant on sm_80 and sm_90 (206 compiles, these 3 failed: dx spilled 120-128 B, dW
#: 16 B); triton 3.9.0 (ptxas 12.9 / 13.4), the same run (216 compiles, 10 failed: 8 to 80 B). Their
#: fp32, tf32 and autocast lists were not gated for norms.
_NORM_DROPPED_BY_TRITON: dict = {
    (3, 6): {"sm_90": {"dx": {(2, False): [(64, 128, 64, 4, 4)]}, "dw": {(2, False): [(128, 64, 64, 4, 4)]}}},
    (3, 9): {"sm_80": {"dw": {(2, False): [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]}},
             "sm_90": {"dx": {(2, False): [(64, 128, 64, 4, 4)]}, "dw": {(2, False): [(128, 64, 64, 4, 4)]}}},
}
#: Tiles a launch with a sink of the next norm's statistics (a chain's forward, :mod:`fusedres.chain`;
#: the hidden norm's fc1) does not ship besides :data:`NORM_DROPPED`, derived by the compile gate
#: from the chain variants (``python -m fusedres.aot --cover --kernels fwd --features chain-batch,
#: chain-layer,chain-mlp-batch,chain-mlp-layer --derive-chain-drops``; that run's records are
#: tests/data/chain_gate_records.json): the same keys as :data:`NORM_DROPPED`, ``mixed`` as the
#: launch's prune sees it (the MLP block's fc2 under autocast is not: it reads h in the GEMM dtype).
CHAIN_DROPPED: dict = {'sm_120': {},
                       'sm_80': {'fwd': {(2, False): [(128, 128, 32, 8, 4)],
                                         (2, True): [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (64, 64, 32, 4, 5)]}},
                       'sm_86': {'fwd': {(4, False): [(128, 128, 16, 8, 4)]}},
                       'sm_89': {'fwd': {(4, False): [(128, 128, 16, 8, 4)]}},
                       'sm_90': {}}
#: What another triton release's chain forwards drop besides :data:`CHAIN_DROPPED`, from its own run
#: of the chain variants (fp16 and fp32 on sm_80 and sm_90; an empty entry: compiled clean, the
#: archs absent were not gated on that release and take every listed arch's drops): 3.6.0 (64
#: compiles, 1 spilled 8 B), 3.8.0 (68 compiles, none), 3.9.0 (68 compiles, 5 spilled 8 to 56 B).
_CHAIN_DROPPED_BY_TRITON: dict = {
    (3, 6): {"sm_80": {}, "sm_90": {"fwd": {(4, False): [(128, 128, 16, 8, 4)]}}},
    (3, 8): {"sm_80": {}, "sm_90": {}},
    (3, 9): {"sm_80": {}, "sm_90": {"fwd": {(2, False): [(128, 64, 64, 4, 4)], (4, False): [(128, 128, 16, 8, 4)]}}},
}
#: Tiles a launch with dropout (issue 23: the keep mask regenerated in the epilogue, on dx's g, on
#: dW's tiles) does not ship, as the compile gate derived them (the same keys as
#: :data:`NORM_DROPPED` and ``both``: the list of the launches with both masks, the MLP block's fc2
#: passes, ``dropout-mlp``; a launch with one mask drops the ``False`` list only). Derived with
#: triton 3.7.1 (ptxas 12.8; 13.1 for sm_120) from every dropout variant's covering set: fp16, bf16,
#: fp32, tf32 and autocast-bf16 on sm_80, sm_90 and sm_120 (508 compiles, 82 failed: spills of 8
#: to 368 B, one over sm_80's shared memory; no serialised wgmma): ``python -m fusedres.aot --cover
#: --features dropout,dropout-norm,dropout-mlp --derive-dropout-drops``, run with this table
#: emptied; ``tests/test_aot.py`` checks it against the saved failing records
#: (``tests/data/dropout_gate_failures.json``). An arch not in it (sm_86, sm_89) takes the union of
#: every arch's. The forward drops nothing: one Philox draw per four features keeps its epilogue
#: within the registers (one draw per element spilled 2 KB at 128x128, 8 warps, on sm_90).
DROPOUT_DROPPED: dict = {'sm_120': {'dw': {(2, False, False): [(128, 128, 64, 8, 3),
                                       (128, 64, 64, 4, 4),
                                       (64, 128, 64, 4, 4),
                                       (64, 64, 64, 4, 4)],
                   (2, False, True): [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)],
                   (2, True, True): [(64, 64, 64, 4, 4)],
                   (4, False, True): [(64, 128, 16, 4, 3)]},
            'dx': {(2, False, False): [(64, 128, 64, 4, 4)],
                   (2, False, True): [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4)],
                   (2, True, True): [(128, 128, 32, 8, 4)],
                   (4, False, True): [(128, 128, 16, 8, 4), (64, 128, 16, 4, 4)]}},
 'sm_80': {'dw': {(2, False, False): [(128, 128, 64, 8, 4),
                                      (128, 128, 64, 8, 3),
                                      (128, 64, 64, 4, 4),
                                      (64, 128, 64, 4, 4)],
                  (2, False, True): [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
                  (2, True, False): [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
                  (2, True, True): [(128, 128, 64, 8, 4)]},
           'dx': {(2, False, True): [(128, 128, 64, 8, 4),
                                     (128, 128, 64, 8, 3),
                                     (128, 128, 32, 8, 4),
                                     (128, 64, 64, 4, 4),
                                     (64, 128, 64, 4, 4)],
                  (2, True, False): [(128, 64, 64, 4, 4), (64, 64, 32, 4, 5)],
                  (2, True, True): [(128, 128, 64, 8, 4),
                                    (128, 128, 64, 8, 3),
                                    (128, 128, 32, 8, 4),
                                    (128, 64, 64, 4, 4),
                                    (64, 128, 64, 4, 4)],
                  (4, False, True): [(128, 128, 16, 8, 4)]}},
 'sm_90': {'dw': {(2, False, False): [(128, 64, 64, 4, 4), (64, 128, 64, 4, 4)],
                  (2, False, True): [(128, 128, 64, 8, 4),
                                     (128, 128, 64, 8, 3),
                                     (128, 64, 64, 4, 4),
                                     (64, 128, 64, 4, 4)],
                  (2, True, False): [(128, 128, 64, 8, 3)]},
           'dx': {(2, False, True): [(128, 128, 64, 8, 4),
                                     (128, 128, 64, 8, 3),
                                     (128, 128, 32, 8, 4),
                                     (128, 64, 64, 4, 4),
                                     (64, 128, 64, 4, 4)],
                  (2, True, False): [(128, 64, 64, 4, 4)],
                  (4, False, True): [(128, 128, 16, 8, 4)]}}}
#: What the dropout launches of another triton release drop besides :data:`DROPOUT_DROPPED` (the
#: same keys), from its own gate run of the three dropout variants, fp16 on sm_80 and sm_90:
#: triton 3.6.0 (ptxas 12.8) compiled all 88 configs clean; triton 3.8.0 (ptxas 12.9) failed 2 of
#: 96 and triton 3.9.0 (ptxas 12.9 / 13.4) 3 of 95, all in the two-mask passes (fc2's forward
#: spilled 32-184 B, dW2 32 B). Their bf16, fp32, tf32 and autocast lists were not gated for dropout.
_DROPOUT_DROPPED_BY_TRITON: dict = {
    (3, 8): {"sm_80": {"fwd": {(2, False, True): [(128, 64, 64, 4, 4)]}},
             "sm_90": {"fwd": {(2, False, True): [(128, 64, 64, 4, 4)]}}},
    (3, 9): {"sm_80": {"fwd": {(2, False, True): [(128, 64, 64, 4, 4)]}},
             "sm_90": {"fwd": {(2, False, True): [(128, 64, 64, 4, 4)]}, "dw": {(2, False, True): [(64, 64, 64, 4, 4)]}}},
}
#: The archs whose activation lists the gate derived (:data:`ACT_DROPPED`); other archs take the
#: list of their family (:func:`stack_table_arch`) and are not gate-verified for these rows.
ACT_GATED_ARCHS = ("sm_80", "sm_90")


def act_name_of(recipe: str | None) -> str:
    """The activation of a launch's ``RECIPE`` string (``"fwd|gelu|alpha=scalar"`` -> ``"gelu"``;
    no activation: ``"identity"``)."""
    if not recipe:
        return "relu"
    return recipe.split("|")[1].split("(", 1)[0]


def act_dropped(act: str, kind: str, elem_size: int, proj: bool, arch: str | None) -> set:
    """The tiles :data:`ACT_DROPPED` removes for ``act`` (none for relu; ``identity``: no activation,
    the MLP block's ``pre_act=None``). A launch with a projection drops its own list and the list
    without one (the second K loop only adds registers). No arch (the interpreter): every gated
    arch's list; an arch besides them: its family's (mma.sync: sm_80's, wgmma: sm_90's)."""
    if act == "relu":
        return set()
    if arch is None:
        archs = ACT_GATED_ARCHS
    else:
        archs = ("sm_90",) if arch in ("sm_90", "sm_100") else ("sm_80",)
    by_arch = ACT_DROPPED.get(act, {})
    return {t for a in archs for p in {False, proj}
            for t in by_arch.get(a, {}).get(kind, {}).get((elem_size, p), ())}


def gate_arch(capability: tuple[int, int]) -> str:
    """The compile gate's arch whose lists a GPU of ``capability`` takes: its own for 8.0, 8.6,
    8.9 and 9.0; the family's for the other Blackwell parts (10.x -> sm_100, 12.x -> sm_120) and
    for 8.7 (Jetson Orin, sm_86's ISA)."""
    major, minor = capability
    if major in (10, 12):
        return f"sm_{major}0"
    return "sm_86" if capability == (8, 7) else f"sm_{major}{minor}"


def dropped_tiles(kind: str, elem_size: int, version: tuple[int, int] | None = None, two_level: bool = False,
                  arch: str | None = None) -> set:
    """The tiles of ``kind`` at ``elem_size`` (with ``two_level`` rows) that triton ``version``
    (default: the installed one) does not ship on any arch, and (given ``arch``) on that arch."""
    version = version or TRITON_VERSION
    key = (elem_size, two_level)
    out = set(_DROPPED_BY_TRITON.get(version, {}).get(kind, {}).get(key, set()))
    if arch is not None:
        for release in (None, version):
            out |= _DROPPED_ON_ARCH.get(release, {}).get(arch, {}).get(kind, {}).get(key, set())
    return out


_ALL_TILES = list(dict.fromkeys([t for tiles in (_TILES, _TILES_TWO_LEVEL) for size in sorted(tiles)
                                 for t in tiles[size]] + [t for ts in _ROW_SCALE_TILES.values() for t in ts]
                                + [t for by in _PROJ_TILES_BY_TRITON.values() for ts in by.values() for t in ts]
                                + [t for rel in _ADDED_ON_ARCH.values() for by_arch in rel.values()
                                   for by_kind in by_arch.values() for ts in by_kind.values() for t in ts]))
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


def pipeline_smem_bytes(kind: str, config: triton.Config, elem_size: int,
                        operand_sizes: tuple[int, int] | None = None) -> int:
    """Shared memory of the operand pipeline: ``num_stages - 1`` buffers of (A tile + B tile), each
    tile at its operand's element size as loaded (``operand_sizes``, default ``elem_size``: under
    autocast fp32 activations meet 16-bit weights and are cast after the load), plus one tile in
    the GEMM dtype (``elem_size``: the cast operand sm_90's wgmma reads, or sm_80's epilogue
    scratch). Fitted to what triton 3.7-3.9 allocate for these kernels (compile gate, sm_80 and
    sm_90); the gate checks the compiled figure of every config the prune keeps."""
    rows, cols, red = (config.kwargs[n] for n in _TILE_NAMES[kind])
    a, b = operand_sizes or (elem_size, elem_size)
    a_tile, b_tile = rows * red, red * cols
    return max(config.num_stages - 1, 1) * (a_tile * a + b_tile * b) + max(a_tile, b_tile) * elem_size


def _tile(kind: str, config: triton.Config) -> tuple:
    rows, cols, red = (config.kwargs[n] for n in _TILE_NAMES[kind])
    return rows, cols, red, config.num_warps, config.num_stages


def shipped_configs(kind: str, elem_size: int, two_level: bool = False,
                    operand_sizes: tuple[int, int] | None = None, proj: bool = False,
                    row_scale: bool = False, limits: DeviceLimits | None = None,
                    act: str = "relu", channel_alpha: bool = False, norm: int = 0,
                    dropout: int = 0) -> list[triton.Config]:
    """The configs of ``kind`` that a GEMM in an ``elem_size``-byte dtype (and two-level rows, if
    ``two_level``; a projection shortcut, if ``proj``; stochastic depth's row scale, if
    ``row_scale``) may run on a device with ``limits`` (None: no GPU; see
    :func:`fusedres.kernels.device.limits_for`): the tiles listed for it (all tiles for an
    unlisted element size) whose pipeline fits that device's shared memory
    (:func:`smem_budget`), with its A and B tiles loaded at ``operand_sizes`` bytes per element
    (default ``elem_size``; see :func:`pipeline_smem_bytes`), less those the activation ``act``
    drops (:data:`ACT_DROPPED`) and, with ``channel_alpha`` (a per-channel alpha),
    :data:`_CHANNEL_ALPHA_SPILLS`, with ``norm`` (1: a normalization prologue; 2: a sink of the next
    norm's statistics too, with or without a prologue) :data:`NORM_DROPPED` (and :data:`CHAIN_DROPPED`),
    and with ``dropout`` keep masks (1, or 2: the MLP block's fc2 passes, both masks)
    :data:`DROPOUT_DROPPED`. Largest tiles first."""
    listed = (_TILES_TWO_LEVEL.get(elem_size) if two_level else None) or _TILES.get(elem_size)
    if proj and not two_level and (kind, elem_size) in _PROJ_TILES_BY_TRITON.get(TRITON_VERSION, {}):
        listed = _PROJ_TILES_BY_TRITON[TRITON_VERSION][(kind, elem_size)]
    mixed = operand_sizes is not None and max(operand_sizes) > elem_size
    arch = None if limits is None else gate_arch(limits.capability)
    added = _ADDED_ON_ARCH.get(TRITON_VERSION, {}).get(arch, {}).get(kind, {}).get((elem_size, two_level), [])
    if added and listed is not None:
        listed = list(listed) + added
    if act not in ("relu", "identity") and listed is not None:
        listed = list(listed) + ACT_ADDED.get((kind, elem_size), [])
    spills = (_MIXED_HEAVY_SPILLS[kind] | _MIXED_HEAVY_BY_TRITON.get(TRITON_VERSION, {}).get(arch, {}).get(kind, set())
              if mixed and (proj or two_level) else set())
    if row_scale:
        spills = spills | _ROW_SCALE_SPILLS.get((kind, elem_size), set())
        if listed is not None and not two_level:
            listed = list(listed) + _ROW_SCALE_TILES.get((kind, elem_size), [])
    if channel_alpha:
        spills = spills | {t for a, table in _CHANNEL_ALPHA_SPILLS.items() if arch is None or a == arch
                           for t in table.get((kind, elem_size), ())}
    # the gate-derived tables of a piece: (tables, keys); dropout: one mask's list, or both lists
    derived = ([((NORM_DROPPED, _NORM_DROPPED_BY_TRITON.get(TRITON_VERSION, {})), [(elem_size, mixed)])] if norm
               else []) + ([((CHAIN_DROPPED, _CHAIN_DROPPED_BY_TRITON.get(TRITON_VERSION, {})), [(elem_size, mixed)])]
                           if norm > 1 else []) + ([((DROPOUT_DROPPED, _DROPOUT_DROPPED_BY_TRITON.get(TRITON_VERSION, {})),
                             [(elem_size, mixed, both) for both in ((False, True) if dropout > 1 else (False,))])]
                           if dropout else [])
    for tables, keys in derived:
        for drops in tables:
            spills = spills | {tuple(t) for a, table in drops.items() if arch not in drops or a == arch
                               for key in keys for t in table.get(kind, {}).get(key, ())}

    def smem(c):
        return pipeline_smem_bytes(kind, c, elem_size, operand_sizes)
    dropped = dropped_tiles(kind, elem_size, two_level=two_level, arch=arch) | act_dropped(act, kind, elem_size,
                                                                                             proj, arch)
    fits = [c for c in CONFIGS[kind] if (listed is None or _tile(kind, c) in listed)
            and fits_device(c.num_warps, smem(c), limits)
            and _tile(kind, c) not in spills and _tile(kind, c) not in dropped]
    return fits or [min(CONFIGS[kind], key=smem)]


def launch_operand_sizes(kind: str, named_args: dict) -> tuple[int, tuple[int, int]]:
    """``(GEMM element size, (A, B) operand element sizes as loaded)`` of a launch's arguments."""
    return (named_args[_GEMM_DTYPE_FROM[kind]].element_size(),
            tuple(named_args[n].element_size() for n in _GEMM_TILES_FROM[kind]))


def launch_limits(kind: str, named_args: dict) -> DeviceLimits | None:
    """The limits of the device a launch of ``kind`` runs on (its GEMM operand's)."""
    return limits_for(named_args[_GEMM_DTYPE_FROM[kind]].device)


def launch_shipped_configs(kind: str, named_args: dict) -> list[triton.Config]:
    """:func:`shipped_configs` for a launch: its GEMM dtype, operand dtypes, row layout
    (``TWO_LEVEL_ROWS``), projection, row scale and per-channel alpha (the operands
    ``p_ptr``/``dp_ptr``, ``s_ptr`` and ``channel_alpha_ptr``, given or None) and activation
    (``RECIPE``), on its device."""
    elem_size, operand_sizes = launch_operand_sizes(kind, named_args)
    return shipped_configs(kind, elem_size, bool(named_args.get("TWO_LEVEL_ROWS", False)), operand_sizes,
                           launch_has(kind, named_args, "proj"), launch_has(kind, named_args, "row_scale"),
                           launch_limits(kind, named_args), act_name_of(named_args.get("RECIPE")),
                           launch_has(kind, named_args, "channel_alpha"), norm_sites(named_args),
                           dropout_sites(named_args))


#: The operand that carries a piece, per kernel.
_PIECE_OPERAND = {"proj": {"fwd": "p_ptr", "dx": "p_ptr", "dw": "dp_ptr"},
                  "row_scale": {"fwd": "s_ptr", "dx": "s_ptr", "dw": "s_ptr"},
                  "channel_alpha": {"fwd": "channel_alpha_ptr", "dx": "channel_alpha_ptr", "dw": "channel_alpha_ptr"}}


def launch_has(kind: str, named_args: dict, piece: str) -> bool:
    """Whether a launch of ``kind`` has ``piece`` (``"proj"``, ``"row_scale"``, ``"channel_alpha"``,
    ``"norm"``): its operand given (a norm: its per-row or per-feature statistics)."""
    if piece == "norm":
        return named_args.get("row_rstd_ptr") is not None or named_args.get("col_rstd_ptr") is not None
    return named_args.get(_PIECE_OPERAND[piece][kind]) is not None


def norm_sites(named_args: dict) -> int:
    """Which norm tile lists a launch takes: 0 (no norm), 1 (a normalization prologue, or the hidden
    norm's fc1: its statistics sink without a residual, gated as the hidden-norm variants), 2 (a
    chain's forward: the residual add with the next norm's statistics sink, with or without a
    prologue, gated as the chain variants; it takes both lists)."""
    sink = named_args.get("col_stats_ptr") is not None or named_args.get("row_stats_ptr") is not None
    if sink and named_args.get("r_ptr") is not None:
        return 2
    return int(sink or launch_has("fwd", named_args, "norm"))


def dropout_sites(named_args: dict) -> int:
    """Which dropout tile lists a launch takes: 0 (no mask), 1 (the branch mask alone: the gated
    single-mask variants), or 2 (the MLP block's hidden mask, alone or with the branch mask). The
    hidden mask alone was not gated as a variant of its own: it takes the two-mask list, the
    heavier combination's, conservatively."""
    if named_args.get("a_drop_seed_ptr") is not None:
        return 2
    return 1 if named_args.get("drop_seed_ptr") is not None else 0


def prune_for(kind: str):
    """``early_config_prune`` for ``triton.autotune``: keep :func:`launch_shipped_configs`."""
    def prune(configs, named_args, **kwargs):
        keep = {id(c) for c in launch_shipped_configs(kind, {**kwargs, **named_args})}
        return [c for c in configs if id(c) in keep] or configs[-1:]
    return prune


# Which launch argument carries the GEMM's dtype, and which the A and B tiles of its pipelined
# loop are loaded from, per kernel (the projection's loop loads the same dtypes).
_GEMM_DTYPE_FROM = {"fwd": "w_ptr", "dx": "w_ptr", "dw": "dw_ptr"}
_GEMM_TILES_FROM = {"fwd": ("x_ptr", "w_ptr"), "dx": ("g_ptr", "w_ptr"), "dw": ("x_ptr", "g_ptr")}


@functools.lru_cache(maxsize=4096)
def interpreter_config(kind: str, M: int, D: int) -> triton.Config:
    """One config per size for the interpreter, where cost is per program and per loop trip,
    almost regardless of tile size: the largest tiles that the problem fills, up to 128."""
    def fit(n):
        return max(16, min(128, next_pow2_bucket(max(n, 1))))
    rows, cols, red = _TILE_NAMES[kind]
    group = GROUP_NAME[kind]
    sizes = {"BLOCK_M": fit(M), "BLOCK_N": fit(D), "BLOCK_K": fit(D)}
    return triton.Config({rows: sizes[rows], cols: sizes[cols], red: sizes[red], group: GROUP},
                         num_warps=4, num_stages=1)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


# PyTorch's two switches for fp32 matmuls: the newer per-backend one (torch.backends.cuda.matmul.
# fp32_precision, which inherits "none" from the generic torch.backends.fp32_precision) and the
# legacy torch.set_float32_matmul_precision. The legacy getter raises once the newer switch has
# been used ("mix of the legacy and new APIs"), while every setter, legacy ones included ('highest'
# -> "ieee", 'high'/'medium' -> "tf32", allow_tf32), writes the newer switch, and its getter
# returns the resolved value without raising (torch 2.11-2.15; aten Context::float32Precision).
# cuBLAS uses TF32 exactly when that value is "tf32".
_fp32_precision_getter = getattr(torch._C, "_get_fp32_precision_getter", None)
_legacy_matmul_precision = torch._C._get_float32_matmul_precision


def fp32_matmul_precision() -> str:
    """``"tf32"`` or ``"ieee"``: whether an fp32 GEMM may use TF32 tensor cores now, as cuBLAS
    decides it for ``nn.Linear`` on CUDA: ``torch.backends.cuda.matmul.fp32_precision`` resolved
    (it follows the generic ``torch.backends.fp32_precision`` where it is "none", and
    ``torch.set_float32_matmul_precision`` writes it: 'highest' is IEEE, 'high' and 'medium'
    allow TF32). Never raises, whichever of the APIs (or both) a program used. The one reader of
    the setting: the launch plans' keys, :func:`gemm_flags` and the stack's operand class call it."""
    if _fp32_precision_getter is not None:
        return "tf32" if _fp32_precision_getter("cuda", "matmul") == "tf32" else "ieee"
    return "ieee" if _legacy_matmul_precision() == "highest" else "tf32"     # a torch without the newer switch


@contextlib.contextmanager
def fp32_matmul_precision_set(precision: str | None):
    """Within the block, fp32 GEMMs run at ``precision`` (``"tf32"`` or ``"ieee"``; None: leave
    it), set through the API the program already uses: the legacy one while its getter still
    answers (so that the program's own legacy calls keep working), else the newer switch; both
    are restored after. The gate, the GPU check and the tests set the precision through this."""
    if precision is None:
        yield
        return
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"precision {precision!r}: 'tf32' or 'ieee'")
    saved = _fp32_precision_getter("cuda", "matmul") if _fp32_precision_getter is not None else None
    generic = _fp32_precision_getter("generic", "all") if _fp32_precision_getter is not None else None
    # "none" (inherit the generic switch) where the saved value was the inherited one, so that a later
    # change of the generic switch still reaches cuBLAS and fusedres
    restore = "none" if saved is not None and (saved == "none" or saved == generic) else saved
    try:
        legacy = _legacy_matmul_precision()
    except RuntimeError:
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")
    else:
        torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        if restore is not None and (restore == "none" or _fp32_precision_getter("cuda", "matmul") != restore):
            torch.backends.cuda.matmul.fp32_precision = restore


def gemm_flags(gemm_dtype: torch.dtype, *io_dtypes: torch.dtype) -> dict:
    """Numerics constexprs: accumulator dtype, tf32 or not, and bf16 emulation.

    fp32 GEMMs follow torch's fp32 matmul precision (:func:`fp32_matmul_precision`: IEEE fp32 by
    default, tf32 where allowed), the rule nn.Linear follows on CUDA. fp64 accumulates in fp64
    (Triton cannot compile an fp64 dot into an fp32 accumulator); everything else in fp32.
    ``io_dtypes`` are the dtypes of the other operands and outputs: any bf16 among them needs the
    emulation.
    """
    tf32 = gemm_dtype == torch.float32 and fp32_matmul_precision() == "tf32"
    return dict(
        ACC_DTYPE=tl.float64 if gemm_dtype == torch.float64 else tl.float32,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        EMULATE_BF16=INTERPRET and torch.bfloat16 in (gemm_dtype, *io_dtypes),
    )


# Triton's Autotuner keeps per-launch state on the shared object (``nargs``) and the interpreter
# patches ``triton.language`` for the duration of a launch: neither is safe across Python threads.
# Launches are asynchronous on a GPU, so holding a lock across the launch call costs little.
_launch_lock = _common._launch_lock


def autotune_key(tuned, args: tuple, kwargs: dict) -> tuple:
    """The key Triton's ``Autotuner.run`` files a launch under: the values of its ``key``
    arguments, then the dtype of every tensor argument in signature order."""
    named = {**dict(zip(tuned.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuned.arg_names}
    key = [named[k] for k in tuned.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device and its current stream, whatever device the
    pointers are on: make that the tensor's device (and so its current stream). A no-op off CUDA.
    Every launch's first call enters here, so a GPU older than the kernels support is refused
    here with a clear error (:func:`fusedres.kernels.device.cuda_limits`), before Triton sees it."""
    if device.type != "cuda":
        return _NO_GUARD
    _device.cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.device(device)


def jit_run_kwargs(fn, kwargs: dict) -> dict:
    """``kwargs`` plus the options ``JITFunction.run`` adds before it binds (triton 3.7-3.9); the
    cache key depends on them and on their order. The capture guard and the compile gate
    (``fusedres.aot``) both bind through this."""
    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", fn.debug) or triton.knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(triton.knobs.compilation, name):
            kw[name] = getattr(triton.knobs.compilation, name)
    return kw


def jit_function(kernel):
    """The JITFunction under an Autotuner/Heuristics chain; None for the interpreter's functions."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = getattr(fn, "fn", None)
        if fn is None:
            return None
    return fn


def compiled_kernel(kernel, args: tuple, kwargs: dict):
    """The compiled kernel ``kernel[grid](*args, **kwargs)`` would launch on the current device,
    looked up as ``JITFunction.run`` looks it up (triton 3.7-3.9): binder -> specialisation
    (dtypes, 16-divisibility, constexprs) + options -> cache key -> the device's kernel cache.
    None when it is not compiled yet; False when it cannot tell (the interpreter, a stage
    inspection hook, or unknown Triton internals)."""
    fn = jit_function(kernel)
    caches = getattr(fn, "device_caches", None)
    if caches is None or getattr(triton.knobs.runtime, "add_stages_inspection_hook", None) is not None:
        return False
    try:
        entry = caches.get(_triton_driver.active.get_current_device())   # .get: do not create one
        if entry is None:
            return None
        kernel_cache, kernel_key_cache, _target, _backend, binder = entry
        _bound, specialization, options = binder(*args, **jit_run_kwargs(fn, kwargs))
        key = triton.runtime.jit.compute_cache_key(kernel_key_cache, specialization, options)
    except (AttributeError, TypeError, ValueError):
        return False
    return kernel_cache.get(key)


def jit_compiled(kernel, args: tuple, kwargs: dict) -> bool | None:
    """Whether ``kernel[grid](*args, **kwargs)`` finds its compiled specialisation in the JIT
    cache of the current device (:func:`compiled_kernel`). None when it cannot tell."""
    found = compiled_kernel(kernel, args, kwargs)
    return None if found is False else found is not None


def _capturing(device: torch.device) -> bool:
    # (torch.cuda.is_available() costs about 14 us on a machine without CUDA: this runs on a
    # signature's first launch only; prepared launches skip it on the CPU, where nothing captures)
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_capture_safe(kind: str, kernel, args: tuple, kwargs: dict, tuned=None) -> None:
    """Nothing may autotune or compile during CUDA-graph capture: autotuning launches every
    candidate several times, and compiling loads a module, which CUDA refuses under the default
    (global) capture mode. So the tuned choice and the exact compiled specialisation must exist.
    ``tuned``: the Autotuner when the launch goes through it (``kernel`` is then the same)."""
    if not _capturing(args[0].device):
        return
    if tuned is not None:
        key = autotune_key(tuned, args, kwargs)
        config = tuned.cache.get(key) if len(tuned.configs) > 1 else tuned.configs[0]
        if config is None:
            raise RuntimeError(
                f"fusedres: the {kind} kernel would autotune during CUDA-graph capture (key {key}). Run "
                "fusedres.warmup(model, example_inputs) before capturing (or fusedres.load_tuning(path), then "
                "warmup).")
        kwargs = {**kwargs, **config.all_kwargs()}       # what Autotuner.run passes to the JIT function
    if jit_compiled(kernel, args, kwargs) is False:
        raise RuntimeError(
            f"fusedres: the {kind} kernel would compile during CUDA-graph capture: this exact specialisation "
            "(dtypes, flags such as alpha or projection, sizes and strides divisible by 16 or not) was never "
            "launched on this device. Run fusedres.warmup(model, example_inputs) with the inputs you capture "
            "with, in the same autocast and grad mode, before capturing.")


# Per-signature launch plans (fusedres.op's) hold PreparedLaunch objects, which fix a config, a grid
# and a split: anything that changes those choices clears them here.
_prepared_caches: list = []


def register_prepared_cache(cache: dict) -> dict:
    """Register a dict of prepared launches that :func:`clear_prepared` empties."""
    _prepared_caches.append(cache)
    return cache


def clear_prepared() -> None:
    """Forget every prepared launch: the next call of each signature plans and launches afresh.
    Called when a config override, a forced split, loaded tuning, the backend or the validate
    mode changes."""
    for cache in _prepared_caches:
        cache.clear()


#: ``(kind, named launch arguments) -> triton.Config``, or None: when set, it picks the config of
#: every single-block launch that has none, on a GPU and in the interpreter alike (no autotuning).
_config_override = None


@contextlib.contextmanager
def config_override(choose):
    """Within the block, ``choose(kind, named_args)`` gives every launch its config (tests pin
    small tiles with it on both kinds of machine; :func:`pin_configs` uses it)."""
    global _config_override
    saved, _config_override = _config_override, choose
    clear_prepared()
    try:
        yield
    finally:
        _config_override = saved
        clear_prepared()


def pinned_config(kind: str, named_args: dict) -> triton.Config:
    """One config per kernel, operand dtypes, row layout and device: the first that the
    autotuner's prune keeps (the largest tile that fits the device), so a GPU compiles each
    variant once and benchmarks nothing."""
    return launch_shipped_configs(kind, named_args)[0]


def pin_configs():
    """Context manager: every single-block launch takes :func:`pinned_config` (``FUSEDRES_PIN_CONFIGS=1``
    in the test suite; ``python -m bench --gpu-check``)."""
    return config_override(pinned_config)


def run_kernel(kernel, grid, args: tuple, kwargs: dict):
    """``kernel[grid](*args, **kwargs)``: the one place where a fusedres launch enters Triton.
    ``python -m bench``'s host-time measurement replaces it with a no-op on a CPU, to time the
    host work around the launch without the interpreter's device work."""
    return kernel[grid](*args, **kwargs)


def resolve_config(tuned, kind: str, args, consts: dict, M: int, D: int) -> triton.Config | None:
    """The config :func:`launch` would give a launch that has none: the override's, else the
    interpreter's per-size one; None where it would autotune (a GPU)."""
    if _config_override is not None:
        config = _config_override(kind, {**dict(zip(tuned.arg_names, args)), **consts})
        if config is not None:
            return config
    return interpreter_config(kind, M, D) if INTERPRET else None


def launch_and_prepare(kernel, tuned, kind: str, grid, args, consts: dict, M: int, D: int, config=None,
                       n_head: int = 0) -> "PreparedLaunch":
    """Launch ``kernel`` with ``config``, or the autotuned ``tuned`` on a GPU, or the interpreter's
    per-size config when interpreting; on the device of the first argument. Returns the launch it
    made as a :class:`PreparedLaunch` (its ``config``: after autotuning the chosen one, not the
    last one benchmarked) whose first ``n_head`` arguments (the tensors and the per-call scalars)
    are given at each later call."""
    if config is None and _config_override is not None:
        config = _config_override(kind, {**dict(zip(tuned.arg_names, args)), **consts})
    if config is None and INTERPRET:
        config = interpreter_config(kind, M, D)
    with _launch_lock, device_guard(args[0].device):
        if config is None:
            _check_capture_safe(kind, tuned, args, consts, tuned=tuned)
            run_kernel(tuned, grid, args, consts)
            config = tuned.best_config       # set by Autotuner.run for the launch it makes (3.7-3.9)
            kw = {**consts, **config.all_kwargs()}      # what Autotuner.run passed to the JIT function
        else:
            kw = {**consts, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
            _check_capture_safe(kind, kernel, args, kw)
            run_kernel(kernel, grid, args, kw)
    record_launch("residual_" + kind)
    return PreparedLaunch(kernel, kind, grid(kw) if callable(grid) else grid, args, kw, n_head, config)


_launch_counts = _common._launches


def _hooked(hook) -> bool:
    """Whether a launch hook would run: triton 3.7-3.9 keep an empty ``HookChain`` there, which
    ``JITFunction.run`` passes along and the launcher calls to no effect; anything else (a chain
    with calls, a plain function) is a real hook."""
    return hook is not None and getattr(hook, "calls", True) != []


def _current_stream(device_index: int) -> int:
    """The raw current CUDA stream of a device, as ``JITFunction.run`` gets it (torch's, through
    Triton's driver)."""
    return _triton_driver.active.get_current_stream(device_index)


class PreparedLaunch:
    """A launch whose config, grid and trailing arguments (sizes, strides, flags) are fixed, as they
    are for every call with one input signature (shapes, strides, dtypes, devices, flags): only the
    first ``n_head`` arguments (tensors, and a scalar such as ``alpha_value``) change per call.

    Calling it skips what :func:`launch` repeats per call: config resolution, the autotuner's key,
    the grid function and the keyword merge. On a GPU it also skips Triton's JIT binder and cache
    key: from its second call it calls the compiled kernel's launcher directly (the
    ``CompiledKernel.run`` call ``JITFunction.run`` makes, triton 3.7-3.9), on the current stream
    of the tensors' device. It falls back to ``kernel[grid]`` (which finds or compiles the right
    specialisation) when a tensor's 16-byte alignment differs from the compiled one's (Triton
    specialises pointers on it), or while a launch hook is installed (profilers use them; without
    one it passes no hooks and no launch metadata, which the launcher then skips). The
    compiled kernel is the one ``kernel[grid]`` compiled for these arguments, so the compile
    gate's signatures stay the ones that run.
    """
    __slots__ = ("kernel", "kind", "grid", "tail", "kwargs", "config", "n_head", "device", "compiled",
                 "aligned", "const_tail", "grid3")

    def __init__(self, kernel, kind: str, grid: tuple, args: tuple, kwargs: dict, n_head: int, config):
        self.kernel, self.kind, self.grid, self.kwargs, self.config = kernel, "residual_" + kind, grid, kwargs, config
        self.n_head, self.tail = n_head, tuple(args[n_head:])
        device = args[0].device
        self.device = device.index if device.type == "cuda" else None
        if self.device is None and device.type == "cuda":
            self.device = torch.cuda.current_device()
        self.compiled = None
        self.grid3 = (tuple(grid) + (1, 1))[:3]
        fn = jit_function(kernel)
        names = fn.arg_names if fn is not None else getattr(kernel, "arg_names", [])
        # the JIT binder's bound arguments in signature order: constexprs too (the launcher skips them)
        self.const_tail = tuple(kwargs[n] for n in names[len(args):]) if fn is not None else ()
        self.aligned = None

    def __call__(self, *head) -> None:
        self.run(head)

    def run(self, head: tuple) -> None:
        """``self(*head)``, without packing the arguments again."""
        args = head + self.tail
        if self.device is None:
            with _launch_lock:
                run_kernel(self.kernel, self.grid, args, self.kwargs)
                _launch_counts[self.kind] += 1      # record_launch, under the lock already held
        else:
            self._launch_cuda(head, args)
            record_launch(self.kind)

    def _launch_cuda(self, head: tuple, args: tuple) -> None:
        knobs = triton.knobs.runtime
        aligned = tuple(t.data_ptr() % 16 == 0 for t in head if isinstance(t, torch.Tensor))
        compiled = self.compiled
        if (compiled is None or aligned != self.aligned or _hooked(knobs.launch_enter_hook)
                or _hooked(knobs.launch_exit_hook)):
            with _launch_lock, device_guard(torch.device("cuda", self.device)):
                _check_capture_safe(self.kind, self.kernel, args, self.kwargs)
                run_kernel(self.kernel, self.grid, args, self.kwargs)
                if compiled is None:
                    found = compiled_kernel(self.kernel, args, self.kwargs)
                    if found:
                        self.compiled, self.aligned = found, aligned
            return
        g0, g1, g2 = self.grid3
        run = compiled.run
        if torch.cuda.current_device() == self.device:
            run(g0, g1, g2, _current_stream(self.device), compiled.function, compiled.packed_metadata, None,
                None, None, *args, *self.const_tail)
        else:
            with torch.cuda.device(self.device):
                run(g0, g1, g2, _current_stream(self.device), compiled.function, compiled.packed_metadata, None,
                    None, None, *args, *self.const_tail)


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


def stack_operand_class(dtype: torch.dtype, activations: torch.dtype | None = None) -> str:
    """The operand class of a stack whose weights are ``dtype`` (and activations
    ``activations``, default the same), under the current fp32 matmul precision (see
    :func:`gemm_flags`). 16-bit weights beside fp32 activations (autocast) are ``"autocast"``."""
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "ieee" if gemm_flags(dtype)["INPUT_PRECISION"] == "ieee" else "tf32"
    if activations is not None and activations.itemsize > dtype.itemsize:
        return "autocast"
    return "16bit"


# Under autocast the stack carries fp32 activations beside 16-bit weights: the fp32 x, g and
# saved tiles cost registers the 16-bit entries had free. Compile gate on triton 3.7.1, 3.8.0 and
# 3.9.0, autocast-bf16 and autocast-fp16, both variants of each kernel: the "16bit" entries spill
# in the backward at D = 32 (sm_80 and sm_90: 96-344 B), 64 and 128 (sm_80: 8-388 B; sm_90 at 128:
# 16-184 B), at D = 16 on sm_80 (32 B, 3.7.1 and 3.9.0), and in the forward at D = 64 on sm_80.
# These entries, found with the sweep rule above, compile clean on all three releases; every
# other (width, arch) keeps its 16-bit entry.
STACK_AUTOCAST: dict[tuple[str, str], dict] = {
    ("stack_fwd", "sm_80"): {64: (128, 8, 3)},
    ("stack_bwd", "sm_80"): {16: (32, 4, 2, 16), 32: (128, 8, 2, 16), 64: (64, 4, 2, 16), 128: (16, 4, 2, 64)},
    ("stack_bwd", "sm_90"): {32: (128, 8, 2, 32), 128: (64, 8, 2, 32)},
}


# Per triton release, the stack entries that differ from the lists above: (kernel, arch) ->
# operand class ("autocast" for fp32 activations beside 16-bit weights, over STACK_AUTOCAST; a
# "16bit" entry also reaches autocast where STACK_AUTOCAST has none) -> {width: tile}; the
# reduce's entry is (BLOCK, warps). Found with the same sweep
# and rule as above, on that release's compiler, where the 3.9 entry spills:
# - triton 3.7.1 (ptxas 12.8): fwd ieee sm_90 D=64 (64, 4, 3) spills 168-1888 B and D=128
#   (32, 16, 3) 4296 B; bwd tf32 sm_90 D=64 (128, 8, 2, 64) 48-96 B, D=128 (32, 4, 2, 16) 80 B;
#   bwd ieee sm_80 D=16 (64, 4, 2, 16) 16 B; the reduce at 4 warps spills 20 B on sm_80 (fp32).
# - triton 3.8.0: fwd ieee sm_90 D=32 (128, 4, 2) 40 B, D=64 (64, 4, 3) 1624-1888 B, D=128
#   (32, 16, 3) 2320-4240 B; bwd tf32 sm_90 D=64 (128, 8, 2, 64) 64 B, D=128 (32, 4, 2, 16) 24 B.
# - triton 3.6.0 (ptxas 12.8; 12.9 for sm_120), every variant of each kernel, each dtype of the
#   class: fwd 16bit sm_80 D=64 (128, 4, 3) 8-48 B (fp16 and bf16 train; 2 stages 8 B);
#   sm_90 D=128 (128, 8, 3) 296 B (bf16 train) and 48 B under autocast (both mixes, train): every
#   128-row tile spills, 64 rows at 4 warps load scalars; ieee sm_90 D=32 (128, 4, 2) 8 B
#   (inference; 3 stages are clean here), D=128 (32, 16, 3) 2484 B (inference). bwd (atomic) D=16
#   16bit (128, 4, 2, 16) 8 B on sm_80 (bf16), sm_86 and sm_89 (fp16); sm_120 compiles it clean,
#   so its entry restates it against the sm_80 key; tf32 D=16 8 B on sm_80 (128, 4, 1, 16), sm_86,
#   sm_89 and sm_120 (each 4-warp tile spills 8-16 B there); tf32 sm_90 D=64 (128, 8, 2, 64)
#   136-144 B, D=128 (32, 4, 2, 16) 80 B; autocast sm_90 D=128 (64, 8, 2, 32) 8 B
#   (deterministic, both mixes); the reduce at 4 warps 20 B on sm_80 (fp32, tf32).
STACK_BY_TRITON: dict[tuple[int, int], dict[tuple[str, str], dict]] = {
    (3, 7): {
        ("stack_fwd", "sm_90"): {"ieee": {64: (64, 8, 3), 128: (32, 8, 3)}},
        ("stack_bwd", "sm_90"): {"tf32": {64: (128, 8, 1, 16), 128: (32, 8, 2, 128)}},
        ("stack_bwd", "sm_80"): {"ieee": {16: (128, 8, 2, 16)}},
        ("stack_reduce", "sm_80"): (STACK_REDUCE_BLOCK, 8),
    },
    (3, 8): {
        ("stack_fwd", "sm_90"): {"ieee": {32: (128, 8, 3), 64: (64, 8, 2), 128: (16, 16, 2)}},
        ("stack_bwd", "sm_90"): {"tf32": {64: (128, 8, 1, 64), 128: (32, 8, 2, 128)}},
    },
    (3, 6): {
        ("stack_fwd", "sm_80"): {"16bit": {64: (128, 4, 1)}},
        ("stack_fwd", "sm_90"): {"16bit": {128: (64, 8, 3)}, "ieee": {32: (128, 4, 3), 128: (64, 8, 3)}},
        ("stack_bwd", "sm_80"): {"16bit": {16: (128, 4, 3, 16)}, "tf32": {16: (128, 4, 2, 16)}},
        ("stack_bwd", "sm_86"): {"16bit": {16: (128, 4, 1, 16)}, "tf32": {16: (128, 8, 2, 16)}},
        ("stack_bwd", "sm_89"): {"16bit": {16: (128, 4, 1, 16)}, "tf32": {16: (128, 8, 2, 16)}},
        ("stack_bwd", "sm_120"): {"16bit": {16: (128, 4, 2, 16)}, "tf32": {16: (128, 8, 2, 16)}},
        ("stack_bwd", "sm_90"): {"tf32": {64: (128, 8, 1, 16), 128: (32, 8, 2, 128)},
                                 "autocast": {128: (64, 8, 2, 16)}},
        ("stack_reduce", "sm_80"): (STACK_REDUCE_BLOCK, 8),
    },
    # triton 3.9.0, sm_86 and sm_89 (ptxas 12.9): fwd ieee D=32 (128, 4, 2) spills 32 B (train)
    (3, 9): {
        ("stack_fwd", "sm_86"): {"ieee": {32: (128, 8, 2)}},
        ("stack_fwd", "sm_89"): {"ieee": {32: (128, 8, 2)}},
    },
}


# The 99 KB parts (sm_86, sm_89, sm_120: RTX 30/40/50, A10, A40, L4, L40S) take the sm_80 entries
# (mma.sync parts, like the A100), except where those need more shared memory than the 101376 B
# such a part allows (compile gate, triton 3.7.1): the forward at D = 128 in fp32 holds 2 of 3
# stages of the [128, 128] fp32 weight, 147456 B at (32, 8, 3); at 2 stages 81920 B.
STACK_SMALL_SMEM: dict[str, dict] = {
    "stack_fwd": {"ieee": {128: (32, 8, 2)}, "tf32": {128: (32, 8, 2)}},
}


# Entries of the mma.sync parts that differ from the sm_80 table on their own arch, where ptxas
# spills the sm_80 entry (compile gate, triton 3.7.1: ptxas 12.8 for sm_86/sm_89, 13.1 for sm_120;
# replacements from the sweep rule above, every variant of the kernel, both 16-bit dtypes where the
# class has two): (kernel, arch) -> operand class ("autocast" for fp32 activations beside 16-bit
# weights) -> {width: tile}. Applied on every release; a release's own findings go in
# STACK_BY_TRITON under the same (kernel, arch) key.
# - sm_86, sm_89: fwd 16-bit D=64 (128, 4, 3) spills 260 B (bf16 train).
# - sm_120: fwd 16-bit D=64 (128, 4, 3) 16 B (fp16 inference); autocast D=16 (128, 4, 3) 16 B;
#   ieee D=128 (32, 8, 2) 5692 B: only 16 rows at 16 warps compile clean; bwd tf32 D=128
#   (16, 4, 2, 32) 80 B (atomic).
STACK_BY_ARCH: dict[tuple[str, str], dict] = {
    ("stack_fwd", "sm_86"): {"16bit": {64: (128, 8, 3)}},
    ("stack_fwd", "sm_89"): {"16bit": {64: (128, 8, 3)}},
    ("stack_fwd", "sm_120"): {"16bit": {64: (128, 4, 2)}, "autocast": {16: (128, 4, 2)}, "ieee": {128: (16, 16, 2)}},
    ("stack_bwd", "sm_120"): {"tf32": {128: (16, 4, 2, 16)}},
}


#: The oldest triton whose compiler the narrow stack's kernels ship for: every supported release.
#: triton 3.6.0 (torch 2.11's) compiled the 16-bit backward with scalar 16-bit global loads until
#: the launcher's alignment reached it as a ``tl.multiple_of`` hint, and spilled 8-2484 B in 27
#: compiles of the shipped entries (full product, sm_80-sm_120, every default dtype): its own
#: entries are in STACK_BY_TRITON[(3, 6)].
#: On an older triton the stack's launches are refused on a GPU; the single blocks and the MLP
#: block are unaffected.
STACK_MIN_TRITON = (3, 6)


def stack_supported(version: tuple[int, int] | None = None) -> bool:
    """Whether triton ``version`` (default: the installed one) ships the narrow stack's kernels."""
    return (version or TRITON_VERSION) >= STACK_MIN_TRITON


def stack_table_arch(capability: tuple[int, int] | None) -> str:
    """Which of the stack's tables a GPU of ``capability`` takes: ``"sm_90"`` for the wgmma
    parts (Hopper) and Blackwell datacenter parts (10.x) and the interpreter (None); ``"sm_80"``
    for the mma.sync parts: Ampere, Ada and the consumer Blackwell parts (12.x)."""
    return "sm_90" if capability is None or capability[0] in (9, 10) else "sm_80"


def stack_config(kind: str, D: int, operands: str = "16bit", capability: tuple[int, int] | None = None,
                 version: tuple[int, int] | None = None, limits: DeviceLimits | None = None) -> triton.Config:
    """The shipped config of a stack kernel (``"stack_fwd"``, ``"stack_bwd"``, ``"stack_reduce"``)
    at width ``D`` for an operand class (:func:`stack_operand_class`) on a GPU with ``limits``
    (or of compute ``capability``; neither: the sm_90 entries, which the interpreter also uses),
    as triton ``version`` (default: the installed one) ships it. A part with less shared memory
    per block than the A100's takes :data:`STACK_SMALL_SMEM`'s entries."""
    if limits is None and capability is not None:     # a capability alone: that arch's recorded limits
        limits = DeviceLimits(gate_arch(capability), tuple(capability),
                              _device.SHARED_PER_BLOCK.get(tuple(capability), _device.SHARED_PER_BLOCK[(8, 6)]), 1)
    return _stack_config(kind, D, operands, limits, version or TRITON_VERSION)


@functools.lru_cache(maxsize=1024)
def _stack_config(kind: str, D: int, operands: str, limits: DeviceLimits | None,
                  version: tuple[int, int]) -> triton.Config:
    capability = limits.capability if limits is not None else None
    arch = stack_table_arch(capability)
    sm80 = arch == "sm_80"
    small = limits is not None and limits.shared_per_block < _device.SHARED_PER_BLOCK[(8, 0)]
    overrides = STACK_BY_TRITON.get(version, {})
    if kind == "stack_reduce":
        block, warps = overrides.get((kind, arch), (STACK_REDUCE_BLOCK, STACK_REDUCE_WARPS))
        return triton.Config({"BLOCK": block}, num_warps=warps, num_stages=1)
    mixed = operands == "autocast"
    if mixed:
        operands = "16bit"
    own = gate_arch(capability) if capability is not None else arch     # sm_86, sm_89, sm_120, ...
    cls = "autocast" if mixed else operands
    release = {**overrides.get((kind, arch), {}).get(operands, {}),
               **(STACK_AUTOCAST.get((kind, arch), {}) if mixed else {}),
               **(overrides.get((kind, arch), {}).get("autocast", {}) if mixed else {}),
               **(STACK_SMALL_SMEM.get(kind, {}).get(operands, {}) if small and not mixed else {}),
               **(STACK_BY_ARCH.get((kind, own), {}).get(cls, {}) if own != arch else {}),
               **(overrides.get((kind, own), {}).get(cls, {}) if own != arch else {})}
    if kind == "stack_fwd":
        tiles = {**STACK_FWD_TILES[operands], **(STACK_FWD_TILES_SM80[operands] if sm80 else {}), **release}
        m, w, s = tiles[D]
        return triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
    if kind == "stack_bwd":
        tiles = {**STACK_BWD_TILES[operands], **(STACK_BWD_TILES_SM80[operands] if sm80 else {}), **release}
        m, w, s, cols = tiles[D]
        return triton.Config({"BLOCK_M": m, "DW_COLS": cols}, num_warps=w, num_stages=s)
    raise ValueError(f"unknown stack kernel {kind!r}")
