"""The activation table (issue 21): every row, through every path a user reaches.

Each row gives parity forward and backward in fp32, fp16 and bf16 and under autocast, an fp64
gradcheck of the fused op, the kernels' NaN and +-inf behaviour against torch's, and the fused
bytes at the compulsory minimum. The compile gate's records for the rows are in test_aot.
"""
import pytest
import torch
import triton
import triton.language as tl
from torch import nn

import fusedres
from fusedres import activations, traffic
from fusedres.kernels import activations as kact
from fusedres.validate import parity
from helpers import check_mlp_parity, check_parity, make_params, make_x, mlp_params

ACTS = tuple(activations.ACTIVATIONS)
ALL_THREE = {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}


def test_table_rows_are_one_list():
    assert ACTS == ("relu", "gelu", "gelu_tanh", "silu", "relu_sq", "leaky_relu")
    assert set(kact.KERNELS) == set(ACTS)


@pytest.mark.parametrize("module,name,param", [
    (nn.ReLU(), "relu", 0.0), (nn.GELU(), "gelu", 0.0), (nn.GELU(approximate="tanh"), "gelu_tanh", 0.0),
    (nn.SiLU(), "silu", 0.0), (nn.LeakyReLU(), "leaky_relu", 0.01), (nn.LeakyReLU(0.2), "leaky_relu", 0.2),
    ("GELU", "gelu", 0.0), ("relu_sq", "relu_sq", 0.0)])
def test_names_and_modules_resolve(module, name, param):
    row = activations.resolve(module, "test")
    assert (row.name, row.param) == (name, param)


@pytest.mark.parametrize("bad", ["tanh", nn.Tanh(), nn.Sequential()])
def test_anything_else_is_refused_with_the_supported_list(bad):
    with pytest.raises(ValueError, match="supported: 'relu', 'gelu'.*nn.LeakyReLU"):
        activations.resolve(bad, "fused_residual")
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="supported"):
        fusedres.fused_residual(x, w, act=bad)
    with pytest.raises(ValueError, match="supported"):
        fusedres.FusedResidualBlock(8, act=bad)
    with pytest.raises(TypeError, match="act must be"):
        fusedres.fused_residual(x, w, act=3)


@triton.jit
def _apply_row(x_ptr, y_ptr, dx_ptr, ACT: tl.constexpr, DACT: tl.constexpr, PARAM: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    v = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, ACT(v, tl.float32, False, PARAM))
    tl.store(dx_ptr + offs, DACT(tl.full((N,), 1.0, tl.float32), v, PARAM))


@pytest.mark.parametrize("name", ACTS)
def test_kernel_rows_match_torch_at_the_edges(name, device):
    """The kernels' forward and derivative equal torch's on NaN, +-inf, +-0 and far tails: NaN
    where torch gives NaN, the same infinities, the values within fp32 rounding."""
    row = activations.ACTIVATIONS[name]
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-3, -1e-3, 30.0, -30.0, 100.0, -100.0]
    x = torch.tensor(special + torch.linspace(-6, 6, 64 - len(special)).tolist(), device=device)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    prologue, derivative = kact.KERNELS[name]
    _apply_row[(1,)](x, y, dx, prologue, derivative, row.param, 64)
    xr = x.detach().clone().requires_grad_()
    y_ref = row(xr)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, torch.ones_like(y_ref))
    for got, want in ((y, y_ref.detach()), (dx, dx_ref)):
        assert torch.equal(got.isnan(), want.isnan()), (name, x[got.isnan() != want.isnan()])
        assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()]), name
        finite = want.isfinite()
        torch.testing.assert_close(got[finite], want[finite], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ACTS)
def test_parity_every_activation(name, dtype, device, launches):
    """Forward and every gradient (x, W, b, a learnable alpha) under the parity rule."""
    x = make_x((2, 9, 32), dtype, device)
    w, b = make_params(32, dtype, device)
    alpha = torch.tensor(0.75, device=device, dtype=dtype)
    check_parity(x, w, b, alpha=alpha, act=name)
    assert launches() == ALL_THREE


