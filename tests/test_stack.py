"""The fully fused narrow stack (``FusedResidualStack``): parity, equivalence with single blocks,
determinism, launch counts, conversion and errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedres
from fusedres import FusedResidualBlock, FusedResidualStack, ResidualBlock, fused_residual_stack, stack_reference
from fusedres.kernels import residual_stack as ks
from fusedres.reference import eager_stack_backward
from fusedres.validate import parity

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_stack_inputs(M, D, L, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bound = D ** -0.5
    x = torch.randn(M, D, generator=gen)
    x[:, ::5] = 0   # exact zeros, where relu'(0) = 1 would show
    w = torch.empty(L, D, D).uniform_(-bound, bound, generator=gen)
    b = torch.empty(L, D).uniform_(-bound, bound, generator=gen) if bias else None
    g = torch.randn(M, D, generator=gen)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(g)


def check_stack_parity(x, w, b, g, *, deterministic=True):
    """Forward: fused and eager (same dtype) against the fp64 chain from the same rounded inputs.
    Backward: fused and eager autograd against an fp64 backward, all given the activations the
    fused forward saved (relu-mask flips near zero make end-to-end low-precision backward
    comparisons meaningless, for eager as much as for fused). Returns the fused (y, dx, dW, db)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = fused_residual_stack(*leaves, deterministic=deterministic)
    y.backward(g)
    dx, dw, db = (t.grad if t is not None else None for t in leaves)

    p = parity(y, stack_reference(x, w, b), stack_reference(*(t.double() if t is not None else None for t in (x, w, b))))
    assert p.ok, f"y [{x.dtype}, x {list(x.shape)}, L {w.shape[0]}]: {p}"

    D = w.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    # the activations the fused forward saved for its backward: x_1 .. x_{L-1}
    (saved,) = [t for t in packed if t.dim() == 3 and t.shape[1:] == x2.shape]
    assert saved.shape[0] == w.shape[0] - 1
    g2 = g.reshape(-1, D)
    eager = eager_stack_backward(g2, x2, saved, w, b is not None, True, True)
    ref = eager_stack_backward(g2.double(), x2.double(), saved.double(), w.double(), b is not None, True, True)
    for name, f, e, r in zip(("dx", "dweight", "dbias"), (dx.reshape(-1, D), dw, db), eager, ref):
        if r is None:
            assert f is None, name
            continue
        assert f.shape == e.shape and f.dtype == e.dtype, (name, f.shape, e.shape)
        p = parity(f, e, r)
        assert p.ok, f"{name} [{x.dtype}, x {list(x.shape)}, L {w.shape[0]}]: {p}"
    return y.detach(), dx, dw, db


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", (1, 5, 8))
@pytest.mark.parametrize("D", ks.STACK_WIDTHS)
def test_parity(D, L, dtype, device, launches, monkeypatch):
    # M = 300: ragged against every row tile (64 and 128), and more tiles than the backward's
    # persistent programs, so that programs accumulate partials over several tiles. A GPU gives
    # one program per SM (132 on an H100: one tile each at this M), so the programs are capped
    # at 2 on every machine (the interpreter's default).
    default, used = ks.stack_programs, []

    def two_programs(M, D, device, config, programs=None):
        used.append((default(M, D, device, config, programs or 2), -(-M // config.kwargs["BLOCK_M"])))
        return used[-1][0]

    monkeypatch.setattr(ks, "stack_programs", two_programs)
    x, w, b, g = make_stack_inputs(300, D, L, dtype, device, seed=D + L)
    check_stack_parity(x, w, b, g)
    assert launches() == {"residual_stack_fwd": 1, "residual_stack_bwd": 1, "residual_stack_reduce": 1}
    ((programs, tiles),) = used
    assert tiles > programs == 2


@pytest.mark.parametrize("D", ks.STACK_WIDTHS)
def test_parity_fewer_rows_than_a_tile(D, device, launches):
    x, w, b, g = make_stack_inputs(5, D, 5, torch.bfloat16, device, seed=3)
    check_stack_parity(x, w, b, g)
    assert launches()["residual_stack_fwd"] == 1


@pytest.mark.parametrize("layout", ("sliced", "transposed", "batched"))
def test_parity_strided_and_batched_input(layout, device, launches):
    """Non-contiguous inputs are copied once to contiguous, aligned rows; leading dims are kept."""
    D, L = 32, 5
    base, w, b, _ = make_stack_inputs(2 * 7 * 11, 2 * D, L, torch.float16, device, seed=5)
    w, b = w[:, :D, :D].contiguous(), b[:, :D].contiguous()
    if layout == "sliced":
        x = base[:, D // 2: D // 2 + D]                               # row stride 2D
    elif layout == "transposed":
        x = base[:, :D].reshape(7, 22, D).transpose(0, 1)           # two row strides
    else:
        x = base[:, :D].contiguous().reshape(2, 7, 11, D)           # contiguous, leading dims
    assert x.is_contiguous() == (layout == "batched")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, x.dtype)
    y, dx, _, _ = check_stack_parity(x, w, b, g)
    assert y.shape == x.shape and dx.shape == x.shape


def test_parity_without_bias_and_with_atomics(device, launches):
    x, w, _, g = make_stack_inputs(300, 64, 5, torch.bfloat16, device, bias=False, seed=9)
    check_stack_parity(x, w, None, g)
    x, w, b, g = make_stack_inputs(300, 64, 5, torch.bfloat16, device, seed=9)
    check_stack_parity(x, w, b, g, deterministic=False)


def test_gradcheck_fp64(device):
    x, w, b, _ = make_stack_inputs(19, 16, 3, torch.float64, device, seed=2)
    x = x + 0.1   # keep away from relu's kink, where finite differences are meaningless
    x[:, ::5] = 0.5
    assert torch.autograd.gradcheck(lambda *t: fused_residual_stack(*t),
                                    tuple(t.requires_grad_() for t in (x, w, b)), eps=1e-6, atol=1e-5,
                                    fast_mode=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_as_a_list_of_blocks(dtype, device):
    """The same weights as L FusedResidualBlocks: fp32 agrees to fp32 rounding in y and dx (the
    stack sums each layer in the single-block kernel's order; its fp32 carry is the blocks'
    fp32 output); in 16-bit the stack carries fp32 between layers where the blocks round, so
    both are held to the parity rule against the fp64 chain, and the stack must not be the
    less accurate one by more than the rule allows."""
    torch.manual_seed(0)
    stack = FusedResidualStack(32, 5, device=device, dtype=dtype)
    blocks = nn.Sequential(*stack.to_blocks())
    assert all(type(b) is FusedResidualBlock for b in blocks)
    x = torch.randn(150, 32, device=device, dtype=dtype)
    xs, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yb = stack(xs), blocks(xb)
    g = torch.randn_like(ys)
    ys.backward(g)
    yb.backward(g)
    dws = stack.weight.grad
    dwb = torch.stack([b.weight.grad for b in blocks])
    dbb = torch.stack([b.bias.grad for b in blocks])
    if dtype == torch.float32:
        # same operations in the same order per layer; only the GEMM's internal summation
        # (numpy's here, the MMA's on a GPU) may differ with the row tile
        torch.testing.assert_close(ys, yb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xs.grad, xb.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dws, dwb, rtol=1e-5, atol=1e-5)   # tile sums in another order
        torch.testing.assert_close(stack.bias.grad, dbb, rtol=1e-5, atol=1e-5)
    else:
        ref = stack_reference(x.double(), stack.weight.double(), stack.bias.double())
        p_stack, p_blocks = parity(ys, yb, ref), parity(yb, yb, ref)
        assert p_stack.ok, p_stack
        assert p_stack.fused_error <= 2 * p_blocks.fused_error + p_blocks.floor, (p_stack, p_blocks)


def test_backward_is_bitwise_deterministic(device):
    x, w, b, g = make_stack_inputs(400, 64, 5, torch.bfloat16, device, seed=4)
    _, saved = torch.ops.fusedres.stack_forward(x, w, b, True, True)
    runs = [ks.residual_stack_bwd(g, x, saved, w, has_bias=True, need_dx=True, need_params=True, chunk=c)
            for c in (None, None, 3, 1)]
    for other in runs[1:]:
        for a, o in zip(runs[0], other):
            assert torch.equal(a, o)
    # and the module path, twice
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        fused_residual_stack(*leaves).backward(g)
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, o) for a, o in zip(*grads))


def test_chunked_layers_match_one_chunk(device, launches):
    """Layer chunks (the L2 budget) change where g waits between layers, not the result, and
    still take one backward launch plus the reduce."""
    x, w, b, g = make_stack_inputs(300, 16, 5, torch.float32, device, seed=6)
    _, saved = torch.ops.fusedres.stack_forward(x, w, b, True, True)
    before = launches()
    one = ks.residual_stack_bwd(g, x, saved, w, has_bias=True, need_dx=True, need_params=True, chunk=5)
    two = ks.residual_stack_bwd(g, x, saved, w, has_bias=True, need_dx=True, need_params=True, chunk=2)
    after = launches()
    assert all(torch.equal(a, o) for a, o in zip(one, two))
    assert after["residual_stack_bwd"] - before.get("residual_stack_bwd", 0) == 2
    assert after["residual_stack_reduce"] - before.get("residual_stack_reduce", 0) == 2


def test_layers_per_chunk_follows_half_of_l2():
    l2 = ks.DEFAULT_L2_BYTES
    # H100 (132 SMs, 50 MiB L2), fp32 partials: the design note's 11 layers at D=64 and 3 at D=128
    assert ks.l2_bytes("cpu") == l2
    assert ks.layers_per_chunk(64, 64, 132, 4, l2) == 11
    assert ks.layers_per_chunk(64, 128, 132, 4, l2) == 3
    assert ks.layers_per_chunk(8, 64, 132, 4, l2, deterministic=False) == 8
    assert 132 * 11 * (64 * 64 + 64) * 4 <= l2 // 2 < 132 * 12 * (64 * 64 + 64) * 4


def test_forward_is_one_launch_and_inference_saves_nothing(device, launches):
    stack = FusedResidualStack(64, 8, device=device)
    x = torch.randn(300, 64, device=device)
    with torch.no_grad():
        stack(x)
    assert launches() == {"residual_stack_fwd": 1}
    y, saved = torch.ops.fusedres.stack_forward(x, stack.weight.detach(), stack.bias.detach(), False, True)
    assert saved.numel() == 0
    y2, saved2 = torch.ops.fusedres.stack_forward(x, stack.weight.detach(), stack.bias.detach(), True, True)
    assert torch.equal(y, y2) and saved2.shape == (7, 300, 64)


def test_saves_only_the_input_weights_and_hidden_activations(device):
    stack = FusedResidualStack(32, 6, device=device)
    x = torch.randn(40, 32, device=device, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        stack(x)
    assert sorted(t.numel() for t in packed) == sorted([40 * 32, 6 * 32 * 32, 5 * 40 * 32])


@pytest.mark.parametrize("need", ("x", "params", "weight"))
def test_only_the_needed_gradients(need, device, launches):
    stack = FusedResidualStack(16, 3, device=device)
    x = torch.randn(50, 16, device=device, requires_grad=need == "x")
    if need == "x":
        stack.requires_grad_(False)
    if need == "weight":
        stack.bias.requires_grad_(False)
    stack(x).sum().backward()
    counts = launches()
    assert counts["residual_stack_bwd"] == 1
    assert counts.get("residual_stack_reduce", 0) == (need != "x")
    assert (x.grad is not None) == (need == "x")
    assert (stack.weight.grad is not None) == (need != "x")
    assert (stack.bias.grad is not None) == (need == "params")


def test_from_blocks_to_blocks_and_sequential_state_dict(device):
    torch.manual_seed(1)
    blocks = nn.Sequential(*[ResidualBlock(64, device=device) for _ in range(4)])
    stack = FusedResidualStack.from_blocks(blocks)
    assert (stack.dim, stack.depth) == (64, 4)
    for l, b in enumerate(blocks):
        assert torch.equal(stack.weight[l], b.weight) and torch.equal(stack.bias[l], b.bias)
    other = FusedResidualStack(64, 4, device=device)
    other.load_state_dict(blocks.state_dict())
    assert torch.equal(other.weight, stack.weight) and torch.equal(other.bias, stack.bias)
    back = nn.Sequential(*stack.to_blocks(ResidualBlock))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), blocks.state_dict().values()))
    # the same RNG draws as the blocks built in a row
    torch.manual_seed(2)
    fresh_blocks = [ResidualBlock(64, device=device) for _ in range(4)]
    torch.manual_seed(2)
    fresh = FusedResidualStack(64, 4, device=device)
    assert torch.equal(fresh.weight, torch.stack([b.weight for b in fresh_blocks]))
    x = torch.randn(20, 64, device=device)
    p = parity(stack(x), blocks(x), stack_reference(x.double(), stack.weight.double(), stack.bias.double()))
    assert p.ok, p


