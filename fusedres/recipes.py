"""The recipe a call or a module names (:mod:`fusedres.kernels.recipe`), read off its PyTorch arguments.

One copy of the rule from arguments to pieces: the eager reference (:mod:`fusedres.reference`)
evaluates the recipe it names here, and :func:`block_recipe` tells a user (or a test) which GEMM
passes a module's training step launches, with the keys the autotuner and the compile gate use.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import chain as _chain
from .activations import Activation
from .kernels.recipe import MLPRecipe, Recipe
from .kernels.residual_fwd import alpha_kind
from .norm import NormLike, norm_kind, uses_batch_stats


def call_alpha_kind(alpha, fp64: bool = False) -> Optional[str]:
    """The residual scale's kind for a call's ``alpha``: the launch's (``kernels.alpha_kind``), after
    the call's two rules: a Python float of 1 is no scale, and an fp64 launch reads a float through
    a pointer (``"scalar"``) to keep every bit."""
    if not isinstance(alpha, Tensor):
        if float(alpha) == 1.0:
            return None
        if fp64:
            return "scalar"
    return alpha_kind(alpha)


def _norm_fields(norm: NormLike, who: str, prefix: str = "") -> tuple:
    """A norm's recipe fields, as ``(name, value)`` pairs: its kind, whether it has each affine
    parameter, and whether it normalizes with statistics of its input (BatchNorm in training)."""
    kind = norm_kind(norm, None, who)
    if kind is None:
        return ()
    weight = getattr(norm, "weight", None) is not None
    bias = getattr(norm, "bias", None) is not None and kind != "rms"
    return ((f"{prefix}norm", kind), (f"{prefix}norm_weight", weight), (f"{prefix}norm_bias", bias),
            (f"{prefix}batch_stats", uses_batch_stats(norm)))


def _act_key(act: Optional[Activation]) -> tuple:
    """An activation as a cache key: its name, its parameter as a float, and that float's sign (1
    and 1.0 name one recipe; -0.0 and 0.0, equal as floats, are told apart)."""
    if act is None:
        return None, 0.0, 1.0
    p = float(act.param)
    return act.name, p, math.copysign(1.0, p)


def single_recipe(act: Activation, alpha, *, bias: bool, proj: bool = False, sample_scale: bool = False,
                  norm: NormLike = None, dropout: bool = False, learnable_alpha: bool = False,
                  next_norm: Optional[str] = None, fp64: bool = False, who: str = "single_recipe") -> Recipe:
    """The single block's recipe from a call's arguments: ``act`` a resolved activation, ``alpha``
    a float or tensor, ``sample_scale`` and ``dropout`` whether each applies to this call
    (stochastic depth's scale given; dropout active: training, ``p > 0``). ``who`` names the
    caller in the error for a norm of another kind."""
    return named_single(act, alpha, bias=bias, proj=proj, sample_scale=sample_scale, norm=norm, dropout=dropout,
                        learnable_alpha=learnable_alpha, next_norm=next_norm, fp64=fp64, who=who)[0]


def named_single(act: Activation, alpha, *, bias: bool, proj: bool = False, sample_scale: bool = False,
                 norm: NormLike = None, dropout: bool = False, learnable_alpha: bool = False,
                 next_norm: Optional[str] = None, fp64: bool = False, who: str = "single_recipe") -> tuple:
    """``(recipe, forward steps)`` of :func:`single_recipe`'s call (:func:`forward_steps`)."""
    key = (*_act_key(act), call_alpha_kind(alpha, fp64), learnable_alpha, bias, proj, sample_scale, dropout, next_norm,
           _norm_fields(norm, who))
    return _name_single(*key) if _is_compiling() else _single(*key)


def _name_single(act, act_param, _sign, alpha, learnable_alpha, bias, proj, row_scale, dropout, next_norm,
                 norm_fields) -> tuple:
    recipe = Recipe(act=act, act_param=act_param, alpha=alpha, learnable_alpha=learnable_alpha, bias=bias, proj=proj,
                    row_scale=row_scale, dropout=dropout, next_norm=next_norm, **dict(norm_fields))
    return recipe, forward_steps(recipe)


def mlp_recipe(pre_act: Optional[Activation], act: Activation, alpha, *, bias: bool, sample_scale: bool = False,
               norm: NormLike = None, hidden_norm: NormLike = None, dropout: bool = False,
               hidden_dropout: bool = False, learnable_alpha: bool = False, next_norm: Optional[str] = None,
               fp64: bool = False, fc2_bias: Optional[bool] = None, who: str = "mlp_recipe") -> MLPRecipe:
    """The MLP block's recipe from a call's arguments (as :func:`single_recipe`; ``bias``: fc1's,
    and fc2's unless ``fc2_bias`` is given)."""
    return named_mlp(pre_act, act, alpha, bias=bias, sample_scale=sample_scale, norm=norm, hidden_norm=hidden_norm,
                     dropout=dropout, hidden_dropout=hidden_dropout, learnable_alpha=learnable_alpha,
                     next_norm=next_norm, fp64=fp64, fc2_bias=fc2_bias, who=who)[0]


def named_mlp(pre_act: Optional[Activation], act: Activation, alpha, *, bias: bool, sample_scale: bool = False,
              norm: NormLike = None, hidden_norm: NormLike = None, dropout: bool = False,
              hidden_dropout: bool = False, learnable_alpha: bool = False, next_norm: Optional[str] = None,
              fp64: bool = False, fc2_bias: Optional[bool] = None, who: str = "mlp_recipe") -> tuple:
    """``(recipe, forward steps)`` of :func:`mlp_recipe`'s call (:func:`forward_steps`)."""
    norm_fields = _norm_fields(norm, who) + _norm_fields(hidden_norm, who, "hidden_")
    fc2_bias = None if fc2_bias is None or fc2_bias == bias else bool(fc2_bias)
    key = (*_act_key(pre_act), *_act_key(act), call_alpha_kind(alpha, fp64), learnable_alpha, bias, sample_scale, dropout,
           hidden_dropout, next_norm, fc2_bias, norm_fields)
    return _name_mlp(*key) if _is_compiling() else _mlp(*key)


def _name_mlp(pre_act, pre_act_param, _pre_sign, act, act_param, _sign, alpha, learnable_alpha, bias, row_scale,
              dropout, hidden_dropout, next_norm, fc2_bias, norm_fields) -> tuple:
    recipe = MLPRecipe(pre_act=pre_act, pre_act_param=pre_act_param, act=act, act_param=act_param, alpha=alpha,
                       learnable_alpha=learnable_alpha, bias=bias, row_scale=row_scale, dropout=dropout,
                       hidden_dropout=hidden_dropout, next_norm=next_norm, fc2_bias=fc2_bias, **dict(norm_fields))
    return recipe, forward_steps(recipe)


def forward_steps(recipe: Union[Recipe, MLPRecipe]) -> tuple:
    """A recipe's forward passes as the eager reference runs them (:func:`fusedres.reference.recipe_forward`):
    per pass (norm?, activation or None, bias?, hidden dropout?, dropout?, row scale?, shortcut
    added?, scaled?)."""
    steps = []
    for p in recipe.passes():
        if p.kind == "fwd":
            has = p.pieces.__contains__
            steps.append((p.norm is not None, None if p.act is None else Activation(p.act, p.act_param), has("bias"),
                          has("dropout_a"), has("dropout"), has("row_scale"), has("residual") or has("proj"),
                          p.alpha is not None))
    return tuple(steps)


def op_passes(block: type, fields: tuple, needs: Optional[frozenset] = None) -> dict:
    """The passes by role (``launches``) of the recipe ``block(*fields)``
    (:class:`~fusedres.kernels.recipe.Recipe` or :class:`~fusedres.kernels.recipe.MLPRecipe`, its
    fields in order) for the gradients ``needs`` (None: every one): what the fused ops launch
    (:func:`fusedres.kernels.launch.launch_pass`), made once per distinct call (a shared dict:
    read it, never change it). The ops run it outside any trace (inside their custom ops)."""
    signs = tuple(math.copysign(1.0, f) for f in fields if type(f) is float)   # -0.0 and 0.0: two keys
    return _op_passes(block, fields, signs, needs)


@functools.lru_cache(maxsize=4096)
def _op_passes(block: type, fields: tuple, _signs: tuple, needs: Optional[frozenset]) -> dict:
    return block(*fields).launches(needs)


def single_passes(weight: Tensor, has_bias: bool, alpha: Optional[Tensor], alpha_value: float,
                  sample_scale: Optional[Tensor], act: str, act_param: float, *, proj: bool = False,
                  norm: str = "none", norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                  batch_stats: bool = True, dropout: bool = False, next_norm: str = "none",
                  needs: Optional[frozenset] = None) -> dict:
    """The single-block ops' passes by role (:func:`op_passes`) from their arguments: ``alpha`` a
    tensor or None with the float ``alpha_value``, ``norm`` a kind or ``"none"`` with its affine
    tensors, ``dropout`` whether it applies; ``needs`` the wanted gradients (names of
    :data:`~fusedres.kernels.recipe.SINGLE_GRADS`; None: every one). ``has_bias``: the block has a
    bias (a backward's saved bias is None unless dalpha needs it: a wanted db says there is one)."""
    fields = (act, act_param, call_alpha_kind(alpha if alpha is not None else alpha_value,
                                              weight.dtype == torch.float64),
              alpha is not None, has_bias, proj, sample_scale is not None, None if norm == "none" else norm,
              norm_weight is not None, norm_bias is not None, batch_stats, dropout,
              None if next_norm == "none" else next_norm)
    return op_passes(Recipe, fields, needs)


# A call's recipe and forward steps are made once per distinct call: the eager reference names one on
# every call, and it is the baseline of the parity tests and the byte counts. Under torch.compile
# they are made while tracing instead (Dynamo warns about a cache wrapper it would skip; the result is
# a constant of the graph either way).
_single = functools.lru_cache(maxsize=1024)(_name_single)
_mlp = functools.lru_cache(maxsize=1024)(_name_mlp)
_is_compiling = torch.compiler.is_compiling


def block_recipe(module: nn.Module) -> Union[Recipe, MLPRecipe]:
    """The recipe of a residual block module's next training-mode (or eval-mode, as the module is
    set) call: :class:`fusedres.FusedResidualBlock` and :class:`fusedres.ResidualBlock` name a
    :class:`~fusedres.kernels.recipe.Recipe`, the MLP blocks an
    :class:`~fusedres.kernels.recipe.MLPRecipe`. ``block_recipe(m).passes()`` are the GEMM
    launches of a step that needs every gradient, each with its autotune key (``PassRecipe.key``);
    a fused block's GEMM launches are exactly these (tests/test_recipe.py, tests/test_aot.py), but
    for three additions: a GPU plan may split dW over rows (its first launch's key then has
    ``split`` and ``col_sums``, and a reduce kernel follows), a norm adds its statistics and
    finishing kernels, and ``recompute=True`` runs fc1's forward again in the backward.

    Stochastic depth and dropout are pieces only in training with a rate above 0; the next norm of
    a chain (:mod:`fusedres.chain`) is the one the block is linked to, if any."""
    from .module import FusedResidualBlock, FusedResidualMLPBlock
    from .reference import _ResidualMLPParameters, _ResidualParameters
    if not isinstance(module, (_ResidualParameters, _ResidualMLPParameters)):
        raise TypeError(f"block_recipe: expected a fusedres residual block (FusedResidualBlock, FusedResidualMLPBlock, "
                        f"ResidualBlock, ResidualMLPBlock), got {type(module).__name__}")
    training = module.training
    # a chain's sink: a fused block (not a projection's) with chains on, as chain.call_for decides
    fused = isinstance(module, (FusedResidualBlock, FusedResidualMLPBlock))
    chained = fused and _chain._ENABLED and getattr(module, "proj_weight", None) is None
    common = dict(alpha=module.alpha, learnable_alpha=module.alpha.requires_grad, who="block_recipe",
                  sample_scale=training and module.drop_path > 0, norm=module.norm,
                  dropout=training and module.dropout > 0,
                  next_norm=_chain.emits(module, training) if chained else None)
    if isinstance(module, _ResidualMLPParameters):
        return mlp_recipe(module.pre_act, module.act, bias=module.fc1.bias is not None,
                          fc2_bias=module.fc2.bias is not None, hidden_norm=module.hidden_norm,
                          hidden_dropout=training and module.hidden_dropout > 0, **common)
    return single_recipe(module.act, bias=module.bias is not None, proj=module.proj_weight is not None, **common)
