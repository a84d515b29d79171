"""fuse(model) by structure (fusedres.adopt): code nobody here wrote (rtdl-revisiting-models'
ResNet, installed from the package index), timm-structured blocks written as timm writes them,
the occupancy-network / NeRF block, hand-written forms, and what must be left alone and why."""
import copy

import pytest
import rtdl_revisiting_models as rtdl
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres import FusedResidualBlock, FuseReport, ResidualBlock, fuse
from fusedres.validate import parity


def _model_parity(model, x, *, train, seed=None, launches=None, expect=None):
    """Fuse ``model`` in place and check outputs and every gradient (input, all parameters) against
    an eager copy in the same dtype and an fp64 copy, under the parity rule; with ``launches``,
    that the forward launched exactly ``expect``; and that fusing kept the state_dict. Returns the
    report."""
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    before = _state(model)
    model, report = fuse(model, report=True)
    _same_state(model, before)          # the same tensors, keys and values
    g = torch.randn(model.train(train)(x).shape, generator=torch.Generator().manual_seed(7))
    results = []
    for i, (m, xx) in enumerate(((model, x), (eager, x), (ref, x.double()))):
        m.train(train)
        m.zero_grad()
        xx = xx.clone().requires_grad_()
        if seed is not None:
            torch.manual_seed(seed)
        before = launches() if launches else None
        y = m(xx)
        if i == 0 and launches is not None:
            ran = {k: v - before.get(k, 0) for k, v in launches().items() if v != before.get(k, 0)}
            assert ran == expect, ran
        y.backward(g.to(y.dtype))
        results.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    names = ["y", "dx"] + [n for n, _ in model.named_parameters()]
    for name, f, e, r in zip(names, *results):
        assert (f is None) == (e is None) == (r is None), name
        if f is not None:
            p = parity(f, e, r)
            assert p.ok, f"{name}: {p}"
    return report


def _state(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, (ptr, value) in before.items():
        assert after[k].data_ptr() == ptr and torch.equal(after[k], value), k


# ---------------------------------------------------------------------------------------------
# rtdl-revisiting-models' ResNet


def _resnet(dropout1=0.0, dropout2=0.0, n_blocks=4, d_block=32, d_out=1):
    torch.manual_seed(0)
    return rtdl.ResNet(d_in=8, d_out=d_out, n_blocks=n_blocks, d_block=d_block, d_hidden_multiplier=2.0,
                       dropout1=dropout1, dropout2=dropout2)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_rtdl_resnet_every_block_fused_with_parity(train, launches):
    """Every block of rtdl's ResNet fuses (BatchNorm -> Linear -> ReLU -> Dropout -> Linear ->
    Dropout, written as ``x = x + block(x)`` in ResNet.forward), outputs and all gradients obey the
    parity rule in eval and in training (dropout off), the Triton kernels ran (2 launches per
    block), and the state_dict is the same tensors with the same values.

    In training the model is built without its output head (``d_out=None``, rtdl's option): the
    head's training-mode BatchNorm makes the gradient of every per-feature shift (each bias)
    exactly 0 in exact arithmetic, and rounding noise has no scale to be judged at."""
    model = _resnet(d_out=None if train else 1)
    x = torch.randn(16, 8)
    # two GEMM launches per block; in training BatchNorm's batch statistics: one reduction, over the
    # first block's input (the call that made g linked the blocks: each hands the next its
    # statistics, fusedres.chain)
    expect = {"residual_fwd": 8, **({"norm_col_stats": 1} if train else {})}
    report = _model_parity(model, x, train=train, launches=launches, expect=expect)
    assert len(report) == 4 and len(report.fused) == 4, str(report)
    for i, c in enumerate(report):
        b = f"blocks.{i}."
        assert c.path == "" and c.branch == " -> ".join(b + n for n in ("normalization", "linear1", "activation",
                                                                         "dropout1", "linear2", "dropout2"))
        assert c.recipe.startswith("fused_residual_mlp(D=32, H=64, norm=BatchNorm1d, pre_act=None, act=ReLU()")
    assert type(model) is rtdl.ResNet and "forward" in model.__dict__


def test_rtdl_resnet_state_dict_optimizer_and_modes(launches):
    """The optimizer built before fuse keeps training the model's tensors (one SGD step equals the
    eager model's step); train()/eval() reach the fused blocks (BatchNorm running statistics
    update in training, are used in eval); checkpoints load both ways."""
    model = _resnet(n_blocks=2, d_block=16)
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    before = _state(model)
    fuse(model)
    _same_state(model, before)
    x, target = torch.randn(16, 8), torch.randn(16, 1)
    for m, o in ((model, opt), (eager, opt_e)):
        m.train()
        o.zero_grad()
        F.mse_loss(m(x), target).backward()
        o.step()
    assert launches().get("residual_fwd") == 4
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert int(model.blocks[0].normalization.num_batches_tracked) == 1
    model.eval()
    eager.eval()
    torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-6)
    fresh = _resnet(n_blocks=2, d_block=16)
    fresh.load_state_dict(model.state_dict())          # fused -> eager
    model.load_state_dict(_resnet(n_blocks=2, d_block=16).state_dict())   # eager -> fused
    torch.testing.assert_close(model(x), _resnet(n_blocks=2, d_block=16).eval()(x), rtol=1e-5, atol=1e-6)


