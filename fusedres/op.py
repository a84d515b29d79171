"""``fused_residual``: the fused op, its autograd, dispatch and input checks.

Two custom ops carry the work, so that ``torch.compile`` sees opaque, shape-known nodes:

- ``fusedres::residual_forward(x, weight, bias, alpha, proj_weight, alpha_value) -> y``
- ``fusedres::residual_backward(grad, x, weight, bias, alpha, proj_weight, need_*..., alpha_value)
  -> (dx, dW, db, dalpha, dP)``

``alpha`` is a one-element tensor (a pointer for the kernels, maybe learnable) or None; a Python
float alpha travels as ``alpha_value`` instead, a scalar kernel argument: no host-to-device copy.

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


def check_tensor_types(who: str, named: list[tuple[str, Tensor]]) -> None:
    """Each ``(name, tensor)`` is a tensor of a supported floating dtype, or a clear TypeError."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{who}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{who}: {name} has dtype {t.dtype}; supported: "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")


def check_one_device(who: str, named: list[tuple[str, Tensor]]) -> None:
    if len({t.device for _, t in named}) > 1:
        raise ValueError(f"{who}: all tensors must be on one device; got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named))


def gemm_operands(who: str, x: Tensor, params: list[tuple[str, Optional[Tensor]]]) -> list[Optional[Tensor]]:
    """The parameters as the GEMMs take them. Under ``torch.autocast`` they are cast to the
    autocast dtype, as ``F.linear`` casts them (so fp32 parameters get fp32 gradients; ``x`` keeps
    its dtype and is cast inside the kernels). Outside it, every dtype must be ``x``'s."""
    device_type = x.device.type
    tensors = [t for _, t in params]
    if torch.is_autocast_enabled(device_type):
        gemm_dtype = torch.get_autocast_dtype(device_type)
        if tensors[0].dtype in (torch.float32, torch.float16, torch.bfloat16):
            return [t.to(gemm_dtype) if t is not None else None for t in tensors]
        return tensors
    if any(t is not None and t.dtype != x.dtype for t in tensors):
        raise TypeError(f"{who}: dtypes differ: x {x.dtype}, "
                        + ", ".join(f"{n} {t.dtype}" for n, t in params if t is not None)
                        + "; cast them to one dtype, or run under torch.autocast")
    return tensors


def _check_inputs(x, weight, bias, alpha, proj_weight) -> None:
    """Raise a clear error for input the kernels cannot take, before anything is launched."""
    named = [("x", x), ("weight", weight)] + [(n, t) for n, t in (("bias", bias), ("proj_weight", proj_weight))
                                              if t is not None]
    if isinstance(alpha, Tensor):
        named.append(("alpha", alpha))
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"fused_residual: alpha must be a float or a one-element tensor, got {type(alpha).__name__}")
    check_tensor_types("fused_residual", named)
    if x.dim() == 0:
        raise ValueError("fused_residual: x must have shape (..., D); got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"fused_residual: weight must be 2-D, [out, in]; got {list(weight.shape)}")
    N, K = weight.shape
    if proj_weight is None and N != K:
        raise ValueError(f"fused_residual: weight must be square, [D, D], unless a proj_weight [out, in] "
                         f"is given; got {list(weight.shape)}")
    if proj_weight is not None and proj_weight.shape != weight.shape:
        raise ValueError(f"fused_residual: proj_weight must have weight's shape {list(weight.shape)}, "
                         f"got {list(proj_weight.shape)}")
    if x.shape[-1] != K:
        raise ValueError(f"fused_residual: x has last dim {x.shape[-1]}, but weight is {list(weight.shape)}: "
                         f"x must have shape (..., {K})")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"fused_residual: bias must have shape [{N}], got {list(bias.shape)}")
    if isinstance(alpha, Tensor) and alpha.numel() != 1:
        raise ValueError(f"fused_residual: alpha must have one element, got shape {list(alpha.shape)}")
    check_one_device("fused_residual", named)


