"""A recipe's pass, launched: the pass chooses its operands.

The ops (``fusedres.op``, ``fusedres.norm_op``, ``fusedres.mlp_op``) name their call's recipe
(``fusedres.recipes``), take its passes for the gradients the step wants
(:meth:`~.recipe.Recipe.passes`), and hand :func:`launch_pass` each pass with every operand the call
has. The pass decides what the kernel gets: the operand of each piece it names (which must be
there), None for every other, its activation and residual scale kind. So a piece is written once,
in the recipe; the launcher's ``RECIPE`` key, made from the operands it was given, is the pass's
key, and :func:`launch_pass` checks that it is. The compile gate (``fusedres.aot.example_launch``)
makes its launches from the same passes.
"""
from __future__ import annotations

import sys

from ._common import Rows, RowStrides
from .recipe import PassRecipe
from .residual_fwd import NO_DROPOUT, NO_NORM, alpha_kind

#: The pieces a split-M dW's first launch adds to its key (the plan's choice, not the recipe's).
_SPLIT_PIECES = frozenset({"split", "col_sums"})


class MissingOperand(ValueError):
    """A pass names a piece whose operand the call did not give: the op and its recipe disagree."""


def pass_arguments(p: PassRecipe, rows: Rows, x, xs: RowStrides, weight, out, *, g=None,
                   gs: RowStrides | None = None, bias=None, alpha=None, proj_weight=None, residual=None,
                   sample_scale=None, rows_per_sample: int = 1, norm: tuple = NO_NORM, stats_partials=(None, None),
                   norm_sums=(None, None), dropout=NO_DROPOUT, dropout_a=NO_DROPOUT, db=None, dalpha_partials=None,
                   dp=None) -> tuple[tuple, dict]:
    """``(args, keywords)`` of pass ``p``'s launcher (:func:`~.residual_fwd.residual_fwd`,
    :func:`~.residual_bwd.residual_dx`, :func:`~.residual_bwd.residual_dw`, or their
    ``*_launch_args``, which the compile gate calls): the operand of each piece ``p`` names (which
    must be given), None for every other, its activation and residual scale.

    ``fwd``: ``out = y``; ``dx``: ``out = dx`` from ``g``; ``dw``: ``out = dW`` from ``g``. ``x``
    (with strides ``xs``) is the pass's A input (the forward's A operand; the tensor whose
    activation dx differentiates and dW multiplies). The optional operands are as the launchers
    take them, each the operand of a piece: ``bias`` (``bias``; dW's ``dalpha_bias``), ``alpha``
    (the pass's scale kind), ``proj_weight`` (``proj``; dW's ``dp``), ``residual`` (``residual``:
    the tensor added, default the block's own), ``sample_scale`` (``row_scale``), ``norm`` (the
    statistics when the pass has a norm, the affine when it names ``norm_weight``/``norm_bias``),
    ``stats_partials`` and ``norm_sums`` (their column and row pieces), ``dropout`` and
    ``dropout_a``, ``db``, ``dalpha_partials`` (``dalpha``); ``rows_per_sample`` goes with the row
    scale (1 without: Triton specialises an integer 1)."""
    has = p.pieces
    kind = p.kind
    # (inline, not a helper per operand: the norm, dropout and MLP paths call this per launch)
    given = ((bias, "bias" if kind != "dw" else "dalpha_bias"), (proj_weight if kind != "dw" else dp, "proj"),
             (sample_scale, "row_scale"), (dropout[0], "dropout"), (dropout_a[0], "dropout_a"))
    given += (((stats_partials[0], "stats_col_partials"), (stats_partials[1], "stats_row_partials")) if kind == "fwd"
              else ((norm_sums[0], "norm_col_sums"), (norm_sums[1], "norm_row_sums")) if kind == "dx"
              else ((db, "db"), (dalpha_partials, "dalpha")))
    for operand, piece in given:
        if operand is None and piece in has:
            raise MissingOperand(f"launch_pass: the pass {p.key!r} names {piece!r}, but its operand was not given")
    if p.alpha is not None and alpha_kind(alpha) is None:
        raise MissingOperand(f"launch_pass: the pass {p.key!r} scales by alpha ({p.alpha}), but no alpha was given")
    if p.norm is None:
        norm_ops = NO_NORM
    else:
        if norm is NO_NORM or (norm[1] is None and norm[3] is None):
            raise MissingOperand(f"launch_pass: the pass {p.key!r} normalizes its A operand, but no statistics "
                                 "were given")
        for operand, piece in ((norm[4], "norm_weight"), (norm[5], "norm_bias")):
            if operand is None and piece in has:
                raise MissingOperand(f"launch_pass: the pass {p.key!r} names {piece!r}, but its operand was not "
                                     "given")
        norm_ops = (*norm[:4], norm[4] if "norm_weight" in has else None, norm[5] if "norm_bias" in has else None)
    row_scale = "row_scale" in has
    keywords = dict(alpha=alpha if p.alpha is not None else None, sample_scale=sample_scale if row_scale else None,
                    rows_per_sample=rows_per_sample if row_scale else 1, act=p.act, act_param=p.act_param,
                    norm=norm_ops, dropout=dropout if "dropout" in has else NO_DROPOUT,
                    dropout_a=dropout_a if "dropout_a" in has else NO_DROPOUT)
    proj = "proj" in has
    if kind == "dw":
        return (g, gs, x, xs, out, db if "db" in has else None, rows), dict(
            keywords, weight=weight, bias=bias if "dalpha_bias" in has else None,
            dalpha_partials=dalpha_partials if "dalpha" in has else None, dp=dp if proj else None)
    keywords.update(proj_weight=proj_weight if proj else None, residual=residual if "residual" in has else None,
                    add_residual="residual" in has or proj)
    if kind == "fwd":
        return (x, xs, weight, bias if "bias" in has else None, out, rows), dict(
            keywords, stats_partials=(stats_partials[0] if "stats_col_partials" in has else None,
                                      stats_partials[1] if "stats_row_partials" in has else None))
    if kind == "dx":
        return (g, gs, x, xs, weight, out, rows), dict(
            keywords, norm_sums=(norm_sums[0] if "norm_col_sums" in has else None,
                                 norm_sums[1] if "norm_row_sums" in has else None))
    raise ValueError(f"launch_pass: unknown pass kind {p.kind!r}")