@pytest.mark.parametrize("name", ACTS)
def test_parity_every_activation_under_autocast(name, device):
    """fp32 x and parameters, bf16 GEMMs: the activation runs on the fp32 x (as eager's) and the
    result obeys the parity rule against fp64."""
    torch.manual_seed(0)
    eager = fusedres.ResidualBlock(32, act=name, device=device)
    fused = fusedres.FusedResidualBlock(32, act=name, device=device)
    fused.load_state_dict(eager.state_dict())
    x = make_x((2, 10, 32), torch.float32, device)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y_f, y_e = fused(xs[0]), eager(xs[1])
    g = torch.randn(y_e.shape, device=device)
    y_f.backward(g)
    y_e.backward(g)
    ref = fusedres.ResidualBlock(32, act=name, device=device, dtype=torch.float64)
    ref.load_state_dict(eager.state_dict())
    xr = x.detach().double().requires_grad_()
    ref(xr).backward(g.double())
    for f, e, r in [(y_f, y_e, ref(xr)), (xs[0].grad, xs[1].grad, xr.grad),
                    (fused.weight.grad, eager.weight.grad, ref.weight.grad)]:
        p = parity(f.detach(), e.detach(), r.detach())
        assert p.ok, (name, p)


@pytest.mark.parametrize("name", ACTS)
def test_gradcheck_fp64(name, device, launches):
    """torch.autograd.gradcheck of the fused op in fp64 (x kept away from relu-family kinks; fast mode:
    the Jacobian checked along random projections, every input perturbed)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).to(device).requires_grad_()
    w = (torch.randn(5, 5, generator=gen, dtype=torch.float64) / 2).to(device).requires_grad_()
    b = torch.randn(5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    alpha = torch.tensor(0.5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: fusedres.fused_residual(*t[:3], alpha=t[3], act=name),
                                    (x, w, b, alpha), fast_mode=True)
    assert launches()["residual_fwd"] >= 1 and launches()["residual_dw"] >= 1


@pytest.mark.parametrize("pre_act,act", [(None, "gelu"), ("silu", "gelu_tanh"), ("leaky_relu", "relu_sq")])
def test_mlp_block_pre_act_and_act(pre_act, act, device, launches):
    x = make_x((2, 9, 32), torch.float32, device)
    w1, b1, w2, b2 = mlp_params(32, 64, device)
    check_mlp_parity(x, w1, b1, w2, b2, alpha=torch.tensor(0.5, device=device), pre_act=pre_act, act=act)
    assert launches() == {"residual_fwd": 2, "residual_dx": 2, "residual_dw": 2}


@pytest.mark.parametrize("name", ACTS)
def test_fused_bytes_stay_at_the_compulsory_minimum(name):
    """The activation is applied in registers: the same e(2MD + D^2 + D) forward and
    e(5MD + 2D^2 + D) backward as relu's (test_traffic), for every row."""
    M, D, e = 72, 48, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, D, generator=gen, requires_grad=True)
    w = (torch.randn(D, D, generator=gen) / D ** 0.5).requires_grad_()
    b = torch.randn(D, generator=gen, requires_grad=True)
    g = torch.randn(M, D, generator=gen)
    with traffic.InterpreterTraffic() as t:
        y = fusedres.fused_residual(x, w, b, act=name)
        torch.autograd.grad(y, (x, w, b), g)
    assert t.unique_bytes("residual_fwd_kernel") == pytest.approx(e * (2 * M * D + D * D + D), rel=0.01)
    assert t.unique_bytes(("residual_dx_kernel", "residual_dw_kernel")) == pytest.approx(
        e * (5 * M * D + 2 * D * D + D), rel=0.01)
    assert t.violations == []


def test_modules_keep_the_activation_through_fuse_and_state_dict(device):
    eager = nn.Sequential(fusedres.ResidualBlock(32, act=nn.GELU(approximate="tanh"), device=device),
                          fusedres.ResidualMLPBlock(32, 64, pre_act=None, act="silu", device=device))
    x = make_x((4, 32), torch.float32, device)
    y = eager(x)
    fused = fusedres.fuse(eager)
    assert fused[0].act.name == "gelu_tanh" and fused[1].pre_act is None and fused[1].act.name == "silu"
    p = parity(fused(x).detach(), y.detach(), y.detach().double())
    assert p.ok, p
    model = fusedres.ResidualMLP(8, 32, 2, 4, act="leaky_relu", hidden_features=64, pre_act=None)
    assert all(b.act.name == "leaky_relu" and b.pre_act is None for b in model.blocks)


# ---------------------------------------------------------------------------------------------
# Per-channel residual scale (LayerScale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_channel_alpha_parity(dtype, device, launches):
    x = make_x((2, 9, 32), dtype, device)
    w, b = make_params(32, dtype, device)
    alpha = torch.linspace(-1.0, 1.5, 32, device=device).to(dtype)
    fused = check_parity(x, w, b, alpha=alpha)
    assert fused[4].shape == (32,)
    assert launches() == ALL_THREE


def test_per_channel_alpha_split_dw(device, launches):
    """The split-M dW path reduces the per-feature dalpha partials in its reduce kernel."""
    from fusedres.kernels import plan
    x = make_x((300, 32), torch.float32, device)      # 3 row tiles of the interpreter's config
    w, b = make_params(32, torch.float32, device)
    with plan.force_splits(3):
        check_parity(x, w, b, alpha=torch.linspace(0.1, 1.0, 32, device=device))
    assert launches()["residual_dw_reduce"] == 1


