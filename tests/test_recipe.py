"""Recipes (``fusedres.kernels.recipe``): a block's launches are exactly its recipe's passes, the
recipe string round-trips, and the pass table in docs/kernel-family.md is the one the recipes
yield."""
from __future__ import annotations

import copy
import itertools
import importlib
import pathlib
import re

import pytest
import torch

import fusedres
from fusedres.kernels import recipe
from fusedres.kernels.recipe import MLPRecipe, PassRecipe, Recipe


@pytest.fixture
def launched(monkeypatch):
    """The RECIPE of every launch of the single-block kernels, in order."""
    seen = []
    for module in map(importlib.import_module, ("fusedres.kernels.residual_fwd", "fusedres.kernels.residual_bwd")):
        original = module.launch_and_prepare

        def spy(kernel, tuned, kind, grid, args, consts, *rest, _original=original, **kw):
            if kind in ("fwd", "dx", "dw"):
                seen.append(consts["RECIPE"])
            return _original(kernel, tuned, kind, grid, args, consts, *rest, **kw)
        monkeypatch.setattr(module, "launch_and_prepare", spy)
    return seen


def _block_case(act, alpha, bias, proj, drop_path):
    """A block for these options, and the recipe it names."""
    block = fusedres.FusedResidualBlock(16, 32 if proj else None, bias=bias, act=act, alpha=0.5,
                                        learnable_alpha=alpha == "learnable",
                                        alpha_per_channel=alpha == "channel", drop_path=drop_path)
    kind = {"learnable": "scalar", "buffer": "scalar", "channel": "channel"}[alpha]
    return block, Recipe(act=act, act_param=0.01 if act == "leaky_relu" else 0.0, alpha=kind,
                         learnable_alpha=alpha in ("learnable", "channel"), bias=bias, proj=proj,
                         row_scale=drop_path > 0)


@pytest.mark.parametrize("act", ["relu", "gelu", "leaky_relu"])
@pytest.mark.parametrize("alpha,bias,proj,drop_path", [
    ("buffer", True, False, 0.0), ("learnable", False, True, 0.0), ("channel", True, False, 0.5),
    ("learnable", True, True, 0.5)])
def test_a_blocks_launches_are_its_recipes_passes(launched, act, alpha, bias, proj, drop_path):
    torch.manual_seed(0)
    block, expected = _block_case(act, alpha, bias, proj, drop_path)
    x = torch.randn(4, 8, 16, requires_grad=True)
    block(x).sum().backward()
    assert launched == [p.key for p in expected.passes()]
    # the recipe the module names (fusedres.block_recipe) is that one, and so is its eager twin's
    assert fusedres.block_recipe(block) == expected
    eager = fusedres.ResidualBlock(16, 32 if proj else None, bias=bias, act=act, alpha=0.5,
                                   learnable_alpha=alpha == "learnable", alpha_per_channel=alpha == "channel",
                                   drop_path=drop_path)
    assert fusedres.block_recipe(eager) == expected


@pytest.mark.parametrize("pre_act,act,per_channel,drop_path", [
    ("relu", "relu", False, 0.0), (None, "gelu", True, 0.5)])