def test_stack_loads_sequential_state_dicts_without_alpha(device):
    """A Sequential of nn.Linear (no alpha keys) loads into the stack; strict still fails on a
    missing or unexpected key, with a RuntimeError naming it."""
    linears = nn.Sequential(*[nn.Linear(32, 32, device=device) for _ in range(3)])
    stack = FusedResidualStack(32, 3, device=device)
    assert stack.load_state_dict(linears.state_dict()).missing_keys == []
    assert torch.equal(stack.weight, torch.stack([l.weight for l in linears]))
    assert torch.equal(stack.bias, torch.stack([l.bias for l in linears]))
    blocks = nn.Sequential(*[FusedResidualBlock(32, device=device) for _ in range(3)])
    sd = {k: v for k, v in blocks.state_dict().items() if not k.endswith("alpha")}
    FusedResidualStack(32, 3, device=device).load_state_dict(sd)
    del sd["1.bias"]
    with pytest.raises(RuntimeError, match='Missing key.*"bias"'):
        FusedResidualStack(32, 3, device=device).load_state_dict(sd)
    with pytest.raises(RuntimeError, match='Unexpected key.*"extra"'):
        FusedResidualStack(32, 3, device=device).load_state_dict({**linears.state_dict(), "extra": torch.ones(1)})