class _MaskedDropout(nn.Module):
    """An nn.Dropout that applies a given keep mask: the eager side of a parity check through the
    masks a fused call used (fusedres.record_dropout)."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) * (1.0 / (1.0 - self.p))


def test_rtdl_resnet_with_dropout_fuses_with_parity_through_the_masks(launches):
    """rtdl's README block (dropout1=0.15; here dropout2=0.1 too): every block fused with both
    dropouts; eval matches eager; training matches the eager model run with the keep masks the
    fused call drew (outputs and every gradient, the parity rule; fp32 and fp64 eager copies)."""
    model = _resnet(dropout1=0.15, dropout2=0.1, n_blocks=2, d_block=16, d_out=None)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    before = _state(model)
    model, report = fuse(model, report=True)
    _same_state(model, before)
    assert len(report.fused) == 2 and "hidden_dropout=blocks.0.dropout1 (p=0.15)" in report.fused[0].recipe
    x = torch.randn(32, 8)
    torch.testing.assert_close(model.eval()(x), eager.eval()(x), rtol=1e-5, atol=1e-6)
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    results = []
    with fusedres.record_dropout() as rec:
        launched = launches()
        xx = x.clone().requires_grad_()
        y = model.train()(xx)
        assert launches()["residual_fwd"] - launched.get("residual_fwd", 0) == 4
    y.backward(g)
    results.append([y.detach(), xx.grad] + [p.grad for p in model.parameters()])
    hidden, branch = rec.masks("hidden_dropout"), rec.masks("dropout")
    assert len(hidden) == len(branch) == 2 and hidden[0].shape == (32, 32) and not hidden[0].all()
    for m, dtype in ((eager, torch.float32), (ref, torch.float64)):
        for block, h, b in zip(m.blocks, hidden, branch):
            block.dropout1, block.dropout2 = _MaskedDropout(h, 0.15), _MaskedDropout(b, 0.1)
        xx = x.to(dtype).clone().requires_grad_()
        y = m.train()(xx)
        y.backward(g.to(dtype))
        results.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    names = ["y", "dx"] + [n for n, _ in model.named_parameters()]
    for name, f, e, r in zip(names, *results):
        p = parity(f, e, r)
        assert p.ok, f"{name}: {p}"


def test_rtdl_resnet_compiles_fullgraph():
    """torch.compile(fuse(model), fullgraph=True): zero graph breaks in training and in eval, and
    the compiled numbers are the eager fused ones."""
    torch._dynamo.reset()
    model = fuse(_resnet(n_blocks=2, d_block=16))
    x = torch.randn(12, 8)
    for train in (True, False):
        model.train(train)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for train in (False, True):
        model.train(train)
        state = copy.deepcopy(model.state_dict())
        y = compiled(x)
        model.load_state_dict(state)        # (the running statistics' update, once)
        torch.testing.assert_close(y, model(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# timm-structured blocks (timm's own code cannot be imported here: torchvision fails to load)


class Mlp(nn.Module):
    """timm.layers.Mlp, as timm writes it."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, norm_layer=None,
                 bias=True, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class LayerScale(nn.Module):
    """timm.layers.LayerScale."""

    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """timm.layers.drop_path."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm.layers.DropPath."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class TimmMlpBlock(nn.Module):
    """The MLP half of timm's ViT Block: ``x + drop_path(ls(mlp(norm(x))))``."""

    def __init__(self, dim, hidden, drop_path=0.0, init_values=0.5, inplace=False, mlp_norm=None):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden, norm_layer=mlp_norm)
        self.ls2 = LayerScale(dim, init_values, inplace) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _timm(**kw):
    torch.manual_seed(0)
    block = TimmMlpBlock(16, 48, **kw)
    with torch.no_grad():
        block.ls2.gamma.uniform_(0.2, 1.0) if hasattr(block.ls2, "gamma") else None
    return nn.Sequential(block, TimmMlpBlock(16, 48, init_values=None))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_block_with_layerscale_and_drop_path(train, launches):
    """LayerNorm -> Mlp(fc1, GELU, drop1, Identity norm, fc2, drop2) -> LayerScale -> DropPath
    fuses into fused_residual_mlp with the LayerNorm, pre_act None, GELU, a per-channel alpha
    (gamma, learnable) and the DropPath's per-sample scale: parity for y and every gradient
    (gamma's included); in training the same seed drops the same samples as timm's drop_path."""
    model = _timm(drop_path=0.5)
    x = torch.randn(10, 3, 16)
    report = _model_parity(model, x, train=train, seed=3, launches=launches,
                           expect={"residual_fwd": 4, "norm_row_stats": 1})     # (chained: fusedres.chain)
    assert len(report.fused) == 2 and not report.left, str(report)
    first, second = report
    assert first.path == "0" and first.branch == ("norm2 -> mlp.fc1 -> mlp.act -> mlp.drop1 -> mlp.norm -> mlp.fc2 -> "
                                                  "mlp.drop2 -> ls2.gamma -> drop_path2")
    assert "alpha=ls2.gamma (per channel)" in first.recipe and "sample_scale=DropPath(drop_path2)" in first.recipe
    assert "norm=LayerNorm" in first.recipe and "pre_act=None" in first.recipe and "act=GELU()" in first.recipe
    assert second.path == "1" and "alpha" not in second.recipe


