"""Variance and gradient diagnostics for networks of residual blocks, by hooks.

Deep residual stacks grow their activation variance with depth unless the residual branches are
scaled, and plain deep stacks shatter their gradients. These hooks measure both, per block,
without copying any activation: each hook reduces the tensor it is handed to a few scalars.

    with fusedres.diagnostics.record(model) as rec:
        loss_fn(model(x), target).backward()
    rec.table()          # per block: output variance, |dL/d output|, |dL/dW|
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .module import FusedResidualBlock
from .reference import ResidualBlock

BLOCK_TYPES: tuple[type[nn.Module], ...] = (ResidualBlock, FusedResidualBlock)


@dataclass
class BlockStats:
    name: str
    output_variance: float | None = None
    grad_norm: float | None = None
    weight_grad_norm: float | None = None


@dataclass
class Recording:
    blocks: dict[str, BlockStats] = field(default_factory=dict)

    def table(self) -> list[dict]:
        return [vars(s).copy() for s in self.blocks.values()]

    @property
    def output_variance(self) -> list[float | None]:
        return [s.output_variance for s in self.blocks.values()]

    @property
    def grad_norm(self) -> list[float | None]:
        return [s.grad_norm for s in self.blocks.values()]


@contextlib.contextmanager
def record(model: nn.Module, block_types: tuple[type[nn.Module], ...] = BLOCK_TYPES) -> Iterator[Recording]:
    """Record, for every submodule of ``model`` that is one of ``block_types`` (in module order):
    the variance of its output in the last forward, the norm of the gradient reaching its output
    in the last backward, and on exit the norm of its weight's gradient."""
    rec = Recording()
    handles = []
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, block_types)]
    for name, module in blocks:
        stats = rec.blocks[name] = BlockStats(name)

        def on_forward(module, inputs, output, stats=stats):
            with torch.no_grad():
                stats.output_variance = output.detach().var().item()  # reduces in place, no copy

        def on_backward(module, grad_inputs, grad_outputs, stats=stats):
            if grad_outputs[0] is not None:
                stats.grad_norm = torch.linalg.vector_norm(grad_outputs[0], dtype=torch.float32).item()

        handles.append(module.register_forward_hook(on_forward))
        handles.append(module.register_full_backward_hook(on_backward))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        for name, module in blocks:
            w = getattr(module, "weight", None)
            if w is not None and w.grad is not None:
                rec.blocks[name].weight_grad_norm = torch.linalg.vector_norm(w.grad, dtype=torch.float32).item()
