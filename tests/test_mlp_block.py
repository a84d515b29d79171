"""The residual block with a hidden layer (fused_residual_mlp, FusedResidualMLPBlock) and stochastic
depth on the fused kernels (issue 16).

Every pass of the MLP block is one of the single block's three kernels with other operands; the
launch counts prove it: forward 2 ``residual_fwd``, backward 2 ``residual_dx``
and 2 ``residual_dw`` (plus a ``residual_dw_reduce`` per split weight gradient).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedres
from fusedres import (FusedResidualBlock, FusedResidualMLPBlock, ResidualBlock, ResidualMLPBlock, fused_residual,
                      fused_residual_mlp, residual_mlp_reference)
from fusedres.kernels import plan as kplan
from fusedres.validate import parity

from helpers import check_mlp_parity, make_x, mlp_params as _mlp_inputs, run_mlp as _run_mlp, small_tiles

def _scale_for(B, device, dtype=torch.float32):
    """A fixed stochastic-depth scale: dropped samples (0) and kept ones (1 / (1 - p) = 2)."""
    return torch.tensor([0.0, 2.0, 2.0, 0.0, 2.0] * (B // 5 + 1), device=device, dtype=dtype)[:B]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["plain", "no-bias", "alpha", "learnable-alpha", "drop-path", "strided",
                                  "ragged-h1", "recompute"])
def test_mlp_parity_and_launches(dtype, case, device, launches):
    D, H = (24, 1) if case == "ragged-h1" else (24, 40)
    layout = "transposed" if case == "strided" else "contiguous"
    x = make_x((5, 7, D), dtype, device, layout=layout)
    w1, b1, w2, b2 = (t.to(dtype) if t is not None else None for t in _mlp_inputs(D, H, device, bias=case != "no-bias"))
    alpha = {"alpha": 0.5, "learnable-alpha": torch.tensor(0.7, device=device)}.get(case, 1.0)
    s = _scale_for(5, device, dtype) if case in ("drop-path", "strided") else None
    fused = check_mlp_parity(x, w1, b1, w2, b2, alpha=alpha, s=s, recompute=case == "recompute")
    extra_fwd = 1 if case == "recompute" else 0          # forward 1 again, in the backward
    assert launches() == {"residual_fwd": 2 + extra_fwd, "residual_dx": 2, "residual_dw": 2}
    if s is not None:
        y = fused[0]
        for b in (s == 0).nonzero().flatten().tolist():
            assert torch.equal(y[b], x[b]), "a dropped sample's output is its input, exactly"


@pytest.mark.parametrize("H", [1, 3, 17, 33])
def test_mlp_ragged_widths(H, device, launches):
    """Hidden widths from 1, not multiples of anything, and D ragged too, with several tiles per
    dimension (16-wide tiles)."""
    x = make_x((37, 19), torch.float32, device)
    with small_tiles():
        check_mlp_parity(x, *_mlp_inputs(19, H, device), alpha=torch.tensor(0.8, device=device),
                         s=_scale_for(37, device))


@pytest.mark.parametrize("splits", [2, 3])
def test_mlp_split_weight_gradients(splits, device, launches):
    """Split-M applies to both weight gradients: one reduce launch each, a ragged last split."""
    x = make_x((300, 24), torch.float32, device)
    with kplan.force_splits(splits):
        check_mlp_parity(x, *_mlp_inputs(24, 40, device), alpha=torch.tensor(0.7, device=device),
                         s=_scale_for(300, device))
    assert launches() == {"residual_fwd": 2, "residual_dx": 2, "residual_dw": 2, "residual_dw_reduce": 2}


def test_mlp_is_bitwise_deterministic(device):
    x = make_x((40, 24), torch.bfloat16, device)
    w1, b1, w2, b2 = (t.to(torch.bfloat16) for t in _mlp_inputs(24, 96, device))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    runs = [_run_mlp(fused_residual_mlp, x, w1, b1, w2, b2, g, torch.tensor(0.6, device=device),
                     _scale_for(40, device, torch.bfloat16), torch.bfloat16) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_mlp_gradcheck_fp64_with_a_fixed_scale(device):
    # (not make_x: its exact zeros sit on relu's kink, where finite differences see a half slope)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device).requires_grad_()
    w1, b1, w2, b2 = (t.double().requires_grad_() for t in _mlp_inputs(8, 5, device))
    alpha = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    s = _scale_for(6, device, torch.float64)
    # fast mode: analytical against numerical along random projections of the Jacobian (the full
    # Jacobian, 37 s in the interpreter, is the single block's test_gradcheck_fp64)
    assert torch.autograd.gradcheck(lambda *a: fused_residual_mlp(*a[:5], alpha=a[5], sample_scale=s),
                                    (x, w1, b1, w2, b2, alpha), fast_mode=True)


def test_recompute_saves_x_only(device):
    """Saved for the backward: x and h; with recompute, x only (and the parameters)."""
    x = make_x((64, 16), torch.float32, device).requires_grad_()
    w1, b1, w2, b2 = (t.requires_grad_() for t in _mlp_inputs(16, 64, device))

    def saved_activation_bytes(recompute):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fused_residual_mlp(x, w1, b1, w2, b2, recompute=recompute)
        return sum(sizes) - sum(t.numel() * 4 for t in (w1, w2))
    assert saved_activation_bytes(False) == (64 * 16 + 64 * 64) * 4          # x and h
    assert saved_activation_bytes(True) == 64 * 16 * 4 + 64 * 4               # x, and b1 to recompute h


def test_mlp_ops_pass_opcheck(device):
    x = make_x((6, 16), torch.float32, device)
    w1, b1, w2, b2 = _mlp_inputs(16, 24, device)
    alpha = torch.tensor(0.5, device=device)
    s = _scale_for(6, device)
    for recompute in (False, True):
        leaf = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, alpha)]
        torch.library.opcheck(torch.ops.fusedres.residual_mlp_forward, (*leaf[:5], leaf[5], 1.0, s, recompute))
        y, h, *_ = torch.ops.fusedres.residual_mlp_forward(x, w1, b1, w2, b2, alpha, 1.0, s, recompute)
        g = torch.randn_like(y)
        torch.library.opcheck(torch.ops.fusedres.residual_mlp_backward,
                              (g, x, h, w1, b1, w2, b2, alpha, 1.0, s, recompute, True, True, True, True, True, True))
    torch.library.opcheck(torch.ops.fusedres.residual_forward, (x.clone().requires_grad_(), w2[:, :16].contiguous(),
                                                               None, None, None, 0.5, s))


def test_compile_fullgraph_mlp_and_drop_path(device, launches):
    """Blocks with a hidden layer and drop_path compile with fullgraph=True (zero graph breaks)
    and give the eager fused numbers for the same torch seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(FusedResidualMLPBlock(16, 32, drop_path=0.3, device=device),
                          FusedResidualBlock(16, drop_path=0.3, device=device)).train()
    x = make_x((10, 16), torch.float32, device).requires_grad_()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    y = compiled(x)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    torch.manual_seed(1)
    y_eager = model(x)
    y_eager.sum().backward()
    assert torch.equal(y, y_eager) and torch.equal(gx, x.grad)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mlp_autocast_matches_eager(amp_dtype, device):
    torch.manual_seed(0)
    eager, fused = ResidualMLPBlock(16, 48, device=device), FusedResidualMLPBlock(16, 48, device=device)
    fused.load_state_dict(eager.state_dict())
    x = make_x((12, 16), torch.float32, device)
    outs = []
    for block in (fused, eager):
        xx = x.clone().requires_grad_()
        with torch.autocast(device_type=device, dtype=amp_dtype):
            y = block(xx)
        y.float().sum().backward()
        outs.append((y, xx.grad, block.fc1.weight.grad, block.fc2.weight.grad))
    ref = ResidualMLPBlock(16, 48, device=device, dtype=torch.float64)
    ref.load_state_dict(eager.state_dict())
    xx = x.double().requires_grad_()
    y = ref(xx)
    y.sum().backward()
    refs = (y, xx.grad, ref.fc1.weight.grad, ref.fc2.weight.grad)
    for f, e, r in zip(*outs, refs):
        assert f.dtype == e.dtype
        assert parity(f, e, r, r.abs() + 1).ok       # an autocast floor: |reference| + 1 scale
    assert outs[0][2].dtype == torch.float32            # fp32 parameters get fp32 gradients, as eager


