"""The fully fused narrow residual stack: ``fused_residual_stack`` and ``FusedResidualStack``.

``L`` blocks ``x_{l+1} = x_l + relu(x_l) @ W_l.T + b_l`` of width ``D`` in {16, 32, 64, 128} run
as one forward kernel and one backward kernel (plus a fixed-order reduce of the weight
gradients). See ``fusedres/kernels/residual_stack.py`` for the kernels and docs/stack.md, "The narrow
stack" for when it pays.

Two custom ops carry the work, so that ``torch.compile`` sees opaque, shape-known nodes:

- ``fusedres::stack_forward(x, weight, bias, save) -> (y, saved)``: ``saved`` is
  ``[L-1, M, D]`` (``x_1 .. x_{L-1}``) when ``save``, else empty. It is an output of the op so that
  autograd keeps it: the same activations eager autograd keeps, and no more.
- ``fusedres::stack_backward(grad, x, saved, weight, has_bias, need_dx, need_params,
  deterministic) -> (dx, dW, db)``.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .kernels.residual_stack import STACK_WIDTHS, residual_stack_bwd, residual_stack_fwd
from .module import FusedResidualBlock
from .op import autocast_off, backend_for, check_one_device, check_tensor_types, gemm_operands
from .reference import ResidualBlock, eager_stack_backward, eager_stack_forward

__all__ = ["FusedResidualStack", "fused_residual_stack", "STACK_WIDTHS"]


def _width_error(who: str, dim) -> ValueError:
    return ValueError(
        f"{who}: dim must be one of {', '.join(map(str, STACK_WIDTHS))} (a row tile of activations is kept in "
        f"registers across the layers), got {dim}. For other widths use a sequence of "
        f"fusedres.FusedResidualBlock({dim}) modules, e.g. nn.Sequential(*[FusedResidualBlock({dim}) for _ in "
        f"range(depth)]).")


def _check_inputs(x, weight, bias) -> None:
    named = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    check_tensor_types("fused_residual_stack", named)
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2] or weight.shape[0] < 1:
        raise ValueError(f"fused_residual_stack: weight must be [depth, dim, dim] with depth >= 1, got "
                         f"{list(weight.shape)}")
    L, D, _ = weight.shape
    if D not in STACK_WIDTHS:
        raise _width_error("fused_residual_stack", D)
    if x.dim() == 0 or x.shape[-1] != D:
        raise ValueError(f"fused_residual_stack: x must have shape (..., {D}) for weight {list(weight.shape)}, "
                         f"got {list(x.shape)}")
    if bias is not None and tuple(bias.shape) != (L, D):
        raise ValueError(f"fused_residual_stack: bias must have shape [{L}, {D}], got {list(bias.shape)}")
    check_one_device("fused_residual_stack", named)


def _aligned(t: Tensor) -> Tensor:
    """``t`` itself if it is contiguous and 16-byte aligned, else an aligned contiguous copy: the
    kernels' 128-bit loads assume both (compiled without them they spill and load scalars)."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def fused_residual_stack(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                         deterministic: bool = True) -> Tensor:
    """``depth`` pre-activation residual blocks in one fused forward (and backward):
    ``x_{l+1} = x_l + relu(x_l) @ weight[l].T + bias[l]``, returning ``x_depth``.

    Args:
        x: ``(..., dim)``; fp16, bf16, fp32 or fp64; copied once if not contiguous and 16-byte aligned.
        weight: ``[depth, dim, dim]``, each ``weight[l]`` in ``nn.Linear`` layout; ``dim`` in {16, 32, 64, 128}.
        bias: ``[depth, dim]`` or None.
        deterministic: reduce the weight gradients through per-program partials summed in a fixed
            order (bitwise reproducible for a fixed GPU); False adds them with relaxed atomics.

    Under ``torch.autocast`` the GEMMs run in the autocast dtype (the weights and bias are cast, as
    ``F.linear`` casts them); the carried activation keeps ``x``'s dtype.
    """
    _check_inputs(x, weight, bias)
    device_type = x.device.type
    weight, bias = gemm_operands("fused_residual_stack", x, [("weight", weight), ("bias", bias)])
    D = weight.shape[-1]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    # contiguous here (traceable); 16-byte alignment inside the ops (data pointers are opaque to Dynamo)
    x2 = x.reshape(-1, D).contiguous()
    with autocast_off(device_type):
        y, _ = torch.ops.fusedres.stack_forward(x2, weight.contiguous(), None if bias is None else bias.contiguous(),
                                                save, deterministic)
    return y.view(x.shape)


# ---------------------------------------------------------------------------------------------
# The custom ops


