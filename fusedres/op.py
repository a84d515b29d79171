"""``fused_residual``: the fused op, its autograd, dispatch and input checks.

Two custom ops carry the work, so that ``torch.compile`` sees opaque, shape-known nodes:

- ``fusedres::residual_forward(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale) -> y``
- ``fusedres::residual_backward(grad, x, weight, bias, alpha, proj_weight, need_*..., alpha_value,
  sample_scale)
  -> (dx, dW, db, dalpha, dP)``

``alpha`` is a one-element tensor (a pointer for the kernels, maybe learnable) or None; a Python
float alpha travels as ``alpha_value`` instead, a scalar kernel argument: no host-to-device copy.

The autograd formula saves ``x`` and ``weight`` only: ``relu(x)`` is recomputed in the kernels,
so training keeps no ``M x D`` tensor beyond the input it already holds.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .activations import ACTIVATIONS, Activation, ActLike, resolve as resolve_act
from .norm import NormLike
from ._layout import plan_rows
from .droppath import rows_per_sample, sample_rows
from .dropout import check_p as _check_p
from .kernels import plan as _plan_module
from .kernels.launch import launch_pass
from . import recipes as _recipes
from .kernels.residual_bwd import dx_head
from .kernels.residual_fwd import fwd_head
from .reference import eager_backward, eager_forward
from . import validate as _validate
from .validate import check_backward, check_forward

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("eager", "triton")


def read_environment() -> None:
    """Read ``FUSEDRES_BACKEND`` and ``FUSEDRES_VALIDATE`` (done once, at import: no call reads the
    environment). Call it again after changing them in ``os.environ``; or use :func:`set_backend`
    and :func:`fusedres.set_validate`."""
    global _forced
    _forced = os.environ.get("FUSEDRES_BACKEND", "").strip().lower() or None
    _validate.read_environment()
    kernels.configs.clear_prepared()      # plans hold the path each signature took


_forced: Optional[str] = None     # "eager", "triton", None (the default rule), or a bad value from the env
read_environment()


def set_backend(backend: Optional[str]) -> Optional[str]:
    """Force the path every later call takes, at run time: ``"eager"``, ``"triton"``, or None (or
    ``"auto"``) for the default rule of :func:`backend_for`. Returns the previous setting.
    ``FUSEDRES_BACKEND`` sets the initial value, read once at import."""
    global _forced
    value = None if backend is None else str(backend).strip().lower()
    if value == "auto" or value == "":
        value = None
    if value is not None and value not in _BACKENDS:
        raise ValueError(f"fusedres.set_backend: backend must be one of {_BACKENDS} or None, got {backend!r}")
    previous, _forced = _forced, value
    kernels.configs.clear_prepared()      # plans hold the path each signature took
    return previous


def get_backend() -> Optional[str]:
    """The forced path (``"eager"`` or ``"triton"``), or None for the default rule."""
    return _forced


def backend_for(device: torch.device | str) -> str:
    """Which path a tensor on ``device`` takes: ``"triton"`` or ``"eager"``.

    - :func:`fusedres.set_backend` (initially ``FUSEDRES_BACKEND``, read at import) may force one;
    - otherwise CUDA tensors run the compiled Triton kernels, CPU tensors run them in Triton's
      interpreter when ``TRITON_INTERPRET=1`` was set before import, and the eager reference
      when it was not (on a CPU the interpreter is a correctness tool, far slower than eager).
    """
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    forced = _forced
    if forced == "eager":
        return "eager"
    if forced is not None and forced != "triton":
        raise ValueError(f"FUSEDRES_BACKEND must be one of {_BACKENDS}, got {forced!r}")
    runs_triton = kind == "cuda" or (kind == "cpu" and kernels.INTERPRET)
    if forced == "triton" and not runs_triton:
        raise RuntimeError(
            f"FUSEDRES_BACKEND=triton, but Triton cannot run on a {kind} tensor here: CUDA tensors "
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


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` for a device type, False for the meta device (which autocast
    does not know: shape inference on meta tensors takes the custom ops' fake kernels)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, nothing on the meta device."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def gemm_operands(who: str, x: Tensor, params: list[tuple[str, Optional[Tensor]]]) -> list[Optional[Tensor]]:
    """The parameters as the GEMMs take them. Under ``torch.autocast`` they are cast to the
    autocast dtype, as ``F.linear`` casts them (so fp32 parameters get fp32 gradients; ``x`` keeps
    its dtype and is cast inside the kernels). Outside it, every dtype must be ``x``'s."""
    device_type = x.device.type
    tensors = [t for _, t in params]
    if autocast_enabled(device_type):
        gemm_dtype = torch.get_autocast_dtype(device_type)
        if tensors[0].dtype in (torch.float32, torch.float16, torch.bfloat16):
            return [t.to(gemm_dtype) if t is not None else None for t in tensors]
        return tensors
    if any(t is not None and t.dtype != x.dtype for t in tensors):
        raise TypeError(f"{who}: dtypes differ: x {x.dtype}, "
                        + ", ".join(f"{n} {t.dtype}" for n, t in params if t is not None)
                        + "; cast them to one dtype, or run under torch.autocast")
    return tensors