def test_timm_drop_path_drops_whole_samples():
    """A dropped sample's output is its input exactly, as timm's drop_path gives it; eval draws
    nothing."""
    model = _timm(drop_path=0.5)[0]
    eager = copy.deepcopy(model)
    fuse(model)
    x = torch.randn(16, 16)
    torch.manual_seed(11)
    y = model.train()(x)
    torch.manual_seed(11)
    y_e = eager.train()(x)
    dropped = [b for b in range(16) if torch.equal(y_e[b], x[b])]
    assert dropped and len(dropped) < 16
    assert [b for b in range(16) if torch.equal(y[b], x[b])] == dropped
    state = torch.get_rng_state()
    model.eval()(x)
    assert torch.equal(state, torch.get_rng_state())


def test_timm_inplace_layerscale_and_hidden_norm_after_act():
    """LayerScale(inplace=True) (``x.mul_(gamma)`` on the Mlp's output) fuses; an Mlp with a
    norm_layer (timm normalizes AFTER act and drop1; fusedres's hidden_norm is before act) is left
    alone with the reason."""
    torch.manual_seed(0)
    block = TimmMlpBlock(16, 32, inplace=True)
    eager = copy.deepcopy(block)
    _, report = fuse(block, report=True)
    assert len(report.fused) == 1
    x = torch.randn(6, 16)
    torch.testing.assert_close(block(x), eager(x), rtol=1e-5, atol=1e-6)
    block = TimmMlpBlock(16, 32, mlp_norm=nn.LayerNorm)
    _, report = fuse(block, report=True)
    assert len(report.left) == 1 and "a hidden norm after the activation" in report[0].reason
    assert "forward" not in block.__dict__


# ---------------------------------------------------------------------------------------------
# the occupancy-network / NeRF block, and hand-written forms