def test_state_dict_and_from_blocks_errors(device):
    scaled = nn.Sequential(*[ResidualBlock(32, alpha=0.5, device=device) for _ in range(2)])
    with pytest.raises(RuntimeError, match="alpha 0.5"):
        FusedResidualStack(32, 2, device=device).load_state_dict(scaled.state_dict())
    with pytest.raises(RuntimeError, match="3 blocks"):
        FusedResidualStack(32, 2, device=device).load_state_dict(
            nn.Sequential(*[ResidualBlock(32, device=device) for _ in range(3)]).state_dict())
    with pytest.raises(ValueError, match="alpha of 1"):
        FusedResidualStack.from_blocks(scaled)
    with pytest.raises(ValueError, match="differ"):
        FusedResidualStack.from_blocks([ResidualBlock(32, device=device), ResidualBlock(32, False, device=device)])


def test_fuse_folds_runs_of_blocks_into_stacks(device):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 32), *[ResidualBlock(32) for _ in range(3)], nn.Linear(32, 64),
                          ResidualBlock(64), ResidualBlock(64, alpha=0.5), ResidualBlock(64), ResidualBlock(64),
                          nn.Linear(64, 48), ResidualBlock(48), ResidualBlock(48)).to(device)
    x = torch.randn(30, 8, device=device)
    expect = model(x)
    fusedres.fuse(model, stacks=True)
    kinds = [(type(m).__name__, getattr(m, "depth", None)) for m in model]
    assert kinds == [("Linear", None), ("FusedResidualStack", 3), ("Linear", None), ("FusedResidualBlock", None),
                     ("FusedResidualBlock", None), ("FusedResidualStack", 2), ("Linear", None),
                     ("FusedResidualBlock", None), ("FusedResidualBlock", None)]
    torch.testing.assert_close(model(x), expect, rtol=1e-4, atol=1e-4)
    mlp = fusedres.ResidualMLP(4, 16, 5, 2, fused=False)
    fusedres.fuse(mlp, stacks=True)
    assert [type(m).__name__ for m in mlp.blocks] == ["FusedResidualStack"]
    # at D = 128 the model puts the stack's L2-bound backward behind single blocks: not folded
    wide = nn.Sequential(ResidualBlock(128), ResidualBlock(128))
    fusedres.fuse(wide, stacks=True)
    assert [type(m).__name__ for m in wide] == ["FusedResidualBlock", "FusedResidualBlock"]