_RELU = ACTIVATIONS["relu"]


def _check_inputs(x, weight, bias, alpha, proj_weight, sample_scale=None) -> None:
    """Raise a clear error for input the kernels cannot take, before anything is launched."""
    named = [("x", x), ("weight", weight)] + [(n, t) for n, t in (("bias", bias), ("proj_weight", proj_weight),
                                                                  ("sample_scale", sample_scale)) if t is not None]
    if isinstance(alpha, Tensor):
        named.append(("alpha", alpha))
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"fused_residual: alpha must be a float, a one-element tensor or a per-channel tensor "
                        f"[out_features], got {type(alpha).__name__}")
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
    check_alpha_shape("fused_residual", alpha, N)
    check_sample_scale_arg("fused_residual", x, sample_scale)
    check_one_device("fused_residual", named)


def check_alpha_shape(who: str, alpha, out_features: int) -> None:
    """A tensor alpha is one element (any shape) or per channel, ``[out_features]`` (LayerScale)."""
    if isinstance(alpha, Tensor) and alpha.numel() != 1 and tuple(alpha.shape) != (out_features,):
        raise ValueError(f"{who}: a tensor alpha must have one element (a scalar scale) or shape "
                         f"[out_features] = [{out_features}] (a per-channel scale); got shape {list(alpha.shape)}")


def check_sample_scale_arg(who: str, x: Tensor, sample_scale: Optional[Tensor]) -> None:
    """Stochastic depth's ``s``: one value per index of x's first dimension (x at least 2-D: a
    sample dimension, then features), a constant (it gets no gradient)."""
    if sample_scale is None:
        return
    if x.dim() < 2:
        raise ValueError(f"{who}: sample_scale needs x with a sample dimension, (B, ..., D); got x of shape "
                         f"{list(x.shape)}")
    if tuple(sample_scale.shape) != (x.shape[0],):
        raise ValueError(f"{who}: sample_scale must have shape [x.shape[0]] = [{x.shape[0]}], one value per "
                         f"sample; got {list(sample_scale.shape)}")
    if sample_scale.requires_grad:
        raise ValueError(f"{who}: sample_scale is stochastic depth's drawn scale and gets no gradient; pass it "
                         "detached (fusedres.drop_path_scale draws it so)")