@torch.library.custom_op("fusedres::stack_forward", mutates_args=())
def stack_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], save: bool,
                  deterministic: bool) -> tuple[Tensor, Tensor]:
    """``x`` ``[M, D]``; an operand that is not contiguous and 16-byte aligned is copied first.
    ``deterministic`` is only carried to the backward."""
    if backend_for(x.device) == "eager":
        return eager_stack_forward(x, weight, bias, save)
    L = weight.shape[0]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    saved = x.new_empty(L - 1 if save else 0, *x.shape)
    residual_stack_fwd(_aligned(x), _aligned(weight), None if bias is None else _aligned(bias), y,
                       saved if save and L > 1 else None)
    return y, saved


@stack_forward.register_fake
def _(x, weight, bias, save, deterministic):
    return torch.empty_like(x), x.new_empty(weight.shape[0] - 1 if save else 0, *x.shape)


@torch.library.custom_op("fusedres::stack_backward", mutates_args=())
def stack_backward(grad: Tensor, x: Tensor, saved: Tensor, weight: Tensor, has_bias: bool, need_dx: bool,
                   need_params: bool, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dW, db)``; an empty tensor stands for each gradient not asked for."""
    if backend_for(x.device) == "eager":
        dx, dw, db = eager_stack_backward(grad, x, saved, weight, has_bias, need_dx, need_params)
    else:
        dx, dw, db = residual_stack_bwd(_aligned(grad), _aligned(x), _aligned(saved) if saved.numel() else None,
                                        _aligned(weight),
                                        has_bias=has_bias, need_dx=need_dx, need_params=need_params,
                                        deterministic=deterministic)
    return tuple(t if t is not None else like.new_empty(0) for t, like in zip((dx, dw, db), (x, weight, weight)))


@stack_backward.register_fake
def _(grad, x, saved, weight, has_bias, need_dx, need_params, deterministic):
    L, D, _ = weight.shape
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(weight) if need_params else weight.new_empty(0),
            weight.new_empty(L, D) if need_params and has_bias else weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, save, deterministic = inputs
    _, saved = output
    ctx.has_bias, ctx.deterministic = bias is not None, deterministic
    ctx.mark_non_differentiable(saved)
    # x_0 (the input, aliased), the weights and x_1 .. x_{L-1}: nothing else.
    ctx.save_for_backward(x, weight, saved)


def _backward(ctx, grad, _grad_saved):
    x, weight, saved = ctx.saved_tensors
    need_dx, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_params = need_weight or (need_bias and ctx.has_bias)
    if weight.shape[0] > 1 and saved.shape[0] != weight.shape[0] - 1:
        raise RuntimeError("fused_residual_stack: the forward ran without saving activations (no input required "
                           "grad then), so there is nothing to differentiate")
    dx, dw, db = torch.ops.fusedres.stack_backward(grad, x, saved, weight, ctx.has_bias, need_dx, need_params,
                                                   ctx.deterministic)
    return (dx if need_dx else None, dw if need_weight else None, db if need_bias and ctx.has_bias else None,
            None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fused_residual_stack: double backward is not supported; use a sequence of "
                       "fusedres.ResidualBlock for higher-order gradients")


stack_forward.register_autograd(_backward, setup_context=_setup_context)
stack_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# The module


def _stackable(block: nn.Module) -> bool:
    """A block the stack computes exactly: square, no projection, alpha a fixed 1, no stochastic
    depth (the stack has no per-sample branch scale), no dropout, no norm, relu (the activation the
    stack's tables and gate cover; its kernels take the activation table, its API does not yet)."""
    return (type(block) in (ResidualBlock, FusedResidualBlock) and block.proj_weight is None
            and getattr(block, "norm", None) is None
            and getattr(block, "act", None) is not None and block.act.name == "relu"
            and not isinstance(block.alpha, nn.Parameter) and bool(block.alpha.eq(1).all())
            and not getattr(block, "drop_path", 0.0) and not getattr(block, "dropout", 0.0))


class FusedResidualStack(nn.Module):
    """``depth`` pre-activation residual blocks of width ``dim`` fused into one kernel per pass:
    ``x_{l+1} = x_l + relu(x_l) @ weight[l].T + bias[l]``.

    Args:
        dim: width, one of 16, 32, 64, 128 (other widths: :class:`fusedres.FusedResidualBlock`).
            At 128 the training backward is modelled slower than single blocks on A100 and with
            tf32 (its fp32 weight-gradient partials go through L2: ``python -m bench --plan
            --stack-table``, a MODEL), so ``fuse(..., stacks=True)`` does not stack 128; inference
            and the forward still gain.
        depth: number of blocks L >= 1.
        bias: learn ``bias [depth, dim]``.
        deterministic: bitwise-reproducible weight gradients (per-program partials, fixed-order
            reduce); False uses relaxed atomics.

    Parameters ``weight [depth, dim, dim]`` and ``bias [depth, dim]``; layer ``l`` is initialised
    as ``nn.Linear(dim, dim)`` is. ``load_state_dict`` also takes the state_dict of an
    ``nn.Sequential`` of ``depth`` :class:`ResidualBlock`\\ s or :class:`FusedResidualBlock`\\ s
    (keys ``0.weight``, ``0.bias``, ``0.alpha``, ...; every alpha must be 1, and may be absent, as in an
    ``nn.Sequential`` of ``nn.Linear(dim, dim)``\\ s).
    ``forward(x)``: ``(..., dim) -> (..., dim)``, fp16, bf16, fp32 or fp64.
    """

    def __init__(self, dim: int, depth: int, *, bias: bool = True, deterministic: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim not in STACK_WIDTHS:
            raise _width_error(type(self).__name__, dim)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"{type(self).__name__}: depth must be a positive int, got {depth!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.depth, self.deterministic = dim, depth, bool(deterministic)
        self.weight = nn.Parameter(torch.empty(depth, dim, dim, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(depth, dim, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._from_sequential_keys)

    def reset_parameters(self) -> None:
        """Each layer as ``nn.Linear(dim, dim).reset_parameters()``: the same RNG draws, layer after
        layer, as ``depth`` ResidualBlocks built in a row."""
        bound = 1 / math.sqrt(self.dim)
        for l in range(self.depth):
            nn.init.kaiming_uniform_(self.weight[l], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias[l], -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return fused_residual_stack(x, self.weight, self.bias, deterministic=self.deterministic)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, depth={self.depth}, bias={self.bias is not None}, "
                f"deterministic={self.deterministic}")

    @classmethod
    def from_blocks(cls, blocks: Iterable[nn.Module], *, deterministic: bool = True) -> "FusedResidualStack":
        """A stack computing ``blocks`` one after another, with their weights copied in (a stack
        owns one ``[depth, dim, dim]`` tensor, so it cannot share the blocks' parameters: build the
        optimizer after converting). Every block must be a square ResidualBlock or
        FusedResidualBlock of one width in {16, 32, 64, 128}, all with or all without bias, with a
        fixed alpha of 1."""
        blocks = list(blocks)
        if not blocks:
            raise ValueError(f"{cls.__name__}.from_blocks: no blocks")
        for i, b in enumerate(blocks):
            if not _stackable(b):
                raise ValueError(f"{cls.__name__}.from_blocks: block {i} ({type(b).__name__}) is not a square "
                                 "ResidualBlock/FusedResidualBlock with a fixed alpha of 1")
        first = blocks[0]
        if any(b.dim != first.dim or (b.bias is None) != (first.bias is None) or b.weight.dtype != first.weight.dtype
               or b.weight.device != first.weight.device for b in blocks):
            raise ValueError(f"{cls.__name__}.from_blocks: the blocks differ in width, bias, dtype or device")
        stack = cls(first.dim, len(blocks), bias=first.bias is not None, deterministic=deterministic,
                    device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            stack.weight.copy_(torch.stack([b.weight for b in blocks]))
            if stack.bias is not None:
                stack.bias.copy_(torch.stack([b.bias for b in blocks]))
        return stack

    def to_blocks(self, block_type: type | None = None) -> list[nn.Module]:
        """The stack as ``depth`` separate blocks (``FusedResidualBlock`` by default, or
        ``fusedres.ResidualBlock``), with the weights copied out."""
        block_type = block_type or FusedResidualBlock
        blocks = []
        for l in range(self.depth):
            b = block_type(self.dim, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
            with torch.no_grad():
                b.weight.copy_(self.weight[l])
                if self.bias is not None:
                    b.bias.copy_(self.bias[l])
            blocks.append(b)
        return blocks

    def _from_sequential_keys(self, state_dict, prefix, *args) -> None:
        """Rewrite an ``nn.Sequential``-of-blocks state_dict (``{i}.weight``, ``{i}.bias``,
        ``{i}.alpha``) into this module's ``weight`` and ``bias``."""
        if prefix + "weight" in state_dict or prefix + "0.weight" not in state_dict:
            return
        n = 0
        while f"{prefix}{n}.weight" in state_dict:
            n += 1
        if n != self.depth:
            raise RuntimeError(f"{type(self).__name__}: the state_dict holds {n} blocks, the stack has depth "
                               f"{self.depth}")
        for i in range(n):
            alpha = state_dict.pop(f"{prefix}{i}.alpha", None)
            if alpha is not None and not bool(torch.as_tensor(alpha).eq(1).all()):
                raise RuntimeError(f"{type(self).__name__}: block {i} of the state_dict has alpha "
                                   f"{float(alpha):g}; the stack computes alpha = 1 only")
            if state_dict.get(f"{prefix}{i}.proj_weight") is not None:
                raise RuntimeError(f"{type(self).__name__}: block {i} of the state_dict has a projection")
        state_dict[prefix + "weight"] = torch.stack([state_dict.pop(f"{prefix}{i}.weight") for i in range(n)])
        if all(f"{prefix}{i}.bias" in state_dict for i in range(n)):     # else strict names what is missing
            state_dict[prefix + "bias"] = torch.stack([state_dict.pop(f"{prefix}{i}.bias") for i in range(n)])
