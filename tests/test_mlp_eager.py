"""The eager side of the MLP block and stochastic depth: ``residual_mlp_reference``,
``ResidualMLPBlock``, ``drop_path_scale`` and ``ResidualMLP(hidden_features=, drop_path=)``.
Everything here is plain PyTorch on the CPU; the fused kernels are tested against these."""
import math

import pytest
import torch
from torch import nn

import fusedres
from fusedres import (FusedResidualBlock, ResidualBlock, ResidualMLP, ResidualMLPBlock, drop_path_scale,
                      residual_mlp_reference, residual_reference)
from fusedres.droppath import apply_sample_scale


def _mlp_params(D, H, bias, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(H, D, generator=gen, dtype=dtype) / math.sqrt(D)
    w2 = torch.randn(D, H, generator=gen, dtype=dtype) / math.sqrt(H)
    b1 = torch.randn(H, generator=gen, dtype=dtype) if bias else None
    b2 = torch.randn(D, generator=gen, dtype=dtype) if bias else None
    return w1, b1, w2, b2


def _hand_mlp(x, w1, b1, w2, b2, alpha, s):
    """The block by explicit sums in float64: no F.linear, no matmul."""
    x, w1, w2 = x.double(), w1.double(), w2.double()
    r = x.clamp_min(0)
    h = (r[..., None, :] * w1).sum(-1)
    if b1 is not None:
        h = h + b1.double()
    branch = (h.clamp_min(0)[..., None, :] * w2).sum(-1)
    if b2 is not None:
        branch = branch + b2.double()
    if s is not None:
        branch = branch * s.double().reshape((-1,) + (1,) * (x.dim() - 1))
    return x + float(alpha) * branch


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 0.7, "tensor"])
@pytest.mark.parametrize("scaled", [False, True])
def test_mlp_reference_matches_float64_hand_computation(bias, alpha, scaled):
    torch.manual_seed(0)
    D, H = 7, 11
    x = torch.randn(5, 3, D)
    w1, b1, w2, b2 = _mlp_params(D, H, bias)
    a = torch.tensor(0.3) if alpha == "tensor" else alpha
    s = torch.tensor([2.0, 0.0, 1.0, 0.5, 2.0]) if scaled else None
    y = residual_mlp_reference(x, w1, b1, w2, b2, alpha=a, sample_scale=s)
    expect = _hand_mlp(x, w1, b1, w2, b2, a, s)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)
    if scaled:
        assert torch.equal(y[1], x[1])  # s = 0: the input exactly


def test_residual_reference_sample_scale_matches_hand_computation():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 2, 8), torch.randn(8, 8) / 3, torch.randn(8)
    s = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.0, 4.0])
    y = residual_reference(x, w, b, alpha=0.6, sample_scale=s)
    expect = x.double() + 0.6 * s.double()[:, None, None] * (x.double().clamp_min(0) @ w.double().T + b.double())
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[0], x[0]) and torch.equal(y[4], x[4])
    # without a scale, the block as before
    assert torch.equal(residual_reference(x, w, b, alpha=0.6), x + 0.6 * torch.nn.functional.linear(x.relu(), w, b))