def fused_residual(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, alpha: float | Tensor = 1.0,
                   proj_weight: Optional[Tensor] = None, sample_scale: Optional[Tensor] = None,
                   act: ActLike = "relu", norm: NormLike = None, dropout: float = 0.0,
                   training: bool = True, _chain=None) -> Tensor:
    """Pre-activation residual block, fused: ``y = x + alpha * (act(x) @ weight.T + bias)``, or
    with a projection shortcut ``y = x @ proj_weight.T + alpha * (act(x) @ weight.T + bias)``.

    Args:
        x: ``(..., in)``, any strides; fp16, bf16, fp32 or fp64.
        weight: ``[out, in]`` in ``nn.Linear`` layout, x's dtype; square unless ``proj_weight``.
        bias: ``[out]`` or None, x's dtype.
        alpha: residual-branch scale, a float, a one-element tensor, or a per-channel tensor
            ``[out]`` (timm's LayerScale). A tensor may be learnable: its gradient costs no extra
            GEMM (a per-channel one is a column sum in the dW epilogue). ``alpha = 0`` is ReZero's
            start.
        proj_weight: ``[out, in]`` projection for the shortcut when ``out != in``.
        sample_scale: stochastic depth's per-sample scale ``s`` (:func:`fusedres.drop_path_scale`),
            ``[x.shape[0]]``, or None: ``y[b] = shortcut[b] + s[b] * alpha * branch[b]``, applied
            as a row scale in the kernels' epilogues (and to g in the backward's branch terms).
            A sample with ``s[b] = 0`` gets ``y[b] = x[b]`` exactly.
        act: the activation, a name or a torch module (:mod:`fusedres.activations`): ``"relu"``
            (default), ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"relu_sq"``, ``"leaky_relu"``, or
            ``nn.ReLU()``, ``nn.GELU()``, ``nn.SiLU()``, ``nn.LeakyReLU(slope)``. Its derivative is
            recomputed from x in the backward: nothing more is saved than for relu.
        norm: a normalization before the activation, He et al.'s full pre-activation
            ``y = x + alpha * (act(norm(x)) @ weight.T + bias)``: None (default), ``"batch"``,
            ``"layer"``, ``"rms"`` (parameter-free, torch's default eps; ``"batch"`` on batch
            statistics), or an ``nn.BatchNorm1d``, ``nn.LayerNorm`` or ``nn.RMSNorm`` instance, whose
            parameters, eps, mode and running statistics are used and updated as its own forward
            would (:mod:`fusedres.norm`). BatchNorm normalizes over every row of ``x.reshape(-1,
            D)``. Not with ``proj_weight``. The normalized tensor is never written: the kernels
            apply the statistics to their A tiles (:mod:`fusedres.norm_op`).

        dropout: the branch's dropout probability, applied with ``training`` (as
            ``F.dropout(..., p, training)``) before the scales and the add: ``y = x + alpha * s *
            dropout(act(norm(x)) @ weight.T + b)``. The keep mask is a pure function of a seed
            drawn per call from torch's generator and the element's (row, column): every kernel
            regenerates it, none stores it (:mod:`fusedres.dropout`; :func:`fusedres.record_dropout`
            returns the masks a call used). Not with ``proj_weight``.
        training: whether ``dropout`` applies (default True, as ``F.dropout``'s).
        _chain: internal (the modules' :func:`fusedres.chain.call_for`): the norm's statistics
            handed over by the previous block, the next block's norm to emit statistics for.

    Returns:
        ``y`` of shape ``(..., out)``, in ``x``'s dtype (under autocast, eager's type promotion).

    Under ``torch.autocast`` the GEMMs run in the autocast dtype, as ``F.linear``'s would: the
    weights and bias are cast (so fp32 parameters get fp32 gradients), ``x`` is cast inside the
    kernel, and the residual add keeps ``x``'s precision.
    """
    # The eager-mode path, inline: the same kernels and numbers as the custom ops, without their
    # per-call Python dispatch (torch.library.custom_op's autograd and redispatch cost 10-30 us a
    # call). Inputs are checked once per signature (_plan_for); a signature seen before replays its
    # prepared launches. torch.compile, tensor subclasses, dispatch modes, functorch transforms
    # and autocast (which casts the parameters first) take the custom op.
    if dropout:
        dropout = _check_p(dropout, "fused_residual: dropout")
        if not training:
            dropout = 0.0
    if norm is not None or dropout or _chain is not None:
        _check_inputs(x, weight, bias, alpha, proj_weight, sample_scale)
        if proj_weight is not None and norm is not None:
            raise ValueError("fused_residual: norm with a projection shortcut is not supported (which input the "
                             "shortcut takes, x or norm(x), differs between code bases); normalize before the block")
        if proj_weight is not None:
            raise ValueError("fused_residual: dropout with a projection shortcut is not supported by the fused "
                             "kernels; use fusedres.ResidualBlock (eager) for such a block")
        return _norm_op.fused_norm_residual(x, weight, bias, alpha, sample_scale, act, norm, dropout, _chain)
    # (eager_mode_call's checks, inline on this hot path; the meta device is sent to the custom op
    # below, when its signature has no plan)
    if (_is_compiling() or type(x) not in _PLAIN or type(weight) not in _PLAIN or _dispatch_modes()
            or _function_modes() or _functorch_active() or (_any_autocast() and torch.is_autocast_enabled(x.device.type))):
        return _through_custom_op(x, weight, bias, alpha, proj_weight, sample_scale, act)
    act = _RELU if act == "relu" else resolve_act(act, "fused_residual")
    if type(alpha) is float:
        alpha, alpha_value = None, alpha
    elif isinstance(alpha, Tensor):
        alpha_value = 1.0
    else:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            _check_inputs(x, weight, bias, alpha, proj_weight, sample_scale)     # raises for a bad alpha
        alpha, alpha_value = None, float(alpha)
    plan = _plans.get((x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), weight.dtype,
                       weight.device, None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device),
                       alpha_value == 1.0 if alpha is None else (alpha.shape, alpha.stride(), alpha.dtype,
                                                                 alpha.device),
                       None if proj_weight is None else _meta(proj_weight), _matmul_precision(),
                       None if sample_scale is None else (_meta(sample_scale), sample_scale.requires_grad), act))
    if plan is None:
        if x.device.type == "meta":     # shape inference: the custom op's fake kernel (off the hot path)
            return _through_custom_op(x, weight, bias, alpha if alpha is not None else alpha_value, proj_weight,
                                      sample_scale, act)
        plan = _plan_for(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale, act=act)
    if _grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)
                                    or (alpha is not None and alpha.requires_grad)
                                    or (proj_weight is not None and proj_weight.requires_grad)):
        return _apply_fused(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale, plan)
    return plan.forward(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale)


# Module-level names for what every call checks: one lookup each instead of two or three.
_is_compiling = torch.compiler.is_compiling     # (the same function: torch.compile still folds it to True)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_any_autocast = torch._C._is_any_autocast_enabled
_grad_enabled = torch.is_grad_enabled
_empty_like = torch.empty_like