class ResnetBlockFC(nn.Module):
    """Occupancy Networks' ResnetBlockFC (as in convolutional_occupancy_networks)."""

    def __init__(self, size_in, size_out=None, size_h=None):
        super().__init__()
        size_out = size_in if size_out is None else size_out
        size_h = min(size_in, size_out) if size_h is None else size_h
        self.fc_0 = nn.Linear(size_in, size_h)
        self.fc_1 = nn.Linear(size_h, size_out)
        self.actvn = nn.ReLU()
        self.shortcut = None if size_in == size_out else nn.Linear(size_in, size_out, bias=False)

    def forward(self, x):
        net = self.fc_0(self.actvn(x))
        dx = self.fc_1(self.actvn(net))
        x_s = self.shortcut(x) if self.shortcut is not None else x
        return x_s + dx


def test_nerf_block(launches):
    """``net = fc_0(relu(x)); dx = fc_1(relu(net)); return x + dx`` is our two-layer block with
    alpha = 1 (pre_act and act both the block's one ReLU module); with a projection shortcut it
    is left alone (fused_residual_mlp has none)."""
    torch.manual_seed(0)
    model = nn.Sequential(ResnetBlockFC(16, size_h=24), ResnetBlockFC(16, 8))
    report = _model_parity(model, torch.randn(12, 16), train=True, launches=launches,
                           expect={"residual_fwd": 2})
    assert [c.fused for c in report] == [True, False], str(report)
    assert report[0].recipe == "fused_residual_mlp(D=16, H=24, pre_act=ReLU(), act=ReLU())"
    assert "projection shortcut with a hidden layer" in report[1].reason


class Functional(nn.Module):
    """``x + self.fc(F.relu(x))`` and its variations."""

    def __init__(self, form, dim=16, out=None):
        super().__init__()
        self.form = form
        self.fc = nn.Linear(dim, out or dim, bias=form != "nobias")
        self.norm = nn.LayerNorm(dim)
        self.act = nn.SiLU()
        self.shortcut = nn.Linear(dim, out or dim, bias=False)

    def forward(self, x):
        if self.form == "plain":
            return x + self.fc(F.relu(x))
        if self.form == "reversed_scaled":
            return 0.5 * self.fc(F.leaky_relu(x, 0.2)) + x
        if self.form == "nobias":
            return x + self.fc(self.act(self.norm(x)))
        if self.form == "projection":
            return self.shortcut(x) + self.fc(torch.relu(x))
        raise AssertionError(self.form)


@pytest.mark.parametrize("form,recipe", [
    ("plain", "fused_residual(16 -> 16, act='relu')"),
    ("reversed_scaled", "fused_residual(16 -> 16, act='leaky_relu(0.2)', alpha=0.5)"),
    ("nobias", "fused_residual(16 -> 16, norm=LayerNorm, act=SiLU())"),
    ("projection", "fused_residual(16 -> 24, act='relu', proj_weight=shortcut.weight)"),
])
def test_hand_written_single_linear_blocks(form, recipe, launches):
    """``x + fc(F.relu(x))``; ``0.5 * fc(F.leaky_relu(x, 0.2)) + x`` (alpha 0.5, either order); a
    bias-free Linear after LayerNorm and SiLU modules; ``shortcut(x) + fc(relu(x))`` with a
    bias-free Linear shortcut (proj_weight): each one fused launch, parity for every gradient."""
    torch.manual_seed(0)
    model = Functional(form, out=24 if form == "projection" else None)
    expect = {"residual_fwd": 1, **({"norm_row_stats": 1} if form == "nobias" else {})}
    report = _model_parity(model, torch.randn(8, 16), train=True, launches=launches, expect=expect)
    assert len(report.fused) == 1 and report[0].recipe == recipe, str(report)


# ---------------------------------------------------------------------------------------------
# what is left alone, and why