def test_mlp_block_is_nn_linear_pair_and_matches_reference():
    torch.manual_seed(0)
    block = ResidualMLPBlock(12, 20, alpha=0.5)
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(12, 20), nn.Linear(20, 12)
    for mine, theirs in ((block.fc1, fc1), (block.fc2, fc2)):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
    assert set(block.state_dict()) == {"alpha", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert isinstance(block.alpha, torch.Tensor) and not isinstance(block.alpha, nn.Parameter)
    assert set(ResidualMLPBlock(4, 8, bias=False, learnable_alpha=True).state_dict()) == {
        "alpha", "fc1.weight", "fc2.weight"}
    assert dict(ResidualMLPBlock(4, 8, learnable_alpha=True).named_parameters()).keys() >= {"alpha"}
    x = torch.randn(3, 5, 12)
    expect = x + 0.5 * fc2(torch.relu(fc1(torch.relu(x))))
    torch.testing.assert_close(block(x), expect)
    assert block.recompute is False and ResidualMLPBlock(4, 8, recompute=True).recompute is True
    text = repr(ResidualMLPBlock(4, 8, bias=False, drop_path=0.25, recompute=True))
    assert "dim=4, hidden_features=8, bias=False, alpha=1, drop_path=0.25, recompute=True" in text


@pytest.mark.parametrize("make", [lambda p: ResidualBlock(8, drop_path=p), lambda p: ResidualMLPBlock(8, 16, drop_path=p)],
                         ids=["block", "mlp_block"])
def test_eval_and_p0_are_the_plain_block_and_draw_nothing(make):
    torch.manual_seed(0)
    plain = make(0.0)
    dropping = make(0.5)
    dropping.load_state_dict(plain.state_dict())
    x = torch.randn(32, 8)
    expect = plain.eval()(x)
    rng = torch.get_rng_state()
    for model, training in ((plain, True), (plain, False), (dropping, False)):
        model.train(training)
        assert torch.equal(model(x), expect)
    assert torch.equal(torch.get_rng_state(), rng), "the plain block drew random numbers"
    assert drop_path_scale(x, 0.0, True) is None and drop_path_scale(x, 0.5, False) is None
    assert torch.equal(torch.get_rng_state(), rng)
    # training with p > 0 draws, and does change some outputs
    dropping.train()
    assert not torch.equal(dropping(x), expect)
    assert not torch.equal(torch.get_rng_state(), rng)


def test_same_seed_same_scale():
    x = torch.randn(1000, 4)
    torch.manual_seed(3)
    s1 = drop_path_scale(x, 0.4, True)
    torch.manual_seed(3)
    s2 = drop_path_scale(x, 0.4, True)
    torch.manual_seed(4)
    s3 = drop_path_scale(x, 0.4, True)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    # the block's forward draws exactly that scale
    block = ResidualMLPBlock(4, 6, drop_path=0.4).train()
    torch.manual_seed(3)
    y = block(x)
    expect = residual_mlp_reference(x, block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias,
                                    alpha=block.alpha, sample_scale=s1)
    assert torch.equal(y, expect)
    one = ResidualBlock(4, drop_path=0.4).train()
    torch.manual_seed(3)
    assert torch.equal(one(x), residual_reference(x, one.weight, one.bias, alpha=one.alpha, sample_scale=s1))


@pytest.mark.parametrize("make", [lambda: ResidualBlock(16, drop_path=0.5), lambda: ResidualMLPBlock(16, 24, drop_path=0.5)],
                         ids=["block", "mlp_block"])
def test_dropped_sample_output_is_its_input_exactly(make):
    torch.manual_seed(1)
    block = make().train()
    x = torch.randn(64, 3, 16)
    torch.manual_seed(7)
    s = drop_path_scale(x, 0.5, True)
    torch.manual_seed(7)
    y = block(x)
    dropped, kept = (s == 0).nonzero().flatten(), (s != 0).nonzero().flatten()
    assert len(dropped) > 5 and len(kept) > 5
    assert torch.equal(y[dropped], x[dropped])
    assert all(not torch.equal(y[b], x[b]) for b in kept.tolist())
    # p = 1: every branch dropped, no division by zero
    block.drop_path = 1.0
    assert torch.equal(block(x), x)
    assert torch.equal(drop_path_scale(x, 1.0, True), torch.zeros(64))


def test_survival_fraction_and_scale():
    torch.manual_seed(0)
    B, p = 40000, 0.3
    s = drop_path_scale(torch.empty(B, 2), p, True)
    kept = (s != 0).double().mean().item()
    # 6 standard deviations of the binomial fraction (0.014): loose, but a wrong rate fails it
    assert abs(kept - (1 - p)) < 6 * math.sqrt(p * (1 - p) / B)
    assert torch.equal(s[s != 0], torch.full_like(s[s != 0], 1 / (1 - p)))
    assert abs(s.double().mean().item() - 1.0) < 0.02  # E[s] = 1
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        s = drop_path_scale(torch.empty(50, 3, dtype=dtype), 0.5, True)
        assert s.dtype == dtype and s.shape == (50,) and s.device.type == "cpu"
        assert set(s.tolist()) <= {0.0, 2.0}


def test_apply_sample_scale_is_per_first_index():
    branch = torch.randn(3, 4, 5)
    s = torch.tensor([0.0, 1.0, 3.0])
    out = apply_sample_scale(branch, s)
    for b in range(3):
        assert torch.equal(out[b], branch[b] * s[b])
    assert apply_sample_scale(branch, None) is branch


def test_linear_decay_rates():
    def rates(model):
        return [b.drop_path for b in model.blocks]

    for hidden in (None, 8):
        model = ResidualMLP(3, 4, 5, 2, fused=False, hidden_features=hidden, drop_path=0.4)
        assert rates(model) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4], abs=1e-12)
        assert rates(model)[0] == 0.0 and rates(model)[-1] == 0.4
        assert all(isinstance(b, ResidualMLPBlock if hidden else ResidualBlock) for b in model.blocks)
        assert rates(ResidualMLP(3, 4, 1, 2, fused=False, hidden_features=hidden, drop_path=0.4)) == [0.0]
        assert rates(ResidualMLP(3, 4, 3, 2, fused=False, hidden_features=hidden)) == [0.0] * 3
    model = ResidualMLP(3, 4, 3, 2, fused=False, hidden_features=8, drop_path=0.2, alpha=0.5, bias=False)
    assert [(b.dim, b.hidden_features, b.fc1.bias, float(b.alpha)) for b in model.blocks] == [(4, 8, None, 0.5)] * 3
    with pytest.raises(ValueError, match="drop_path"):
        ResidualMLP(3, 4, 3, 2, fused=False, drop_path=1.5)