def _through_custom_op(x, weight, bias, alpha, proj_weight, sample_scale=None, act: ActLike = "relu") -> Tensor:
    """What ``torch.compile`` traces (and any tensor subclass or dispatch mode meets): the
    ``fusedres::residual_forward`` custom op, whose registered autograd calls
    ``fusedres::residual_backward``."""
    _check_inputs(x, weight, bias, alpha, proj_weight, sample_scale)
    act = resolve_act(act, "fused_residual")
    device_type = x.device.type
    weight, bias, proj_weight = gemm_operands("fused_residual", x, [("weight", weight), ("bias", bias),
                                                                    ("proj_weight", proj_weight)])
    # A Python float goes by value (no host-to-device copy, nothing to capture; fp64: a one-element
    # tensor cached per value, kernels.residual_fwd.alpha_args); a tensor by pointer.
    alpha_value = 1.0
    if not isinstance(alpha, Tensor):
        alpha, alpha_value = None, float(alpha)
    with autocast_off(device_type):
        return torch.ops.fusedres.residual_forward(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale,
                                                   act.name, act.param)


_PLAIN = (Tensor, torch.nn.Parameter)


def eager_node(name: str, implementation, setup_context, backward_rule) -> type:
    """The eager-mode autograd node of a custom op (:func:`eager_mode_call`): its implementation,
    saved tensors (``setup_context``) and backward (``backward_rule(ctx, *grads, direct=...)``)
    called directly, without the op's per-call dispatch. Under ``create_graph=True`` the backward
    goes through the backward custom op (``direct=False``), whose autograd refuses a second
    backward."""
    def forward(ctx, *inputs):
        out = implementation(*inputs)
        setup_context(ctx, inputs, out)
        return out

    def backward(ctx, *grads):
        return backward_rule(ctx, *grads, direct=not torch.is_grad_enabled())
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward),
                                                   "__doc__": eager_node.__doc__})


def eager_mode_call(x: Tensor, weight: Tensor) -> bool:
    """Whether a call may skip the custom ops' per-call Python dispatch (their autograd and
    redispatch) and call their implementation directly: not under torch.compile, tensor
    subclasses, dispatch or function modes, functorch transforms or autocast (which casts the
    parameters first), and not on the meta device (the fake kernels infer its shapes). The
    fused ops' eager-mode paths all decide by it."""
    return not (_is_compiling() or type(x) not in _PLAIN or type(weight) not in _PLAIN or _dispatch_modes()
                or _function_modes() or _functorch_active() or x.device.type == "meta"
                or (_any_autocast() and torch.is_autocast_enabled(x.device.type)))


