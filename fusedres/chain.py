"""Chains of normalized blocks: block k+1's norm statistics come from block k's epilogue.

In a chain of fused blocks (:class:`fusedres.ResidualMLP`, an ``nn.Sequential`` of
:class:`fusedres.FusedResidualBlock` or :class:`fusedres.FusedResidualMLPBlock`, any forward that
passes one block's output straight to the next), a block whose norm needs batch statistics of its
input would otherwise read that input once more (the statistics pass of :mod:`fusedres.norm_op`).
Instead the previous block's forward GEMM emits them as it stores its output: per column tile
``(mean, M2)`` partials (the next norm is a BatchNorm) or per row over each column tile (a
LayerNorm or RMSNorm), combined in tile order with Chan's formula (``kernels.gemm.store_stats_partials``,
``kernels.norm.partial_stats``). The values are those of y as stored, so the next block
normalizes with the statistics of exactly its input; the backward is unchanged (it treats them as
the batch statistics of its x, and corrects dx for them).

How the blocks find each other, with no new argument in a user's model:

- a fused block notes a weak reference to itself against its output (:func:`produced`; a block
  that ``fusedres.fuse`` found by structure in someone else's module is known by its first
  Linear). The notes are weak dictionaries here keyed by the output tensor's identity: nothing is
  stored on the tensor, so an output pickles and saves as any tensor;
- a block with a norm whose input has such a note asks that producer to emit its norm's
  statistics from then on (:func:`link`): the links live in a weak dictionary here, not on the
  modules (a copy of a model is unlinked until its first call, a pickle carries nothing);
  :class:`fusedres.ResidualMLP` links its blocks when it is built, so its first call is chained
  too;
- a linked producer notes the statistics against its output (:func:`hand_over`), stamped with
  the output's version counter; the consumer takes them only if its input is that very tensor
  and its version is unchanged (:func:`handed_over`), and else runs the statistics pass.

One producer feeding norms of two kinds stops emitting (the link is marked conflicting). Under
``torch.compile``, under ``torch.inference_mode`` (its tensors have no version counter) and for
anything but a plain tensor, the chain is off: every block computes its own statistics, as without a chain.

The limit of the version check: a write that bypasses autograd's version counter is not seen.
Such writes are ``y.data.mul_(...)``, ``y.data = ...``, writes through ``y.numpy()`` or DLPack,
another tensor ``set_()`` onto y's storage, c10d's in-place collectives (``dist.all_reduce(y)``)
and a custom kernel writing y outside the dispatcher. A model that changes a block's output in one
of those ways before the next block reads it must turn chains off: :func:`set_enabled` (False),
or ``FUSEDRES_CHAIN=0`` in the environment.
"""
from __future__ import annotations

import os
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

#: producer (a fused block, or the first Linear of a block fused by structure) -> the next norm's
#: kind it emits statistics for, or CONFLICT
_LINKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: output tensor -> weak reference to the block that produced it
_PRODUCER = WeakIdKeyDictionary()
#: output tensor -> the next norm's statistics of it (:class:`Handover`)
_HANDED = WeakIdKeyDictionary()
#: chains on (the default) or off: set_enabled, FUSEDRES_CHAIN=0
_ENABLED = os.environ.get("FUSEDRES_CHAIN", "1") != "0"
#: Whether a block with a norm has run in this process (until then no output needs a tag), and
#: whether any producer was ever linked: the plain block's hot path reads these two flags only
#: (:func:`in_use`).
_NORMS_SEEN = False
_ANY_LINK = False
#: A producer's link when norms of two kinds read its output: it emits nothing.
CONFLICT = "conflict"
_is_compiling = torch.compiler.is_compiling


def in_use(norm) -> bool:
    """Whether a block with ``norm`` may take part in a chain now (else its call is the plain one)."""
    return norm is not None or _ANY_LINK


class Handover(NamedTuple):
    """Batch statistics of a block's output for the next block's norm ``kind``: ``mean`` (None for
    RMSNorm) and ``var`` (the biased variance; RMSNorm's mean square), in the accumulator dtype,
    valid while the output's version counter is ``version``."""
    kind: str
    mean: Optional[Tensor]
    var: Tensor
    version: int


class ChainCall(NamedTuple):
    """What a block's call does in a chain: ``stats``, the ``(mean, var)`` handed over for its own
    norm (None: compute them), and ``next_norm``, the next norm's kind to emit (None: none)."""
    stats: Optional[tuple]
    next_norm: Optional[str]


