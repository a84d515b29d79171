"""Launch plans: how many programs each single-block kernel launches, in how many waves, and how
full those waves keep the GPU; and, for dW, how many ways its M reduction is split.

Pure Python (no torch autograd, no Triton launch). The launchers call these functions (the dW
launcher takes its split count from :func:`plan_dw`), and so does ``python -m bench --plan``:
there is one copy of the rule.

Every figure assumes **one resident program per SM** (occupancy is not modelled):
``waves = cdiv(programs, SMs)`` and ``fill = programs / (waves * SMs)``.

The interpreter has no SMs: it plans for :data:`INTERPRETER_SMS` = 1, so that behaviour there is
deterministic and every kernel's grid already "fills" it: the interpreter never splits dW on its
own. Tests force a split count with :func:`forced_splits` (or ``residual_dw(..., splits=S)``).
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch
import triton

from . import configs as _configs
from . import device as _device
from ._common import cdiv

#: SM counts of the GPUs the plan can be asked about by name (NVIDIA datasheets: H100 SXM5 132,
#: A100 108, H200 132).
GPU_SMS = {"h100": 132, "a100": 108, "h200": 132}
#: The stand-in SM count where there is no GPU (the interpreter, or a CPU tensor).
INTERPRETER_SMS = 1
#: A split of the dW reduction keeps at least this many BLOCK_M row tiles: fewer would make the
#: partial slab's write and read (8 N K bytes per split) large against the rows it reduces.
MIN_TILES_PER_SPLIT = 4
#: The split-dW reduce kernel's one config: [BLOCK_R, BLOCK_C] fp32 tiles of the slab (compile gate: at
#: 4 warps sm_90 spills 44 B with a projection and tensor alpha, triton 3.7.1; 8 warps: 40-48 registers).
REDUCE_CONFIG = triton.Config({"BLOCK_R": 32, "BLOCK_C": 128}, num_warps=8, num_stages=1)
#: The reduce's configs: the plan takes the one with the best fill (ties: the first). The small tile
#: fills an H100 at D = 256 (128 programs where 32x128 makes 16). Both compile clean (gate: 31-48
#: registers, sm_80 and sm_90).
REDUCE_CONFIGS = (REDUCE_CONFIG, triton.Config({"BLOCK_R": 8, "BLOCK_C": 64}, num_warps=4, num_stages=1))
#: Reduce configs dropped on one arch (``configs.gate_arch``) for a dW element size: on sm_120 the
#: 32x128 tile spills 8 B with fp32 weights, a projection and a tensor alpha (ptxas 13.1, triton 3.7.1).
REDUCE_DROPPED_ON_ARCH = {"sm_120": {4: {(32, 128, 8)}}}


def reduce_configs(elem_size: int, limits=None) -> tuple:
    """The reduce configs a dW of ``elem_size``-byte weights may take on a device with ``limits``
    (None: no GPU): :data:`REDUCE_CONFIGS` less the arch's drops (none needs shared memory)."""
    if limits is None:
        return REDUCE_CONFIGS
    dropped = REDUCE_DROPPED_ON_ARCH.get(_configs.gate_arch(limits.capability), {}).get(elem_size, set())
    kept = tuple(c for c in REDUCE_CONFIGS
                 if (c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"], c.num_warps) not in dropped)
    return kept or REDUCE_CONFIGS[-1:]


class Plan(NamedTuple):
    """One kernel launch as planned. ``tiles_per_split``: dW's BLOCK_M row tiles per split (the
    last split may have fewer: it is ragged), 0 for the other kernels."""
    kernel: str
    programs: int
    splits: int
    waves: int
    fill: float
    tiles_per_split: int = 0


def waves_and_fill(programs: int, sms: int) -> tuple[int, float]:
    """``(cdiv(programs, sms), programs / (waves * sms))`` at one resident program per SM."""
    waves = max(1, cdiv(programs, sms))
    return waves, programs / (waves * sms)


def sm_count(device=None) -> int:
    """The SM count of a CUDA ``device`` (``multi_processor_count``), or of the recorded GPU a
    :func:`fusedres.kernels.device.simulated_device` block plans for; :data:`INTERPRETER_SMS`
    for any other device (CPU tensors in the interpreter)."""
    limits = _device.limits_for(torch.device(device)) if device is not None else None
    return limits.sms if limits is not None else INTERPRETER_SMS


def _plan(kernel: str, programs: int, splits: int = 1, sms: int = 1, tiles_per_split: int = 0) -> Plan:
    waves, fill = waves_and_fill(programs, sms)
    return Plan(kernel, programs, splits, waves, fill, tiles_per_split)


def plan_fwd(sms: int, M: int, N: int, K: int, config: triton.Config) -> Plan:
    """Forward: one program per [BLOCK_M, BLOCK_N] tile of y (``N`` output features; a projection
    does not widen the grid, it adds a second K loop)."""
    kw = config.kwargs
    return _plan("fwd", cdiv(M, kw["BLOCK_M"]) * cdiv(N, kw["BLOCK_N"]), sms=sms)


def plan_dx(sms: int, M: int, N: int, K: int, config: triton.Config) -> Plan:
    """dx: one program per [BLOCK_M, BLOCK_K] tile of dx (``K`` input features)."""
    kw = config.kwargs
    return _plan("dx", cdiv(M, kw["BLOCK_M"]) * cdiv(K, kw["BLOCK_K"]), sms=sms)


def dw_tiles(N: int, K: int, config: triton.Config, proj: bool = False) -> int:
    """dW's output tiles: cdiv(K, BLOCK_K) (twice that with a projection: dP's tiles) x cdiv(N, BLOCK_N)."""
    kw = config.kwargs
    return cdiv(K, kw["BLOCK_K"]) * (2 if proj else 1) * cdiv(N, kw["BLOCK_N"])


def _split_shape(row_tiles: int, splits: int) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` with every split non-empty: contiguous ranges of
    ``cdiv(row_tiles, splits)`` row tiles, the last one ragged."""
    splits = max(1, min(splits, row_tiles))
    per = cdiv(row_tiles, splits)
    return cdiv(row_tiles, per), per


def plan_dw(sms: int, M: int, N: int, K: int, config: triton.Config, *, proj: bool = False,
            splits: int | None = None) -> Plan:
    """dW (with dP, db and the dalpha partials): ``tiles = dw_tiles(...)`` output tiles, each
    reducing over ``R = cdiv(M, BLOCK_M)`` row tiles, split ``S`` ways (``programs = tiles * S``).

    The rule for ``S`` (``splits=None``):

    - ``tiles >= sms`` (at least one full wave already): ``S = 1``, today's single launch;
    - otherwise ``S`` is the value in ``1 .. min(cdiv(sms, tiles), R // MIN_TILES_PER_SPLIT)``
      with the best ``fill`` (ties: the smaller ``S``). So the programs make up to about one full
      wave (more splits would only add partial-slab traffic), and every split keeps at least
      :data:`MIN_TILES_PER_SPLIT` row tiles.

    Each split reduces ``cdiv(R, S)`` contiguous row tiles (the last split fewer); ``S`` is then
    the number of non-empty splits. ``splits`` forces ``S`` (capped at ``R``; tests use it)."""
    tiles = dw_tiles(N, K, config, proj)
    row_tiles = max(1, cdiv(M, config.kwargs["BLOCK_M"]))
    if splits is None:
        best = (-1.0, 1)
        if tiles < sms:
            for s in range(1, max(1, min(cdiv(sms, tiles), row_tiles // MIN_TILES_PER_SPLIT)) + 1):
                s_eff, _ = _split_shape(row_tiles, s)
                fill = waves_and_fill(tiles * s_eff, sms)[1]
                if fill > best[0] + 1e-12:
                    best = (fill, s)
        splits = best[1]
    s, per = _split_shape(row_tiles, splits)
    return _plan("dw", tiles * s, s, sms, per)


def reduce_programs(N: int, K: int, config: triton.Config, proj: bool = False) -> int:
    kw = config.kwargs
    return cdiv((2 if proj else 1) * N, kw["BLOCK_R"]) * cdiv(K, kw["BLOCK_C"])


def choose_reduce(sms: int, N: int, K: int, splits: int, *, proj: bool = False, candidates=REDUCE_CONFIGS):
    """``(config, plan)``: the reduce config of ``candidates`` (:func:`reduce_configs`) with the
    best fill (ties: the first)."""
    best = None
    for c in candidates:
        p = plan_reduce(sms, N, K, splits, proj=proj, config=c)
        if best is None or p.fill > best[1].fill + 1e-12:
            best = (c, p)
    return best


def plan_reduce(sms: int, N: int, K: int, splits: int, *, proj: bool = False,
                config: triton.Config = REDUCE_CONFIG) -> Plan:
    """The split-dW reduce: one program per [BLOCK_R, BLOCK_C] tile of the ``[N (2N with dP), K]``
    gradient, each summing the ``splits`` fp32 slabs in order (0 programs when ``splits == 1``:
    no reduce is launched)."""
    if splits <= 1:
        return Plan("dw_reduce", 0, 1, 0, 0.0)
    return _plan("dw_reduce", reduce_programs(N, K, config, proj), splits, sms)


def choose_dw(sms: int, M: int, N: int, K: int, candidates, *, proj: bool = False):
    """``(config, plan)`` of the candidate with the best dW fill (ties: the first, i.e. the
    largest tile of a shipped list)."""
    best = None
    for c in candidates:
        p = plan_dw(sms, M, N, K, c, proj=proj)
        if best is None or p.fill > best[1].fill + 1e-12:
            best = (c, p)
    return best


# ---------------------------------------------------------------------------------------------
# Forcing the split count (tests)

_forced = threading.local()


def forced_splits() -> int | None:
    """The split count :func:`force_splits` set in this thread, or None."""
    return getattr(_forced, "value", None)


@contextlib.contextmanager
def force_splits(splits: int):
    """Within the block, every dW launch in this thread splits its M reduction ``splits`` ways
    (capped at its row tiles; ``1``: never split), whatever the plan's rule says."""
    saved = forced_splits()
    _forced.value = splits
    _configs.clear_prepared()
    try:
        yield
    finally:
        _forced.value = saved
        _configs.clear_prepared()
