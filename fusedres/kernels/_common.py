"""Shared Triton building blocks for the residual-block kernels.

Everything here is either a ``@triton.jit`` device function or launch-side bookkeeping that
does not touch autograd or ``nn``: the PyTorch API lives one level up, in ``fusedres``.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import NamedTuple

import triton
import triton.language as tl

#: True when the kernels run on the CPU through Triton's interpreter. Triton decides this when a
#: kernel is decorated, so the environment variable must be set before ``fusedres`` is imported.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _squeeze_interpreter_index() -> bool:
    """Let the interpreter take a runtime scalar as a Python index (``range(0, n)``) again.

    The interpreter holds a scalar as a 1-element 1-D array, and triton 3.6's interpreter turns
    it into an int with ``int(handle.data)`` (``triton/runtime/interpreter.py:888``, in the
    ``tl.tensor.__index__`` it installs for each launch), which numpy refuses (2.4.6: "only
    0-dimensional arrays can be converted to Python scalars"; 1.25 to 2.x first warned). triton 3.7
    squeezes the array first; this installs that same ``__index__`` on an interpreter that does
    not, found by probing it, and is a no-op otherwise. True when it patched.
    """
    import types
    import warnings

    import numpy as np
    try:
        from triton.runtime import interpreter
        patch, scope_type = interpreter._patch_lang_tensor, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return False
    probe, scope = type("_Probe", (), {}), scope_type()
    try:
        patch(probe, scope)
        index = probe.__dict__.get("__index__")
    except Exception:       # another interpreter than the one this was written against: leave it
        return False
    finally:
        scope.restore()
    scalar = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([3], dtype=np.int32)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if index is None or index(scalar) == 3:
                return False
    except (TypeError, DeprecationWarning):
        pass

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


#: Whether :func:`_squeeze_interpreter_index` had to patch this triton's interpreter (3.6).
INTERPRETER_INDEX_PATCHED: bool = INTERPRET and _squeeze_interpreter_index()


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a 1-D program id onto a (pid_m, pid_n) tile, GROUP_M row tiles at a time.

    Programs that run together then share the same column tiles of the second operand in L2
    (the grouped ordering of Triton's matmul tutorial). A 1-D grid also keeps M free of the
    65535 limit of CUDA's second grid dimension.
    """
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def row_offsets(rows, T, stride_outer, stride_inner, TWO_LEVEL: tl.constexpr):
    """Element offset of each flattened row index, in int64.

    A ``(..., D)`` tensor whose leading dims do not collapse into one stride (for example
    ``[B, T, D].transpose(0, 1)``) is addressed as ``row = b * T + t``. int64 keeps
    ``row * stride`` exact past 2**31 elements.
    """
    rows = rows.to(tl.int64)
    if TWO_LEVEL:
        return (rows // T) * stride_outer + (rows % T) * stride_inner
    else:
        return rows * stride_inner


@triton.jit
def round_to_bf16(v):
    """Round fp32 ``v`` to the nearest bf16 value, ties to even, and return it as fp32.

    Only the interpreter needs this: its fp32 -> bf16 ``.to()`` truncates. The result is exactly
    representable in bf16, so a following truncating cast is exact. NaN is kept as NaN.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded)


@triton.jit
def to_gemm_operand(v, GEMM_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Cast a loaded tile to the dtype the tensor cores consume.

    With EMULATE_BF16 (interpreter, and bf16 among the operands) the operand stays fp32, holding
    exactly the values rounded to GEMM_DTYPE: the interpreter computes garbage for bf16 arithmetic and ``tl.dot``, but
    an fp32 dot of bf16 values is what bf16 tensor cores do (exact products, fp32 sums).
    """
    if EMULATE_BF16:
        if GEMM_DTYPE == tl.bfloat16:
            return round_to_bf16(v.to(tl.float32))
        else:
            return v.to(tl.float32).to(GEMM_DTYPE).to(tl.float32)
    else:
        return v.to(GEMM_DTYPE)


@triton.jit
def store_rounded(ptrs, v, mask, EMULATE_BF16: tl.constexpr):
    """Store an fp32/fp64 tile into its output dtype, rounding to nearest even."""
    if EMULATE_BF16:
        if ptrs.dtype.element_ty == tl.bfloat16:
            v = round_to_bf16(v.to(tl.float32))
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch bookkeeping


class Rows(NamedTuple):
    """How the flattened rows ``m = o * T + i`` of the ``(..., D)`` operands are laid out.

    ``two_level`` is False when every operand's leading dims collapse into one stride; then only
    the inner stride is used and the kernels skip the division by ``T``.
    """
    M: int
    T: int
    two_level: bool


class RowStrides(NamedTuple):
    """Strides of one operand in the ``Rows`` decomposition: outer row, inner row, feature."""
    outer: int
    inner: int
    feature: int


# One re-entrant lock for the launches (see fusedres.kernels.configs) and their counts, so that a
# launch made under it counts itself without a second lock.
_launch_lock = threading.RLock()
_launches: collections.Counter[str] = collections.Counter()


def record_launch(kernel_name: str) -> None:
    with _launch_lock:
        _launches[kernel_name] += 1


def launch_counts() -> dict[str, int]:
    """How many times each kernel has been launched in this process (tests use it to prove that
    the Triton path ran rather than the eager reference)."""
    with _launch_lock:
        return dict(_launches)


def reset_launch_counts() -> None:
    with _launch_lock:
        _launches.clear()


def next_pow2_bucket(n: int) -> int:
    """Autotune key for the long dimension: a new batch size re-tunes only on a new power of two."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for the host side: the same value, without the cost of calling a
    ``constexpr_function`` (about 2 us each in triton 3.7-3.9)."""
    return -(-a // b)

