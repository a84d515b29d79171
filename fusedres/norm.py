"""Normalization inside the block, the PyTorch half: which norms, how they are named and checked,
and how the eager reference applies them.

A block's ``norm`` is ``None``, a name (``"batch"``, ``"layer"``, ``"rms"``) or a torch module:
``nn.BatchNorm1d(dim)``, ``nn.LayerNorm(dim)`` or ``nn.RMSNorm(dim)``, whose settings (eps,
momentum, affine, track_running_stats, elementwise_affine) and state (weight, bias, running
statistics) are used as they are. The modules hold the norm as a real module named ``norm``, so
their state_dict keys are torch's own (``norm.weight``, ``norm.running_mean``, ...).

BatchNorm normalizes over every row of an ``x`` of shape ``(..., D)``: ``nn.BatchNorm1d`` applied
to ``x.reshape(-1, D)``, whatever the leading dimensions (a sequence's tokens count as rows).

In the functional forms a name stands for the norm without parameters and torch's default eps:
``"batch"`` is batch statistics without running statistics (``F.batch_norm(..., training=True)``),
``"layer"`` ``F.layer_norm`` without affine, ``"rms"`` ``F.rms_norm`` without weight (eps: the
machine epsilon of the dtype torch computes it in, fp32 for fp16 and bf16, as torch's).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The norms by name, and the torch module each name makes.
NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "rms": nn.RMSNorm}

NormLike = Union[None, str, nn.BatchNorm1d, nn.LayerNorm, nn.RMSNorm]


def norm_kind(norm: NormLike, dim: int | None, who: str) -> str | None:
    """The kind (``"batch"``, ``"layer"``, ``"rms"``) of a norm name or module, checked against the
    block width ``dim`` (None: not checked); None for None. A clear error for anything else."""
    if norm is None:
        return None
    if isinstance(norm, str):
        if norm not in NORMS:
            raise ValueError(f"{who}: unknown norm {norm!r}; supported: None, "
                             + ", ".join(repr(n) for n in NORMS) + ", or an nn.BatchNorm1d, nn.LayerNorm or "
                             "nn.RMSNorm instance")
        return norm
    # exact types: BatchNorm2d/3d and SyncBatchNorm normalize other layouts or across processes
    kind = next((k for k, cls in NORMS.items() if type(norm) is cls), None)
    if kind is None:
        raise TypeError(f"{who}: norm must be None, 'batch', 'layer', 'rms' or an nn.BatchNorm1d, nn.LayerNorm "
                        f"or nn.RMSNorm instance; got {type(norm).__name__}")
    if dim is not None:
        size = norm.num_features if kind == "batch" else tuple(norm.normalized_shape)
        if size != (dim if kind == "batch" else (dim,)):
            what = "num_features" if kind == "batch" else "normalized_shape"
            raise ValueError(f"{who}: the norm's {what} is {size}, but the block's width is {dim}: "
                             f"use {NORMS[kind].__name__}({dim})")
    return kind


def uses_batch_stats(norm: NormLike) -> bool:
    """Whether a norm normalizes with statistics of its input now: every name, LayerNorm and
    RMSNorm, and BatchNorm in training or without running statistics (as ``nn.BatchNorm1d``'s
    forward decides); False for None."""
    if isinstance(norm, nn.BatchNorm1d):
        return norm.training or (norm.running_mean is None and norm.running_var is None)
    return norm is not None


def make_norm(norm: NormLike, dim: int, who: str, device=None, dtype=None) -> Optional[nn.Module]:
    """The module a block holds as ``norm``: a new ``nn.BatchNorm1d(dim)``, ``nn.LayerNorm(dim)`` or
    ``nn.RMSNorm(dim)`` for a name, the instance itself for a module, None for None."""
    kind = norm_kind(norm, dim, who)
    if kind is None or not isinstance(norm, str):
        return norm
    return NORMS[kind](dim, device=device, dtype=dtype)


def apply_norm(norm: NormLike, x: Tensor) -> Tensor:
    """``norm(x)`` as eager PyTorch computes it (the reference): a module is called (BatchNorm on
    ``x.reshape(-1, D)``, updating its running statistics in training as it always does), a name
    is the parameter-free functional norm."""
    D = x.shape[-1]
    if isinstance(norm, str):
        if norm == "batch":
            return F.batch_norm(x.reshape(-1, D), None, None, training=True).reshape(x.shape)
        if norm == "layer":
            return F.layer_norm(x, (D,))
        return F.rms_norm(x, (D,))
    if isinstance(norm, nn.BatchNorm1d):
        return norm(x.reshape(-1, D)).reshape(x.shape)
    return norm(x)


class NormCall:
    """One call's normalization as the kernels take it, read off a name or module:

    - ``kind``; ``weight``, ``bias`` (the affine, or None); ``eps`` (None: RMSNorm's dtype eps);
    - ``running``: ``(mean, var)`` to normalize with, BatchNorm in eval mode on running statistics
      (then the statistics are constants for the backward), or None: batch statistics;
    - ``update``: ``(running_mean, running_var, factor)`` to update after the forward (BatchNorm in
      training with running statistics), or None.
    """
    __slots__ = ("kind", "weight", "bias", "eps", "running", "update")

    def __init__(self, norm: NormLike, dim: int, who: str):
        self.kind = norm_kind(norm, dim, who)
        self.weight = self.bias = self.running = self.update = None
        if isinstance(norm, str):
            self.eps = None if self.kind == "rms" else 1e-5
            return
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)
        if self.kind != "batch":
            return
        # nn.BatchNorm's forward, step for step
        use_batch = uses_batch_stats(norm)
        if not use_batch:
            self.running = (norm.running_mean, norm.running_var)
        elif norm.training and norm.track_running_stats and norm.running_mean is not None:
            factor = 0.0 if norm.momentum is None else norm.momentum
            if norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(1)
                if norm.momentum is None:
                    factor = 1.0 / float(norm.num_batches_tracked)
            self.update = (norm.running_mean, norm.running_var, factor)


def update_running_stats(update, mean: Tensor, var: Tensor, rows: int) -> None:
    """BatchNorm's running statistics after a training forward, as torch updates them: an
    exponential average with ``factor`` of the batch mean and the unbiased batch variance."""
    running_mean, running_var, factor = update
    with torch.no_grad():
        running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        unbiased = var * (rows / (rows - 1))
        running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