def launch_pass(p: PassRecipe, rows: Rows, x, xs: RowStrides, weight, out, *, config=None, **operands):
    """Launch pass ``p`` with the operands it names (:func:`pass_arguments`, whose arguments these
    are; ``config``: the launcher's). Returns the launcher's prepared launch (``PreparedDw`` for
    dW), after checking that its ``RECIPE`` key is the pass's."""
    args, keywords = pass_arguments(p, rows, x, xs, weight, out, **operands)
    launchers = sys.modules[__package__]        # (the package's launchers, looked up per call: tests spy on them)
    launch = getattr(launchers, _LAUNCHERS[p.kind])(*args, config=config, **keywords)
    if p.kind == "dw":
        key = launch.main.kwargs["RECIPE"]
        if launch.reduce is not None and _split_key_matches(PassRecipe.parse(key), p):
            key = p.key         # (the split's first launch names its slabs; the reduce does the epilogue)
    else:
        key = None if launch is None else launch.kwargs["RECIPE"]
    if key is not None and key != p.key:
        raise AssertionError(f"launch_pass: the launch's recipe {key!r} is not the pass's {p.key!r}")
    return launch


_LAUNCHERS = {"fwd": "residual_fwd", "dx": "residual_dx", "dw": "residual_dw"}


def _split_key_matches(launched: PassRecipe, p: PassRecipe) -> bool:
    """A split dW's first launch matches the pass: the same pass but for the epilogue's pieces,
    which the reduce applies (db, dalpha, the scale), and the split's own."""
    epilogue = {"db", "dalpha", "dalpha_bias"}
    return (launched.kind, launched.act, launched.act_param, launched.norm) == (p.kind, p.act, p.act_param, p.norm) \
        and launched.pieces - _SPLIT_PIECES == p.pieces - epilogue
