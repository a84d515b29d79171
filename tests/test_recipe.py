"""Recipes (``fusedres.kernels.recipe``): a block's launches are exactly its recipe's passes, the
recipe string round-trips, and the pass table in docs/kernel-family.md is the one the recipes
yield."""
from __future__ import annotations

import copy
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
    mlp = fusedres.FusedResidualMLPBlock(16, 32, norm=copy.deepcopy(module), pre_act=None, act="gelu").train(train)
    launched.clear()
    mlp(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    expected = MLPRecipe(pre_act=None, act="gelu", alpha="scalar", norm=norm, norm_weight=affine,
                         norm_bias=affine and norm != "rms", batch_stats=train)
    assert launched == [p.key for p in expected.passes()]


@pytest.mark.parametrize("nxt", ["batch", "layer"])
def test_a_chained_blocks_forward_has_the_next_norms_sink(launched, nxt):
    """In a chain (fusedres.chain) a block's forward emits the next norm's statistics: its recipe's
    ``next_norm``, the one piece it adds (the single block's forward; the MLP block's fc2)."""
    torch.manual_seed(0)
    block = fusedres.FusedResidualBlock(16, norm="layer", alpha=0.5, learnable_alpha=True)
    fusedres.chain.set_next_norm(block, nxt)
    block(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    assert launched == [p.key for p in Recipe(alpha="scalar", learnable_alpha=True, norm="layer",
                                              next_norm=nxt).passes()]
    assert "stats_" in launched[0]
    mlp = fusedres.FusedResidualMLPBlock(16, 32, norm="batch", pre_act=None, act="gelu")
    fusedres.chain.set_next_norm(mlp, nxt)
    launched.clear()
    mlp(torch.randn(4, 8, 16, requires_grad=True)).sum().backward()
    assert launched == [p.key for p in MLPRecipe(pre_act=None, act="gelu", alpha="scalar", norm="batch",
                                                 next_norm=nxt).passes()]


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