def fused_residual(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, alpha: float | Tensor = 1.0,
                   proj_weight: Optional[Tensor] = None) -> Tensor:
    """Pre-activation residual block, fused: ``y = x + alpha * (relu(x) @ weight.T + bias)``, or
    with a projection shortcut ``y = x @ proj_weight.T + alpha * (relu(x) @ weight.T + bias)``.

    Args:
        x: ``(..., in)``, any strides; fp16, bf16, fp32 or fp64.
        weight: ``[out, in]`` in ``nn.Linear`` layout, x's dtype; square unless ``proj_weight``.
        bias: ``[out]`` or None, x's dtype.
        alpha: residual-branch scale, a float or a one-element tensor (learnable: it gets a
            gradient, at no extra GEMM). ``alpha = 0`` is ReZero's start.
        proj_weight: ``[out, in]`` projection for the shortcut when ``out != in``.

    Returns:
        ``y`` of shape ``(..., out)``, in ``x``'s dtype (under autocast, eager's type promotion).

    Under ``torch.autocast`` the GEMMs run in the autocast dtype, as ``F.linear``'s would: the
    weights and bias are cast (so fp32 parameters get fp32 gradients), ``x`` is cast inside the
    kernel, and the residual add keeps ``x``'s precision.
    """
    _check_inputs(x, weight, bias, alpha, proj_weight)
    device_type = x.device.type
    weight, bias, proj_weight = gemm_operands("fused_residual", x, [("weight", weight), ("bias", bias),
                                                                    ("proj_weight", proj_weight)])
    # A Python float goes by value (no host-to-device copy, nothing to capture); a tensor by pointer.
    alpha_value = 1.0
    if not isinstance(alpha, Tensor):
        alpha, alpha_value = None, float(alpha)
    with torch.autocast(device_type, enabled=False):
        return torch.ops.fusedres.residual_forward(x, weight, bias, alpha, proj_weight, alpha_value)


# ---------------------------------------------------------------------------------------------
# The custom ops


def _scale(alpha: Optional[Tensor], alpha_value: float):
    """The residual scale as the kernels and the eager reference take it: the tensor, the float,
    or None for 1."""
    if alpha is not None:
        return alpha
    return None if alpha_value == 1.0 else alpha_value


def _empty_like_output(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("fusedres::residual_forward", mutates_args=())
def residual_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor],
                     proj_weight: Optional[Tensor], alpha_value: float = 1.0) -> Tensor:
    alpha = _scale(alpha, alpha_value)
    if backend_for(x.device) == "eager":
        return eager_forward(x, weight, bias, alpha, proj_weight)
    rows, (xs,), (xk,) = plan_rows(x)
    y = _empty_like_output(x, weight)
    kernels.residual_fwd(xk, xs, weight, bias, y.view(rows.M, weight.shape[0]), rows, alpha=alpha,
                         proj_weight=proj_weight)
    check_forward(y, x, weight, bias, alpha, proj_weight)
    return y


@residual_forward.register_fake
def _(x, weight, bias, alpha, proj_weight, alpha_value=1.0):
    return _empty_like_output(x, weight)