class Odd(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc = nn.Linear(16, 16)
        self.wide = nn.Linear(16, 32)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.0)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        f = self.form
        if f == "inplace_on_input":
            return x + self.fc(self.relu(x))
        if f == "dropout_on_input":
            return x + self.fc(F.relu(self.drop(x)))
        if f == "no_activation":
            return x + self.fc(x)
        if f == "shared_value":
            h = F.relu(x)
            return x + self.fc(h) + h
        if f == "biased_shortcut":
            return self.proj(x) + self.fc(F.relu(x))
        if f == "not_a_chain":
            return x + self.fc(F.relu(x)) * torch.sigmoid(x)
        if f == "not_residual":
            return x[:, :8] + self.fc(x)[:, 8:]
        raise AssertionError(f)


@pytest.mark.parametrize("form,reason", [
    ("inplace_on_input", "in place on the block's input"),
    ("dropout_on_input", "dropout on the block's input"),
    ("no_activation", "no activation before the Linear"),
    ("shared_value", "also used outside the branch"),
    ("biased_shortcut", "not a bias-free nn.Linear"),
    ("not_a_chain", "takes 2 tensors"),
])
def test_left_alone_with_reason(form, reason):
    torch.manual_seed(0)
    model = Odd(form)
    _, report = fuse(model, report=True)
    assert not report.fused and any(reason in c.reason for c in report.left), str(report)
    assert "forward" not in model.__dict__


def test_not_residual_is_not_a_candidate():
    _, report = fuse(Odd("not_residual"), report=True)
    assert report == []


class Untraceable(nn.Module):
    """Data-dependent control flow stops this forward only: its child block still fuses."""

    def __init__(self):
        super().__init__()
        self.block = Functional("plain")

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return x


class ReadsTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = x + self.fc(F.relu(x))
        return y * 2 if self.training else y


def test_untraceable_and_training_dependent_forwards():
    model = nn.Sequential(Untraceable(), ReadsTraining())
    _, report = fuse(model, report=True)
    by_path = {c.path: c for c in report}
    assert by_path["0"].reason.startswith("untraceable") and not by_path["0"].fused
    assert by_path["0.block"].fused
    assert "reads self.training" in by_path["1"].reason
    assert "forward" not in model[1].__dict__
    assert str(report).startswith("fusedres.fuse: 1 fused, 2 left alone")


