"""Measured memory traffic of eager PyTorch: every aten op's tensor inputs and outputs, in bytes.

:class:`DispatchTraffic` is a ``TorchDispatchMode``. Each aten op that runs inside it adds the
bytes of its tensor inputs (read) and tensor outputs (written), and records the op. It measures
what eager PyTorch asks of memory, op by op: each op reads its inputs from memory and writes its
outputs back, as the GPU kernels behind these ops do (a GEMM reads its operands once from DRAM at
best; that is the assumption, so this is a lower bound for the GEMMs and exact for pointwise ops).

- View ops (``t``, ``view``, ``expand``, ``as_strided``, ...) move nothing and are skipped.
- A tensor's bytes are its distinct elements times the element size: a broadcast (stride-0)
  dimension counts once.
- An in-place op's mutated argument counts as read and written.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["DispatchTraffic", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel moves to read or write ``t`` once: distinct elements times element size."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    if t.numel() == 0:
        n = 0
    return n * t.element_size()


@dataclass
class OpTraffic:
    op: str
    bytes_read: int
    bytes_written: int
    flops: int = 0            # GEMM ops only: 2 m n k

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def _gemm_flops(func, args) -> int:
    name = func.overloadpacket.__name__
    try:
        if name == "mm":
            a, b = args[0], args[1]
            return 2 * a.shape[0] * a.shape[1] * b.shape[1]
        if name == "addmm":
            a, b = args[1], args[2]
            return 2 * a.shape[0] * a.shape[1] * b.shape[1]
        if name in ("bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    except (AttributeError, IndexError):
        pass
    return 0


@dataclass
class DispatchTraffic(TorchDispatchMode):
    """Count the bytes that the aten ops run inside the ``with`` block read and write."""
    ops: list = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func in _NO_TRAFFIC:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.ops.append(OpTraffic(func.overloadpacket.__name__, sum(tensor_bytes(t) for t in ins),
                                  sum(tensor_bytes(t) for t in outs), _gemm_flops(func, args)))
        return out

    @property
    def bytes_read(self) -> int:
        return sum(o.bytes_read for o in self.ops)

    @property
    def bytes_written(self) -> int:
        return sum(o.bytes_written for o in self.ops)

    @property
    def bytes_total(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def flops(self) -> int:
        return sum(o.flops for o in self.ops)

    def by_op(self) -> dict[str, tuple[int, int, int]]:
        """``{op: (calls, bytes_read, bytes_written)}``."""
        agg: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        for o in self.ops:
            a = agg[o.op]
            a[0] += 1
            a[1] += o.bytes_read
            a[2] += o.bytes_written
        return {k: tuple(v) for k, v in agg.items()}


# Ops that allocate or describe but move no tensor data.
_NO_TRAFFIC = {
    torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
    torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default, torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default, torch.ops.aten.is_same_size.default,
}