def test_an_mlp_blocks_launches_are_its_recipes_passes(launched, pre_act, act, per_channel, drop_path):
    torch.manual_seed(0)
    block = fusedres.FusedResidualMLPBlock(16, 32, pre_act=pre_act, act=act, learnable_alpha=True,
                                           alpha_per_channel=per_channel, drop_path=drop_path)
    block(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    expected = MLPRecipe(pre_act=pre_act, act=act, alpha="channel" if per_channel else "scalar",
                         learnable_alpha=True, row_scale=drop_path > 0)
    assert launched == [p.key for p in expected.passes()]
    assert fusedres.block_recipe(block) == expected


@pytest.mark.parametrize("norm,affine,train", [("batch", True, True), ("batch", False, False), ("layer", True, True),
                                               ("rms", True, True)])
def test_a_normalized_blocks_launches_are_its_recipes_passes(launched, norm, affine, train):
    """The norm's pieces: the statistics' kind, the affine (absent: no operand), dx's sinks (none for
    BatchNorm on running statistics without an affine: nothing to correct, nothing to learn)."""
    torch.manual_seed(0)
    module = {"batch": torch.nn.BatchNorm1d(16, affine=affine), "layer": torch.nn.LayerNorm(16),
              "rms": torch.nn.RMSNorm(16)}[norm]
    block = fusedres.FusedResidualBlock(16, norm=module, alpha=0.5, learnable_alpha=True).train(train)
    block(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    expected = Recipe(alpha="scalar", learnable_alpha=True, norm=norm, norm_weight=affine,
                      norm_bias=affine and norm != "rms", batch_stats=train)
    assert launched == [p.key for p in expected.passes()]
    assert fusedres.block_recipe(block) == expected
    mlp = fusedres.FusedResidualMLPBlock(16, 32, norm=copy.deepcopy(module), pre_act=None, act="gelu").train(train)
    launched.clear()
    mlp(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    expected = MLPRecipe(pre_act=None, act="gelu", alpha="scalar", norm=norm, norm_weight=affine,
                         norm_bias=affine and norm != "rms", batch_stats=train)
    assert launched == [p.key for p in expected.passes()]
    assert fusedres.block_recipe(mlp) == expected


@pytest.mark.parametrize("nxt", ["batch", "layer"])
def test_a_chained_blocks_forward_has_the_next_norms_sink(launched, nxt):
    """In a chain (fusedres.chain) a block's forward emits the next norm's statistics: its recipe's
    ``next_norm``, the one piece it adds (the single block's forward; the MLP block's fc2)."""
    torch.manual_seed(0)
    block = fusedres.FusedResidualBlock(16, norm="layer", alpha=0.5, learnable_alpha=True)
    fusedres.chain.set_next_norm(block, nxt)
    block(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    expected = Recipe(alpha="scalar", learnable_alpha=True, norm="layer", next_norm=nxt)
    assert launched == [p.key for p in expected.passes()]
    assert "stats_" in launched[0]
    assert fusedres.block_recipe(block) == expected
    mlp = fusedres.FusedResidualMLPBlock(16, 32, norm="batch", pre_act=None, act="gelu")
    fusedres.chain.set_next_norm(mlp, nxt)
    launched.clear()
    mlp(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    expected = MLPRecipe(pre_act=None, act="gelu", alpha="scalar", norm="batch", next_norm=nxt)
    assert launched == [p.key for p in expected.passes()]
    assert fusedres.block_recipe(mlp) == expected
    mlp.eval()      # a BatchNorm after an eval-mode block uses its running statistics: no sink
    launched.clear()
    mlp(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    assert launched == [p.key for p in fusedres.block_recipe(mlp).passes()]
    assert fusedres.block_recipe(mlp).next_norm == (None if nxt == "batch" else nxt)
    assert ("stats_" in launched[1]) == (nxt != "batch")


def test_a_float_alpha_is_its_own_recipe_and_none_multiplies_by_nothing(launched):
    """A Python float is passed by value (fp32, as eager rounds it; fp64: a one-element tensor);
    no alpha is no operand at all."""
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    fusedres.fused_residual(x, w, alpha=0.5)
    fusedres.fused_residual(x, w)
    fusedres.fused_residual(x.double(), w.double(), alpha=0.5)
    assert launched == ["fwd|relu|alpha=value|residual", "fwd|relu|residual", "fwd|relu|alpha=scalar|residual"]


def test_recipe_keys_round_trip_and_name_their_pieces():
    for _, r in recipe.TABLE_RECIPES:
        for p in r.passes():
            assert PassRecipe.parse(p.key) == p
    assert PassRecipe("dw", "leaky_relu", 0.2, "channel", {"row_scale", "db"}).key == \
        "dw|leaky_relu(0.2)|alpha=channel|db|row_scale"
    with pytest.raises(ValueError, match="unknown pieces"):
        PassRecipe("fwd", pieces={"bias", "norm"})


def test_the_docs_pass_table_is_the_recipes():
    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "kernel-family.md").read_text()
    table = re.search(r"<!-- pass-table -->\n(.*?)\n<!-- /pass-table -->", page, re.S)
    assert table and table.group(1) == recipe.pass_table()


@pytest.mark.parametrize("act", ["relu", "gelu", "identity"])
def test_every_gate_variant_is_a_recipe(act):
    """The compile gate's variants are recipes: each kernel's example launch (what the gate
    compiles) is one of its recipe's passes."""
    import dataclasses
    from fusedres import aot
    for feats in aot.FEATURES + aot.ON_REQUEST_FEATURES:
        r = aot.FEATURE_RECIPES[feats]
        name = None if act == "identity" else act
        r = dataclasses.replace(r, act=name) if isinstance(r, Recipe) else dataclasses.replace(r, pre_act=name, act=name)
        keys = {p.key for p in r.passes()}
        assert aot.gate_recipe(f"{feats}@{act}") == r
        for kind in aot.feature_kinds(feats):
            _, consts = aot.example_launch(kind, "bf16", M=64, D=32, features=f"{feats}@{act}")
            # the launch is made from the recipe's pass: each of its pieces an operand, no other
            assert consts["RECIPE"] == aot.gate_pass(r, kind)[0].key, (feats, kind)
            assert consts["RECIPE"] in keys, (feats, kind, consts["RECIPE"], sorted(keys))


def test_block_recipe_refuses_other_modules():
    with pytest.raises(TypeError, match="expected a fusedres residual block"):
        fusedres.block_recipe(torch.nn.Linear(4, 4))


# ---------------------------------------------------------------------------------------------
# The eager reference is the recipe's passes (reference.recipe_forward), each piece a torch op

def _linear(weight, bias):
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def test_the_reference_is_he_et_als_full_pre_activation_in_torch_modules():
    """``ResidualBlock(D, norm="batch")``: BN -> ReLU -> Linear, added to x, as torch's modules
    compute it: bitwise, running statistics included (3 training steps, then eval)."""
    torch.manual_seed(0)
    block = fusedres.ResidualBlock(16, norm="batch", alpha=0.5)
    bn, lin = copy.deepcopy(block.norm), _linear(block.weight, block.bias)
    for train in (True, True, True, False):
        block.train(train), bn.train(train)
        x = torch.randn(4, 8, 16) * 3 + 1
        y = block(x)
        assert torch.equal(y, x + 0.5 * lin(torch.relu(bn(x.reshape(-1, 16)))).reshape(x.shape))
    assert torch.equal(block.norm.running_mean, bn.running_mean) and torch.equal(block.norm.running_var, bn.running_var)


def test_the_reference_is_rtdls_block_in_torch_modules():
    """rtdl's block, BN -> Linear -> ReLU -> Dropout -> Linear -> Dropout, added to x: the MLP
    block with ``norm="batch", pre_act=None``, both dropouts drawn from torch's RNG in that order:
    bitwise."""
    torch.manual_seed(0)
    block = fusedres.ResidualMLPBlock(16, 24, norm="batch", pre_act=None, hidden_dropout=0.2, dropout=0.1)
    rtdl = torch.nn.Sequential(copy.deepcopy(block.norm), copy.deepcopy(block.fc1), torch.nn.ReLU(),
                               torch.nn.Dropout(0.2), copy.deepcopy(block.fc2), torch.nn.Dropout(0.1))
    x = torch.randn(32, 16)
    torch.manual_seed(1)
    y = block(x)
    torch.manual_seed(1)
    assert torch.equal(y, x + rtdl(x))
    assert fusedres.block_recipe(block).passes()[1].pieces >= {"dropout", "dropout_a", "residual"}


def test_the_reference_is_timms_mlp_half_in_torch_modules():
    """timm's block, ``x + drop_path(ls(mlp(norm(x))))`` with LN(eps=1e-6) -> fc1 -> GELU -> fc2,
    LayerScale and DropPath, in fp64: the MLP block with ``pre_act=None, act="gelu",
    alpha_per_channel=True, drop_path``. (timm scales by gamma before the drop-path mask, the
    block after it: the same product, rounded in another order.)"""
    torch.manual_seed(0)
    D = 16
    block = fusedres.ResidualMLPBlock(D, 4 * D, norm=torch.nn.LayerNorm(D, eps=1e-6, dtype=torch.float64), pre_act=None, act="gelu",
                                      alpha=1e-5, alpha_per_channel=True, drop_path=0.5, dtype=torch.float64)
    with torch.no_grad():
        block.alpha.uniform_(0.5, 2.0)
    norm, fc1, fc2 = (copy.deepcopy(m) for m in (block.norm, block.fc1, block.fc2))
    x = torch.randn(16, 5, D, dtype=torch.float64)
    torch.manual_seed(1)
    y = block(x)
    torch.manual_seed(1)
    keep = fusedres.drop_path_scale(x, 0.5, True)
    branch = fc2(torch.nn.GELU()(fc1(norm(x)))) * block.alpha.detach()
    torch.testing.assert_close(y, x + branch * keep.view(-1, 1, 1), rtol=1e-14, atol=1e-15)
    assert (keep == 0).any() and (keep > 0).any()


def _spec(x, w, b, *, alpha, proj=None, s=None, act, norm=None, p=0.0, mask=None, shortcut=None):
    """One GEMM of a block in torch ops, in the order the reference was written in before it
    evaluated recipes: the shortcut, norm, activation, F.linear, the dropout mask, the row scale,
    alpha and the add (``shortcut`` None: no add)."""
    from fusedres.dropout import apply_mask
    from fusedres.droppath import apply_sample_scale
    from fusedres.norm import apply_norm
    z = x if norm is None else apply_norm(norm, x)
    out = torch.nn.functional.linear(z if act is None else act(z), w, b)
    if p:
        out = apply_mask(out, mask, p)
    out = apply_sample_scale(out, s)
    if shortcut is None:
        return out
    if isinstance(alpha, torch.Tensor):
        return torch.addcmul(shortcut, alpha, out)
    return shortcut + out if alpha == 1.0 else shortcut + alpha * out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_is_bitwise_the_blocks_torch_ops(dtype):
    """residual_reference and residual_mlp_reference (the recipe evaluated, recipe_forward) against
    the blocks' torch ops written out (_spec) over a grid of options: bitwise, NaN and inf
    included, BatchNorm's running statistics too."""
    from fusedres.activations import resolve
    from fusedres.dropout import apply_mask
    g = torch.Generator().manual_seed(0)
    D, H = 8, 12
    x = torch.randn(3, 4, D, generator=g).to(dtype)
    x[0, 0, 0], x[1, 1, 1] = float("nan"), float("inf")
    w, b, p = (torch.randn(D, D, generator=g).to(dtype), torch.randn(D, generator=g).to(dtype),
               torch.randn(2 * D, D, generator=g).to(dtype))
    w1, b1, w2 = (torch.randn(H, D, generator=g).to(dtype), torch.randn(H, generator=g).to(dtype),
                  torch.randn(D, H, generator=g).to(dtype))
    s = torch.tensor([2.0, 0.0, 1.5]).to(dtype)
    mask, hmask = torch.rand(3, 4, D, generator=g) > 0.3, torch.rand(3, 4, H, generator=g) > 0.3
    alphas = (1.0, 0.5, torch.tensor(0.7).to(dtype), torch.rand(D, generator=g).to(dtype))
    same = (lambda a, c: a.dtype == c.dtype and torch.equal(a.nan_to_num(7.0), c.nan_to_num(7.0)))
    n = 0
    for act, alpha, bias, norm, scale, drop in itertools.product(
            ("relu", "gelu", torch.nn.LeakyReLU(0.2)), alphas, (True, False),
            (None, "layer", torch.nn.BatchNorm1d(D).to(dtype)), (None, s), (0.0, 0.3)):
        n1, n2 = copy.deepcopy(norm), copy.deepcopy(norm)
        got = fusedres.residual_reference(x, w, b if bias else None, alpha=alpha, sample_scale=scale, act=act, norm=n1,
                                          dropout=drop, dropout_mask=mask if drop else None)
        want = _spec(x, w, b if bias else None, alpha=alpha, s=scale, act=resolve(act, "t"), norm=n2, p=drop,
                     mask=mask, shortcut=x)
        assert same(got, want), (act, alpha, bias, norm, scale, drop)
        if isinstance(n1, torch.nn.BatchNorm1d):
            assert same(n1.running_mean, n2.running_mean) and same(n1.running_var, n2.running_var)
        n += 1
    for alpha in alphas[:3]:
        got = fusedres.residual_reference(x, p, None, alpha=alpha, proj_weight=p, sample_scale=s)
        assert same(got, _spec(x, p, None, alpha=alpha, s=s, act=torch.relu, shortcut=torch.nn.functional.linear(x, p)))
    for pre, act, alpha, hidden, (drop, hdrop) in itertools.product(
            (None, "relu"), ("gelu", "relu"), alphas, (None, "batch"), ((0.0, 0.0), (0.2, 0.4))):
        got = fusedres.residual_mlp_reference(x, w1, b1, w2, None, alpha=alpha, sample_scale=s, pre_act=pre, act=act,
                                              norm="layer", hidden_norm=hidden, dropout=drop, hidden_dropout=hdrop,
                                              dropout_mask=mask if drop else None,
                                              hidden_dropout_mask=hmask if hdrop else None)
        h = _spec(x, w1, b1, alpha=None, act=None if pre is None else resolve(pre, "t"), norm="layer")
        hidden_act = resolve(act, "t")
        want = _spec(h, w2, None, alpha=alpha, s=s, norm=hidden, p=drop, mask=mask, shortcut=x,
                     act=lambda t: apply_mask(hidden_act(t), hmask, hdrop) if hdrop else hidden_act(t))
        assert same(got, want), (pre, act, alpha, hidden, drop)
        n += 1
    assert n == 288 + 64


# ---------------------------------------------------------------------------------------------
# The ops launch their recipe's passes for the gradients a step wants (kernels.launch.launch_pass)

_GRAD_NAMES = {"weight": "weight", "bias": "bias", "alpha": "alpha", "proj_weight": "proj_weight",
               "norm.weight": "norm_weight", "norm.bias": "norm_bias", "fc1.weight": "fc1_weight",
               "fc1.bias": "fc1_bias", "fc2.weight": "fc2_weight", "fc2.bias": "fc2_bias",
               "hidden_norm.weight": "hidden_norm_weight", "hidden_norm.bias": "hidden_norm_bias"}


def _frozen_cases():
    """(block, options, frozen, pinned): ``pinned`` says what the step launches less than a step
    that wants every gradient, written out here (not by the recipe's rules): per role, None for a
    pass not launched, or the pieces (column sums) its key drops."""
    single = dict(alpha=0.5, learnable_alpha=True)
    return [
        ("single", dict(single), ("bias",), {"dw": ("db",)}),
        ("single", dict(alpha=0.5), ("weight",), {"dw": None}),          # db alone: a native reduction
        ("single", dict(single), ("weight", "alpha"), {"dw": None}),
        ("single", dict(single, out_features=32), ("proj_weight",), {"dw": ("proj",)}),
        ("single", dict(single, dropout=0.25), ("weight", "alpha"), {"dw": ("dalpha", "dalpha_bias")}),
        ("single", dict(single, norm="batch"), ("weight", "bias", "alpha"), {"dw": None}),
        ("single", dict(single, norm=torch.nn.LayerNorm(16)), ("norm.weight", "norm.bias"),
         {"dx": ("norm_col_sums",)}),
        ("single", dict(single, norm=torch.nn.BatchNorm1d(16)), ("x", "norm.weight", "norm.bias"), {"dx": None}),
        ("single", dict(single, norm=torch.nn.LayerNorm(16)), ("x",), {"dx": ("norm_row_sums",)}),
        ("mlp", dict(norm=torch.nn.LayerNorm(16), pre_act=None, act="gelu"), ("fc1.weight", "fc1.bias"),
         {"dw1": None}),
        ("mlp", dict(hidden_norm=torch.nn.BatchNorm1d(32)), ("x", "fc1.weight", "fc1.bias"),
         {"dx": None, "dw1": None}),
        ("mlp", dict(norm=torch.nn.BatchNorm1d(16), hidden_dropout=0.2, dropout=0.1), ("fc2.weight", "fc2.bias"),
         {"dw2": None}),
        ("mlp", dict(learnable_alpha=True, alpha_per_channel=True), ("x", "fc2.bias"),
         {"dx": None, "dw2": ("db",)}),
        ("mlp", dict(norm=torch.nn.LayerNorm(16), recompute=True), ("norm.weight", "norm.bias"),
         {"dx": ("norm_col_sums",)}),
    ]


_ROLES = {"single": ("fwd", "dx", "dw"), "mlp": ("fc1", "fc2", "dh", "dw2", "dx", "dw1")}


@pytest.mark.parametrize("kind,options,frozen,pinned", _frozen_cases(),
                         ids=lambda v: "-".join(v) if isinstance(v, tuple) else None)
def test_a_step_launches_the_passes_of_the_gradients_it_wants(launched, kind, options, frozen, pinned):
    """Frozen parameters (and an input without a gradient): the fused block launches exactly
    ``block_recipe(block).passes(needs)``, the needs its parameters that require a gradient; that
    is the full step's launches less what the case pins (a pass, or column sums); and the
    gradients it makes are the full step's (fp64, the same dropout masks: the same seed)."""
    options = dict(options)
    out = options.pop("out_features", None)
    torch.manual_seed(0)
    if kind == "single":
        block = fusedres.FusedResidualBlock(16, out, dtype=torch.float64, **options)
    else:
        block = fusedres.FusedResidualMLPBlock(16, 32, dtype=torch.float64, **options)
    x0 = torch.randn(4, 8, 16, dtype=torch.float64)

    def step(frozen_names):
        for name, p in block.named_parameters():
            p.grad = None
            p.requires_grad_(name not in frozen_names)
        x = x0.clone().requires_grad_("x" not in frozen_names)
        torch.manual_seed(1)        # (the dropout seeds)
        fusedres.kernels.configs.clear_prepared()       # (each step through the launchers, not a replay)
        launched.clear()
        y = block(x)
        forward = len(launched)
        y.sum().backward()
        if getattr(block, "recompute", False):      # fc1's forward again, first in the backward
            assert launched[forward] == launched[0]
            del launched[forward]
        grads = {n: p.grad for n, p in block.named_parameters()}
        return y, x.grad, grads, list(launched)

    y_all, dx_all, grads_all, keys_all = step(())
    recipe = fusedres.block_recipe(block)       # (with every parameter learnable)
    y, dx, grads, keys = step(frozen)
    needs = frozenset(_GRAD_NAMES[n] for n in grads if n not in frozen) | ({"x"} if "x" not in frozen else set())
    assert keys_all == [p.key for p in recipe.passes()]
    assert keys == [p.key for p in recipe.passes(needs)]
    expected = []
    for role, key in zip(_ROLES[kind], keys_all, strict=True):
        if role in pinned and pinned[role] is None:
            continue
        dropped = pinned.get(role, ())
        assert all(f"|{piece}" in key for piece in dropped), (key, dropped)
        expected.append("|".join(part for part in key.split("|") if part not in dropped))
    assert keys == expected
    torch.testing.assert_close(y, y_all, rtol=0, atol=0)
    for name, g in grads.items():
        assert (g is None) == (name in frozen), name
        if g is not None:
            torch.testing.assert_close(g, grads_all[name], msg=name)
    assert (dx is None) == ("x" in frozen)
    if dx is not None:
        torch.testing.assert_close(dx, dx_all)


@pytest.mark.parametrize("norm", ["layer", "rms", "batch"])
def test_a_normalized_block_over_no_rows_has_zero_gradients(norm):
    """An empty batch through a normalized block (a LayerNorm's saved mean is then empty, and
    still a LayerNorm's): the output is empty and every gradient zero, as eager's."""
    module = {"layer": torch.nn.LayerNorm(16), "rms": torch.nn.RMSNorm(16), "batch": torch.nn.BatchNorm1d(16)}[norm]
    for block in (fusedres.FusedResidualBlock(16, norm=module, learnable_alpha=True),
                  fusedres.FusedResidualMLPBlock(16, 32, norm=copy.deepcopy(module), hidden_norm="layer",
                                                 recompute=True)):
        x = torch.randn(2, 0, 16, requires_grad=True)
        y = block(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        for name, p in block.named_parameters():
            assert p.grad is not None and not p.grad.any(), name


def test_launch_pass_takes_the_operands_its_pass_names():
    """The pass chooses: an operand of a piece it does not name is not passed (its launch's key is
    the pass's), and a piece it names without its operand is a clear error."""
    from fusedres._layout import plan_rows
    from fusedres.kernels.launch import MissingOperand, launch_pass
    x, w, b = torch.randn(8, 16), torch.randn(16, 16), torch.randn(16)
    rows, (xs,), (xk,) = plan_rows(x)
    bare = PassRecipe("fwd", "gelu", pieces={"residual"})
    y = torch.empty(8, 16)
    launch = launch_pass(bare, rows, xk, xs, w, y, bias=b, alpha=torch.tensor(2.0), sample_scale=torch.ones(8))
    assert launch.kwargs["RECIPE"] == bare.key == "fwd|gelu|residual"
    torch.testing.assert_close(y, x + torch.nn.functional.gelu(x) @ w.T)
    with pytest.raises(MissingOperand, match=r"names 'bias'"):
        launch_pass(PassRecipe("fwd", "relu", pieces={"bias", "residual"}), rows, xk, xs, w, y)
    with pytest.raises(MissingOperand, match=r"scales by alpha"):
        launch_pass(PassRecipe("fwd", "relu", alpha="scalar", pieces={"residual"}), rows, xk, xs, w, y)
    with pytest.raises(ValueError, match=r"unknown gradients \['bias2'\]"):
        Recipe().passes(frozenset({"bias2"}))


def test_an_mlp_block_with_one_bias_names_it_per_linear(launched):
    """fc1 with a bias and fc2 without (or the other way): each pass names its own linear's
    (``MLPRecipe.fc2_bias``), the ops launch them, and the reference evaluates the same recipe."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    w1, b1, w2, b2 = torch.randn(32, 16) / 4, torch.randn(32), torch.randn(16, 32) / 6, torch.randn(16)
    for fc1_bias, fc2_bias in ((b1, None), (None, b2)):
        launched.clear()
        params = [t.clone().requires_grad_() for t in (w1, w2)] + [
            None if t is None else t.clone().requires_grad_() for t in (fc1_bias, fc2_bias)]
        y = fusedres.fused_residual_mlp(x, params[0], params[2], params[1], params[3])
        y.sum().backward()
        relu = fusedres.activations.ACTIVATIONS["relu"]
        recipe = fusedres.recipes.mlp_recipe(relu, relu, 1.0, bias=fc1_bias is not None,
                                             fc2_bias=fc2_bias is not None)
        assert launched == [p.key for p in recipe.passes()]
        assert ("bias" in recipe.passes()[0].pieces, "bias" in recipe.passes()[1].pieces) == (
            fc1_bias is not None, fc2_bias is not None)
        ref = fusedres.residual_mlp_reference(x.double(), w1.double(), None if fc1_bias is None else b1.double(),
                                              w2.double(), None if fc2_bias is None else b2.double())
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_an_mlp_blocks_float_alpha_kind_is_fc2s(launched):
    """A float alpha's kind is decided by the launch it scales, fc2's: by value, unless fc2's
    weight is fp64 (by pointer). Under autocast an fp64 fc1 keeps its dtype beside an fp32 fc2."""
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    w1, b1 = torch.randn(32, 16, dtype=torch.float64) / 4, torch.randn(32, dtype=torch.float64)
    w2, b2 = torch.randn(16, 32) / 6, torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fusedres.fused_residual_mlp(x, w1, b1, w2, b2, alpha=0.5)
    assert launched[1].startswith("fwd|relu|alpha=value|")
    assert y.shape == x.shape and torch.isfinite(y).all()
    launched.clear()
    fusedres.fused_residual_mlp(x.double(), w1, b1, w2.double(), b2.double(), alpha=0.5)
    assert launched[1].startswith("fwd|relu|alpha=scalar|")
