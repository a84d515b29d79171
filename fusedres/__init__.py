"""fusedres: fused Triton kernels for the pre-activation residual block ``y = x + relu(x) @ W.T + b``."""
from __future__ import annotations

from .adopt import FuseReport
from .recipes import block_recipe
from .convert import fuse
from .droppath import drop_path_scale
from .dropout import record_dropout
from .mlp import ResidualMLP
from .mlp_op import fused_residual_mlp
from .module import FusedResidualBlock, FusedResidualMLPBlock
from .op import SUPPORTED_DTYPES, backend_for, fused_residual, get_backend, set_backend
from .reference import (ResidualBlock, ResidualMLPBlock, residual_mlp_reference, residual_reference,
                        stack_reference)
from .stack import STACK_WIDTHS, FusedResidualStack, fused_residual_stack
from .tuning import load_tuning, save_tuning, warmup
from .validate import ParityError, set_validate

__version__ = "0.1.0"

__all__ = [
    "FusedResidualBlock",
    "FusedResidualMLPBlock",
    "fused_residual_mlp",
    "FusedResidualStack",
    "fused_residual_stack",
    "stack_reference",
    "STACK_WIDTHS",
    "ResidualMLP",
    "fuse",
    "FuseReport",
    "block_recipe",
    "ResidualBlock",
    "fused_residual",
    "residual_reference",
    "ResidualMLPBlock",
    "residual_mlp_reference",
    "drop_path_scale",
    "record_dropout",
    "backend_for",
    "set_backend",
    "get_backend",
    "set_validate",
    "warmup",
    "save_tuning",
    "load_tuning",
    "ParityError",
    "SUPPORTED_DTYPES",
    "__version__",
]