# ---------------------------------------------------------------------------------------------
# drop_path on the fused modules


@pytest.mark.parametrize("kind", ["block", "mlp"])
def test_drop_path_follows_torch_rng_as_the_eager_block(kind, device, launches):
    """Same seed, same per-sample scale as the eager reference block (torch's RNG draws it), the
    same outputs under the parity rule, and a dropped sample's output equal to its input."""
    torch.manual_seed(0)
    if kind == "block":
        eager, fused = ResidualBlock(24, drop_path=0.5, device=device), FusedResidualBlock(24, drop_path=0.5,
                                                                                            device=device)
    else:
        eager, fused = (ResidualMLPBlock(24, 40, drop_path=0.5, device=device),
                        FusedResidualMLPBlock(24, 40, drop_path=0.5, device=device))
    fused.load_state_dict(eager.state_dict())
    x = make_x((16, 3, 24), torch.float32, device)
    torch.manual_seed(5)
    s = fusedres.drop_path_scale(x, 0.5, True)
    torch.manual_seed(5)
    y_f = fused.train()(x)
    torch.manual_seed(5)
    y_e = eager.train()(x)
    assert torch.allclose(y_f, y_e, atol=1e-5, rtol=1e-5)
    dropped = (s == 0).nonzero().flatten().tolist()
    assert dropped and len(dropped) < 16
    for b in dropped:
        assert torch.equal(y_f[b], x[b])
    # eval mode: the plain block, and no random numbers drawn
    state = torch.get_rng_state()
    before = launches()
    y_eval = fused.eval()(x)
    assert torch.equal(torch.get_rng_state(), state)
    plain = (fused_residual(x, fused.weight, fused.bias, alpha=fused.alpha) if kind == "block" else
             fused_residual_mlp(x, fused.fc1.weight, fused.fc1.bias, fused.fc2.weight, fused.fc2.bias,
                                alpha=fused.alpha))
    assert torch.equal(y_eval, plain) and launches()["residual_fwd"] - before.get("residual_fwd", 0) == (
        2 if kind == "block" else 4)