@torch.library.custom_op("fusedres::residual_backward", mutates_args=())
def residual_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor],
                      proj_weight: Optional[Tensor], need_dx: bool, need_weight: bool, need_bias: bool,
                      need_alpha: bool, need_proj: bool, alpha_value: float = 1.0
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``residual_forward`` with respect to (x, weight, bias, alpha, proj_weight); an
    empty tensor stands for each gradient not asked for (and its kernel is not launched)."""
    needs = (need_dx, need_weight, need_bias, need_alpha, need_proj)
    alpha = _scale(alpha, alpha_value)
    if backend_for(x.device) == "eager":
        grads = eager_backward(grad, x, weight, bias, alpha, proj_weight, *needs)
    else:
        grads = _triton_backward(grad, x, weight, bias, alpha, proj_weight, *needs)
        check_backward(grads, grad, x, weight, bias, alpha, proj_weight)
    return tuple(t if t is not None else like.new_empty(0)
                 for t, like in zip(grads, (x, weight, weight, weight, weight)))


def _triton_backward(grad, x, weight, bias, alpha, proj_weight, need_dx, need_weight, need_bias, need_alpha,
                     need_proj):
    N, K = weight.shape
    rows, (gs, xs), (gk, xk) = plan_rows(grad, x)
    dx = dw = db = dalpha = dp = None
    if need_dx:
        dx = x.new_empty(x.shape)
        kernels.residual_dx(gk, gs, xk, xs, weight, dx.view(rows.M, K), rows, alpha=alpha, proj_weight=proj_weight)
    if need_weight or need_alpha or need_proj:
        # dW is the GEMM the dalpha and dP reductions ride on: it is computed whenever they are.
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dw = weight.new_empty(N, K)
        db = weight.new_empty(N) if need_bias else None
        dp = weight.new_empty(N, K) if need_proj else None
        # no zero fill: only the partials of the launch's own programs are summed
        partials = (torch.empty(kernels.dalpha_workspace_size(N, K, need_proj), device=x.device, dtype=acc)
                    if need_alpha else None)
        programs = kernels.residual_dw(gk, gs, xk, xs, dw, db, rows, weight=weight, bias=bias, alpha=alpha,
                                       dalpha_partials=partials, dp=dp)
        if need_alpha:
            dalpha = partials[:programs].sum().to(alpha.dtype).reshape(alpha.shape)
        if not need_weight:
            dw = None
    elif need_bias:
        # db alone is a column sum: a native reduction, with no GEMM to fold it into.
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        db = grad.reshape(-1, N).sum(0, dtype=acc)
        if isinstance(alpha, Tensor):
            db = db * alpha.to(acc)
        elif alpha is not None:
            db = db * alpha
        db = db.to(weight.dtype)
    return dx, dw, db, dalpha, dp


@residual_backward.register_fake
def _(grad, x, weight, bias, alpha, proj_weight, need_dx, need_weight, need_bias, need_alpha, need_proj,
      alpha_value=1.0):
    N, K = weight.shape
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(N, K) if need_weight else weight.new_empty(0),
            weight.new_empty(N) if need_bias else weight.new_empty(0),
            alpha.new_empty(alpha.shape) if need_alpha else weight.new_empty(0),
            weight.new_empty(N, K) if need_proj else weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, alpha, proj_weight, alpha_value = inputs
    ctx.has = tuple(t is not None for t in (bias, alpha, proj_weight))
    ctx.alpha_value = alpha_value
    # Saved: x, the weights, and alpha; the bias only when alpha needs its gradient (dalpha's
    # <g.sum(0), b> term). Never relu(x) or any other M x D tensor.
    keep_bias = bias if (alpha is not None and alpha.requires_grad) else None
    ctx.save_for_backward(x, weight, keep_bias, alpha, proj_weight)


def _backward(ctx, grad):
    x, weight, bias, alpha, proj_weight = ctx.saved_tensors
    has_bias, has_alpha, has_proj = ctx.has
    need_dx, need_weight, need_bias, need_alpha, need_proj = ctx.needs_input_grad[:5]
    needs = (need_dx, need_weight, need_bias and has_bias, need_alpha and has_alpha, need_proj and has_proj)
    grads = torch.ops.fusedres.residual_backward(grad, x, weight, bias, alpha, proj_weight, *needs,
                                                 ctx.alpha_value)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fused_residual: double backward (create_graph=True, then backward again) is not "
                       "supported; use fusedres.ResidualBlock for higher-order gradients")


def _no_double_backward_setup(ctx, inputs, output) -> None:
    pass


residual_forward.register_autograd(_backward, setup_context=_setup_context)
residual_backward.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)
