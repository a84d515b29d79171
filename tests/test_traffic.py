"""The interpreter instrument (fusedres.traffic) on kernels of known traffic, then on the fused kernels.

It patches private internals of Triton's interpreter (3.7, 3.8 and 3.9 supported), so these tests
are what tells a triton upgrade broke it: CI runs them on each supported triton. They need the interpreter (TRITON_INTERPRET=1, set by conftest without CUDA).
"""
import os

import pytest
import torch
import triton
import triton.language as tl

import fusedres
from fusedres import traffic
from fusedres.traffic import BoundsViolation, InterpreterTraffic

# these tests plant out-of-bounds accesses and install/remove the instrument themselves, so the
# suite-wide sanitizer (tests/conftest.py) stays out of them
pytestmark = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                 reason="the traffic instrument needs Triton's interpreter"),
              pytest.mark.skipif(not traffic.supported()[0], reason=traffic.supported()[1]),
              pytest.mark.no_sanitizer]


@triton.jit
def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def unmasked_copy_kernel(src, dst, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs))


@triton.jit
def twice_kernel(src, dst, n, BLOCK: tl.constexpr):
    """Reads every element twice (a tile re-read), writes once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(src + offs, mask=m)
    b = tl.load(src + offs, mask=m)
    tl.store(dst + offs, a + b, mask=m)


@triton.jit
def dot_kernel(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    acc = tl.zeros((M, N), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(a + rm[:, None] * K + rk[None, :])
        y = tl.load(b + rk[:, None] * N + rn[None, :])
        acc = tl.dot(x, y, acc)
    tl.store(c + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def select_kernel(a, b, out, BLOCK: tl.constexpr):
    """The first half of the lanes reads a, the second half b, through one selected pointer."""
    offs = tl.arange(0, BLOCK)
    half = BLOCK // 2
    ptrs = tl.where(offs < half, a + offs, b + (offs - half))
    tl.store(out + offs, tl.load(ptrs))


def _storage_slice(nbytes: int, dtype=torch.float32, total: int = 4096):
    """A tensor whose storage is exactly ``nbytes`` inside a larger allocation: reading past its
    end is out of its storage but stays in mapped memory."""
    base = torch.zeros(total, dtype=dtype)
    storage = base.untyped_storage()[0:nbytes]
    n = nbytes // base.element_size()
    return base, torch.empty(0, dtype=dtype).set_(storage, 0, (n,), (1,))


def test_copy_with_masked_tail_counts_exact_bytes():
    x = torch.randn(1000)
    y = torch.empty(1000)
    with InterpreterTraffic() as t:
        copy_kernel[(4,)](x, y, 1000, BLOCK=256)
    assert torch.equal(x, y)
    (launch,) = t.launches
    assert launch.kernel == "copy_kernel" and launch.grid == (4, 1, 1)
    src, dst = launch.args["src"], launch.args["dst"]
    # 1000 active lanes of 4 bytes each way; the 24 masked lanes of the last program move nothing
    assert (src.bytes_read, src.bytes_written, src.loads) == (4000, 0, 4)
    assert (dst.bytes_read, dst.bytes_written, dst.stores) == (0, 4000, 4)
    assert (launch.unique_read, launch.unique_written, launch.unique_bytes) == (4000, 4000, 8000)
    assert t.bytes_read() == 4000 and t.bytes_written() == 4000 and t.unique_bytes() == 8000
    assert t.violations == []      # masked lanes past the end are not accesses


def test_rereads_count_as_requests_not_as_unique_bytes():
    x = torch.randn(300, dtype=torch.float16)
    y = torch.empty(300, dtype=torch.float16)
    with InterpreterTraffic() as t:
        twice_kernel[(3,)](x, y, 300, BLOCK=128)
    assert torch.equal(y, x + x)
    assert t.bytes_read() == 2 * 300 * 2
    assert t.launches[0].unique_read == 300 * 2
    assert t.launches[0].unique_written == 300 * 2


def test_dot_flops_and_operand_bytes():
    M, N, K, BK = 32, 64, 32, 16
    a, b = torch.randn(M, K), torch.randn(K, N)
    c = torch.empty(M, N)
    with InterpreterTraffic() as t:
        dot_kernel[(1,)](a, b, c, M, N, K, BK)
    torch.testing.assert_close(c, a @ b)
    (launch,) = t.launches
    assert launch.dots == K // BK
    assert t.dot_flops() == 2 * M * N * K
    assert launch.args["a"].bytes_read == M * K * 4
    assert launch.args["b"].bytes_read == K * N * 4
    assert launch.args["c"].bytes_written == M * N * 4


def test_a_pointer_selected_from_two_arguments_is_attributed_lane_by_lane():
    a, b, out = torch.randn(64), torch.randn(64), torch.empty(128)
    with InterpreterTraffic() as t:
        select_kernel[(1,)](a, b, out, BLOCK=128)
    assert torch.equal(out, torch.cat([a, b]))
    args = t.launches[0].args
    assert args["a"].bytes_read == 256 and args["b"].bytes_read == 256
    assert args["a"].unique_read == 256 and args["b"].unique_read == 256
    assert t.violations == []


def test_aliasing_arguments_count_each_byte_once():
    x = torch.randn(512)
    with InterpreterTraffic() as t:
        copy_kernel[(2,)](x, x, 512, BLOCK=256)    # in place: src and dst are one tensor
    launch = t.launches[0]
    assert launch.args["src"].unique_read == 2048 and launch.args["dst"].unique_written == 2048
    assert launch.unique_read == 2048 and launch.unique_written == 2048


def test_out_of_storage_load_is_recorded_per_lane():
    _base, src = _storage_slice(4000)                # 1000 floats
    dst = torch.empty(1024)
    with InterpreterTraffic() as t:
        unmasked_copy_kernel[(4,)](src, dst, BLOCK=256)   # reads 24 floats past src's storage
    (v,) = t.violations
    assert (v.kernel, v.op, v.arg, v.scope, v.lanes) == ("unmasked_copy_kernel", "load", "src", "storage", 24)
    assert v.program == (3, 0, 0) and v.launch == 0
    assert v.offsets[:3] == (4000, 4004, 4008) and v.storage_nbytes == 4000
    # the request bytes include the bad lanes; the unique bytes only what is inside the storage
    assert t.launches[0].args["src"].bytes_read == 4096
    assert t.launches[0].args["src"].unique_read == 4000


def test_raise_on_violation_stops_before_the_store():
    base, dst = _storage_slice(4000)                 # dst's storage: the first 1000 floats of base
    src = torch.ones(1024)
    with pytest.raises(BoundsViolation) as info:
        with InterpreterTraffic(raise_on_violation=True):
            unmasked_copy_kernel[(4,)](src, dst, BLOCK=256)
    assert info.value.violation.op == "store" and info.value.violation.arg == "dst"
    assert info.value.violation.program == (3, 0, 0)
    assert base[1000:].eq(0).all(), "the out-of-bounds store must not have run"


def test_outside_the_view_but_inside_the_storage_is_a_view_violation():
    base = torch.randn(2048)
    view = base[:1000]
    out = torch.empty(1024)
    with InterpreterTraffic(raise_on_violation=True) as t:       # view violations never raise
        unmasked_copy_kernel[(4,)](view, out, BLOCK=256)
    (v,) = t.violations
    assert (v.arg, v.scope, v.lanes) == ("src", "view", 24)
    assert torch.equal(out, base[:1024])


def test_patches_are_removed_and_counters_nest():
    from triton.runtime import interpreter
    original = interpreter.InterpreterBuilder.create_masked_load
    x, y = torch.randn(256), torch.empty(256)
    with InterpreterTraffic() as outer:
        with InterpreterTraffic(track_unique=False) as inner:
            copy_kernel[(1,)](x, y, 256, BLOCK=256)
        copy_kernel[(1,)](x, y, 256, BLOCK=256)
    assert interpreter.InterpreterBuilder.create_masked_load is original
    assert interpreter.GridExecutor.__call__.__name__ == "__call__"
    assert len(outer.launches) == 2 and len(inner.launches) == 1
    assert inner.bytes_read() == 1024
    copy_kernel[(1,)](x, y, 256, BLOCK=256)        # uninstrumented launches still work
    assert len(outer.launches) == 2


def test_progress_callback_sees_every_program():
    seen = []
    x, y = torch.randn(1000), torch.empty(1000)
    with InterpreterTraffic(progress=lambda k, i, n: seen.append((k, i, n))):
        copy_kernel[(4,)](x, y, 1000, BLOCK=256)
    assert seen == [("copy_kernel", i, 4) for i in range(4)]


@pytest.mark.parametrize("M,D", [(200, 96), (256, 128)])
def test_fused_kernels_move_exactly_the_compulsory_minimum(M, D):
    """Unique bytes of the fused kernels == e(2MD + D^2 + D) forward and e(5MD + 2D^2 + D) backward
    (dx, dW and db all computed), within 1% (they are equal), with every lane in bounds."""
    e = 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, D, generator=gen, requires_grad=True)
    w = (torch.randn(D, D, generator=gen) / D ** 0.5).requires_grad_()
    b = torch.randn(D, generator=gen, requires_grad=True)
    g = torch.randn(M, D, generator=gen)
    with InterpreterTraffic() as t:
        y = fusedres.fused_residual(x, w, b)
        torch.autograd.grad(y, (x, w, b), g)
    fwd = t.unique_bytes("residual_fwd_kernel")
    bwd = t.unique_bytes(("residual_dx_kernel", "residual_dw_kernel"))
    assert fwd == pytest.approx(e * (2 * M * D + D * D + D), rel=0.01)
    assert bwd == pytest.approx(e * (5 * M * D + 2 * D * D + D), rel=0.01)
    assert t.dot_flops("residual_fwd_kernel") >= 2 * M * D * D      # tiles pad up, never down
    assert t.violations == []
    # requests include tile re-reads: never fewer than the unique bytes
    assert t.bytes_read() + t.bytes_written() >= t.unique_bytes()


@pytest.mark.parametrize("splits", [2, 3])
def test_split_dw_moves_the_compulsory_minimum_plus_its_partials(splits):
    """Split-M dW (forced: the interpreter plans for one SM): the dW kernel writes S fp32 slabs of
    dW.T and db partials (4 S (D^2 + D) bytes) instead of dW and db, and the reduce reads them back
    and writes dW and db: the backward's unique bytes are the single launch's e(5MD + 2D^2 + D)
    plus exactly 8 S (D^2 + D), per kernel as below."""
    from fusedres.kernels import plan
    M, D, e = 300, 96, 4       # 3 row tiles of 128: S = 2 reduces 2 + 1, S = 3 1 + 1 + 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, D, generator=gen, requires_grad=True)
    w = (torch.randn(D, D, generator=gen) / D ** 0.5).requires_grad_()
    b = torch.randn(D, generator=gen, requires_grad=True)
    g = torch.randn(M, D, generator=gen)
    with plan.force_splits(splits), InterpreterTraffic() as t:
        y = fusedres.fused_residual(x, w, b)
        torch.autograd.grad(y, (x, w, b), g)
    slabs = 4 * splits * (D * D + D)
    (dw,), (red,) = t.select("residual_dw_kernel"), t.select("residual_dw_reduce_kernel")
    assert (dw.unique_read, dw.unique_written) == (e * 2 * M * D, slabs)
    assert (red.unique_read, red.unique_written) == (slabs, e * (D * D + D))
    bwd = t.unique_bytes(("residual_dx_kernel", "residual_dw_kernel", "residual_dw_reduce_kernel"))
    assert bwd == e * (5 * M * D + 2 * D * D + D) + 2 * slabs
    assert t.violations == []


@pytest.mark.parametrize("D,L,chunk", [(32, 5, None), (64, 3, 2)])
def test_stack_kernels_move_exactly_the_model(D, L, chunk):
    """Per argument, the stack's kernels touch exactly the model's bytes (bench/stack.py): the
    forward reads x, W, b once and writes x_1..x_{L-1} and y; the backward reads g, x_0, the
    saved activations and W once, writes dx and the partials once (and re-reads only its own
    partials, the L2-resident read-modify-write); the reduce reads the partials and writes dW, db.
    With two layer chunks, g's fp32 carry adds one write and one read of [M, D]."""
    from bench import stack as bench_stack
    from fusedres.kernels import residual_stack as ks

    M, e, a = 300, 2, 4
    gen = torch.Generator().manual_seed(0)
    x, g = (torch.randn(M, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    w = (torch.randn(L, D, D, generator=gen) / D ** 0.5).to(torch.bfloat16)
    b = torch.randn(L, D, generator=gen).to(torch.bfloat16)
    y, saved = torch.empty_like(x), torch.empty(L - 1, M, D, dtype=torch.bfloat16)
    with InterpreterTraffic() as t:
        ks.residual_stack_fwd(x, w, b, y, saved)
        ks.residual_stack_bwd(g, x, saved, w, has_bias=True, need_dx=True, need_params=True, chunk=chunk)
    P = ks.INTERPRETER_PROGRAMS
    ws = a * P * L * (D * D + D)
    (fwd,) = t.select(["residual_stack_fwd_kernel"])
    (bwd,) = t.select(["residual_stack_bwd_kernel"])
    (red,) = t.select(["residual_stack_reduce_kernel"])

    def per_arg(launch):
        return {n: (v.unique_read, v.unique_written) for n, v in launch.args.items() if v.unique_read or v.unique_written}

    assert per_arg(fwd) == {"x_ptr": (e * M * D, 0), "w_ptr": (e * L * D * D, 0), "b_ptr": (e * L * D, 0),
                            "saved_ptr": (0, e * (L - 1) * M * D), "y_ptr": (0, e * M * D)}
    # a program re-reads its partials from its second row tile on
    tiles = -(-M // ks.stack_config("stack_bwd", D).kwargs["BLOCK_M"])
    rereading = sum(len(range(p, tiles, P)) >= 2 for p in range(P))
    assert rereading >= 1
    reread = ws // P * rereading
    expect_bwd = {"g_ptr": (e * M * D, 0), "x_ptr": (e * M * D, 0), "saved_ptr": (e * (L - 1) * M * D, 0),
                  "w_ptr": (e * L * D * D, 0), "dx_ptr": (0, e * M * D), "ws_ptr": (reread, ws)}
    if chunk is not None:
        expect_bwd["carry_ptr"] = (a * M * D, a * M * D)
    assert per_arg(bwd) == expect_bwd
    assert per_arg(red) == {"ws_ptr": (ws, 0), "dw_ptr": (0, e * L * D * D), "db_ptr": (0, e * L * D)}
    # the model: everything above but the partials' re-read, which stays in L2
    l2 = 50 * 2 ** 20 if chunk is None else 2 * P * chunk * (D * D + D) * a   # an L2 that forces the chunking
    assert bench_stack.DEFAULT_L2 == ks.DEFAULT_L2_BYTES
    assert bench_stack.chunks(L, D, P, l2) == (1 if chunk is None else -(-L // chunk))
    for mode, launches in (("fwd", [fwd]), ("bwd", [bwd, red])):
        measured = sum(lc.unique_bytes for lc in launches) - (reread if mode == "bwd" else 0)
        assert measured == bench_stack.model_bytes("stack", mode, M, D, L, e, P, l2)
    assert t.dot_flops("residual_stack_fwd_kernel") >= 2 * L * M * D * D
    assert t.violations == []