def test_drop_path_parity_on_the_single_block(device, launches):
    """fused_residual with a fixed sample_scale: every output and gradient under the parity rule
    (fp32, bf16; projection and learnable alpha), the dropped rows exact."""
    from helpers import run
    for dtype in (torch.float32, torch.bfloat16):
        for proj in (False, True):
            x = make_x((10, 4, 24), dtype, device)
            N = 32 if proj else 24
            gen = torch.Generator().manual_seed(2)
            w = (torch.randn(N, 24, generator=gen) / 5).to(device, dtype)
            b = torch.randn(N, generator=gen).to(device, dtype)
            p = (torch.randn(N, 24, generator=gen) / 5).to(device, dtype) if proj else None
            a = torch.tensor(0.7, device=device, dtype=dtype)
            s = _scale_for(10, device, dtype)
            g = torch.randn((10, 4, N), generator=gen).to(device, dtype)

            def with_s(fn, dt):
                return lambda xx, ww, bb, **kw: fn(xx, ww, bb, sample_scale=s.to(dt), **kw)
            fused = run(with_s(fused_residual, dtype), x, w, b, g, alpha=a, proj=p)
            eager = run(with_s(fusedres.residual_reference, dtype), x, w, b, g, alpha=a, proj=p)
            ref = run(with_s(fusedres.residual_reference, torch.float64), x, w, b, g, dtype=torch.float64, alpha=a,
                      proj=p)
            absolute = [t.abs() if t is not None else None for t in (x, w, b, g, a, p)]
            sc = run(with_s(fusedres.residual_reference, torch.float64), *absolute[:4], dtype=torch.float64,
                     alpha=absolute[4], proj=absolute[5])
            for f, e, r, scale in zip(fused, eager, ref, sc):
                if r is not None:
                    assert parity(f, e, r, scale).ok
            if not proj:
                for row in (s == 0).nonzero().flatten().tolist():
                    assert torch.equal(fused[0][row], x[row])


