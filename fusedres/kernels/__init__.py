"""Pure Triton kernels of fusedres and their launchers: no ``nn``, no autograd.

- :func:`residual_fwd`: ``y = x + alpha * (relu(x) @ W.T + b)`` (or ``x @ P.T`` as the shortcut)
- :func:`residual_dx`: ``dx = g + alpha * (g @ W) * [x > 0]`` (or ``g @ P`` as the shortcut's part)
- :func:`residual_dw`: ``dW = alpha * g.T @ relu(x)`` with ``db``, ``dP`` and ``dalpha`` folded in,
  without atomics
- :func:`residual_stack_fwd`, :func:`residual_stack_bwd`: L blocks of width D <= 128 in one
  forward kernel, one backward kernel and a fixed-order reduce of the weight gradients
- :func:`launch.launch_pass`: a recipe's pass (:mod:`.recipe`) launched through the three
  launchers above with the operands its pieces name; the fused ops launch this way
"""
from ._common import INTERPRET, Rows, RowStrides, launch_counts, reset_launch_counts
from .configs import CONFIGS, DW_CONFIGS, DX_CONFIGS, FWD_CONFIGS, interpreter_config, shipped_configs
from .residual_bwd import dalpha_workspace_size, residual_dw, residual_dw_kernel, residual_dx, residual_dx_kernel
from .residual_fwd import NO_DROPOUT, NO_NORM, norm_operands, residual_fwd, residual_fwd_kernel
from . import norm
from .residual_stack import (
    STACK_WIDTHS,
    residual_stack_bwd,
    residual_stack_bwd_kernel,
    residual_stack_fwd,
    residual_stack_fwd_kernel,
    residual_stack_reduce_kernel,
)

__all__ = [
    "INTERPRET", "Rows", "RowStrides", "launch_counts", "reset_launch_counts",
    "CONFIGS", "FWD_CONFIGS", "DX_CONFIGS", "DW_CONFIGS", "interpreter_config", "shipped_configs",
    "NO_DROPOUT", "NO_NORM", "norm_operands", "norm",
    "residual_fwd", "residual_dx", "residual_dw", "dalpha_workspace_size",
    "residual_fwd_kernel", "residual_dx_kernel", "residual_dw_kernel",
    "STACK_WIDTHS", "residual_stack_fwd", "residual_stack_bwd",
    "residual_stack_fwd_kernel", "residual_stack_bwd_kernel", "residual_stack_reduce_kernel",
]