def test_fused_one_layer_network_builds_as_before():
    """fused=True without hidden_features or drop_path: FusedResidualBlocks, same state_dict keys."""
    model = ResidualMLP(3, 8, 2, 2)
    assert all(type(b) is FusedResidualBlock for b in model.blocks)
    assert [k for k in model.state_dict() if k.startswith("blocks.0.")] == ["blocks.0.weight", "blocks.0.bias",
                                                                             "blocks.0.alpha"]
    assert model.state_dict().keys() == ResidualMLP(3, 8, 2, 2, fused=False).state_dict().keys()


class _TimmMlp(nn.Module):
    """timm.layers.Mlp's parameter layout: fc1, act, drop1, norm (Identity), fc2, drop2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class _TimmResidual(nn.Module):
    """A pre-activation residual block around a timm-style Mlp: x + mlp(relu(x))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.mlp = _TimmMlp(dim, hidden)

    def forward(self, x):
        return x + self.mlp(torch.relu(x))


def test_state_dict_round_trip_with_timm_style_mlp():
    torch.manual_seed(0)
    theirs = _TimmResidual(10, 40)
    mine = ResidualMLPBlock(10, 40, alpha=0.25)
    result = mine.load_state_dict(theirs.mlp.state_dict())  # no alpha: keeps its own
    assert not result.missing_keys and not result.unexpected_keys
    assert float(mine.alpha) == 0.25
    x = torch.randn(7, 10)
    mine.alpha.fill_(1.0)
    torch.testing.assert_close(mine(x), theirs(x), rtol=0, atol=0)
    # and back: the block's state_dict without alpha loads strictly into the timm layout
    with torch.no_grad():
        for p in mine.parameters():
            p.add_(0.5)
    back = {k: v for k, v in mine.state_dict().items() if k != "alpha"}
    theirs.mlp.load_state_dict(back)
    torch.testing.assert_close(mine(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("learnable", [False, True])
def test_state_dict_without_alpha_loads(learnable):
    src = ResidualMLPBlock(6, 9, alpha=2.0, learnable_alpha=learnable)
    dst = ResidualMLPBlock(6, 9, alpha=0.5, learnable_alpha=learnable)
    sd = {k: v for k, v in src.state_dict().items() if k != "alpha"}
    dst.load_state_dict(sd)
    assert dst.alpha.item() == 0.5 and torch.equal(dst.fc2.weight, src.fc2.weight)
    dst.load_state_dict(src.state_dict())
    assert dst.alpha.item() == 2.0
    # on the meta device, assign=True materialises the constructor's alpha
    meta = ResidualMLPBlock(6, 9, alpha=0.5, learnable_alpha=learnable, device="meta")
    meta.load_state_dict(sd, assign=True)
    assert meta.alpha.device.type == "cpu" and meta.alpha.item() == 0.5
    # other keys are still checked
    with pytest.raises(RuntimeError, match="fc1.bias"):
        dst.load_state_dict({k: v for k, v in sd.items() if k != "fc1.bias"})
    # the one-layer block with drop_path keeps loading checkpoints without alpha
    one = ResidualBlock(6, alpha=0.5, drop_path=0.1)
    one.load_state_dict(nn.Linear(6, 6).state_dict())
    assert float(one.alpha) == 0.5 and set(one.state_dict()) == {"weight", "bias", "alpha"}


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.1", None])
def test_bad_drop_rate_raises(bad):
    with pytest.raises(ValueError, match=r"drop rate must be a number in \[0, 1\]"):
        drop_path_scale(torch.ones(3, 2), bad, True)
    with pytest.raises(ValueError, match="ResidualMLPBlock: drop_path"):
        ResidualMLPBlock(4, 8, drop_path=bad)
    with pytest.raises(ValueError, match="ResidualBlock: drop_path"):
        ResidualBlock(4, drop_path=bad)


@pytest.mark.parametrize("shape", [(5,), (3, 1), (), (1,)])
def test_bad_sample_scale_shape_raises(shape):
    x = torch.randn(3, 4)
    w1, b1, w2, b2 = _mlp_params(4, 6, True)
    s = torch.ones(shape)
    with pytest.raises(ValueError, match="sample_scale must be 1-D with one value per sample"):
        residual_mlp_reference(x, w1, b1, w2, b2, sample_scale=s)
    with pytest.raises(ValueError, match="sample_scale must be 1-D with one value per sample"):
        residual_reference(x, torch.eye(4), sample_scale=s)


def test_bad_mlp_weight_shapes_raise():
    x = torch.randn(3, 4)
    w1, b1, w2, b2 = _mlp_params(4, 6, True)
    with pytest.raises(ValueError, match=r"fc1_weight \[H, D\] and fc2_weight \[D, H\]"):
        residual_mlp_reference(x, w1, b1, w2.T, b2)
    with pytest.raises(ValueError, match="hidden_features must be a positive int"):
        ResidualMLPBlock(4, 0)


def test_gradcheck_mlp_reference_fp64_with_fixed_scale():
    torch.manual_seed(0)
    D, H = 5, 7
    x = torch.randn(4, 2, D, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in _mlp_params(D, H, True, dtype=torch.float64)]
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([2.0, 0.0, 1.0, 0.5], dtype=torch.float64)

    def f(x, w1, b1, w2, b2, alpha):
        return residual_mlp_reference(x, w1, b1, w2, b2, alpha=alpha, sample_scale=s)

    assert torch.autograd.gradcheck(f, (x, *params, alpha))
    (gx,) = torch.autograd.grad(f(x, *params, alpha).sum(), x)
    assert torch.equal(gx[1], torch.ones_like(gx[1]))  # a dropped sample's gradient is the identity's


def test_exports():
    for name in ("ResidualMLPBlock", "residual_mlp_reference", "drop_path_scale"):
        assert name in fusedres.__all__ and hasattr(fusedres, name)