def test_sample_scale_errors(device):
    x = make_x((6, 16), torch.float32, device)
    w = torch.randn(16, 16, device=device)
    with pytest.raises(ValueError, match=r"sample_scale must have shape \[x.shape\[0\]\] = \[6\]"):
        fused_residual(x, w, sample_scale=torch.ones(5, device=device))
    fused_residual(x, w, sample_scale=torch.ones(6, device=device))       # a plan for this signature, then:
    with pytest.raises(ValueError, match="gets no gradient"):
        fused_residual(x, w, sample_scale=torch.ones(6, device=device, requires_grad=True))
    with pytest.raises(ValueError, match="needs x with a sample dimension"):
        fused_residual(x[0], w, sample_scale=torch.ones(16, device=device))
    w1, b1, w2, b2 = _mlp_inputs(16, 8, device)
    with pytest.raises(ValueError, match=r"fc2_weight must be \[D, H\] = \[16, 8\]"):
        fused_residual_mlp(x, w1, b1, w2.T, b2)
    with pytest.raises(TypeError, match="dtypes differ"):
        fused_residual_mlp(x, w1.double(), b1, w2, b2)


def test_fuse_converts_mlp_blocks_and_keeps_drop_path(device):
    torch.manual_seed(0)
    model = nn.Sequential(ResidualMLPBlock(16, 32, drop_path=0.2, device=device),
                          *[ResidualBlock(16, drop_path=0.1, device=device) for _ in range(2)])
    fusedres.fuse(model, stacks=True)
    assert type(model[0]) is FusedResidualMLPBlock and model[0].drop_path == 0.2
    # the stack has no per-sample scale: blocks with drop_path are not folded into one
    assert [type(m) for m in model[1:]] == [FusedResidualBlock] * 2 and model[1].drop_path == 0.1
    x = make_x((8, 16), torch.float32, device)
    model.eval()
    ref = nn.Sequential(ResidualMLPBlock(16, 32, device=device), *[ResidualBlock(16, device=device) for _ in range(2)])
    ref.load_state_dict(model.state_dict())
    assert torch.allclose(model(x), ref.eval()(x), atol=1e-5)


def test_mlp_double_backward_is_a_clear_error(device):
    x = make_x((6, 16), torch.float32, device).requires_grad_()
    w1, b1, w2, b2 = _mlp_inputs(16, 8, device)
    (gx,) = torch.autograd.grad(fused_residual_mlp(x, w1, b1, w2, b2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fused_residual_mlp: double backward"):
        gx.sum().backward()


def test_any_sample_scale_is_exact(device, launches):
    """The kernels take any per-sample scale, not only stochastic depth's (0 or 1 / (1 - p)):
    negative, fractional and zero, with infinities in x where a zero scale meets them; fp64
    against eager autograd, every gradient."""
    x = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    x[3, 1, 2], x[2, 0, 5] = -float("inf"), float("inf")          # sample 3: s = 0; sample 2: s = -1
    s = torch.tensor([-1.0, 2.0, -1.0, 0.0, 0.25, 3.0], dtype=torch.float64, device=device)
    gen = torch.Generator().manual_seed(4)
    w, b = (torch.randn(16, 16, generator=gen, dtype=torch.float64) / 4).to(device), \
        torch.randn(16, generator=gen, dtype=torch.float64).to(device)
    alpha = torch.tensor(0.7, dtype=torch.float64, device=device)
    g = torch.randn(6, 5, 16, generator=gen, dtype=torch.float64).to(device)
    outs = []
    for fn in (fused_residual, fusedres.residual_reference):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, alpha)]
        y = fn(leaves[0], leaves[1], leaves[2], alpha=leaves[3], sample_scale=s)
        y.backward(g)
        outs.append([y.detach()] + [t.grad for t in leaves])
    for name, f, e in zip(("y", "dx", "dW", "db", "dalpha"), *outs):
        assert torch.equal(f.isnan(), e.isnan()), name
        ok = ~e.isnan()
        torch.testing.assert_close(f[ok], e[ok], rtol=1e-12, atol=1e-12, msg=name)


def test_strided_bias_with_a_float_alpha_backward(device, launches):
    """The backward gets no bias unless alpha needs its gradient: a strided bias's copy must
    not be attempted then."""
    x = make_x((8, 16), torch.float32, device).requires_grad_()
    w = torch.randn(16, 16, device=device, requires_grad=True)
    b = torch.randn(16, 2, device=device, requires_grad=True)
    y = fused_residual(x, w, b[:, 0], alpha=0.5)
    y.sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    fusedres.residual_reference(ref[0], ref[1], ref[2][:, 0], alpha=0.5).sum().backward()
    for got, want in zip((x.grad, w.grad, b.grad), (t.grad for t in ref)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
