"""Normalization inside the block (issue 22): ``y = x + alpha * (act(norm(x)) @ W.T + b)`` with
BatchNorm, LayerNorm and RMSNorm, against eager references built on torch's own norm modules."""
import copy

import pytest
import torch
from torch import nn

from fusedres import FusedResidualBlock, ResidualBlock, fused_residual, kernels, residual_reference
from fusedres.validate import parity
from helpers import make_x

KINDS = ["batch", "layer", "rms"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ("y", "dx", "dweight", "dbias", "dnorm_weight", "dnorm_bias")


def make_norm(kind, D, seed=4, **kwargs):
    """A torch norm module with non-trivial parameters (and running statistics)."""
    gen = torch.Generator().manual_seed(seed)
    norm = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "rms": nn.RMSNorm}[kind](D, **kwargs)
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(torch.rand(D, generator=gen) + 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.rand(D, generator=gen) - 0.5)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(torch.randn(D, generator=gen) * 0.3)
            norm.running_var.copy_(torch.rand(D, generator=gen) + 0.5)
    return norm


def params(D, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    bound = D ** -0.5
    w = torch.empty(D, D).uniform_(-bound, bound, generator=gen).to(device)
    b = torch.empty(D).uniform_(-bound, bound, generator=gen).to(device)
    return w, b


def run(fn, x, w, b, norm, g, dtype, act="relu", alpha=1.0, autocast=None):
    """Forward and backward; returns ([y, dx, dW, db, dnorm_weight, dnorm_bias], the norm module
    the run used: a copy in ``dtype``, with its updated running statistics)."""
    cast = lambda t: t.detach().to(dtype).requires_grad_()          # noqa: E731
    xx, ww, bb = cast(x), cast(w), cast(b)
    nm = copy.deepcopy(norm).to(xx.device, dtype if autocast is None else torch.float32)
    if autocast is not None:
        xx, ww, bb = (t.detach().float().requires_grad_() for t in (x, w, b))
        with torch.autocast(x.device.type, dtype=autocast):
            y = fn(xx, ww, bb, norm=nm, act=act, alpha=alpha)
    else:
        y = fn(xx, ww, bb, norm=nm, act=act, alpha=alpha)
    y.backward(g.to(y.dtype))
    nw, nb = getattr(nm, "weight", None), getattr(nm, "bias", None)
    return [y.detach(), xx.grad, ww.grad, bb.grad, *(p.grad if p is not None else None for p in (nw, nb))], nm


def check_norm_parity(x, w, b, norm, *, act="relu", autocast=None, alpha=1.0):
    """Fused, eager (torch's norm module, then the eager block) in the same dtype, and fp64 on the
    same rounded inputs: the parity rule for y, every gradient and BatchNorm's running statistics."""
    g = torch.randn((*x.shape[:-1], w.shape[0]), generator=torch.Generator().manual_seed(7)).to(x.device)
    dtype = x.dtype
    fused, fn = run(fused_residual, x, w, b, norm, g, dtype, act, alpha, autocast)
    eager, en = run(residual_reference, x, w, b, norm, g, dtype, act, alpha, autocast)
    ref, rn = run(residual_reference, x, w, b, norm, g, torch.float64, act, alpha)
    assert_parity(GRAD_NAMES, fused, eager, ref, (fn, en, rn),
                  f"[{type(norm).__name__}, {dtype}, autocast {autocast}, x {list(x.shape)}]")
    return fused


def assert_parity(names, fused, eager, ref, norms, where):
    """The parity rule for every named output (None: absent in all three), and for BatchNorm's
    running statistics of the three runs' norm modules ``norms``."""
    for name, f, e, r in zip(names, fused, eager, ref):
        if r is None:
            assert f is None and e is None, name
            continue
        assert f.shape == e.shape and f.dtype == e.dtype, (name, f.shape, e.shape, f.dtype, e.dtype)
        p = parity(f, e, r)
        assert p.ok, f"{name} {where}: {p}"
    if getattr(norms[0], "running_mean", None) is not None:
        for name in ("running_mean", "running_var"):
            p = parity(*(getattr(n, name) for n in norms))
            assert p.ok, f"{name} {where}: {p}"
        assert int(norms[0].num_batches_tracked) == int(norms[1].num_batches_tracked)


def expected_launches(kind, batch_stats=True):
    stats = {} if not batch_stats else {"norm_col_stats" if kind == "batch" else "norm_row_stats": 1}
    return {**stats, "residual_fwd": 1, "residual_dx": 1, "norm_dx": 1, "residual_dw": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,act", [("batch", "relu"), ("layer", "gelu"), ("rms", "silu")])
def test_norm_parity(kind, act, dtype, device, launches):
    x = (make_x((3, 13, 40), torch.float32, device) * 1.5 + 0.75).to(dtype)
    w, b = params(40, device)
    check_norm_parity(x, w.to(dtype), b.to(dtype), make_norm(kind, 40).to(device), act=act)
    assert launches() == expected_launches(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_norm_parity_autocast(kind, device, launches):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = make_x((2, 17, 48), torch.float32, device)
    w, b = params(48, device)
    check_norm_parity(x, w, b, make_norm(kind, 48).to(device), act="gelu_tanh", autocast=dtype)
    assert launches() == expected_launches(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_norm_gradcheck(kind, device):
    """fp64 gradcheck of x, the block's parameters, alpha and the norm's affine (BatchNorm on batch
    statistics: its running statistics are updated on every call and not used)."""
    block = FusedResidualBlock(6, norm=kind, act="gelu", learnable_alpha=True, alpha=0.7, device=device,
                               dtype=torch.float64)
    gradcheck_module(block, 4, {"norm.weight", "weight", "bias", "alpha"}, device)


def gradcheck_module(block, rows, must_have, device):
    """fp64 gradcheck of ``block`` on ``rows`` rows, as a function of x and every parameter (perturbed
    from their init, so that no affine sits at 1 and 0). Fast mode: random projections of the
    Jacobian, analytical against numerical (about 10x fewer launches than the full one)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, block.dim, generator=gen, dtype=torch.float64) + 0.3).to(device).requires_grad_()
    names = [n for n, _ in block.named_parameters()]
    assert must_have <= set(names)
    values = [(p.detach() + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device))
              .requires_grad_() for _, p in block.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *values), fast_mode=True)


def sgd_steps(models, shape, device, steps=3):
    """``steps`` SGD steps of each model on the same inputs of ``shape`` (mean 1, spread 2; each
    model in its own dtype) and a squared-output loss; returns the generator, to draw more."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = (torch.randn(*shape, generator=gen) * 2 + 1).to(device)
        for m, opt in zip(models, opts):
            opt.zero_grad()
            m(x.to(next(m.parameters()).dtype)).square().mean().backward()
            opt.step()
    return gen


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_stats_three_steps(momentum, device):
    """Three SGD steps on the fused and the eager block from one init: the running statistics (and
    num_batches_tracked) equal torch's under the parity rule, then eval mode uses them."""
    torch.manual_seed(0)
    eager = ResidualBlock(32, norm=nn.BatchNorm1d(32, momentum=momentum), device=device)
    fused = FusedResidualBlock.from_block(copy.deepcopy(eager))
    ref = copy.deepcopy(eager).double()
    gen = sgd_steps((fused, eager, ref), (4, 9, 32), device)
    for name in ("running_mean", "running_var"):
        p = parity(getattr(fused.norm, name), getattr(eager.norm, name), getattr(ref.norm, name))
        assert p.ok, f"{name}: {p}"
    assert int(fused.norm.num_batches_tracked) == int(eager.norm.num_batches_tracked) == 3
    for m in (fused, eager, ref):
        m.eval()
    x = (torch.randn(3, 32, generator=gen) + 1).to(device)
    outs = [m(x.to(next(m.parameters()).dtype)) for m in (fused, eager, ref)]
    assert parity(*outs).ok


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_eval_parity(affine, device, launches):
    """Eval mode on running statistics: no statistics pass, and the backward has no batch
    correction (the statistics are constants)."""
    x = make_x((29, 24), torch.float32, device) + 0.5
    w, b = params(24, device)
    norm = make_norm("batch", 24, affine=affine).to(device).eval()
    if affine:
        check_norm_parity(x, w, b, norm)
        assert launches() == expected_launches("batch", batch_stats=False)
    else:
        g = torch.randn(29, 24, generator=torch.Generator().manual_seed(2)).to(device)
        outs = []
        for fn, dtype in ((fused_residual, torch.float32), (residual_reference, torch.float32),
                          (residual_reference, torch.float64)):
            xx = x.detach().to(dtype).requires_grad_()
            y = fn(xx, w.to(dtype), b.to(dtype), norm=copy.deepcopy(norm).to(dtype))
            y.backward(g.to(dtype))
            outs.append((y.detach(), xx.grad))
        for i in range(2):
            assert parity(outs[0][i], outs[1][i], outs[2][i]).ok


def test_batchnorm_without_running_stats(device):
    """track_running_stats=False: batch statistics in eval mode too, as torch."""
    x = make_x((33, 16), torch.float32, device)
    w, b = params(16, device)
    norm = make_norm("batch", 16, track_running_stats=False).to(device).eval()
    check_norm_parity(x, w, b, norm)


@pytest.mark.parametrize("kind,layout,shape", [("batch", "transposed", (5, 7, 37)), ("layer", "sliced", (3, 11, 70)),
                                               ("rms", "feature-strided", (2, 9, 19))])
def test_norm_strided_and_ragged(kind, layout, shape, device, launches):
    x = make_x(shape, torch.float32, device, layout=layout)
    w, b = params(shape[-1], device)
    check_norm_parity(x, w, b, make_norm(kind, shape[-1]).to(device), act="leaky_relu")
    assert launches()["residual_fwd"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_norm_by_name_functional(kind, device):
    """A name in the functional form: the parameter-free norm, as F.batch_norm(training=True),
    F.layer_norm and F.rms_norm."""
    x = make_x((21, 32), torch.float64, device) + 0.2
    w, b = params(32, device)
    w, b = w.double(), b.double()
    y = fused_residual(x, w, b, norm=kind)
    assert torch.allclose(y, residual_reference(x, w, b, norm=kind), rtol=1e-12, atol=1e-12)


def test_norm_with_alpha_and_drop_path(device):
    x = make_x((6, 5, 24), torch.float32, device) + 0.3
    w, b = params(24, device)
    s = torch.tensor([2.0, 0, 2, 2, 0, 2])          # stochastic depth's drawn scale, p = 0.5
    for kind in KINDS:
        norm = make_norm(kind, 24).to(device)
        outs = []
        for fn, dtype in ((fused_residual, torch.float32), (residual_reference, torch.float32),
                          (residual_reference, torch.float64)):
            xx = x.detach().to(dtype).requires_grad_()
            alpha = torch.full((24,), 0.3, dtype=dtype, device=device).requires_grad_()
            y = fn(xx, w.to(dtype), b.to(dtype), alpha=alpha, sample_scale=s.to(device, dtype),
                   norm=copy.deepcopy(norm).to(dtype))
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), xx.grad, alpha.grad))
        for i in range(3):
            assert parity(outs[0][i], outs[1][i], outs[2][i]).ok, (kind, i)


@pytest.mark.parametrize("kind", KINDS)
def test_norm_saves_x_and_vectors(kind, device):
    """The backward keeps x, the parameters and the statistic vectors: no other tensor the size of
    x (never norm(x))."""
    block = FusedResidualBlock(40, norm=kind, device=device)
    x = torch.randn(3, 13, 40, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = block(x)
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != block.weight.data_ptr()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in big]
    vectors = sum(t.numel() for t in saved if t.numel() < x.numel() and t.dim() == 1)
    assert vectors <= 2 * 39 + 4 * 40 + 1
    y.sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_norm_forward_writes_only_y(kind, device):
    """The forward's kernels write no tensor of x's size but y: the statistics pass writes
    vectors, the GEMM y; x is read twice (the statistics, the GEMM's A tiles)."""
    from fusedres.traffic import InterpreterTraffic
    block = FusedResidualBlock(64, norm=kind, device=device)
    x = torch.randn(96, 64, device=device)
    with torch.no_grad(), InterpreterTraffic() as t:
        block(x)
    per = t.per_argument()
    written = {k: v["unique_written"] for k, v in per.items() if v["unique_written"]}
    assert written.pop("residual_fwd_kernel.y_ptr") == x.numel() * 4
    assert all(v <= 2 * 96 * 4 for v in written.values()), written
    x_reads = {k: v["unique_read"] for k, v in per.items() if k.endswith(".x_ptr")}
    assert sorted(x_reads.values()) == [x.numel() * 4] * 2, x_reads


def test_norm_state_dict_interchange(device):
    """The norm is a real submodule: torch's keys, loadable both ways with the eager block."""
    fused = FusedResidualBlock(16, norm="batch", device=device)
    eager = ResidualBlock(16, norm="batch", device=device)
    keys = set(fused.state_dict())
    assert {"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
            "norm.num_batches_tracked"} <= keys and keys == set(eager.state_dict())
    with torch.no_grad():
        fused.norm.running_mean.fill_(0.25)
    eager.load_state_dict(fused.state_dict())
    fused.load_state_dict(eager.state_dict())
    assert torch.equal(eager.norm.running_mean, fused.norm.running_mean)
    assert isinstance(FusedResidualBlock(16, norm="rms").norm, nn.RMSNorm)
    ln = nn.LayerNorm(16, eps=1e-6)
    assert FusedResidualBlock(16, norm=ln).norm is ln


def test_norm_errors(device):
    x = torch.randn(4, 8, device=device)
    w, b = params(8, device)
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        fused_residual(x, w, b, norm="group")
    with pytest.raises(ValueError, match="normalized_shape is \\(16,\\), but the block's width is 8"):
        fused_residual(x, w, b, norm=nn.LayerNorm(16))
    with pytest.raises(ValueError, match="num_features is 9"):
        FusedResidualBlock(8, norm=nn.BatchNorm1d(9))
    with pytest.raises(TypeError, match="got GroupNorm"):
        FusedResidualBlock(8, norm=nn.GroupNorm(2, 8))
    with pytest.raises(TypeError, match="got BatchNorm2d"):
        fused_residual(x, w, b, norm=nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="projection"):
        FusedResidualBlock(8, 12, norm="layer")
    with pytest.raises(ValueError, match="projection"):
        fused_residual(x, w[:6].contiguous(), b[:6].contiguous(), proj_weight=w[:6].contiguous(), norm="layer")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fused_residual(x[:1], w, b, norm="batch")


def test_norm_deterministic(device):
    """Bitwise the same outputs and gradients twice (partials summed in a fixed order)."""
    x = make_x((70, 48), torch.float32, device)
    w, b = params(48, device)
    g = torch.randn(70, 48, generator=torch.Generator().manual_seed(5)).to(device)
    norm = make_norm("batch", 48).to(device)
    first, _ = run(fused_residual, x, w, b, norm, g, torch.float32)
    second, _ = run(fused_residual, x, w, b, norm, g, torch.float32)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_norm_opcheck(device):
    x = torch.randn(10, 16, device=device, dtype=torch.float64)
    w, b = (t.double() for t in params(16, device))
    nw, nb = torch.rand(16, device=device, dtype=torch.float64) + 0.5, torch.randn(16, device=device,
                                                                                  dtype=torch.float64)
    for kind, running in (("batch", None), ("layer", None), ("rms", None),
                          ("batch", (torch.randn(16, device=device, dtype=torch.float64),
                                     torch.rand(16, device=device, dtype=torch.float64) + 0.5))):
        args = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), None, 0.5, None,
                "relu", 0.0, kind, nw.clone().requires_grad_(), None if kind == "rms" else nb.clone().requires_grad_(),
                1e-5, *(running or (None, None)))
        torch.library.opcheck(torch.ops.fusedres.norm_residual_forward.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("kind", ["batch", "layer"])
def test_norm_compile_fullgraph(kind, device):
    """torch.compile(fullgraph=True) traces the custom ops (and BatchNorm's running update) with no
    graph break, training and eval."""
    torch._dynamo.reset()
    block = FusedResidualBlock(16, norm=kind, device=device)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(12, 16, device=device)
    for train in (True, False):
        block.train(train)
        eager.train(train)
        y = compiled(x)
        y_ref = eager(x)
        assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    if kind == "batch":
        assert torch.allclose(block.norm.running_mean, eager.norm.running_mean)
        assert int(block.norm.num_batches_tracked) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_norm_constant_rows_and_columns(kind, device):
    """Zero-variance columns (BatchNorm) and rows (LayerNorm, RMSNorm of a constant row), where
    rstd = 1/sqrt(eps) amplifies any error in the mean: the statistics' corrected two-pass mean is
    exact there, as eager's."""
    x = make_x((40, 24), torch.float32, device) + 0.3          # every 5th column: the constant 0.3
    x[::7] = -1.7                                               # constant rows
    w, b = params(24, device)
    check_norm_parity(x, w, b, make_norm(kind, 24).to(device))


# ---------------------------------------------------------------------------------------------
# The MLP block: y = x + alpha * s * (act(pre_act(norm(x)) @ W1.T + b1) @ W2.T + b2)

MLP_GRADS = ("y", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias", "dnorm_weight", "dnorm_bias")


def run_mlp(fn, x, params, norm, g, dtype, autocast=None, **kwargs):
    cast = lambda t: t.detach().to(dtype).requires_grad_()          # noqa: E731
    nm = copy.deepcopy(norm).to(x.device, dtype if autocast is None else norm.weight.dtype)
    if autocast is not None:
        xx, *ps = (t.detach().float().requires_grad_() for t in (x, *params))
        with torch.autocast(x.device.type, dtype=autocast):
            y = fn(xx, *ps, norm=nm, **kwargs)
    else:
        xx, *ps = (cast(t) for t in (x, *params))
        y = fn(xx, *ps, norm=nm, **kwargs)
    y.backward(g.to(y.dtype))
    nb = getattr(nm, "bias", None)
    return [y.detach(), xx.grad, *(p.grad for p in ps), nm.weight.grad, nb.grad if nb is not None else None], nm


def check_mlp_norm_parity(x, params, norm, autocast=None, **kwargs):
    from fusedres import fused_residual_mlp, residual_mlp_reference
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x.device)
    fused, fn = run_mlp(fused_residual_mlp, x, params, norm, g, x.dtype, autocast, **kwargs)
    eager, en = run_mlp(residual_mlp_reference, x, params, norm, g, x.dtype, autocast,
                        **{k: v for k, v in kwargs.items() if k != "recompute"})
    ref, rn = run_mlp(residual_mlp_reference, x, params, norm, g, torch.float64,
                      **{k: v for k, v in kwargs.items() if k != "recompute"})
    assert_parity(MLP_GRADS, fused, eager, ref, (fn, en, rn),
                  f"[{type(norm).__name__}, {x.dtype}, autocast {autocast}, {kwargs}]")
    return fused


def mlp_params(D, H, device, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(H, D, generator=gen) / D ** 0.5).to(device), (torch.randn(H, generator=gen) * 0.1).to(device),
            (torch.randn(D, H, generator=gen) / H ** 0.5).to(device), (torch.randn(D, generator=gen) * 0.1).to(device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,pre_act,act", [("batch", None, "relu"),        # rtdl's block
                                              ("layer", None, "gelu"),        # timm's ViT MLP half
                                              ("rms", "silu", "relu_sq")])
