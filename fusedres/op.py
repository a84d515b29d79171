"""``fused_residual``: the fused op, its autograd, dispatch and input checks.

Two custom ops carry the work, so that ``torch.compile`` sees opaque, shape-known nodes:

- ``fusedres::residual_forward(x, weight, bias) -> y``
- ``fusedres::residual_backward(grad, x, weight, need_dx, need_weight, need_bias) -> (dx, dW, db)``

The autograd formula saves ``x`` and ``weight`` only: ``relu(x)`` is recomputed in the kernels,
so training keeps no ``M x D`` tensor beyond the input it already holds.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import kernels
from ._layout import plan_rows
from .reference import eager_backward, eager_forward
from .validate import check_backward, check_forward

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("eager", "triton")


def backend_for(device: torch.device | str) -> str:
    """Which path a tensor on ``device`` takes: ``"triton"`` or ``"eager"``.

    - ``FUSEDRES_BACKEND=eager`` or ``=triton`` forces one;
    - otherwise CUDA tensors run the compiled Triton kernels, CPU tensors run them in Triton's
      interpreter when ``TRITON_INTERPRET=1`` was set before import, and the eager reference
      when it was not (on a CPU the interpreter is a correctness tool, far slower than eager).
    """
    device = torch.device(device)
    forced = os.environ.get("FUSEDRES_BACKEND", "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(f"FUSEDRES_BACKEND must be one of {_BACKENDS}, got {forced!r}")
    if forced == "eager":
        return "eager"
    runs_triton = device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRET)
    if forced == "triton" and not runs_triton:
        raise RuntimeError(
            f"FUSEDRES_BACKEND=triton, but Triton cannot run on a {device.type} tensor here: CUDA tensors "
            "need a GPU, CPU tensors need TRITON_INTERPRET=1 set before fusedres is imported")
    return "triton" if runs_triton else "eager"


def _check_inputs(x, weight, bias) -> None:
    """Raise a clear error for input the kernels cannot take, before anything is launched."""
    named = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"fused_residual: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"fused_residual: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"fused_residual: {name} has dtype {t.dtype}; supported: "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if x.dim() == 0:
        raise ValueError("fused_residual: x must have shape (..., D); got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"fused_residual: weight must be square, [D, D]; got {list(weight.shape)}")
    D = weight.shape[1]
    if x.shape[-1] != D:
        raise ValueError(f"fused_residual: x has last dim {x.shape[-1]}, but weight is [{D}, {D}]: "
                         f"x must have shape (..., {D})")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"fused_residual: bias must have shape [{D}], got {list(bias.shape)}")
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        raise ValueError("fused_residual: x, weight and bias must be on one device; got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named))


def fused_residual(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Pre-activation residual block ``y = x + relu(x) @ weight.T + bias``, fused.

    Args:
        x: ``(..., D)``, any strides; fp16, bf16, fp32 or fp64.
        weight: ``[D, D]`` in ``nn.Linear`` layout (``out_features x in_features``), x's dtype.
        bias: ``[D]`` or None, x's dtype.

    Returns:
        ``y`` with ``x``'s shape, in ``x``'s dtype (under autocast, eager's type promotion).

    Under ``torch.autocast`` the GEMM runs in the autocast dtype, as ``F.linear`` would: the
    weight and bias are cast (so fp32 parameters get fp32 gradients), ``x`` is cast inside the
    kernel, and the residual add keeps ``x``'s precision.
    """
    _check_inputs(x, weight, bias)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        gemm_dtype = torch.get_autocast_dtype(device_type)
        if weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.to(gemm_dtype)
            bias = bias.to(gemm_dtype) if bias is not None else None
    elif x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"fused_residual: dtypes differ: x {x.dtype}, weight {weight.dtype}"
                        + (f", bias {bias.dtype}" if bias is not None else "")
                        + "; cast them to one dtype, or run under torch.autocast")
    with torch.autocast(device_type, enabled=False):
        return torch.ops.fusedres.residual_forward(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# The custom ops


def _empty_like_output(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("fusedres::residual_forward", mutates_args=())
def residual_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if backend_for(x.device) == "eager":
        return eager_forward(x, weight, bias)
    D = weight.shape[0]
    rows, (xs,), (xk,) = plan_rows(x)
    y = _empty_like_output(x, weight)
    kernels.residual_fwd(xk, xs, weight, bias, y.view(rows.M, D), rows)
    check_forward(y, x, weight, bias)
    return y


@residual_forward.register_fake
def _(x, weight, bias):
    return _empty_like_output(x, weight)


@torch.library.custom_op("fusedres::residual_backward", mutates_args=())
def residual_backward(grad: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_weight: bool,
                      need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``residual_forward`` with respect to x, weight and bias; an empty tensor
    stands for each gradient not asked for (and its kernel is not launched)."""
    if backend_for(x.device) == "eager":
        dx, dw, db = eager_backward(grad, x, weight, need_dx, need_weight, need_bias)
    else:
        dx, dw, db = _triton_backward(grad, x, weight, need_dx, need_weight, need_bias)
        check_backward((dx, dw, db), grad, x, weight)
    return (dx if dx is not None else x.new_empty(0),
            dw if dw is not None else weight.new_empty(0),
            db if db is not None else weight.new_empty(0))


def _triton_backward(grad, x, weight, need_dx, need_weight, need_bias):
    D = weight.shape[0]
    rows, (gs, xs), (gk, xk) = plan_rows(grad, x)
    dx = dw = db = None
    if need_dx:
        dx = x.new_empty(x.shape)
        kernels.residual_dx(gk, gs, xk, xs, weight, dx.view(rows.M, D), rows)
    if need_weight:
        dw = weight.new_empty(D, D)
        db = weight.new_empty(D) if need_bias else None
        kernels.residual_dw(gk, gs, xk, xs, dw, db, rows)
    elif need_bias:
        # db alone is a column sum: a native reduction, with no GEMM to fold it into.
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        db = grad.reshape(-1, D).sum(0, dtype=acc).to(weight.dtype)
    return dx, dw, db


@residual_backward.register_fake
def _(grad, x, weight, need_dx, need_weight, need_bias):
    D = weight.shape[0]
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(D, D) if need_weight else weight.new_empty(0),
            weight.new_empty(D) if need_bias else weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_dx, need_weight, need_bias = ctx.needs_input_grad
    need_bias = need_bias and ctx.has_bias
    dx, dw, db = torch.ops.fusedres.residual_backward(grad, x, weight, need_dx, need_weight, need_bias)
    return dx if need_dx else None, dw if need_weight else None, db if need_bias else None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fused_residual: double backward (create_graph=True, then backward again) is not "
                       "supported; use fusedres.ResidualBlock for higher-order gradients")


def _no_double_backward_setup(ctx, inputs, output) -> None:
    pass


residual_forward.register_autograd(_backward, setup_context=_setup_context)
residual_backward.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)