@pytest.mark.parametrize("bad", ("width", "shape", "bias", "dtype", "depth"))
def test_errors(bad, device):
    x, w, b, _ = make_stack_inputs(4, 32, 2, torch.float32, device)
    if bad == "width":
        with pytest.raises(ValueError, match="FusedResidualBlock"):
            FusedResidualStack(48, 2)
        with pytest.raises(ValueError, match="FusedResidualBlock"):
            fused_residual_stack(torch.randn(4, 256), torch.randn(2, 256, 256))
    elif bad == "shape":
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 32\)"):
            fused_residual_stack(x[:, :16], w, b)
    elif bad == "bias":
        with pytest.raises(ValueError, match=r"bias must have shape \[2, 32\]"):
            fused_residual_stack(x, w, b[0])
    elif bad == "dtype":
        with pytest.raises(TypeError, match="dtypes differ"):
            fused_residual_stack(x.half(), w, b)
    else:
        with pytest.raises(ValueError, match="depth must be a positive int"):
            FusedResidualStack(32, 0)


def test_custom_ops_pass_opcheck(device):
    x, w, b, g = make_stack_inputs(40, 16, 3, torch.float32, device)
    torch.library.opcheck(torch.ops.fusedres.stack_forward, (x, w.requires_grad_(), b.requires_grad_(), True, True))
    _, saved = torch.ops.fusedres.stack_forward(x, w.detach(), b.detach(), True, True)
    torch.library.opcheck(torch.ops.fusedres.stack_backward, (g, x, saved, w.detach(), True, True, True, True))