class _FusedResidual(torch.autograd.Function):
    """The eager-mode autograd node: the custom ops' forward, saved tensors and backward, called
    directly. Under ``create_graph=True`` the backward goes through ``fusedres::residual_backward``,
    whose autograd makes a second backward the same clear error as on the custom-op path."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, proj_weight, alpha_value, sample_scale, plan):
        # as _setup_context, inline (this runs on every training step's forward)
        ctx.save_for_backward(x, weight, bias if (alpha is not None and alpha.requires_grad) else None, alpha,
                              proj_weight, sample_scale)
        ctx.state = (plan, alpha_value, bias is not None, alpha is not None, proj_weight is not None)
        launch = plan.fwd
        if launch is not None and plan.fast and not _validate.ENABLED:     # _Plan.forward's fast path, inline
            y = _empty_like(x)
            launch.run(fwd_head(x, weight, bias, y, alpha if alpha is not None else
                                (None if alpha_value == 1.0 else alpha_value), proj_weight, None, sample_scale))
            return y
        return plan.forward(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, alpha, proj_weight, sample_scale = ctx.saved_tensors
        plan, alpha_value, has_bias, has_alpha, has_proj = ctx.state
        need_dx, need_weight, need_bias, need_alpha, need_proj = ctx.needs_input_grad[:5]
        needs = (need_dx, need_weight, need_bias and has_bias, need_alpha and has_alpha, need_proj and has_proj)
        if torch.is_grad_enabled():
            grads = torch.ops.fusedres.residual_backward(grad, x, weight, bias, alpha, proj_weight, *needs,
                                                         alpha_value, sample_scale, plan.act.name, plan.act.param)
        else:
            grads = plan.backward(grad, x, weight, bias, alpha, proj_weight, needs, alpha_value, sample_scale)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


# torch.autograd.Function.apply's C implementation. The Python classmethod over it adds only
# functorch's wrapper handling (about 2 us a call); _lean takes the custom op whenever a functorch
# transform is active, so it calls the C apply directly.
_apply_fused = super(torch.autograd.Function, _FusedResidual).apply


# ---------------------------------------------------------------------------------------------
# Launch plans: what one input signature fixes


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


# "tf32" or "ieee", whichever API set it (kernels.configs.fp32_matmul_precision): on every call, so
# the plan key binds the C getter it reads where torch has it, without the Python call around it.
_matmul_precision = (functools.partial(kernels.configs._fp32_precision_getter, "cuda", "matmul")
                     if kernels.configs._fp32_precision_getter is not None else kernels.configs.fp32_matmul_precision)


def _signature(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale=None, act: Activation = _RELU) -> tuple:
    """Everything a call's checks, allocations and launches depend on, but the data: shapes,
    strides, dtypes, devices, which optional operands there are, a float alpha of 1 (no scale) or
    not, torch's fp32 matmul precision (tf32 or IEEE), and stochastic depth's scale (its
    requires_grad too: the check that refuses it runs once per signature), and the activation's table
    row. (fused_residual builds
    the same tuple inline, a Python call less on every call: keep the two equal.)"""
    return (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), weight.dtype, weight.device,
            None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device),
            alpha_value == 1.0 if alpha is None else (alpha.shape, alpha.stride(), alpha.dtype, alpha.device),
            None if proj_weight is None else _meta(proj_weight), _matmul_precision(),
            None if sample_scale is None else (_meta(sample_scale), sample_scale.requires_grad), act)


# signature -> _Plan. Bounded: cleared when it grows past _PLANS_MAX; emptied by
# kernels.configs.clear_prepared when a config override, forced split, tuning or mode changes.
_plans: dict = kernels.configs.register_prepared_cache({})
_op_plans: dict = kernels.configs.register_prepared_cache({})
_PLANS_MAX = 4096


def _plan_for(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale=None, plans: dict = _plans, *,
              act: Activation = _RELU) -> "_Plan":
    """The plan of this call's signature: found, or made after the input checks (which run once
    per signature: a signature that passed them once passes them always). ``fused_residual``'s
    plans (``_plans``) also hold its dtype rule (parameters in x's dtype outside autocast); the
    custom ops' (``_op_plans``) take what autocast made, parameters cast, x not."""
    key = _signature(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale, act)
    plan = plans.get(key)
    if plan is None:
        _check_inputs(x, weight, bias, alpha if alpha is not None else alpha_value, proj_weight, sample_scale)
        if plans is _plans:
            gemm_operands("fused_residual", x, [("weight", weight), ("bias", bias), ("proj_weight", proj_weight)])
        if len(plans) >= _PLANS_MAX:
            plans.clear()
        plan = plans[key] = _Plan(x, weight, bias, sample_scale, alpha, act, alpha_value, proj_weight is not None)
    return plan


class _Plan:
    """One input signature's path, row layout, output, and prepared launches.

    The first call of a signature launches through :mod:`fusedres.kernels`' launchers (config
    choice, autotuning on a GPU, split plan) and keeps each launch as a
    :class:`~fusedres.kernels.configs.PreparedLaunch`; later calls only allocate their outputs and
    replay those launches with their own tensors. Same kernels, configs, grids and arguments, so
    the same results and launch counts. The launches are the passes of the signature's recipe
    (:func:`fusedres.recipes.single_passes`), those of the gradients a backward wants, each
    launched by :func:`~fusedres.kernels.launch.launch_pass`.
    """
    __slots__ = ("eager", "rows", "xs", "copy_x", "copy_bias", "copy_s", "copy_alpha", "rows_per_sample", "out_shape",
                 "out_dtype", "like_x", "fast", "fwd", "bwd", "act", "proj")

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], sample_scale: Optional[Tensor] = None,
                 alpha: Optional[Tensor] = None, act: Activation = _RELU, alpha_value: float = 1.0,
                 proj: bool = False):
        self.act = act
        self.proj = proj
        warn_if_ungated(act, x.device)
        self.eager = backend_for(x.device) == "eager"
        self.rows, (self.xs,), (xk,) = plan_rows(x)
        self.copy_x = xk is not x
        # the kernels read bias[n] at n: a strided bias is made contiguous (D elements)
        self.copy_bias = bias is not None and bias.numel() > 1 and bias.stride(0) != 1
        self.copy_s = sample_scale is not None and sample_scale.numel() > 1 and sample_scale.stride(0) != 1
        self.copy_alpha = alpha is not None and alpha.numel() > 1 and alpha.stride(0) != 1     # per channel
        self.rows_per_sample = rows_per_sample(x) if sample_scale is not None else 1
        self.out_shape = (*x.shape[:-1], weight.shape[0])
        self.out_dtype = torch.promote_types(x.dtype, weight.dtype)
        # y as x's own layout (the cheapest allocation) when that is the row-major output
        self.like_x = x.is_contiguous() and self.out_shape == x.shape and self.out_dtype == x.dtype
        # the common case: Triton, no copies, y like x
        self.fast = self.like_x and not (self.eager or self.copy_x or self.copy_bias or self.copy_s or self.copy_alpha)
        self.fwd = None
        self.bwd: dict = {}

    def forward(self, x, weight, bias, alpha, proj_weight, alpha_value, sample_scale=None) -> Tensor:
        launch = self.fwd
        if launch is not None and self.fast:
            y = _empty_like(x)
            launch.run(fwd_head(x, weight, bias, y, alpha if alpha is not None else
                                (None if alpha_value == 1.0 else alpha_value), proj_weight, None, sample_scale))
            if _validate.ENABLED:
                check_forward(y, x, weight, bias, _scale(alpha, alpha_value), proj_weight, sample_scale, self.act)
            return y
        if self.eager:      # (contiguous, as the custom op's fake kernel promises)
            return eager_forward(x, weight, bias, _scale(alpha, alpha_value), proj_weight, sample_scale,
                                 self.act).contiguous()
        if self.copy_x:
            x = plan_rows(x)[2][0]
        if self.copy_bias:
            bias = bias.contiguous()
        if self.copy_s:
            sample_scale = sample_scale.contiguous()
        if self.copy_alpha:
            alpha = alpha.contiguous()
        y = torch.empty_like(x) if self.like_x else x.new_empty(self.out_shape, dtype=self.out_dtype)
        scale = _scale(alpha, alpha_value)
        if self.fwd is not None:
            self.fwd.run(fwd_head(x, weight, bias, y, scale, proj_weight, None, sample_scale))
        else:
            fwd = _recipes.single_passes(weight, bias is not None, alpha, alpha_value, sample_scale, self.act.name,
                                         self.act.param, proj=self.proj)["fwd"]
            self.fwd = launch_pass(fwd, self.rows, x, self.xs, weight,
                                   y.view(self.rows.M, weight.shape[0]), bias=bias, alpha=scale,
                                   proj_weight=proj_weight, sample_scale=sample_scale,
                                   rows_per_sample=self.rows_per_sample)
        if _validate.ENABLED:
            check_forward(y, x, weight, bias, scale, proj_weight, sample_scale, self.act)
        return y

    def backward(self, grad, x, weight, bias, alpha, proj_weight, needs, alpha_value, sample_scale=None):
        """(dx, dW, db, dalpha, dP), None for each not asked for."""
        scale = _scale(alpha, alpha_value)
        if self.eager:
            return eager_backward(grad, x, weight, bias, scale, proj_weight, *needs, sample_scale=sample_scale,
                                  act=self.act)
        # (the backward's bias is None unless alpha needs its gradient: only then saved)
        if self.copy_bias and bias is not None:
            bias = bias.contiguous()
        if self.copy_s and sample_scale is not None:
            sample_scale = sample_scale.contiguous()
        if self.copy_alpha:
            scale = scale.contiguous()
        key = (grad.shape, grad.stride(), grad.dtype, grad.device, needs, bias is None, _plan_module.forced_splits(),
               _matmul_precision())
        launches = self.bwd.get(key)
        if launches is None:
            launches = self.bwd[key] = _BackwardLaunches(grad, x, _recipes.single_passes(
                weight, bias is not None or needs[2], alpha, alpha_value, sample_scale, self.act.name,
                self.act.param, proj=self.proj, needs=frozenset(n for n, need in zip(_NEEDS, needs) if need)))
        grads = launches.run(grad, x, weight, bias, scale, proj_weight, needs[1], needs[2], sample_scale,
                             self.rows_per_sample)
        if _validate.ENABLED:
            check_backward(grads, grad, x, weight, bias, scale, proj_weight, sample_scale, self.act)
        return grads


