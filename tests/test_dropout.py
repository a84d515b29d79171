"""Dropout inside the blocks (issue 23): the keep mask is a pure function of (seed, row, column),
regenerated in every kernel that needs it and never stored. Tested as the peers test dropout
(never bitwise against torch's own RNG): the kept fraction, the exact scale, seed
reproducibility, fp64 gradcheck with the seed fixed, and parity against eager given the mask a
call used (:func:`fusedres.record_dropout`)."""
import math

import pytest
import torch
from torch import nn

import fusedres
from fusedres import FusedResidualBlock, FusedResidualMLPBlock, ResidualBlock, ResidualMLPBlock, kernels
from fusedres.dropout import keep_mask, uniform
from fusedres.kernels.recipe import MLPRecipe, Recipe
from fusedres.validate import parity
from helpers import make_params, make_x, mlp_params
from test_recipe import launched  # noqa: F401  (the fixture)

ACTS = ["relu", "gelu", "gelu_tanh", "silu", "relu_sq", "leaky_relu"]
GRADS = ("y", "dx", "dW", "db", "dalpha")
MLP_GRADS = ("y", "dx", "dW1", "db1", "dW2", "db2", "dalpha")


def single(x, w, b, alpha, g, *, mask=None, **kw):
    """Forward and backward of the block (fused, or the reference given ``mask``): [y, dx, dW,
    db, dalpha] and the dropout record of the fused call."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, alpha)]
    with fusedres.record_dropout() as rec:
        if mask is None:
            y = fusedres.fused_residual(*leaves[:3], alpha=leaves[3], **kw)
        else:
            y = fusedres.residual_reference(*leaves[:3], alpha=leaves[3], dropout_mask=mask, **kw)
    y.backward(g.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves], rec


def assert_parity(names, fused, eager, ref, scale, where=""):
    """The parity rule for every output, the floor from ``scale``: the computation redone on
    absolute values (tests/helpers.py's rule), which a long sum's cancellation needs (dalpha)."""
    for name, f, e, r, sc in zip(names, fused, eager, ref, scale):
        assert f.shape == e.shape and f.dtype == e.dtype, name
        p = parity(f, e, r, sc)
        assert p.ok, f"{name} {where}: {p}"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its masks from a known seed (the masks, not only the data, are fixed)."""
    torch.manual_seed(2023)


# ---------------------------------------------------------------------------------------------
# The mask: a pure function, the same bits in the kernels and in torch ops


def test_the_kernels_drop_exactly_the_mask_torch_ops_compute(device):
    """y - x is 0 exactly where the recorded mask (computed with torch ops from the call's seed)
    drops, and nowhere else: the kernels' Philox and fusedres.dropout.keep_mask agree bit for bit."""
    x = make_x((3, 37, 48), torch.float64, device)
    w, b = make_params(48, torch.float64, device)
    with fusedres.record_dropout() as rec:
        y = fusedres.fused_residual(x, w, b, dropout=0.4)
    (draw,) = rec.draws
    keep = draw.mask()
    assert draw.site == "dropout" and keep.shape == y.shape and draw.seed.dtype == torch.int64
    assert torch.equal((y - x) != 0, keep)


def test_the_mask_depends_on_no_tile_or_config(device):
    """The same seed under two tile shapes (different programs, loops and K splits): the same y bits
    where dropped, and the same mask."""
    from helpers import fixed_tiles
    from fusedres.kernels import configs
    x = make_x((2, 45, 40), torch.float64, device)
    w, b = make_params(40, torch.float64, device)
    outs = []
    for tiles in ((16, 16, 16), (32, 64, 32)):
        with configs.config_override(fixed_tiles(*tiles)):
            torch.manual_seed(5)
            outs.append(fusedres.fused_residual(x, w, b, dropout=0.5))
    assert torch.equal(outs[0] == x, outs[1] == x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kept_fraction_is_one_minus_p(p):
    """Over 4M elements the kept fraction is within 0.01 of 1 - p; rows past 2**32 (the counter's
    second word) draw their own bits."""
    keep = keep_mask(12345, (2048, 2048), p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    hi = uniform(12345, 64, 64, row_start=2 ** 32)
    assert not torch.equal(hi, uniform(12345, 64, 64))


def test_kept_values_are_the_branch_scaled_by_one_over_keep(device):
    """Kept: exactly ``z / (1 - p)`` (fp64, alpha = 1); dropped: y = x bit for bit."""
    x = make_x((4, 9, 32), torch.float64, device)
    w, b = make_params(32, torch.float64, device)
    p = 0.25
    with fusedres.record_dropout() as rec:
        y = fusedres.fused_residual(x, w, b, dropout=p)
    keep = rec.masks()[0]
    z = torch.nn.functional.linear(torch.relu(x), w, b)
    assert torch.equal(y[~keep], x[~keep])
    torch.testing.assert_close((y - x)[keep], z[keep] / (1 - p), rtol=1e-13, atol=1e-13)


def test_the_same_seed_reproduces_and_another_seed_draws_another_mask(device):
    x = make_x((2, 21, 32), torch.float32, device)
    w, b = make_params(32, torch.float32, device)
    block = FusedResidualMLPBlock(32, 64, dropout=0.3, hidden_dropout=0.3).to(device)

    def step(seed):
        block.zero_grad()
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_()
        y = block(xx)
        y.sum().backward()
        return y.detach(), xx.grad, block.fc1.weight.grad.clone(), block.fc2.weight.grad.clone()

    first, again, other = step(1), step(1), step(2)
    for a, b_ in zip(first, again):
        assert torch.equal(a, b_)
    assert not torch.equal(first[0], other[0])


# ---------------------------------------------------------------------------------------------
# Parity against eager given the mask, every gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act,norm,drop_path", [("relu", None, False), ("gelu", "batch", True),
                                                ("silu", "layer", False)])
def test_single_block_parity_given_the_mask(dtype, act, norm, drop_path, device, launches):
    x = make_x((3, 13, 40), torch.float32, device)
    w, b = make_params(40, torch.float32, device)
    alpha = torch.full((40,), 0.8, device=device)
    g = torch.randn(3, 13, 40, generator=torch.Generator().manual_seed(7)).to(device)
    s = torch.tensor([0.0, 2.0, 1.25], device=device) if drop_path else None
    kw = dict(act=act, dropout=0.3, sample_scale=s)
    nm = (lambda dt: {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm](40).to(device, dt)) if norm else None
    fused, rec = single(*(t.to(dtype) for t in (x, w, b, alpha)), g, norm=nm(dtype) if nm else None,
                        **{**kw, "sample_scale": s.to(dtype) if s is not None else None})
    mask = rec.masks()[0]
    eager, _ = single(*(t.to(dtype) for t in (x, w, b, alpha)), g, mask=mask, norm=nm(dtype) if nm else None,
                      **{**kw, "sample_scale": s.to(dtype) if s is not None else None})
    ref, _ = single(*(t.to(dtype).double() for t in (x, w, b, alpha)), g, mask=mask,
                    norm=nm(torch.float64) if nm else None,
                    **{**kw, "sample_scale": s.double() if s is not None else None})
    scale, _ = single(*(t.to(dtype).double().abs() for t in (x, w, b, alpha)), g.abs(), mask=mask,
                      norm=nm(torch.float64) if nm else None,
                      **{**kw, "sample_scale": s.double() if s is not None else None})
    assert_parity(GRADS, fused, eager, ref, scale, f"[{dtype}, {act}, {norm}]")
    expected = {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}
    if norm is not None:
        expected.update({"norm_dx": 1, "norm_col_stats" if norm == "batch" else "norm_row_stats": 1})
    assert launches() == expected


def mlp_run(x, p1, alpha, s, g, dtype, masks=None, **kw):
    w1, b1, w2, b2 = (t.detach().to(dtype).requires_grad_() for t in p1)
    a = alpha.detach().to(dtype).requires_grad_()
    xx = x.detach().to(dtype).requires_grad_()
    ss = s.to(dtype) if s is not None else None
    norms = {k: (v.to(x.device, dtype) if v is not None else None) for k, v in kw.pop("norms", {}).items()}
    with fusedres.record_dropout() as rec:
        if masks is None:
            y = fusedres.fused_residual_mlp(xx, w1, b1, w2, b2, alpha=a, sample_scale=ss, **norms, **kw)
        else:
            kw.pop("recompute", None)
            y = fusedres.residual_mlp_reference(xx, w1, b1, w2, b2, alpha=a, sample_scale=ss,
                                                hidden_dropout_mask=masks[0], dropout_mask=masks[1], **norms, **kw)
    y.backward(g.to(y.dtype))
    return [y.detach(), xx.grad, w1.grad, b1.grad, w2.grad, b2.grad, a.grad], rec


def check_mlp(dtype, device, *, act="relu", pre_act="relu", norm=None, hidden_norm=None, drop_path=True,
              recompute=False, p=(0.2, 0.35)):
    D, H = 24, 40
    x = make_x((2, 11, D), torch.float32, device)
    ps = mlp_params(D, H, device)
    alpha = torch.tensor(0.9, device=device)
    s = torch.tensor([1.6, 0.0], device=device) if drop_path else None
    g = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(9)).to(device)
    mods = {k: ({"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "rms": nn.RMSNorm}[v](w) if v else None)
            for k, v, w in (("norm", norm, D), ("hidden_norm", hidden_norm, H))}
    kw = dict(act=act, pre_act=pre_act, dropout=p[0], hidden_dropout=p[1])
    import copy
    fused, rec = mlp_run(x, ps, alpha, s, g, dtype, norms=copy.deepcopy(mods), recompute=recompute, **kw)
    masks = (rec.masks("hidden_dropout")[0], rec.masks("dropout")[0])
    assert masks[0].shape == (2, 11, H) and masks[1].shape == (2, 11, D)
    eager, _ = mlp_run(x, ps, alpha, s, g, dtype, masks, norms=copy.deepcopy(mods), **kw)
    ref, _ = mlp_run(x, [t.to(dtype) for t in ps], alpha.to(dtype), s.to(dtype) if s is not None else None, g,
                     torch.float64, masks, norms=copy.deepcopy(mods), **kw)
    scale, _ = mlp_run(x.to(dtype).abs(), [t.to(dtype).abs() for t in ps], alpha.to(dtype).abs(),
                       s.to(dtype) if s is not None else None, g.abs(), torch.float64, masks,
                       norms=copy.deepcopy(mods), **kw)
    assert_parity(MLP_GRADS, fused, eager, ref, scale, f"[{dtype}, {act}, {norm}, {hidden_norm}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mlp_block_parity_given_both_masks(dtype, device, launches):
    check_mlp(dtype, device, act="gelu", pre_act=None, norm="layer")
    assert launches() == {"norm_row_stats": 1, "residual_fwd": 2, "residual_dx": 2, "residual_dw": 2, "norm_dx": 1}


@pytest.mark.parametrize("act", ACTS)
def test_mlp_block_with_both_dropouts_drop_path_norm_and_every_activation(act, device):
    """The issue's done-when: both dropouts with drop_path, a norm (each kind in turn, the hidden
    one too) and every activation, fp32, every gradient."""
    i = ACTS.index(act)
    check_mlp(torch.float32, device, act=act, pre_act=ACTS[(i + 1) % len(ACTS)],
              norm=("batch", "layer", "rms")[i % 3], hidden_norm=(None, "batch", "layer")[i % 3],
              recompute=i % 2 == 1)


@pytest.mark.parametrize("act", ACTS)
def test_single_block_with_dropout_drop_path_norm_and_every_activation(act, device):
    i = ACTS.index(act)
    x = make_x((2, 9, 32), torch.float32, device)
    w, b = make_params(32, torch.float32, device)
    alpha = torch.tensor(0.7, device=device)
    g = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3)).to(device)
    s = torch.tensor([0.0, 1.5], device=device)
    norm = {0: None, 1: "batch", 2: "layer", 3: "rms"}[i % 4]
    mk = (lambda dt: {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "rms": nn.RMSNorm}[norm](32).to(device, dt)) \
        if norm else (lambda dt: None)
    fused, rec = single(x, w, b, alpha, g, act=act, dropout=0.45, sample_scale=s, norm=mk(torch.float32))
    mask = rec.masks()[0]
    eager, _ = single(x, w, b, alpha, g, mask=mask, act=act, dropout=0.45, sample_scale=s, norm=mk(torch.float32))
    ref, _ = single(*(t.double() for t in (x, w, b, alpha)), g, mask=mask, act=act, dropout=0.45,
                    sample_scale=s.double(), norm=mk(torch.float64))
    scale, _ = single(*(t.double().abs() for t in (x, w, b, alpha)), g.abs(), mask=mask, act=act, dropout=0.45,
                      sample_scale=s.double(), norm=mk(torch.float64))
    assert_parity(GRADS, fused, eager, ref, scale, f"[{act}, {norm}]")


def test_fp64_gradcheck_with_the_seed_fixed(device):
    """Each evaluation re-seeds torch: gradcheck then sees one function, and the analytic backward
    (the kernels' regenerated masks) matches the numeric derivative of the forward's."""
    # (smooth activations and x away from 0: a numeric derivative across relu's kink is not one)
    x = torch.randn(2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    w, b = (t.requires_grad_() for t in make_params(8, torch.float64, device))
    alpha = torch.tensor(0.6, dtype=torch.float64, device=device, requires_grad=True)

    def block(x, w, b, alpha):
        torch.manual_seed(11)
        return fusedres.fused_residual(x, w, b, alpha=alpha, dropout=0.4, act="gelu")
    assert torch.autograd.gradcheck(block, (x, w, b, alpha), fast_mode=True)
    w1, b1, w2, b2 = (t.double().requires_grad_() for t in mlp_params(8, 12, device))

    def mlp(x, w1, b1, w2, b2):
        torch.manual_seed(12)
        return fusedres.fused_residual_mlp(x, w1, b1, w2, b2, dropout=0.3, hidden_dropout=0.5, act="silu",
                                           pre_act="gelu")
    assert torch.autograd.gradcheck(mlp, (x, w1, b1, w2, b2), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# What dropout must not cost: eval, p = 0, the saved tensors


@pytest.mark.parametrize("mlp", [False, True])
def test_eval_and_p0_draw_nothing_and_launch_the_plain_block(mlp, launched):  # noqa: F811
    torch.manual_seed(0)
    make = (lambda **kw: FusedResidualMLPBlock(16, 32, **kw)) if mlp else (lambda **kw: FusedResidualBlock(16, **kw))
    plain, dropped, zero = make(), make(dropout=0.5, **({"hidden_dropout": 0.5} if mlp else {})), make(dropout=0.0)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 8, 16)
    plain(x.clone().requires_grad_()).sum().backward()
    expected = list(launched)
    for block in (dropped.eval(), zero):
        launched.clear()
        kernels.configs.clear_prepared()        # (else the plain block's prepared launches replay unseen)
        state = torch.get_rng_state()
        y = block(x.clone().requires_grad_())
        y.sum().backward()
        assert torch.equal(torch.get_rng_state(), state)      # no random number drawn
        assert launched == expected                            # the plain block's passes, no dropout piece
    assert torch.equal(dropped.eval()(x), plain(x))
    # training with dropout: exactly the recipe's passes with the masks
    launched.clear()
    dropped.train()(x.clone().requires_grad_()).sum().backward()
    recipe = MLPRecipe(alpha="scalar", dropout=True, hidden_dropout=True) if mlp else Recipe(alpha="scalar",
                                                                                             dropout=True)
    assert launched == [p.key for p in recipe.passes()]


def test_p1_behaves_as_torch(device):
    """p = 1: the branch is multiplied by 0 (y = x), its gradients are 0, dx = g; as torch's."""
    torch.manual_seed(0)
    fused = FusedResidualMLPBlock(16, 32, dropout=1.0).to(device)
    eager = ResidualMLPBlock(16, 32, dropout=1.0).to(device)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(3, 16, device=device)
    ys = []
    for block in (fused, eager):
        xx = x.clone().requires_grad_()
        y = block(xx)
        y.backward(torch.ones_like(y))
        ys.append((y, xx.grad, block.fc2.weight.grad, block.fc2.bias.grad, block.fc1.weight.grad))
    for a, b in zip(*ys):
        assert torch.equal(a, b)
    assert torch.equal(ys[0][0], x) and not ys[0][2].any()
    single = FusedResidualBlock(16, dropout=1.0).to(device)
    assert torch.equal(single(x), x)


def saved_bytes(fn):
    """The bytes autograd saves for the backward of ``fn()``, counted by storage (a tensor saved
    twice counts once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("mlp", [False, True])
def test_no_mask_is_saved(mlp, device):
    """Training with dropout saves exactly the seeds more than without: 8 bytes per call, whatever
    the size of x (the eager block saves a mask or the dropped tensor, M x D elements per dropout)."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, 32, device=device, requires_grad=True)
    make = (lambda **kw: FusedResidualMLPBlock(32, 64, **kw)) if mlp else (lambda **kw: FusedResidualBlock(32, **kw))
    drops = dict(dropout=0.3, hidden_dropout=0.3) if mlp else dict(dropout=0.3)
    without = saved_bytes(lambda: make(norm="layer").to(device)(x))
    with_ = saved_bytes(lambda: make(norm="layer", **drops).to(device)(x))
    assert with_ - without == (16 if mlp else 8)
    eager_extra = saved_bytes(lambda: (ResidualMLPBlock if mlp else ResidualBlock)(32, *((64,) if mlp else ()),
                                                                                 **drops).to(device)(x))
    assert eager_extra > with_


# ---------------------------------------------------------------------------------------------
# The API


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_a_probability_outside_0_1_raises_nn_dropouts_error(p):
    with pytest.raises(ValueError) as torch_err:
        nn.Dropout(p)
    for make in (lambda: FusedResidualBlock(8, dropout=p), lambda: FusedResidualMLPBlock(8, 16, hidden_dropout=p),
                 lambda: ResidualBlock(8, dropout=p), lambda: fusedres.fused_residual(torch.randn(2, 8),
                                                                                     torch.randn(8, 8), dropout=p),
                 lambda: fusedres.fused_residual_mlp(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 16),
                                                     None, dropout=p, training=False)):
        with pytest.raises(ValueError) as ours:
            make()
        assert str(ours.value) == str(torch_err.value)


def test_train_eval_switch_and_state_dicts_interchange():
    torch.manual_seed(0)
    eager = ResidualBlock(16, dropout=0.2, norm="batch")
    fused = FusedResidualBlock.from_block(eager)
    assert fused.dropout == 0.2 and "dropout=0.2" in repr(fused)
    assert set(fused.state_dict()) == set(eager.state_dict())
    x = torch.randn(6, 16)
    fused.eval(), eager.eval()
    torch.testing.assert_close(fused(x), eager(x))
    fused.train()
    assert not torch.equal(fused(x), fused.eval()(x))
    converted = fusedres.fuse(torch.nn.Sequential(ResidualMLPBlock(16, 32, dropout=0.1, hidden_dropout=0.2)))
    assert (converted[0].dropout, converted[0].hidden_dropout) == (0.1, 0.2)
    # a run of blocks with dropout is never folded into a stack (it has no dropout)
    run = fusedres.fuse(torch.nn.Sequential(ResidualBlock(16, dropout=0.1), ResidualBlock(16, dropout=0.1)),
                        stacks=True)
    assert [type(b) for b in run] == [FusedResidualBlock] * 2 and run[0].dropout == 0.1


def test_dropout_with_a_projection_is_refused():
    with pytest.raises(ValueError, match="dropout with a projection"):
        fusedres.fused_residual(torch.randn(2, 8), torch.randn(16, 8), proj_weight=torch.randn(16, 8), dropout=0.1)
    # in eval it is the plain block
    fusedres.fused_residual(torch.randn(2, 8), torch.randn(16, 8), proj_weight=torch.randn(16, 8), dropout=0.1,
                            training=False)


def test_compiles_fullgraph_and_is_deterministic_for_a_seed():
    """torch.compile(fullgraph=True) traces the seed draw (torch.randint) and the custom ops: no
    graph break; a seed reproduces the compiled run, and the kept fraction is 1 - p's."""
    torch.manual_seed(0)
    x = torch.randn(64, 16, requires_grad=True)
    for block in (FusedResidualMLPBlock(16, 32, dropout=0.5, hidden_dropout=0.5, norm="layer", pre_act=None),
                  FusedResidualBlock(16, dropout=0.5)):
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        runs = []
        for _ in range(2):
            torch.manual_seed(3)
            y = compiled(x)
            (dx,) = torch.autograd.grad(y.sum(), x)
            runs.append((y, dx))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        with torch.no_grad():
            kept = (runs[0][0] != x).float().mean().item()
        assert abs(kept - 0.5) < 0.1
        assert math.isfinite(runs[0][1].sum().item())


def test_the_debug_record_names_each_site_and_call():
    block = FusedResidualMLPBlock(8, 16, dropout=0.1, hidden_dropout=0.2)
    with fusedres.record_dropout() as rec:
        block(torch.randn(3, 8))
        block(torch.randn(3, 8))
    assert [(d.site, d.p, d.shape) for d in rec.draws] == [("hidden_dropout", 0.2, (3, 16)), ("dropout", 0.1, (3, 8))] * 2
    assert not torch.equal(rec.masks("dropout")[0], rec.masks("dropout")[1]) or rec.masks("dropout")[0].all()
    block.eval()
    with fusedres.record_dropout() as rec:
        block(torch.randn(3, 8))
    assert rec.draws == []


def test_every_dropout_pass_stays_in_bounds_under_the_sanitizer(monkeypatch):
    """Ragged shapes, a transposed x, 16-wide tiles (many programs, partial tiles in every
    dimension, the split-M dW where the plan takes it): no active lane outside its tensor, the
    masks' seeds and parameters included (the suite runs under the sanitizer too; this names it)."""
    from fusedres import traffic
    from fusedres.kernels import configs
    from fusedres.traffic import InterpreterTraffic
    if not traffic.supported()[0]:
        pytest.fail(traffic.supported()[1])
    default = configs.interpreter_config
    monkeypatch.setattr(configs, "interpreter_config", lambda kind, M, D: type(default(kind, M, D))(
        {k: 16 if k.startswith("BLOCK_") else 2 for k in default(kind, M, D).kwargs}, num_warps=4, num_stages=1))
    x = make_x((3, 6, 40), torch.float32, "cpu", layout="transposed").requires_grad_()
    with InterpreterTraffic(track_unique=False, raise_on_violation=True) as t:
        FusedResidualBlock(40, dropout=0.3, norm="layer", alpha_per_channel=True)(x).sum().backward()
        FusedResidualMLPBlock(40, 24, dropout=0.2, hidden_dropout=0.4, hidden_norm="batch",
                              drop_path=0.5)(x).sum().backward()
    assert t.violations == [] and len(t.launches) >= 10
    assert {"drop_seed_ptr", "a_drop_seed_ptr"} <= {name for lc in t.launches for name in lc.args}
