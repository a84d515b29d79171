"""Autotuning ahead of time: ``warmup``, saving and loading the choices, and the CUDA-graph guard.

On a GPU each kernel autotunes the first time it sees a new key (power-of-two bucket of M, D,
dtypes, layout flags). Autotuning launches each candidate config several times, which must not
happen inside ``torch.cuda.graph`` capture, nor in the middle of a latency-critical step. So:

- :func:`warmup` runs a model's own forward and backward on example inputs (or, in its older
  form, a block of a given width for some row counts); every later call with a key in the same
  bucket reuses the choice (the per-process cache of Triton's autotuner), and every kernel
  specialisation it launched is compiled;
- :func:`save_tuning` / :func:`load_tuning` persist those choices as JSON, for the next process;
- a launch during CUDA-graph capture whose key was never tuned, or whose exact specialisation was
  never compiled on that device, raises instead of autotuning or compiling.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import torch
import triton
from torch import Tensor, nn

from .kernels._common import next_pow2_bucket
from .kernels import configs
from .kernels.configs import autotune_key  # noqa: F401  (re-exported for users)
from .kernels.residual_bwd import residual_dw_kernel_tuned, residual_dx_kernel_tuned
from .kernels.residual_fwd import residual_fwd_kernel_tuned

TUNED_KERNELS = {"fwd": residual_fwd_kernel_tuned, "dx": residual_dx_kernel_tuned, "dw": residual_dw_kernel_tuned}


def warmup(model: nn.Module | int, example_inputs: Any = None, *, batch_sizes: Iterable[int] | None = None,
           dtypes: Iterable[torch.dtype] = (torch.bfloat16,), device: str | torch.device = "cuda",
           bias: bool = True, training: bool = True, loss_fn: Callable[[Any], Tensor] | None = None) -> int:
    """Tune and compile, before CUDA-graph capture, every kernel a model will launch.

    ``warmup(model, example_inputs)``: runs ``model(*example_inputs)`` (a lone tensor is one
    input) as the captured step will: a forward under ``torch.no_grad()`` (inference variants:
    the stack then saves no activations), then, with ``training``, a forward and backward
    (``loss_fn(output)``, default: a gradient of ones on every output that requires grad). That
    launches exactly the specialisations the model uses: its blocks' alpha (float, tensor or
    learnable), projections, stacks, dtypes, which inputs need gradients, and sizes and strides.
    Call it in the autocast context you will capture in, with inputs of the captured shapes. It
    leaves no trace on the model: no ``.grad`` is written (``torch.autograd.grad``), buffers
    (e.g. running statistics) and the RNG state are restored.

    ``warmup(dim, batch_sizes, *, dtypes, device, bias, training)``, the older form: a
    ``FusedResidualBlock(dim)`` and the plain ``fused_residual`` for these row counts (one per
    power-of-two bucket suffices) and dtypes.

    Returns the number of tuned entries now cached. On the CPU (interpreter) there is nothing to
    tune or compile; it still runs the kernels once, which checks the shapes.
    """
    if isinstance(model, nn.Module):
        if example_inputs is None:
            raise TypeError("warmup(model, example_inputs): example_inputs are required")
        _warmup_model(model, example_inputs, training, loss_fn)
    else:
        sizes = batch_sizes if batch_sizes is not None else example_inputs
        if sizes is None:
            raise TypeError("warmup(dim, batch_sizes): batch_sizes are required")
        _warmup_dim(int(model), sizes, dtypes, device, bias, training)
    return sum(len(t.cache) for t in TUNED_KERNELS.values())


def _tensors(obj) -> list:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _synchronize(tensors) -> None:
    for d in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.synchronize(d)


def _warmup_model(model: nn.Module, example_inputs, training: bool, loss_fn) -> None:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    state = list(model.parameters()) + list(model.buffers()) + _tensors(inputs)
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({t.device.index or 0 for t in state if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        with torch.no_grad():
            model(*inputs)
        if training:
            with torch.enable_grad():
                out = model(*inputs)
                if loss_fn is not None:
                    outs = [loss_fn(out)]
                    grads = [None]
                else:
                    outs = [t for t in _tensors(out) if t.requires_grad]
                    grads = [torch.ones_like(t) for t in outs]
                wrt = [p for p in model.parameters() if p.requires_grad]
                wrt += [t for t in _tensors(inputs) if t.requires_grad]
                if outs and wrt and outs[0].requires_grad:
                    torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    with torch.no_grad():
        for b, value in saved_buffers:
            b.copy_(value)
    _synchronize(state)


def _warmup_dim(dim: int, batch_sizes, dtypes, device, bias: bool, training: bool) -> None:
    from .module import FusedResidualBlock
    from .op import fused_residual

    buckets = {}
    for M in batch_sizes:
        buckets.setdefault(next_pow2_bucket(int(M)), int(M))
    for dtype in dtypes:
        # the block passes its alpha buffer (a tensor: recipe alpha=scalar); the function, none
        block = FusedResidualBlock(dim, bias=bias, device=device, dtype=dtype)
        block.requires_grad_(training)
        w = block.weight.detach().clone().requires_grad_(training)
        b = block.bias.detach().clone().requires_grad_(training) if bias else None
        for M in buckets.values():
            x = torch.randn(M, dim, device=device, dtype=dtype, requires_grad=training)
            with torch.set_grad_enabled(training):
                for y in (fused_residual(x, w, b), block(x)):
                    if training:
                        y.backward(torch.ones_like(y))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


#: The layout of :func:`save_tuning`'s keys: 2 since the kernels key on their recipe string
#: (``fusedres.kernels.recipe``); files without a format field are 1.
TUNING_FORMAT = 2


def save_tuning(path: str | os.PathLike) -> int:
    """Write every cached autotune choice to ``path`` (JSON, with the GPU and versions it was
    tuned on). Returns the number of entries written."""
    entries = {kind: [{"key": list(key), "config": {"kwargs": c.kwargs, "num_warps": c.num_warps,
                                                    "num_stages": c.num_stages}}
                      for key, c in tuned.cache.items()]
               for kind, tuned in TUNED_KERNELS.items()}
    doc = {"format": TUNING_FORMAT, "device": _device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "kernels": entries}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return sum(len(v) for v in entries.values())


def load_tuning(path: str | os.PathLike, *, strict: bool = True) -> int:
    """Load choices written by :func:`save_tuning` into this process's autotune caches.

    With ``strict`` a file tuned on another GPU or another triton version is refused: its
    choices would be wrong for this hardware. Returns the number of entries loaded.
    """
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"load_tuning: {path} is not JSON ({e}); expected a file written by "
                             "fusedres.save_tuning") from None
    missing = [k for k in ("device", "triton", "kernels") if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise ValueError(f"load_tuning: {path} is not a fusedres tuning file: it has no {', '.join(map(repr, missing))} "
                         "(expected a file written by fusedres.save_tuning)")
    if doc.get("format") != TUNING_FORMAT:
        raise ValueError(f"load_tuning: {path} has autotune keys of format {doc.get('format', 1)}, this fusedres "
                         f"writes format {TUNING_FORMAT} (the kernels' recipes changed the keys: a launch would never "
                         "find those entries); tune again (fusedres.warmup) and save_tuning")
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
    configs.clear_prepared()      # prepared launches hold the configs chosen before
    return n