#: The single block's gradients in the order of the backward's needs (``Recipe.passes``' names).
_NEEDS = ("x", "weight", "bias", "alpha", "proj_weight")


class _BackwardLaunches:
    """The backward's row layout and prepared dx and dW launches, for one (grad layout, needed
    gradients) of a forward signature: the passes of those gradients."""
    __slots__ = ("rows", "gs", "xs", "copy", "dx", "dw", "dx_pass", "dw_pass")

    def __init__(self, grad: Tensor, x: Tensor, launches: dict):
        self.rows, (self.gs, self.xs), (gk, xk) = plan_rows(grad, x)
        self.copy = gk is not grad or xk is not x
        self.dx = self.dw = None
        self.dx_pass, self.dw_pass = launches["dx"], launches["dw"]

    def run(self, grad, x, weight, bias, alpha, proj_weight, need_weight, need_bias, sample_scale=None,
            rows_per_sample=1):
        """(dx, dW, db, dalpha, dP) by the passes: None for each not launched (dW None unless
        ``need_weight``; db alone, ``need_bias`` without a dW pass, a native reduction)."""
        N, K = weight.shape
        rows, gs, xs = self.rows, self.gs, self.xs
        if self.copy:
            rows, (gs, xs), (grad, x_rows) = plan_rows(grad, x)
        else:
            x_rows = x
        dx = dw = db = dalpha = dp = None
        if self.dx_pass is not None:
            dx = x.new_empty(x.shape)
            if self.dx is not None:
                self.dx.run(dx_head(grad, x_rows, weight, dx, alpha, proj_weight, None, sample_scale))
            else:
                self.dx = launch_pass(self.dx_pass, rows, x_rows, xs, weight, dx.view(rows.M, K), g=grad, gs=gs,
                                      alpha=alpha, proj_weight=proj_weight, sample_scale=sample_scale,
                                      rows_per_sample=rows_per_sample)
        if self.dw_pass is not None:
            # dW is the GEMM the dalpha and dP reductions ride on: it is computed whenever they are.
            acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
            has = self.dw_pass.pieces.__contains__
            dw = weight.new_empty(N, K)
            db = weight.new_empty(N) if has("db") else None
            dp = weight.new_empty(N, K) if has("proj") else None
            # no zero fill: only the partials of the launch's own programs are summed
            partials = (torch.empty(kernels.dalpha_workspace_size(N, K, dp is not None, alpha.numel() > 1),
                                    device=x.device, dtype=acc) if has("dalpha") else None)
            if self.dw is not None:
                programs = self.dw(grad, x_rows, dw, db, weight=weight, bias=bias, alpha=alpha,
                                   dalpha_partials=partials, dp=dp, sample_scale=sample_scale)
            else:
                self.dw = launch_pass(self.dw_pass, rows, x_rows, xs, weight, dw, g=grad, gs=gs, bias=bias,
                                      alpha=alpha, db=db, dalpha_partials=partials, dp=dp, sample_scale=sample_scale,
                                      rows_per_sample=rows_per_sample)
                programs = self.dw.programs
            if partials is not None:
                dalpha = dalpha_from_partials(partials, programs, alpha, N)
            if not need_weight:
                dw = None
        elif need_bias:
            db = bias_grad(grad, sample_scale, alpha, weight)
        return dx, dw, db, dalpha, dp