def test_report_class_pass_refuse_twice_and_deepcopy():
    """The class-based conversions are in the report; a second fuse fuses nothing again; a deep
    copy of a fused model runs on its own parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(ResidualBlock(16), Functional("plain"))
    model, report = fuse(model, report=True)
    assert isinstance(report, FuseReport) and [c.fused for c in report] == [True, True]
    assert report[0].recipe == "FusedResidualBlock" and isinstance(model[0], FusedResidualBlock)
    assert fuse(model, report=True)[1] == []
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[1].fc.weight.zero_()
        twin[1].fc.bias.zero_()
    x = torch.randn(4, 16)
    torch.testing.assert_close(twin[1](x), x)
    assert not torch.equal(model[1](x), x)


# ---------------------------------------------------------------------------------------------
# read at call time


def test_dropout_rate_and_batchnorm_layout_read_at_call_time(launches):
    """A dropout whose p was 0 when fused and is raised later is read at each call: training then
    draws its mask in the fused kernels; eval is the plain block. An nn.BatchNorm1d over an input
    that is not (N, C) (it normalizes dim 1; the fused norm the last) runs the original code, with
    a warning."""
    model = _resnet(n_blocks=2, d_block=16)
    eager = copy.deepcopy(model)
    fuse(model)
    for m in (model, eager):
        for block in m.blocks:
            block.dropout1.p = 0.25
    x = torch.randn(16, 8)
    state = copy.deepcopy(model.state_dict())
    with fusedres.record_dropout() as rec:
        model.train()(x)
    model.load_state_dict(state)        # (undo the running statistics' update: its inputs were dropped)
    assert [d.p for d in rec.draws] == [0.25, 0.25] and launches()["residual_fwd"] == 4
    torch.testing.assert_close(model.eval()(x), eager.eval()(x), rtol=1e-5, atol=1e-6)
    assert launches()["residual_fwd"] == 8

    class BN3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc1, self.fc2 = nn.BatchNorm1d(16), nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.fc2(F.relu(self.fc1(self.bn(x))))

    torch.manual_seed(0)
    block = BN3d()
    eager = copy.deepcopy(block)
    _, report = fuse(block, report=True)
    assert len(report.fused) == 1
    x = torch.randn(4, 16, 16)
    before = launches()
    with pytest.warns(RuntimeWarning, match="runs eagerly at this call: an nn.BatchNorm1d over a 3-D input"):
        y = block(x)
    assert torch.equal(y, eager(x)) and launches() == before
    x2 = torch.randn(8, 16)
    torch.testing.assert_close(block(x2), eager(x2), rtol=1e-5, atol=1e-6)
    assert launches()["residual_fwd"] == before["residual_fwd"] + 2


def test_timm_block_compiles_without_graph_breaks():
    """The timm-structured block, fused, traces with no graph break in training (DropPath's draw)
    and in eval."""
    torch._dynamo.reset()
    model = fuse(_timm(drop_path=0.3))
    x = torch.randn(6, 16)
    for train in (True, False):
        explained = torch._dynamo.explain(model.train(train))(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# What the fused call must not skip (review findings): other inputs, hooks, swapped modules


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(F.relu(x))


def test_a_forward_with_more_inputs_is_left_alone():
    """fx passes every argument as a proxy: `if extra is None` would be frozen to one branch."""
    class TwoInputs(_Block):
        def forward(self, x, extra=None):
            y = x + self.fc(F.relu(x))
            return y if extra is None else y * 2
    torch.manual_seed(0)
    m = TwoInputs()
    x = torch.randn(4, 16)
    want = m(x)
    m, report = fuse(m, report=True)
    assert report.fused == [] and "takes more than one input (extra)" in report[0].reason
    assert torch.equal(m(x), want) and torch.equal(m(x, extra=1), 2 * want)


def test_hooks_leave_a_block_alone_or_run_it_eagerly():
    """A hook on a branch module at fuse time: left alone. One registered after fuse (a pruning
    pre-hook, a forward hook): that call runs the block's own code, with a warning, and equals eager."""
    torch.manual_seed(0)
    m = _Block()
    m.fc.register_forward_hook(lambda mod, inp, out: out * 0)
    _, report = fuse(m, report=True)
    assert report.fused == [] and "fc has hooks" in report[0].reason
    torch.manual_seed(0)
    m, eager = _Block(), _Block()
    eager.load_state_dict(m.state_dict())
    _, report = fuse(m, report=True)
    assert len(report.fused) == 1
    x = torch.randn(4, 16)
    from torch.nn.utils import prune
    for mod in (m, eager):
        prune.l1_unstructured(mod.fc, "weight", 0.5)
    with pytest.warns(RuntimeWarning, match="has hooks"):
        y = m(x)
    torch.testing.assert_close(y, eager(x))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):          # the pruning pre-hook recomputes the weight each call: two steps train
        opt.zero_grad()
        with pytest.warns(RuntimeWarning):
            m(x).sum().backward()
        opt.step()


def test_a_module_swapped_after_fuse_runs_its_own_forward():
    """An adapter's Linear subclass (a LoRA term in forward) put in place after fuse: the fused call
    would read weight and bias only; the block's own code runs instead, with a warning."""
    class LoRALinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 3.0
    torch.manual_seed(0)
    m = fuse(_Block())
    lora = LoRALinear(16, 16)
    lora.load_state_dict(m.fc.state_dict())
    m.fc = lora
    x = torch.randn(4, 16)
    with pytest.warns(RuntimeWarning, match="replaced after fuse"):
        y = m(x)
    torch.testing.assert_close(y, x + lora(F.relu(x)))


def test_a_projection_block_with_dropout_stays_eager():
    """The fused kernels refuse dropout with a projection: fuse leaves such a ResidualBlock as it is
    (with the reason), and the fused module refuses it at construction."""
    model = nn.Sequential(ResidualBlock(16, 24, dropout=0.1))
    model, report = fuse(model, report=True)
    assert type(model[0]) is ResidualBlock and "dropout with a projection" in report[0].reason
    model.train()(torch.randn(4, 16))
    with pytest.raises(ValueError, match="dropout with a projection"):
        FusedResidualBlock(16, 24, dropout=0.1)
    with pytest.raises(ValueError, match="dropout with a projection"):
        FusedResidualBlock.from_block(ResidualBlock(16, 24, dropout=0.1))
