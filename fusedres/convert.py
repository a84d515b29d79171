"""Model conversion: swap eager residual blocks for fused ones, sharing the parameters."""
from __future__ import annotations

from torch import nn

from .module import FusedResidualBlock
from .reference import ResidualBlock


def fuse(model: nn.Module) -> nn.Module:
    """Replace, in place, every submodule ``fuse`` can recognise without guessing, and return
    ``model``. The replacement shares the original's parameters (no copy): optimizers, tied
    weights and hooks on the parameters keep working.

    Recognised patterns:

    - :class:`fusedres.ResidualBlock` (exactly that class: a subclass may have changed
      ``forward``) becomes :class:`fusedres.FusedResidualBlock`.

    A hand-written ``x + linear(relu(x))`` inside some other module's ``forward`` is not
    recognised: that would need guessing at code. Wrap it as a ``ResidualBlock`` or use
    ``FusedResidualBlock.from_linear``.
    """
    if type(model) is ResidualBlock:
        raise TypeError("fuse: the model itself is a ResidualBlock; use "
                        "FusedResidualBlock.from_block(model) to convert a single block")
    for name, child in model.named_children():
        if type(child) is ResidualBlock:
            setattr(model, name, FusedResidualBlock.from_block(child))
        else:
            fuse(child)
    return model
