"""Row layout of ``(..., D)`` operands for the kernels: no copy unless a copy is unavoidable."""
from __future__ import annotations

import math

from torch import Tensor

from .kernels import Rows, RowStrides


def _leading_dims(t: Tensor) -> list[tuple[int, int]]:
    """(size, stride) of ``t``'s leading dims, size-1 dims dropped and mergeable neighbours merged."""
    dims: list[tuple[int, int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims


def plan_rows(*tensors: Tensor) -> tuple[Rows, list[RowStrides], list[Tensor]]:
    """Describe the flattened rows of same-shaped ``(..., D)`` tensors for the kernels.

    Rows are addressed as ``m = o * T + i`` with a per-tensor (outer, inner) stride, which covers
    every layout whose leading dims collapse to at most two strides (contiguous, sliced,
    ``[B, T, D].transpose(0, 1)``, ...). A tensor is copied only when its last stride is not 1
    (the kernels' loads would not coalesce), or when its leading dims need three or more strides.
    Returns the rows, the strides of each tensor, and the tensors (copied where needed).
    """
    M = math.prod(tensors[0].shape[:-1])
    ts = [t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in tensors]
    dims = [_leading_dims(t) for t in ts]
    ts = [t.contiguous() if len(d) > 2 else t for t, d in zip(ts, dims)]
    dims = [_leading_dims(t) for t in ts]
    splits = [tuple(s for s, _ in d) for d in dims if len(d) == 2]
    if not splits or M == 0:  # (no rows: nothing is addressed, and T must not be 0)
        rows = Rows(M, max(M, 1), False)
        return rows, [RowStrides(0, d[0][1] if d else 0, t.stride(-1)) for t, d in zip(ts, dims)], ts

    outer, inner = splits[0]
    strides = []
    for i, (t, d) in enumerate(zip(ts, dims)):
        if len(d) == 2 and (d[0][0], d[1][0]) != (outer, inner):
            ts[i] = t = t.contiguous()
            d = _leading_dims(t)
        if len(d) == 2:
            strides.append(RowStrides(d[0][1], d[1][1], t.stride(-1)))
        else:
            s = d[0][1] if d else 0
            strides.append(RowStrides(inner * s, s, t.stride(-1)))
    return Rows(M, inner, True), strides, ts