def weight_grads(p, g, gs, x, xs, rows, weight, bias, need_weight, alpha=None, **operands):
    """``(dW, db, dalpha)`` of ``alpha * (g.T @ act(x))`` by the dW pass ``p``: one launch (split-M
    where the plan says) with db and the dalpha partials folded in where the pass names them
    (None otherwise; dW None unless ``need_weight``). ``alpha``: the scale as the kernels take it
    (a tensor when the pass names dalpha); ``operands``: the rest of
    :func:`~fusedres.kernels.launch.launch_pass`'s (row scale, norm, dropout)."""
    N, K = weight.shape
    has = p.pieces.__contains__
    dw = weight.new_empty(N, K)
    db = weight.new_empty(N) if has("db") else None
    partials = (torch.empty(kernels.dalpha_workspace_size(N, K, False, alpha.numel() > 1), device=x.device,
                            dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
                if has("dalpha") else None)
    prepared = launch_pass(p, rows, x, xs, weight, dw, g=g, gs=gs, bias=bias, alpha=alpha, db=db,
                           dalpha_partials=partials, **operands)
    dalpha = dalpha_from_partials(partials, prepared.programs, alpha, N) if partials is not None else None
    return (dw if need_weight else None), db, dalpha


def bias_grad(grad: Tensor, sample_scale: Optional[Tensor], alpha, weight: Tensor) -> Tensor:
    """db alone (no dW GEMM to fold it into): ``alpha * (s * g).sum over rows``, a native reduction."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    g = grad if sample_scale is None else grad * sample_rows(sample_scale, grad)
    db = g.reshape(-1, weight.shape[0]).sum(0, dtype=acc)
    if isinstance(alpha, Tensor):
        db = db * alpha.to(acc)
    elif alpha is not None:
        db = db * alpha
    return db.to(weight.dtype)


_warned: set = set()


def warn_if_ungated(act: Optional[Activation], device: torch.device) -> None:
    """On a CUDA device whose arch the activation's tile lists were not gated on, warn once."""
    if act is None or act.name == "relu" or device.type != "cuda":
        return
    limits = kernels.device.limits_for(device)
    arch = kernels.configs.gate_arch(limits.capability) if limits is not None else None
    if arch is not None and arch not in kernels.configs.ACT_GATED_ARCHS:
        warn_ungated(act.name, arch)


def warn_ungated(name: str, arch: str) -> None:
    """Once per activation and arch: the row's tiles were gate-derived on sm_80 and sm_90
    (configs.ACT_GATED_ARCHS); this arch takes its family's list, not compiled for it."""
    if (name, arch) not in _warned:
        _warned.add((name, arch))
        import warnings
        warnings.warn(f"fusedres: the tiles of activation {name!r} were chosen with the compile gate on "
                      f"{', '.join(kernels.configs.ACT_GATED_ARCHS)}; this GPU ({arch}) takes its family's list, "
                      f"not gated for it (python -m fusedres.aot --cover --archs {arch} --acts {name}). Results "
                      "are exact; a tile may spill registers", RuntimeWarning, stacklevel=3)


def dalpha_from_partials(partials: Tensor, programs: int, alpha: Tensor, N: int) -> Tensor:
    """dalpha from the dW kernels' partials: the sum of the first ``programs`` (a scalar alpha), or
    per feature the sum of ``programs`` rows of ``N`` (a per-channel alpha), in a fixed order."""
    if alpha.numel() > 1:
        return partials[:programs * N].view(programs, N).sum(0).to(alpha.dtype).reshape(alpha.shape)
    return partials[:programs].sum().to(alpha.dtype).reshape(alpha.shape)


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


def _activation(act: str, act_param: float) -> Activation:
    """The custom ops' ``(act, act_param)`` as the table row (validated)."""
    if act == "relu":
        return _RELU
    row = resolve_act(act, "fusedres::residual_forward")
    return row if row.name != "leaky_relu" else Activation("leaky_relu", float(act_param))


def _forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor],
                  proj_weight: Optional[Tensor], alpha_value: float = 1.0, sample_scale: Optional[Tensor] = None,
                  act: str = "relu", act_param: float = 0.0) -> Tensor:
    row = _activation(act, act_param)
    return _plan_for(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale, _op_plans, act=row).forward(
        x, weight, bias, alpha, proj_weight, alpha_value, sample_scale)


