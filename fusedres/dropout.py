"""Dropout inside the blocks: a keep mask that is a pure function of (seed, row, column).

The kernels never read or write a mask. Each pass that needs it regenerates the bits it uses
(``kernels.gemm.dropout_multiplier``): the forward's epilogue (the branch) and A-tile prologue (the
MLP's hidden layer), dx's A tiles of ``g`` and its epilogue, dW's tiles. The mask depends on no
tile, split or config, so every pass, on every GPU and config, drops the same elements.

- **Where the seed comes from.** Each training call draws its seeds with ``torch.randint`` on the
  input's device, from torch's generator for that device: ``torch.manual_seed`` reproduces a run,
  and the draw is an ordinary kernel that reads torch's Philox (seed, offset) state on the device,
  so it needs no host sync and is safe under CUDA-graph capture (torch advances the graph's
  offset as for any random op). The kernels read the seed through a pointer. One 62-bit seed per
  dropout site (the MLP block's hidden and branch dropouts get one each).
- **The mask.** Element ``(m, n)`` of ``x.reshape(-1, D)``'s branch is kept iff ``u >= p``, ``u``
  word ``n % 4`` of Philox4x32-10 under the key ``seed`` and the counter ``(n // 4, m mod 2**32,
  m // 2**32, 0)`` (one draw serves four features), made a float in [0, 1) as Triton's
  ``uint_to_uniform_float`` makes it. A kept
  element is scaled by ``1 / (1 - p)``; a dropped one is multiplied by 0 (a NaN stays NaN, as in
  eager's ``x * mask * scale``). :func:`keep_mask` computes the same bits with torch ops: the
  tests check the kernels against it bit for bit, and the eager backend uses it.
- **What it costs.** No HBM byte: the mask is never in memory. Compute: one Philox draw per four
  elements per pass that needs it (dx and dW regenerate ``g``'s mask once per output tile column,
  as the GEMMs re-read ``g``).
- **Debugging.** :func:`record_dropout` records the seeds each fused call draws; its masks are
  the masks that call used, for parity against eager given the same mask.

Eval mode and ``p = 0`` draw no random numbers and launch the kernels without the piece.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

#: Seeds are drawn in [0, 2**62): a 64-bit Philox key, never negative.
SEED_BOUND = 2 ** 62


def check_p(p, who: str) -> float:
    """``p`` as a float, or the error ``nn.Dropout`` raises for a probability outside [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{who}: a dropout probability must be a float, got {type(p).__name__}")
    if p < 0 or p > 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def active(p: float, training: bool) -> bool:
    """Whether a dropout does anything: training with ``p > 0``."""
    return bool(training) and p > 0


def draw_seeds(n: int, device) -> Tensor:
    """``n`` seeds for one call, drawn from torch's generator on ``device`` (no host sync)."""
    return torch.randint(SEED_BOUND, (n,), dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=256)
def _params(p: float, acc: torch.dtype, device: torch.device) -> Tensor:
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    return torch.tensor([p, scale], dtype=acc, device=device)


def dropout_operands(seed: Tensor | None, p: float, like: Tensor) -> tuple:
    """The kernels' ``(seed, [p, 1 / (1 - p)])`` operands of one dropout site: ``seed`` a
    one-element int64 tensor (a view of the call's :func:`draw_seeds`), the parameters in the
    accumulator dtype of ``like`` (fp64 for fp64, else fp32: ``1 / (1 - p)`` rounded once, as
    eager's opmath scalar), made once per (p, dtype, device). ``seed`` None: no dropout."""
    if seed is None:
        return None, None
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    return seed, _params(float(p), acc, like.device)


# ---------------------------------------------------------------------------------------------
# The mask in torch ops (the eager backend's, and the kernels' check)

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` 32-bit words of ``a * b`` for a 32-bit constant ``a`` and uint32 values ``b``
    held in int64 (products split in 16-bit halves: nothing passes 2**63)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    u, t = a * b_hi, a * b_lo
    return (u + (t >> 16)) >> 16, (((u & 0xFFFF) << 16) + t) & _M32


def _philox(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, rounds: int = 10) -> tuple:
    """Philox4x32's four output words, as ``triton.language.random.philox_impl`` computes them."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uniform(seed: int, rows: int, cols: int, device=None, row_start: int = 0) -> Tensor:
    """The uniform ``u`` in [0, 1) (fp32) of rows ``row_start .. row_start + rows - 1`` and
    columns ``0 .. cols - 1`` under ``seed``: the kernels' draw, in torch ops (element ``(m, n)``
    is word ``n % 4`` of the draw at the counter ``(n // 4, m mod 2**32, m // 2**32, 0)``)."""
    groups = -(-cols // 4)
    r = torch.arange(row_start, row_start + rows, dtype=torch.int64, device=device)[:, None].expand(rows, groups)
    c = torch.arange(groups, dtype=torch.int64, device=device)[None, :].expand(rows, groups)
    words = _philox(int(seed), c, r & _M32, (r >> 32) & _M32, torch.zeros_like(r))
    bits = torch.stack(words, dim=-1).reshape(rows, 4 * groups)[:, :cols]
    signed = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=device)


def keep_mask(seed: int | Tensor, shape, p: float, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The keep mask (bool, ``shape``: ``(..., N)``, rows flattened as the kernels flatten them)
    of the seed ``seed`` and probability ``p`` for a block in ``dtype``: True where the element is
    kept. ``u >= p`` is compared in the kernels' accumulator dtype (fp64 for fp64, else fp32), as
    they compare it."""
    seed = int(seed.reshape(-1)[0].item()) if isinstance(seed, Tensor) else int(seed)
    *lead, N = shape
    M = 1
    for d in lead:
        M *= d
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = uniform(seed, M, N, device)
    return (u.to(acc) >= torch.tensor(p, dtype=acc, device=device)).reshape(*lead, N)


def apply_mask(t: Tensor, keep: Tensor, p: float) -> Tensor:
    """``t * keep * 1 / (1 - p)`` as eager's dropout computes it (``p = 1``: ``t * 0``)."""
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    return t * keep.to(t.dtype) * scale


# ---------------------------------------------------------------------------------------------
# The debug record


@dataclass(frozen=True)
class DropoutDraw:
    """One dropout site of one fused call: ``site`` (``"dropout"``: the branch; ``"hidden_dropout"``:
    the MLP's hidden layer), the drawn ``seed`` (a one-element tensor), the masked tensor's
    ``shape`` and ``p``."""
    site: str
    seed: Tensor
    shape: tuple
    p: float
    dtype: torch.dtype = torch.float32

    def mask(self) -> Tensor:
        """The keep mask this call used (bool, :attr:`shape`, on the seed's device)."""
        return keep_mask(self.seed, self.shape, self.p, self.seed.device, self.dtype)


class DropoutRecord:
    """What :func:`record_dropout` collects: ``draws``, one :class:`DropoutDraw` per dropout site
    of each fused call, in call order."""

    def __init__(self):
        self.draws: list[DropoutDraw] = []

    def masks(self, site: str | None = None) -> list[Tensor]:
        """The keep masks of every draw (of ``site`` only, if given), in call order."""
        return [d.mask() for d in self.draws if site is None or d.site == site]


_recording: list = []


@contextlib.contextmanager
def record_dropout():
    """Record the seeds every fused call inside draws, to get back the masks they used::

        with fusedres.record_dropout() as rec:
            y = block(x)
        keep = rec.masks("dropout")[0]      # bool, y's shape: y = x + alpha * z * keep / (1 - p)

    A debug tool (it reads the seeds back to the host when a mask is asked for); eager mode."""
    record = DropoutRecord()
    _recording.append(record)
    try:
        yield record
    finally:
        _recording.remove(record)


def note_draw(site: str, seed: Tensor, shape, p: float, dtype: torch.dtype) -> None:
    """Add a call's draw to every open :func:`record_dropout`."""
    for record in _recording:
        record.draws.append(DropoutDraw(site, seed, tuple(shape), float(p), dtype))
