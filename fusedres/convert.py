"""Model conversion: swap eager residual blocks for fused ones, sharing the parameters."""
from __future__ import annotations

import warnings

import triton
from torch import nn

from .adopt import Candidate, FuseReport, fuse_structure
from .module import FusedResidualBlock, FusedResidualMLPBlock
from .reference import ResidualBlock, ResidualMLPBlock
from .stack import FusedResidualStack, _stackable

#: The widths ``fuse(..., stacks=True)`` folds into a stack. Not 128: there the stack's backward
#: read-modify-writes a D x D fp32 partial per row tile and layer through L2 (8 D^2 / BLOCK_M bytes
#: per row per layer), and model v2 (``python -m bench --plan --stack-table``, M = 65536, L = 8)
#: puts the stack at 0.82x (bf16) and 0.65x (tf32) of 8 single blocks on an A100 (1.45x / 1.25x on
#: an H100): a MODEL, but no user should be steered to the slower path.
#: ``FusedResidualStack(128, ...)`` still works when asked for by name.
FUSE_STACK_WIDTHS = (16, 32, 64)


def _stack_shipped() -> bool:
    """Whether stacks can run here: the installed triton ships them, or kernels interpret."""
    from .kernels import INTERPRET
    from .kernels.configs import stack_supported
    return INTERPRET or stack_supported()


def fuse(model: nn.Module, *, stacks: bool = False, report: bool = False):
    """Fuse, in place, every residual block ``fuse`` can prove is one, and return ``model``
    (with ``report=True``: ``(model, report)``, a :class:`fusedres.adopt.FuseReport` listing every
    candidate, fused with its recipe or left alone with the reason; ``print(report)`` reads it).
    Nothing is copied: parameters, buffers and state_dict keys stay the same tensors, so
    optimizers, tied weights, hooks on the parameters and checkpoints keep working.

    Two passes. First, by class:

    - :class:`fusedres.ResidualBlock` (exactly that class: a subclass may have changed
      ``forward``) becomes :class:`fusedres.FusedResidualBlock`;
    - :class:`fusedres.ResidualMLPBlock` (exactly) becomes :class:`fusedres.FusedResidualMLPBlock`.

    Each keeps its ``drop_path`` (and ``recompute``).

    With ``stacks=True``, runs of two or more consecutive blocks inside an ``nn.Sequential`` (the
    one container whose execution order is its order) that a :class:`fusedres.FusedResidualStack`
    computes exactly and faster (square, one width in {16, 32, 64}: see ``FUSE_STACK_WIDTHS``
    for why not 128; all with or all without bias, one
    dtype and device, a fixed alpha of 1, no drop_path) become one stack, named after the run's first block.
    The stack owns its ``[depth, dim, dim]`` weight, so those parameters are copied, not shared:
    build the optimizer after ``fuse``. Blocks outside such runs are converted as above.

    Second, by structure (:mod:`fusedres.adopt`): every other module's ``forward`` is read with
    torch.fx, and each residual add in it (``x + branch(x)``, ``x + c * branch(x)``,
    ``shortcut(x) + branch(x)`` with a bias-free Linear shortcut) whose branch is a chain the fused
    forms compute exactly (``[norm] -> [act] -> Linear``, optionally ``-> [hidden norm] -> act ->
    [dropout] -> Linear``, then any of dropout, a per-channel scale such as timm's LayerScale, a
    constant, a timm-style DropPath) becomes one call of :func:`fusedres.adopt.residual_block` on
    the user's own modules; the rewritten graph becomes that module's ``forward`` (an instance
    attribute: its class, other methods, children and state_dict are unchanged). A forward that
    cannot be traced, or that reads ``self.training`` in Python, is left alone and its children
    are searched on their own. Python decisions in a forward are read now: configure first.
    Calling ``fuse`` again fuses nothing twice.
    """
    found = FuseReport()
    _fuse_classes(model, stacks, found, "")
    fuse_structure(model, found)
    return (model, found) if report else model


def _fuse_classes(model: nn.Module, stacks: bool, found: FuseReport, path: str) -> None:
    if type(model) in _FUSED:
        raise TypeError(f"fuse: the model itself is a {type(model).__name__}; use "
                        f"{_FUSED[type(model)].__name__}.from_block(model) to convert a single block")
    if stacks and not _stack_shipped():
        warnings.warn(f"fusedres.fuse: stacks=True is ignored: triton {triton.__version__} does not ship the narrow "
                      "stack's kernels (fusedres.kernels.configs.STACK_MIN_TRITON); blocks are fused one by one",
                      RuntimeWarning, stacklevel=3)
        stacks = False
    if stacks and isinstance(model, nn.Sequential):
        for name, depth in _fold_stacks(model):
            found.append(Candidate(f"{path}.{name}" if path else name, None, f"{depth} consecutive blocks", True,
                                   recipe=f"FusedResidualStack (depth {depth})"))
    for name, child in model.named_children():
        where = f"{path}.{name}" if path else name
        if type(child) is ResidualBlock and child.dropout and child.proj_weight is not None:
            found.append(Candidate(where, None, type(child).__name__, False,
                                   reason="dropout with a projection shortcut: the fused kernels do not take it"))
        elif type(child) in _FUSED:
            fused = _FUSED[type(child)].from_block(child)
            setattr(model, name, fused)
            found.append(Candidate(where, None, type(child).__name__, True, recipe=type(fused).__name__))
        else:
            _fuse_classes(child, stacks, found, where)


#: eager class -> fused class, for exactly these classes
_FUSED = {ResidualBlock: FusedResidualBlock, ResidualMLPBlock: FusedResidualMLPBlock}


def _stack_key(block: nn.Module):
    """What must agree along a run of blocks for one stack to compute them (None: not stackable)."""
    if not _stackable(block) or block.dim not in FUSE_STACK_WIDTHS:
        return None
    return block.dim, block.bias is None, block.weight.dtype, block.weight.device


def _fold_stacks(seq: nn.Sequential) -> list[tuple[str, int]]:
    """Fold the runs; returns each stack's name and depth."""
    items = list(seq._modules.items())
    runs, start = [], 0
    for i in range(1, len(items) + 1):
        if i == len(items) or _stack_key(items[i][1]) is None or _stack_key(items[i][1]) != _stack_key(items[start][1]):
            if _stack_key(items[start][1]) is not None and i - start >= 2:
                runs.append((start, i))
            start = i
    if not runs:
        return []
    folded, i = [], 0
    for a, b in runs:
        folded += items[i:a]
        folded.append((items[a][0], FusedResidualStack.from_blocks([m for _, m in items[a:b]])))
        i = b
    folded += items[i:]
    seq._modules.clear()
    seq._modules.update(folded)
    return [(items[a][0], b - a) for a, b in runs]
