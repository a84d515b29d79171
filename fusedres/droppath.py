"""Stochastic depth (``drop_path``): the per-sample scale of a residual branch, as timm's ``DropPath``.

For a block ``y = x + f(x)`` and a drop rate ``p``, training draws one scale per sample

    s_b = m_b / (1 - p),    m_b ~ Bernoulli(1 - p),    b = 0 .. B-1  (B = x.shape[0])

and computes ``y[b] = x[b] + s_b * f(x)[b]``: a sample keeps its branch with probability
``1 - p``, scaled by ``1 / (1 - p)`` so that ``E[s_b] = 1``, or drops it (``y[b] = x[b]``
exactly). "Per sample" is per index of x's first dimension, timm's convention, whatever the
other dimensions are. At ``p = 1`` every branch is dropped (``s = 0``; no division by zero). In
eval mode, or at ``p = 0``, there is no scale at all: the plain block, no random numbers drawn.

The scale is one value per sample, never a mask of x's size, and it is drawn by torch's RNG
(``bernoulli_``): ``torch.manual_seed`` reproduces it, and the fused kernels apply the same ``s``
as a row scale.
"""
from __future__ import annotations

import math

from torch import Tensor

__all__ = ["drop_path_scale", "apply_sample_scale", "check_drop_path", "check_sample_scale", "rows_per_sample",
           "sample_rows"]


def check_drop_path(p, who: str = "drop_path") -> float:
    """``p`` as a float, or a ValueError unless it is a real number in ``[0, 1]``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: the drop rate must be a number in [0, 1], got {p!r}")
    return float(p)


def drop_path_scale(x: Tensor, p: float, training: bool) -> Tensor | None:
    """The per-sample branch scale ``s`` of stochastic depth for the batch ``x``, or None.

    None when not ``training`` or when ``p == 0``: the caller runs the plain block (nothing is
    drawn, torch's RNG state is untouched). Otherwise a 1-D tensor of shape ``[x.shape[0]]`` on
    ``x``'s device, in ``x``'s dtype (as timm's ``DropPath``), holding ``m / (1 - p)`` with
    ``m ~ Bernoulli(1 - p)`` drawn by ``x.new_empty(B).bernoulli_(1 - p)``; all zeros at ``p == 1``.

    Raises ValueError unless ``0 <= p <= 1``, or if ``x`` is 0-dim (it has no sample dimension).
    """
    p = check_drop_path(p)
    if not training or p == 0.0:
        return None
    if x.dim() == 0:
        raise ValueError("drop_path_scale: x must have a sample (first) dimension, got a 0-dim tensor")
    keep = 1.0 - p
    s = x.new_empty(x.shape[0]).bernoulli_(keep)
    if keep > 0.0:
        s.div_(keep)
    return s


def check_sample_scale(sample_scale: Tensor | None, x: Tensor, who: str) -> None:
    """A ValueError unless ``sample_scale`` is None or a 1-D tensor of ``x.shape[0]`` values."""
    if sample_scale is None:
        return
    if not isinstance(sample_scale, Tensor):
        raise TypeError(f"{who}: sample_scale must be a Tensor or None, got {type(sample_scale).__name__}")
    if x.dim() == 0 or sample_scale.shape != (x.shape[0],):
        raise ValueError(f"{who}: sample_scale must be 1-D with one value per sample, shape "
                         f"[x.shape[0]] = [{x.shape[0] if x.dim() else '?'}], got {list(sample_scale.shape)}")


def rows_per_sample(x: Tensor) -> int:
    """Flattened rows of ``x (B, ..., D)`` per sample: the kernels index ``s`` at ``row // this``
    (at least 1, so that an empty middle dimension divides nothing by zero)."""
    return max(math.prod(x.shape[1:-1]), 1)


def sample_rows(s: Tensor, like: Tensor) -> Tensor:
    """``s [B]`` viewed ``[B, 1, ..., 1]`` in ``like``'s dtype, to scale each sample of ``like``."""
    return s.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def apply_sample_scale(branch: Tensor, s: Tensor | None) -> Tensor:
    """``branch * s`` with ``s [B]`` viewed as ``[B, 1, ..., 1]``: ``out[b, ...] = s[b] * branch[b, ...]``.
    ``s is None`` returns ``branch`` itself (no copy)."""
    if s is None:
        return branch
    check_sample_scale(s, branch, "apply_sample_scale")
    return branch * s.reshape((-1,) + (1,) * (branch.dim() - 1))     # (in s's dtype: eager's promotion)