def set_enabled(enabled: bool) -> bool:
    """Turn chains on or off for the process (returns the previous setting). Off, every block runs
    its own statistics pass, and nothing is noted against outputs."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def active(x) -> bool:
    """Whether chaining applies to this call: on, eager mode, a plain tensor outside inference
    mode (its version counter is what the hand-over is checked by)."""
    return _ENABLED and type(x) is Tensor and not _is_compiling() and not x.is_inference()


def next_norm(producer) -> Optional[str]:
    """The norm kind a producer emits statistics for (None: not linked; or :data:`CONFLICT`)."""
    return _LINKS.get(producer)


def emits(producer, training: bool) -> Optional[str]:
    """The norm kind whose statistics a linked producer emits in this mode, or None: none linked,
    a conflict, or a BatchNorm next after an eval-mode block (which uses its running statistics)."""
    nxt = _LINKS.get(producer)
    if nxt == CONFLICT or (nxt == "batch" and not training):
        return None
    return nxt


def set_next_norm(producer, kind: Optional[str]) -> None:
    """Link (``kind``), mark conflicting (:data:`CONFLICT`) or unlink (None) a producer."""
    global _ANY_LINK
    if kind is None:
        _LINKS.pop(producer, None)
    else:
        _LINKS[producer] = kind
        _ANY_LINK = True


def link(x: Tensor, consumer_kind: str) -> None:
    """The consumer side: ask the block that produced ``x`` (if any) to emit ``consumer_kind``'s
    statistics of its output from its next call on."""
    ref = _PRODUCER.get(x)
    producer = ref() if ref is not None else None
    if producer is None:
        return
    current = _LINKS.get(producer)
    if current != consumer_kind:
        set_next_norm(producer, consumer_kind if current is None else CONFLICT)


def handed_over(x: Tensor, kind: str) -> Optional[tuple]:
    """``(mean, var)`` its producer noted against ``x`` for a norm of ``kind``, if ``x``'s version
    is still the one they describe; else None."""
    h = _HANDED.get(x)
    if h is None or h.kind != kind or h.version != x._version:
        return None
    return h.mean, h.var


def produced(y: Tensor, producer) -> None:
    """Note a weak reference to the block against its output (made per call, not kept on the
    block: a copy or pickle of the block must not point at the original). Callers check
    ``_NORMS_SEEN`` first: no norm has run, no consumer can want the note."""
    if active(y):
        _PRODUCER[y] = weakref.ref(producer)


def hand_over(y: Tensor, kind: str, mean: Tensor, var: Tensor) -> None:
    """Note the next norm's statistics of ``y`` (``mean`` empty for RMSNorm) against it."""
    if active(y):
        _HANDED[y] = Handover(kind, mean if mean.numel() or kind != "rms" else None, var, y._version)


def call_for(producer, norm, x, training: bool, proj=None) -> Optional[ChainCall]:
    """A fused block's chain call for input ``x`` (None: no chain, the plain call): links ``x``'s
    producer to this block's ``norm``, takes the statistics handed over for it, and asks for the
    next norm's if this block (``producer``) is linked. ``training``: the block's mode."""
    global _NORMS_SEEN
    if not in_use(norm) or proj is not None or not active(x):
        return None         # (a projection block has no norm and emits nothing: the fused kernels refuse both)
    from .norm import norm_kind, uses_batch_stats
    stats = None
    kind = norm_kind(norm, None, "fusedres.chain")      # (a block's norm, checked when it was made)
    if kind is not None:
        _NORMS_SEEN = True
    if kind is not None and uses_batch_stats(norm):
        link(x, kind)
        stats = handed_over(x, kind)
    nxt = emits(producer, training)
    if stats is None and nxt is None:
        return None
    return ChainCall(stats, nxt)


def link_blocks(blocks) -> None:
    """Link a sequence of fused blocks ahead of their first call (:class:`fusedres.ResidualMLP`):
    each emits the next one's norm statistics."""
    from .norm import norm_kind
    blocks = list(blocks)
    for producer, consumer in zip(blocks, blocks[1:]):
        kind = norm_kind(getattr(consumer, "norm", None), None, "fusedres.chain")
        if kind is not None:
            set_next_norm(producer, kind)


def op_arguments(call: Optional[ChainCall], normalizes_batch: bool, rows: int) -> tuple:
    """What a fused op takes for a chain call: ``(given, next_norm, extra inputs)``, ``given`` the
    handed-over ``(mean, var)`` when the block's norm normalizes with batch statistics of a
    non-empty x (else None), ``next_norm`` the kind to emit (``"none"``: nothing), and the op's
    trailing ``(stats_mean, stats_var, next_norm)`` arguments (empty when neither is wanted)."""
    given = call.stats if call is not None and normalizes_batch and rows else None
    nxt = call.next_norm if call is not None and call.next_norm is not None else "none"
    extra = (*(given or (None, None)), nxt) if given is not None or nxt != "none" else ()
    return given, nxt, extra