def test_misaligned_operands_are_refused_by_the_launcher(device):
    x, w, b, _ = make_stack_inputs(33, 16, 2, torch.float32, device)
    shifted = torch.empty(33 * 16 + 1, device=device)[1:].view(33, 16)
    shifted.copy_(x)
    with pytest.raises(ValueError, match="16-byte aligned"):
        ks.residual_stack_fwd(shifted, w, b, torch.empty_like(x))
    # the public API copies instead
    torch.testing.assert_close(fused_residual_stack(shifted, w, b), fused_residual_stack(x, w, b), rtol=0, atol=0)


def test_empty_batch(device):
    stack = FusedResidualStack(16, 3, device=device)
    x = torch.empty(0, 16, device=device, requires_grad=True)
    y = stack(x)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert torch.equal(stack.weight.grad, torch.zeros_like(stack.weight))
    assert torch.equal(stack.bias.grad, torch.zeros_like(stack.bias))


def test_nonfinite_values_land_where_eager_puts_them(device):
    x, w, b, g = make_stack_inputs(40, 32, 3, torch.float32, device, seed=11)
    x[3, 7], x[5, 1], x[9, 2] = float("nan"), float("inf"), -float("inf")
    check_stack_parity(x, w, b, g)       # parity() requires the same NaN/Inf pattern as eager


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    stack = FusedResidualStack(32, 4, device=device)
    x = torch.randn(50, 32, device=device, requires_grad=True)
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    gx, gw = x.grad.clone(), stack.weight.grad.clone()
    x.grad = None
    stack.zero_grad()
    stack(x).sum().backward()
    assert torch.equal(y, stack(x)) and torch.equal(gx, x.grad) and torch.equal(gw, stack.weight.grad)


def test_autocast_runs_the_gemms_in_bf16(device):
    stack = FusedResidualStack(32, 3, device=device)
    x = torch.randn(60, 32, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = stack(x)
        expect = stack_reference(x, stack.weight, stack.bias)
    assert y.dtype == expect.dtype == torch.float32
    ref = stack_reference(x.double(), stack.weight.double(), stack.bias.double())
    p = parity(y, expect, ref)
    assert p.ok, p
    y.sum().backward()
    assert stack.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