@torch.library.custom_op("fusedres::residual_forward", mutates_args=())
def residual_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor],
                     proj_weight: Optional[Tensor], alpha_value: float = 1.0,
                     sample_scale: Optional[Tensor] = None, act: str = "relu", act_param: float = 0.0) -> Tensor:
    return _forward_impl(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale, act, act_param)


@residual_forward.register_fake
def _(x, weight, bias, alpha, proj_weight, alpha_value=1.0, sample_scale=None, act="relu", act_param=0.0):
    return _empty_like_output(x, weight)


@torch.library.custom_op("fusedres::residual_backward", mutates_args=())
def residual_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor],
                      proj_weight: Optional[Tensor], need_dx: bool, need_weight: bool, need_bias: bool,
                      need_alpha: bool, need_proj: bool, alpha_value: float = 1.0,
                      sample_scale: Optional[Tensor] = None, act: str = "relu",
                      act_param: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``residual_forward`` with respect to (x, weight, bias, alpha, proj_weight); an
    empty tensor stands for each gradient not asked for (and its kernel is not launched)."""
    grads = _backward_impl(grad, x, weight, bias, alpha, proj_weight, need_dx, need_weight, need_bias, need_alpha,
                           need_proj, alpha_value, sample_scale, act, act_param)
    return tuple(t if t is not None else like.new_empty(0)
                 for t, like in zip(grads, (x, weight, weight, weight, weight)))


def _backward_impl(grad, x, weight, bias, alpha, proj_weight, need_dx, need_weight, need_bias, need_alpha,
                   need_proj, alpha_value=1.0, sample_scale=None, act="relu", act_param=0.0):
    """(dx, dW, db, dalpha, dP), None for each not asked for: both paths' backward."""
    plan = _plan_for(x, weight, bias, alpha, proj_weight, alpha_value, sample_scale, _op_plans,
                     act=_activation(act, act_param))
    return plan.backward(grad, x, weight, bias, alpha, proj_weight,
                         (need_dx, need_weight, need_bias, need_alpha, need_proj), alpha_value, sample_scale)


@residual_backward.register_fake
def _(grad, x, weight, bias, alpha, proj_weight, need_dx, need_weight, need_bias, need_alpha, need_proj,
      alpha_value=1.0, sample_scale=None, act="relu", act_param=0.0):
    N, K = weight.shape
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(N, K) if need_weight else weight.new_empty(0),
            weight.new_empty(N) if need_bias else weight.new_empty(0),
            alpha.new_empty(alpha.shape) if need_alpha else weight.new_empty(0),
            weight.new_empty(N, K) if need_proj else weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, alpha, proj_weight, alpha_value, sample_scale, act, act_param = inputs
    ctx.has = (bias is not None, alpha is not None, proj_weight is not None)
    ctx.alpha_value, ctx.act = alpha_value, (act, act_param)
    # Saved: x, the weights, alpha and stochastic depth's s; the bias only when alpha needs its
    # gradient (dalpha's <g.sum(0), b> term). Never relu(x) or any other M x D tensor.
    keep_bias = bias if (alpha is not None and alpha.requires_grad) else None
    ctx.save_for_backward(x, weight, keep_bias, alpha, proj_weight, sample_scale)


def _backward(ctx, grad):
    x, weight, bias, alpha, proj_weight, sample_scale = ctx.saved_tensors
    has_bias, has_alpha, has_proj = ctx.has
    need_dx, need_weight, need_bias, need_alpha, need_proj = ctx.needs_input_grad[:5]
    needs = (need_dx, need_weight, need_bias and has_bias, need_alpha and has_alpha, need_proj and has_proj)
    grads = torch.ops.fusedres.residual_backward(grad, x, weight, bias, alpha, proj_weight, *needs,
                                                 ctx.alpha_value, sample_scale, *ctx.act)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


def refuse_double_backward(backward_op, who: str, reference: str) -> None:
    """Register on a backward custom op an autograd that raises a clear error: a second backward
    through it (``create_graph=True``, then backward again) is not supported."""
    def refuse(ctx, *grads):
        raise RuntimeError(f"{who}: double backward (create_graph=True, then backward again) is not supported; "
                           f"use fusedres.{reference} for higher-order gradients")

    backward_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


residual_forward.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(residual_backward, "fused_residual", "ResidualBlock")


from . import norm_op as _norm_op      # (last: it registers its custom ops with this module's helpers)