def test_mlp_norm_parity(kind, pre_act, act, dtype, device, launches):
    x = (make_x((3, 11, 32), torch.float32, device) * 1.5 + 0.5).to(dtype)
    params = [p.to(dtype) for p in mlp_params(32, 64, device)]
    check_mlp_norm_parity(x, params, make_norm(kind, 32).to(device), pre_act=pre_act, act=act)
    stats = "norm_col_stats" if kind == "batch" else "norm_row_stats"
    assert launches() == {stats: 1, "residual_fwd": 2, "residual_dx": 2, "norm_dx": 1, "residual_dw": 2}


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_norm_autocast_recompute_and_layerscale(kind, device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = make_x((2, 9, 32), torch.float32, device) + 0.4
    alpha = torch.full((32,), 0.3, device=device)
    check_mlp_norm_parity(x, mlp_params(32, 48, device), make_norm(kind, 32).to(device), autocast=dtype,
                          pre_act=None, act="gelu", alpha=alpha, recompute=True)


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_norm_gradcheck(kind, device):
    from fusedres import FusedResidualMLPBlock
    block = FusedResidualMLPBlock(6, 10, norm=kind, pre_act=None, act="gelu", learnable_alpha=True, alpha=0.7,
                                  device=device, dtype=torch.float64)
    gradcheck_module(block, 4, {"norm.weight", "fc1.weight"}, device)


def test_mlp_batchnorm_running_stats_and_eval(device):
    """rtdl's block: three SGD steps, then eval on the running statistics; the state_dict moves
    between the fused and the eager block."""
    from fusedres import FusedResidualMLPBlock, ResidualMLPBlock
    torch.manual_seed(0)
    eager = ResidualMLPBlock(24, 48, norm="batch", pre_act=None, device=device)
    fused = FusedResidualMLPBlock.from_block(copy.deepcopy(eager))
    ref = copy.deepcopy(eager).double()
    gen = sgd_steps((fused, eager, ref), (37, 24), device)
    for name in ("running_mean", "running_var"):
        assert parity(getattr(fused.norm, name), getattr(eager.norm, name), getattr(ref.norm, name)).ok, name
    assert int(fused.norm.num_batches_tracked) == 3
    x = (torch.randn(5, 24, generator=gen) + 1).to(device)
    outs = [m.eval()(x.to(next(m.parameters()).dtype)) for m in (fused, eager, ref)]
    assert parity(*outs).ok
    assert set(fused.state_dict()) == set(eager.state_dict()) >= {"norm.running_mean", "fc1.weight"}


def test_residual_mlp_with_norm(device):
    from fusedres import ResidualMLP
    torch.manual_seed(0)
    fused = ResidualMLP(8, 32, 3, 2, hidden_features=64, norm="layer", pre_act=None, act="gelu", device=device)
    eager = ResidualMLP(8, 32, 3, 2, hidden_features=64, norm="layer", pre_act=None, act="gelu", fused=False,
                        device=device)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(16, 8, device=device)
    assert torch.allclose(fused(x), eager(x), rtol=1e-4, atol=1e-5)
    assert all(isinstance(b.norm, nn.LayerNorm) for b in fused.blocks)
    with pytest.raises(TypeError, match="norm must be a name"):
        ResidualMLP(8, 32, 2, 2, hidden_features=64, norm=nn.LayerNorm(32))


def test_mlp_norm_saves_x_h_and_vectors(device):
    from fusedres import FusedResidualMLPBlock
    block = FusedResidualMLPBlock(40, 80, norm="layer", pre_act=None, device=device)
    x = torch.randn(3, 13, 40, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = block(x)
    # x, h (the hidden pre-activation, as without a norm), the weights; the rest are vectors
    params = {block.fc1.weight.data_ptr(), block.fc2.weight.data_ptr()}
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() not in params]
    assert sorted(tuple(t.shape) for t in big) == [(3, 13, 40), (3, 13, 80)]
    assert any(t.data_ptr() == x.data_ptr() for t in big)
    assert all(t.dim() <= 1 for t in saved if t.numel() < x.numel())
    y.sum().backward()


def test_mlp_norm_opcheck(device):
    x = torch.randn(10, 16, device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    w1, b1, w2, b2 = (t.double() for t in mlp_params(16, 24, device))
    nw = (torch.rand(16, generator=gen, dtype=torch.float64) + 0.5).to(device)
    nb = torch.randn(16, generator=gen, dtype=torch.float64).to(device)
    for kind in KINDS:
        for recompute in (False, True):
            leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
            args = (*leaves, None, 1.0, None, recompute, "none", 0.0, "gelu", 0.0, kind, nw.clone().requires_grad_(),
                    None if kind == "rms" else nb.clone().requires_grad_(), 1e-5, None, None)
            torch.library.opcheck(torch.ops.fusedres.residual_mlp_forward.default, args,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_mlp_norm_compile_fullgraph(device):
    from fusedres import FusedResidualMLPBlock
    torch._dynamo.reset()
    block = FusedResidualMLPBlock(16, 32, norm="batch", pre_act=None, device=device)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(12, 16, device=device)
    for train in (True, False):
        block.train(train)
        eager.train(train)
        assert torch.allclose(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(block.norm.running_mean, eager.norm.running_mean)


def test_fuse_keeps_the_norm_and_never_stacks_it(device):
    """fuse() swaps eager blocks with a norm for fused ones sharing the norm module; a run of
    stackable widths with norms stays as single blocks (the stack has no norm)."""
    import fusedres
    torch.manual_seed(0)
    model = nn.Sequential(*[ResidualBlock(32, norm="batch", device=device) for _ in range(3)])
    norms = [b.norm for b in model]
    x = torch.randn(20, 32, device=device)
    want = copy.deepcopy(model)(x)
    fusedres.fuse(model, stacks=True)
    assert all(type(b) is FusedResidualBlock for b in model) and [b.norm for b in model] == norms
    assert torch.allclose(model(x), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Edges a review found


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rms_default_eps_is_the_opmath_dtypes(dtype, device):
    """RMSNorm's eps=None is fp32's machine epsilon for 16-bit x (torch's opmath), not the 16-bit
    dtype's: visible on small inputs, where eps is not negligible against the mean square."""
    x = (make_x((8, 32), torch.float32, device) * 0.02).to(dtype)
    w, b = params(32, device)
    check_norm_parity(x, w.to(dtype), b.to(dtype), make_norm("rms", 32).to(device))


def test_masked_lanes_of_the_norm_prologue_are_zero(device):
    """A large-mean column (BatchNorm) and a constant row without affine (LayerNorm) normalize the
    masked lanes of ragged tiles to large values; in fp16 those would round to inf and meet the
    other operand's masked zeros (NaN). They are zeroed: dW and y stay finite, under parity."""
    x = make_x((100, 32), torch.float32, device)
    x[:, 3] = -2024.0
    w, b = params(32, device)
    check_norm_parity(x.half(), w.half(), b.half(), make_norm("batch", 32).to(device))
    x = make_x((6, 40), torch.float32, device)
    x[1] = -300.0
    w, b = params(40, device)
    check_norm_parity(x.half(), w.half(), b.half(), nn.LayerNorm(40, elementwise_affine=False).to(device))


def test_eager_backend_updates_batchnorm_once(device):
    """Without the interpreter (or with set_backend("eager")) the module's own forward runs: its
    running statistics and num_batches_tracked are updated once per call, as torch's."""
    import fusedres
    fusedres.set_backend("eager")
    torch.manual_seed(0)
    fused = FusedResidualBlock(16, norm=nn.BatchNorm1d(16, momentum=None), device=device)
    eager = copy.deepcopy(fused)
    for _ in range(3):
        x = torch.randn(10, 16, device=device) + 1
        fused(x)
        residual_reference(x, eager.weight, eager.bias, norm=eager.norm)
    assert int(fused.norm.num_batches_tracked) == 3
    assert torch.allclose(fused.norm.running_mean, eager.norm.running_mean)


def test_norm_opcheck_16_bit(device):
    """The custom ops' fake outputs match the real ones for 16-bit x (the statistics are fp32)."""
    x = torch.randn(10, 16, device=device, dtype=torch.float16)
    w, b = (t.half() for t in params(16, device))
    nw = torch.rand(16, device=device, dtype=torch.float16) + 0.5
    for kind in KINDS:
        args = (x, w, b, None, 1.0, None, "relu", 0.0, kind, nw, None, 1e-5, None, None)
        torch.library.opcheck(torch.ops.fusedres.norm_residual_forward.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        w1, b1, w2, b2 = (t.half() for t in mlp_params(16, 24, device))
        args = (x, w1, b1, w2, b2, None, 1.0, None, False, "none", 0.0, "relu", 0.0, kind, nw, None, 1e-5, None,
                None)
        torch.library.opcheck(torch.ops.fusedres.residual_mlp_forward.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_norm_on_another_device_is_refused(device):
    x = torch.randn(4, 16, device=device)
    w, b = params(16, device)
    with pytest.raises(ValueError, match="one device"):
        fused_residual(x, w, b, norm=nn.LayerNorm(16, device="meta"))


def test_batchnorm_on_an_empty_batch(device):
    """No rows in training: an empty output, the running statistics kept, num_batches_tracked
    counted, zero gradients for the affine, as torch."""
    block = FusedResidualBlock(16, norm="batch", device=device)
    x = torch.randn(0, 16, device=device, requires_grad=True)
    y = block(x)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert torch.equal(block.norm.running_mean, torch.zeros(16, device=device))
    assert torch.equal(block.norm.running_var, torch.ones(16, device=device))
    assert int(block.norm.num_batches_tracked) == 1 and torch.equal(block.norm.weight.grad, torch.zeros(16))


# ---------------------------------------------------------------------------------------------
# The MLP block's hidden norm: act(hidden_norm(h)), statistics from fc1's epilogue


def run_hidden(fn, x, params, norms, g, dtype, **kwargs):
    cast = lambda t: t.detach().to(dtype).requires_grad_()          # noqa: E731
    n1, n2 = (copy.deepcopy(n).to(x.device, dtype) if isinstance(n, nn.Module) else n for n in norms)
    xx, *ps = (cast(t) for t in (x, *params))
    y = fn(xx, *ps, norm=n1, hidden_norm=n2, **kwargs)
    y.backward(g.to(y.dtype))
    affine = [p.grad for n in (n1, n2) if isinstance(n, nn.Module) for p in n.parameters()]
    return [y.detach(), xx.grad, *(p.grad for p in ps), *affine], n2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm,hidden", [("batch", "batch"),      # He et al.'s two-layer full pre-activation
                                         (None, "layer"), ("rms", "rms")])
def test_hidden_norm_parity(norm, hidden, dtype, device, launches):
    from fusedres import fused_residual_mlp, residual_mlp_reference
    x = (make_x((3, 11, 32), torch.float32, device) * 1.5 + 0.5).to(dtype)
    params = [p.to(dtype) for p in mlp_params(32, 48, device)]
    norms = (make_norm(norm, 32).to(device) if norm else None, make_norm(hidden, 48, seed=5).to(device))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device)
    kw = dict(pre_act="relu", act="relu")
    fused, fn = run_hidden(fused_residual_mlp, x, params, norms, g, dtype, **kw)
    eager, en = run_hidden(residual_mlp_reference, x, params, norms, g, dtype, **kw)
    ref, rn = run_hidden(residual_mlp_reference, x, params, norms, g, torch.float64, **kw)
    for i, (f, e, r) in enumerate(zip(fused, eager, ref)):
        assert f.shape == e.shape and f.dtype == e.dtype, i
        p = parity(f, e, r)
        assert p.ok, f"output {i} [{norm}, {hidden}, {dtype}]: {p}"
    if hidden == "batch":
        for name in ("running_mean", "running_var"):
            assert parity(getattr(fn, name), getattr(en, name), getattr(rn, name)).ok, name
    # the hidden norm's statistics come from fc1's epilogue: no statistics pass over h
    stats = {} if norm is None else {"norm_col_stats" if norm == "batch" else "norm_row_stats": 1}
    assert launches() == {**stats, "residual_fwd": 2, "residual_dx": 2, "norm_dx": 1 + (norm is not None),
                          "residual_dw": 2}


@pytest.mark.parametrize("hidden", KINDS)
def test_hidden_norm_gradcheck(hidden, device):
    from fusedres import FusedResidualMLPBlock
    block = FusedResidualMLPBlock(6, 10, norm="batch", hidden_norm=hidden, act="gelu", learnable_alpha=True,
                                  alpha=0.7, device=device, dtype=torch.float64)
    gradcheck_module(block, 5, {"hidden_norm.weight", "norm.weight"}, device)


def test_hidden_batchnorm_trains_then_evals_and_recomputes(device):
    """He et al.'s two-layer form in an MLP block: three SGD steps (recompute=True) with both
    BatchNorms' running statistics as torch's, then eval on them; the state_dict interchanges."""
    from fusedres import FusedResidualMLPBlock, ResidualMLPBlock
    torch.manual_seed(0)
    eager = ResidualMLPBlock(24, 40, norm="batch", hidden_norm="batch", device=device)
    fused = FusedResidualMLPBlock.from_block(copy.deepcopy(eager))
    fused.recompute = True
    ref = copy.deepcopy(eager).double()
    gen = sgd_steps((fused, eager, ref), (37, 24), device)
    for norm in ("norm", "hidden_norm"):
        for name in ("running_mean", "running_var"):
            got = [getattr(getattr(m, norm), name) for m in (fused, eager, ref)]
            assert parity(*got).ok, (norm, name)
    assert int(fused.hidden_norm.num_batches_tracked) == 3
    x = (torch.randn(5, 24, generator=gen) + 1).to(device)
    outs = [m.eval()(x.to(next(m.parameters()).dtype)) for m in (fused, eager, ref)]
    assert parity(*outs).ok
    assert {"hidden_norm.running_var", "norm.weight"} <= set(fused.state_dict()) == set(eager.state_dict())


def test_hidden_norm_forward_reads_h_once(device):
    """No pass over h for its statistics: fc1 writes h (and vector partials), fc2 reads it once."""
    from fusedres import FusedResidualMLPBlock
    from fusedres.traffic import InterpreterTraffic
    block = FusedResidualMLPBlock(32, 64, hidden_norm="layer", device=device)
    x = torch.randn(96, 32, device=device)
    with torch.no_grad(), InterpreterTraffic() as t:
        block(x)
    h_bytes = 96 * 64 * 4
    assert [lc.kernel for lc in t.launches] == ["residual_fwd_kernel", "residual_fwd_kernel"]
    fc1, fc2 = t.launches
    assert fc1.args["y_ptr"].unique_written == h_bytes and fc2.args["x_ptr"].unique_read == h_bytes
    assert fc1.args["row_stats_ptr"].unique_written < h_bytes // 4


def test_hidden_norm_opcheck_and_errors(device):
    from fusedres import FusedResidualMLPBlock, ResidualMLP
    x = torch.randn(10, 16, device=device, dtype=torch.float64)
    w1, b1, w2, b2 = (t.double() for t in mlp_params(16, 24, device))
    hw = torch.rand(24, device=device, dtype=torch.float64) + 0.5
    for kind in KINDS:
        leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        args = (*leaves, None, 1.0, None, False, "relu", 0.0, "relu", 0.0, "none", None, None, 0.0, None, None, kind,
                hw.clone().requires_grad_(), None, 1e-5, None, None)
        torch.library.opcheck(torch.ops.fusedres.residual_mlp_forward.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(ValueError, match="num_features is 16, but the block's width is 24"):
        FusedResidualMLPBlock(16, 24, hidden_norm=nn.BatchNorm1d(16))
    with pytest.raises(ValueError, match="hidden_features"):
        ResidualMLP(8, 16, 2, 2, hidden_norm="batch")


def test_hidden_norm_affine_alone(device):
    """Only the hidden norm's affine wants gradients: no finishing pass over dh (nothing reads
    it), the same gradients as eager's."""
    from fusedres import FusedResidualMLPBlock
    torch.manual_seed(0)
    block = FusedResidualMLPBlock(16, 32, hidden_norm="layer", device=device)
    eager = copy.deepcopy(block)
    for m in (block, eager):
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("hidden_norm."))
    x = torch.randn(12, 16, device=device)
    block(x).square().sum().backward()
    from fusedres import residual_mlp_reference
    residual_mlp_reference(x, eager.fc1.weight, eager.fc1.bias, eager.fc2.weight, eager.fc2.bias, alpha=eager.alpha,
                           hidden_norm=eager.hidden_norm).square().sum().backward()
    for a, b in zip(block.hidden_norm.parameters(), eager.hidden_norm.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_the_mlp_ops_refuse_a_norm_on_the_eager_backend(device):
    import fusedres
    fusedres.set_backend("eager")
    x = torch.randn(4, 16, device=device)
    w1, b1, w2, b2 = mlp_params(16, 24, device)
    with pytest.raises(RuntimeError, match="through the eager reference"):
        torch.ops.fusedres.residual_mlp_forward(x, w1, b1, w2, b2, None, 1.0, None, False, "none", 0.0, "relu", 0.0,
                                                "layer", None, None, 1e-5, None, None)
    y = fusedres.fused_residual_mlp(x, w1, b1, w2, b2, norm="layer")      # the API takes the reference
    assert torch.allclose(y, fusedres.residual_mlp_reference(x, w1, b1, w2, b2, norm="layer"))
