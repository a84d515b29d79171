"""The activation table's Triton half: one forward and one derivative per activation.

Every kernel that applies an activation takes two ``tl.constexpr`` jit functions from here (the
idea of Triton's matmul tutorial and of quack's ``act_fn_map``/``dact_fn_map``):

- ``ACT(a, GEMM_DTYPE, EMULATE_BF16, PARAM) -> operand``: the A-tile prologue. It takes the tile
  as loaded (its own dtype) and returns ``act(a)`` as the operand the tensor cores consume,
  rounded once to ``GEMM_DTYPE`` as eager rounds ``act(x).to(weight.dtype)``. The smooth
  activations compute in fp32 (fp64 for fp64), torch's opmath; relu is exact in any dtype and
  runs on the narrow operand. :func:`identity` is the prologue of a GEMM without activation (the
  projection's, the pre-norm blocks' first).
- ``DACT(grad, v, PARAM) -> grad * act'(v)``: the derivative, an epilogue step. ``v`` is the
  pre-activation that is already saved (``x``, or the MLP's ``h``) in the accumulator dtype, so
  nothing more is saved for any activation.

``PARAM`` is the activation's one number, a constexpr (leaky_relu's negative slope; 0.0 for the
others). Formulas follow torch's CUDA kernels (``ActivationGeluKernel.cu``,
``ActivationSiluKernel.cu``, ``ActivationLeakyReluKernel.cu``, ``threshold_backward``) so that
NaN and +-inf come out as torch's: relu'(NaN) passes the gradient, gelu(-inf) is NaN, and so on.

The PyTorch half of the table (names, modules, references) is :mod:`fusedres.activations`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import to_gemm_operand

_SQRT1_2 = tl.constexpr(0.7071067811865476)          # M_SQRT1_2
_GELU_PDF = tl.constexpr(0.3989422804014327)          # M_2_SQRTPI * M_SQRT1_2 * 0.5: 1/sqrt(2 pi)
_GELU_TANH_BETA = tl.constexpr(0.7978845608028654)    # M_SQRT2 * M_2_SQRTPI * 0.5: sqrt(2/pi)
_GELU_TANH_KAPPA = tl.constexpr(0.044715)


@triton.jit
def opmath(v):
    """``v`` in the dtype torch computes elementwise ops in: fp32 for 16-bit and fp32, fp64 kept."""
    if v.dtype == tl.float64:
        return v
    else:
        return v.to(tl.float32)


@triton.jit
def tanh_exp(u):
    """``tanh(u)`` from one exp (``tl.math`` has no tanh on every supported release): saturates to
    +-1 where the exp overflows, and keeps NaN."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def relu_nan(v):
    """relu that keeps NaN, as ``torch.relu`` does (the default ``tl.maximum`` returns 0).

    The result keeps ``v``'s dtype on every supported triton, so it can meet the other fp16/bf16
    dot operand: triton 3.7 and 3.8 promote an fp16 ``v`` against the Python scalar ``0.0`` to
    fp32 (hence a zero of ``v``'s own dtype), and ``tl.maximum`` itself promotes bf16 to fp32
    there (hence the cast back, which is exact and a no-op on 3.9).
    """
    return tl.maximum(v, tl.zeros_like(v), propagate_nan=tl.PropagateNan.ALL).to(v.dtype)


# --- prologues: ACT(a, GEMM_DTYPE, EMULATE_BF16, PARAM) -> the GEMM operand act(a) ---------------

@triton.jit
def identity(a, GEMM_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, PARAM: tl.constexpr):
    return to_gemm_operand(a, GEMM_DTYPE, EMULATE_BF16)


@triton.jit
def relu(a, GEMM_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, PARAM: tl.constexpr):
    # relu commutes with rounding: applied to the narrow operand, the cheapest form
    return relu_nan(to_gemm_operand(a, GEMM_DTYPE, EMULATE_BF16))


@triton.jit
def gelu(a, GEMM_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, PARAM: tl.constexpr):
    v = opmath(a)
    return to_gemm_operand(v * 0.5 * (1.0 + tl.math.erf(v * _SQRT1_2)), GEMM_DTYPE, EMULATE_BF16)


@triton.jit
def gelu_tanh(a, GEMM_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, PARAM: tl.constexpr):
    v = opmath(a)
    # the module's constexprs on the right: constexpr * tensor wraps the tensor in the interpreter
    inner = (v + v * v * v * _GELU_TANH_KAPPA) * _GELU_TANH_BETA
    return to_gemm_operand(0.5 * v * (1.0 + tanh_exp(inner)), GEMM_DTYPE, EMULATE_BF16)


@triton.jit
def silu(a, GEMM_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, PARAM: tl.constexpr):
    v = opmath(a)
    return to_gemm_operand(v / (1.0 + tl.exp(-v)), GEMM_DTYPE, EMULATE_BF16)


@triton.jit
def relu_sq(a, GEMM_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, PARAM: tl.constexpr):
    r = relu_nan(opmath(a))
    return to_gemm_operand(r * r, GEMM_DTYPE, EMULATE_BF16)


@triton.jit
def leaky_relu(a, GEMM_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, PARAM: tl.constexpr):
    v = opmath(a)
    return to_gemm_operand(tl.where(v > 0, v, v * PARAM), GEMM_DTYPE, EMULATE_BF16)


# --- derivatives: DACT(grad, v, PARAM) -> grad * act'(v), v the saved pre-activation ------------

@triton.jit
def relu_grad(grad, v, PARAM: tl.constexpr):
    # v <= 0 -> 0, not v > 0 -> grad: at v = NaN the gradient passes, as in threshold_backward
    return tl.where(v <= 0, 0.0, grad)


@triton.jit
def gelu_grad(grad, v, PARAM: tl.constexpr):
    cdf = 0.5 * (1.0 + tl.math.erf(v * _SQRT1_2))
    pdf = tl.exp(v * v * -0.5) * _GELU_PDF
    return grad * (cdf + v * pdf)


@triton.jit
def gelu_tanh_grad(grad, v, PARAM: tl.constexpr):
    v_sq = v * v
    t = tanh_exp((v + v_sq * v * _GELU_TANH_KAPPA) * _GELU_TANH_BETA)
    left = 0.5 * (1.0 + t)
    right = 0.5 * v * (1.0 - t * t) * ((1.0 + v_sq * _GELU_TANH_KAPPA * 3.0) * _GELU_TANH_BETA)
    return grad * (left + right)


@triton.jit
def silu_grad(grad, v, PARAM: tl.constexpr):
    s = 1.0 / (1.0 + tl.exp(-v))
    return grad * s * (1.0 + v * (1.0 - s))


@triton.jit
def relu_sq_grad(grad, v, PARAM: tl.constexpr):
    # d relu(v)^2 = 2 relu(v), then relu's own mask (NaN passes, as autograd's chain does)
    return tl.where(v <= 0, 0.0, grad * 2.0 * v)


@triton.jit
def leaky_relu_grad(grad, v, PARAM: tl.constexpr):
    return tl.where(v > 0, grad, grad * PARAM)


#: name -> (prologue, derivative): the kernels' view of :data:`fusedres.activations.ACTIVATIONS`.
KERNELS: dict[str, tuple] = {
    "relu": (relu, relu_grad),
    "gelu": (gelu, gelu_grad),
    "gelu_tanh": (gelu_tanh, gelu_tanh_grad),
    "silu": (silu, silu_grad),
    "relu_sq": (relu_sq, relu_sq_grad),
    "leaky_relu": (leaky_relu, leaky_relu_grad),
}
