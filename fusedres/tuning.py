"""Autotuning ahead of time: ``warmup``, saving and loading the choices, and the CUDA-graph guard.

On a GPU each kernel autotunes the first time it sees a new key (power-of-two bucket of M, D,
dtypes, layout flags). Autotuning launches each candidate config several times, which must not
happen inside ``torch.cuda.graph`` capture, nor in the middle of a latency-critical step. So:

- :func:`warmup` runs forward and backward for the shapes a model will see; every later call with
  a key in the same bucket reuses the choice (the per-process cache of Triton's autotuner);
- :func:`save_tuning` / :func:`load_tuning` persist those choices as JSON, for the next process;
- a launch during CUDA-graph capture whose key was never tuned raises instead of autotuning.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import torch
import triton

from .kernels._common import next_pow2_bucket
from .kernels.configs import autotune_key  # noqa: F401  (re-exported for users)
from .kernels.residual_bwd import residual_dw_kernel_tuned, residual_dx_kernel_tuned
from .kernels.residual_fwd import residual_fwd_kernel_tuned

TUNED_KERNELS = {"fwd": residual_fwd_kernel_tuned, "dx": residual_dx_kernel_tuned, "dw": residual_dw_kernel_tuned}


def warmup(dim: int, batch_sizes: Iterable[int], *, dtypes: Iterable[torch.dtype] = (torch.bfloat16,),
           device: str | torch.device = "cuda", bias: bool = True, training: bool = True) -> int:
    """Tune every kernel a ``FusedResidualBlock(dim)`` will launch for these row counts and dtypes.

    ``batch_sizes`` are row counts M (all leading dims multiplied out). One launch per power-of-two
    bucket suffices. With ``training`` the backward kernels are tuned too. Returns the number of
    tuned entries now cached. On the CPU (interpreter) there is nothing to tune; it still runs the
    kernels once, which checks the shapes.
    """
    from .op import fused_residual

    buckets = {}
    for M in batch_sizes:
        buckets.setdefault(next_pow2_bucket(int(M)), int(M))
    for dtype in dtypes:
        w = torch.randn(dim, dim, device=device, dtype=dtype) * dim ** -0.5
        b = torch.zeros(dim, device=device, dtype=dtype) if bias else None
        w.requires_grad_(training)
        if b is not None:
            b.requires_grad_(training)
        for M in buckets.values():
            x = torch.randn(M, dim, device=device, dtype=dtype, requires_grad=training)
            with torch.set_grad_enabled(training):
                y = fused_residual(x, w, b)
                if training:
                    y.backward(torch.ones_like(y))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return sum(len(t.cache) for t in TUNED_KERNELS.values())


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def save_tuning(path: str | os.PathLike) -> int:
    """Write every cached autotune choice to ``path`` (JSON, with the GPU and versions it was
    tuned on). Returns the number of entries written."""
    entries = {kind: [{"key": list(key), "config": {"kwargs": c.kwargs, "num_warps": c.num_warps,
                                                    "num_stages": c.num_stages}}
                      for key, c in tuned.cache.items()]
               for kind, tuned in TUNED_KERNELS.items()}
    doc = {"device": _device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "kernels": entries}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return sum(len(v) for v in entries.values())


def load_tuning(path: str | os.PathLike, *, strict: bool = True) -> int:
    """Load choices written by :func:`save_tuning` into this process's autotune caches.

    With ``strict`` a file tuned on another GPU or another triton version is refused: its
    choices would be wrong for this hardware. Returns the number of entries loaded.
    """
    with open(path) as f:
        doc = json.load(f)
    if strict and (doc["device"], doc["triton"]) != (_device_name(), triton.__version__):
        raise ValueError(f"load_tuning: {path} was tuned on {doc['device']!r} with triton {doc['triton']}; "
                         f"this is {_device_name()!r} with triton {triton.__version__} (strict=False loads anyway)")
    n = 0
    for kind, entries in doc["kernels"].items():
        tuned = TUNED_KERNELS[kind]
        for e in entries:
            c = e["config"]
            tuned.cache[tuple(e["key"])] = triton.Config(c["kwargs"], num_warps=c["num_warps"],
                                                         num_stages=c["num_stages"])
            n += 1
    return n