def test_per_channel_alpha_trains_like_eager(device):
    """LayerScale (alpha_per_channel; 0.1 rather than timm's 1e-5, so that it moves): a few SGD steps of
    the fused block and the eager one from the same state stay equal under the parity rule, and
    alpha's gradient is eager's."""
    torch.manual_seed(0)
    eager = fusedres.ResidualBlock(32, act="gelu", alpha=0.1, alpha_per_channel=True, device=device)
    fused = fusedres.FusedResidualBlock(32, act="gelu", alpha=0.1, alpha_per_channel=True, device=device)
    fused.load_state_dict(eager.state_dict())
    assert isinstance(fused.alpha, nn.Parameter) and fused.alpha.shape == (32,)
    ref = fusedres.ResidualBlock(32, act="gelu", alpha=0.1, alpha_per_channel=True, device=device,
                                 dtype=torch.float64)
    ref.load_state_dict(eager.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, fused, ref)]
    for step in range(3):
        x = make_x((16, 32), torch.float32, device, seed=step)
        grads = []
        for m, opt in zip((eager, fused, ref), opts):
            opt.zero_grad()
            m(x.to(m.weight.dtype)).square().mean().backward()
            grads.append(m.alpha.grad.detach().clone())
            opt.step()
        p = parity(grads[1], grads[0], grads[2])
        assert p.ok, (step, p)
    assert not torch.equal(fused.alpha.detach(), torch.full((32,), 0.1, device=device))


def test_alpha_of_another_shape_is_refused():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    for bad in (torch.ones(7), torch.ones(8, 1), torch.ones(2, 4)):
        with pytest.raises(ValueError, match=r"one element .* or shape \[out_features\] = \[8\].*got shape"):
            fusedres.fused_residual(x, w, alpha=bad)
    with pytest.raises(ValueError, match=r"\[D\]|out_features"):
        fusedres.fused_residual_mlp(x, torch.randn(16, 8), None, torch.randn(8, 16), None, alpha=torch.ones(16))


def test_eager_backend_and_custom_op_paths_take_every_row(device):
    """The eager backend (and the custom ops' bodies, where autograd records no graph) compute each
    row's derivative with torch's own backward op; create_graph=True takes the custom op."""
    previous = fusedres.set_backend("eager")
    try:
        x = make_x((3, 8), torch.float64, device).requires_grad_()
        block = fusedres.FusedResidualMLPBlock(8, 16, pre_act="silu", act="gelu", alpha_per_channel=True,
                                               device=device, dtype=torch.float64)
        ref = fusedres.ResidualMLPBlock(8, 16, pre_act="silu", act="gelu", alpha_per_channel=True, device=device,
                                        dtype=torch.float64)
        ref.load_state_dict(block.state_dict())
        got = torch.autograd.grad(block(x).sum(), (x, block.alpha))
        want = torch.autograd.grad(ref(x).sum(), (x, ref.alpha))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    finally:
        fusedres.set_backend(previous)
    w = make_params(8, torch.float64, device)[0].requires_grad_()
    for name in ACTS:
        (gx,) = torch.autograd.grad(fusedres.fused_residual(x, w, act=name).sum(), x, create_graph=True)
        (rx,) = torch.autograd.grad(fusedres.residual_reference(x, w, act=name).sum(), x)
        torch.testing.assert_close(gx.detach(), rx)


def test_a_strided_alpha_gets_its_own_plan(device):
    """Two per-channel alphas of one shape, one contiguous and one a strided view: the second is not
    read through the first one's (contiguous) plan."""
    x = make_x((4, 16), torch.float32, device)
    w, b = make_params(16, torch.float32, device)
    base = torch.arange(32.0, device=device) / 32
    for alpha in (base[::2].contiguous(), base[::2], base[1::2]):
        torch.testing.assert_close(fusedres.fused_residual(x, w, b, alpha=alpha),
                                   fusedres.residual_reference(x, w, b, alpha=alpha))


def test_per_channel_alpha_under_autocast(device):
    x = make_x((4, 16), torch.float32, device).requires_grad_()
    w, b = make_params(16, torch.float32, device)
    alpha = torch.linspace(0.2, 1.0, 16, device=device, requires_grad=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = fusedres.fused_residual(x, w, b, alpha=alpha, act="gelu")
    y.float().sum().backward()
    assert alpha.grad.dtype == torch.float32 and alpha.grad.shape == (16,) and x.grad.dtype == torch.float32
