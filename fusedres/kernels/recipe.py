"""Recipes: a block names its pieces, and its passes follow.

A :class:`Recipe` (the single block) or :class:`MLPRecipe` (the two-layer block) is a small frozen
dataclass of a block's pieces: activation, residual scale, bias, shortcut, stochastic depth. Its
:meth:`~Recipe.passes` are the kernel launches one training step makes, each a :class:`PassRecipe`:
the kernel (``fwd``, ``dx``, ``dw``), its activation and the pieces it is given. A pass's
:attr:`PassRecipe.key` is the launch's ``RECIPE`` constexpr, the autotune key's recipe string
(JSON-safe, so :func:`fusedres.save_tuning` can write it): the launchers build it with
:func:`pass_recipe` from the operands they are given, the tests check that a block's launches are
exactly its recipe's passes, and the pass table of docs/kernel-family.md is :func:`pass_table`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: The pieces a pass may have, in the order its key lists them:
#: ``bias`` (forward epilogue), ``db`` (dW's column sum of g, scaled), ``proj`` (the projection
#: shortcut's second K loop; dP tiles in dW), ``residual`` (the residual added in the epilogue),
#: ``dalpha`` and ``dalpha_bias`` (dW's dalpha partials, and their bias term), ``row_scale``
#: (stochastic depth's per-sample scale), ``split`` and ``col_sums`` (split-M dW's first launch:
#: partial slabs, and the column sums of g into db partials).
PIECES = ("bias", "db", "proj", "residual", "dalpha", "dalpha_bias", "row_scale", "split", "col_sums",
          "norm_weight", "norm_bias", "norm_col_sums", "norm_row_sums", "stats_col_partials", "stats_row_partials",
          "dropout", "dropout_a")
#: The normalizations of the A operand (the A-tile prologue, before the activation): statistics
#: per feature (``batch``) or per row (``layer``; ``rms`` without a mean). ``norm_weight`` and
#: ``norm_bias`` are its affine; ``norm_col_sums`` and ``norm_row_sums`` dx's sinks of the norm
#: output's gradient (column sums per row tile: dgamma, dbeta and BatchNorm's correction; row sums
#: per feature tile: LayerNorm's and RMSNorm's correction); ``stats_col_partials`` and
#: ``stats_row_partials`` the forward's sink of the next norm's statistics partials of its output
#: (the MLP block's hidden norm: BatchNorm's per column, LayerNorm's and RMSNorm's per row).
#: Dropout's keep masks, regenerated from a seed (``kernels.gemm.dropout_multiplier``):
#: ``dropout`` on the GEMM's output side, the branch (the forward's epilogue; g in dx's A-tile
#: prologue and on dW's B tile); ``dropout_a`` on its activated A operand, the MLP's hidden
#: dropout (the forward's A-tile prologue; dx's epilogue before the derivative; dW's A prologue).
NORMS = ("batch", "layer", "rms")
#: The kinds of residual scale, each its own code: a Python float passed by value, a one-element
#: tensor read through a pointer, a per-channel tensor ``[N]``. (None: no scale, no multiply.)
ALPHA_KINDS = ("value", "scalar", "channel")


def act_label(act: str | None, act_param: float = 0.0) -> str:
    """An activation as a key names it: ``"identity"`` for none, leaky_relu with its slope."""
    name = act or "identity"
    return f"leaky_relu({act_param!r})" if name == "leaky_relu" else name


@dataclass(frozen=True)
class PassRecipe:
    """One kernel launch of a block: ``kind`` (``fwd``, ``dx``, ``dw``), the activation (its
    forward as dW's and the forward's A-tile prologue, its derivative in dx's epilogue; None:
    none), the residual scale kind (:data:`ALPHA_KINDS` or None) and its pieces
    (:data:`PIECES`)."""
    kind: str
    act: str | None = "relu"
    act_param: float = 0.0
    alpha: str | None = None
    pieces: frozenset = field(default_factory=frozenset)
    norm: str | None = None

    def __post_init__(self):
        unknown = set(self.pieces) - set(PIECES)
        if unknown or self.alpha not in (None, *ALPHA_KINDS) or self.norm not in (None, *NORMS):
            raise ValueError(f"PassRecipe: unknown pieces {sorted(unknown)}, alpha {self.alpha!r} or norm {self.norm!r}")
        object.__setattr__(self, "pieces", frozenset(self.pieces))
        parts = [self.kind, act_label(self.act, self.act_param)]
        if self.norm is not None:
            parts.append(f"norm={self.norm}")
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha}")
        # (made once: the ops check each launch against it)
        object.__setattr__(self, "_key", "|".join(parts + [p for p in PIECES if p in self.pieces]))

    @property
    def key(self) -> str:
        """``"fwd|gelu|alpha=scalar|bias|residual"``: the launch's ``RECIPE``."""
        return self._key

    @classmethod
    def parse(cls, key: str) -> "PassRecipe":
        """The inverse of :attr:`key`."""
        kind, act, *rest = key.split("|")
        param = 0.0
        if act.startswith("leaky_relu("):
            act, param = "leaky_relu", float(act[len("leaky_relu("):-1])
        named = dict(p.split("=", 1) for p in rest if "=" in p)
        return cls(kind, None if act == "identity" else act, param, named.get("alpha"),
                   frozenset(p for p in rest if "=" not in p), named.get("norm"))

    def describe(self) -> tuple[str, str, str]:
        """(A-tile prologue, epilogue, column sums) in words, for the pass table."""
        act = act_label(self.act, self.act_param)
        scale = {"value": "x alpha (float)", "scalar": "x alpha (tensor)", "channel": "x alpha[n]", None: None}[self.alpha]
        has = self.pieces.__contains__
        norm = ""
        if self.norm is not None:
            affine = "".join(t for p, t in (("norm_weight", " x w[k]"), ("norm_bias", " + b[k]")) if has(p))
            norm = ({"batch": "(x - mean[k]) x rstd[k]", "layer": "(x - mean[m]) x rstd[m]",
                     "rms": "x rstd[m]"}[self.norm] + affine + ", then ")
        drop, drop_a = " x mask[m, n]" if has("dropout") else "", " x mask_h[m, k]" if has("dropout_a") else ""
        if self.kind == "fwd":
            prologue = norm + act + drop_a
            epilogue = ["+ b" if has("bias") else None, drop.strip() or None, "x s[m]" if has("row_scale") else None,
                        scale,
                        "+ x P^T (2nd K loop)" if has("proj") else "+ residual" if has("residual") else None]
            sums = []
        elif self.kind == "dx":
            prologue = ("g x alpha[n]" if self.alpha == "channel" else "g") + drop
            epilogue = [None if self.alpha == "channel" else scale, "x s[m]" if has("row_scale") else None,
                        drop_a.strip() or None,
                        (f"x {act}'(norm(x)) = dz" if self.norm else f"x {act}'(x)") if self.act is not None else None,
                        "+ g P (2nd K loop)" if has("proj") else "+ residual grad" if has("residual") else None]
            sums = [s for s, p in (("dz, dz x_hat column sums", "norm_col_sums"),
                                   ("dz, dz x_hat row sums", "norm_row_sums")) if has(p)]
        else:
            prologue = norm + act + (" x s[m]" if has("row_scale") else "") + drop_a + (
                "; g" + drop if drop else "")
            if has("split"):
                epilogue = ["fp32 partial slabs (reduce kernel: the epilogue)"]
                sums = ["db partials"] if has("col_sums") else []
            else:
                epilogue = [scale, "dP tiles" if has("proj") else None]
                sums = [s for s, p in (("db", "db"), ("dalpha", "dalpha")) if has(p)]
                if has("dalpha_bias"):
                    sums.append("dalpha bias term")
        return prologue, ", ".join(e for e in epilogue if e) or "-", ", ".join(sums) or "-"


def pass_recipe(kind: str, act: str | None, act_param: float = 0.0, *, alpha: str | None = None,
                norm: str | None = None, **operands) -> PassRecipe:
    """The pass a launch makes, from what it is given: ``alpha``, the kind of its scale (None or
    one of :data:`ALPHA_KINDS`), and the pieces of :data:`PIECES` as operands (a tensor or True:
    given; None or False: not)."""
    return PassRecipe(kind, act, act_param, alpha,
                      frozenset(p for p, v in operands.items() if v is not None and v is not False), norm)


@dataclass(frozen=True)
class Recipe:
    """The single block ``y = [x | x @ P.T] + s[m] * alpha * (act(x) @ W.T + b)``: its pieces.

    ``alpha``: None (no scale), ``"value"`` (a Python float), ``"scalar"`` (a one-element tensor)
    or ``"channel"`` (``[N]``, LayerScale); ``learnable_alpha``: its gradient is wanted;
    ``proj``: a projection shortcut; ``row_scale``: stochastic depth's per-sample scale.
    ``norm``: a normalization before the activation (:data:`NORMS`), with its affine
    ``norm_weight``/``norm_bias`` (learnable), on batch statistics (``batch_stats``; False:
    BatchNorm's running statistics, constants for the backward). With a norm, dx writes the norm
    output's gradient and its sinks, and the norm's finishing pass adds the residual gradient.
    ``dropout``: the branch's dropout (training, ``p > 0``), a keep mask in every pass.
    ``next_norm``: the norm of the next block of a chain (:data:`NORMS`), whose batch statistics
    of y the forward's epilogue emits as partials (``fusedres.chain``)."""
    act: str | None = "relu"
    act_param: float = 0.0
    alpha: str | None = None
    learnable_alpha: bool = False
    bias: bool = True
    proj: bool = False
    row_scale: bool = False
    norm: str | None = None
    norm_weight: bool = True
    norm_bias: bool = True
    batch_stats: bool = True
    dropout: bool = False
    next_norm: str | None = None

    def passes(self, needs: frozenset | None = None) -> tuple[PassRecipe, ...]:
        """The GEMM launches of a training step: the forward, dx and dW. ``needs``: the gradients
        the step wants, named as :data:`SINGLE_GRADS` (None: every one). A pass no wanted gradient
        needs is not launched, and the column sums a pass makes are only the wanted ones (db, dalpha,
        a norm's sinks); db alone is a native reduction, not a dW launch (but with dropout, whose
        masked g only dW's kernel has)."""
        return tuple(p for p in self.launches(needs).values() if p is not None)

    def launches(self, needs: frozenset | None = None) -> dict:
        """:meth:`passes` by role: ``{"fwd": ..., "dx": ..., "dw": ...}``, None for a pass not
        launched."""
        want = _wanted(needs, SINGLE_GRADS)
        alpha = self.alpha
        dalpha = self.learnable_alpha and alpha in ("scalar", "channel") and want("alpha")
        shortcut = "proj" if self.proj else "residual"
        rs = {"row_scale"} if self.row_scale else set()
        if self.dropout:
            rs.add("dropout")
        affine, dx_shortcut = _norm_pieces(self, want("x"), want("norm_weight") or want("norm_bias"))
        if self.norm is None:
            dx_shortcut = {shortcut}
        launched = dict.fromkeys(("fwd", "dx", "dw"))
        launched["fwd"] = PassRecipe("fwd", self.act, self.act_param, alpha,
                                     {shortcut, *rs, *affine, *stats_sink(self.next_norm)}
                                     | ({"bias"} if self.bias else set()), self.norm)
        if want("x") or (self.norm is not None and (want("norm_weight") or want("norm_bias"))):
            launched["dx"] = PassRecipe("dx", self.act, self.act_param, alpha, {*dx_shortcut, *rs, *affine},
                                        self.norm)
        db = self.bias and want("bias")
        if want("weight") or dalpha or (self.proj and want("proj_weight")) or (db and self.dropout):
            launched["dw"] = PassRecipe("dw", self.act, self.act_param, alpha,
                                        {p for p, on in (("db", db), ("proj", self.proj and want("proj_weight")),
                                                         ("dalpha", dalpha), ("dalpha_bias", dalpha and self.bias))
                                         if on} | rs | affine, self.norm)
        return launched


@dataclass(frozen=True)
class MLPRecipe:
    """The two-layer block ``y = x + s[m] * alpha * (act(pre_act(norm(x)) @ W1.T + b1) @ W2.T + b2)``:
    ``pre_act`` None is the pre-norm blocks' (timm's, rtdl's) first GEMM without activation;
    ``norm`` (as :class:`Recipe`'s) is in fc1's passes: its forward's and dW1's A-tile prologue,
    and dx's epilogue with its sinks. ``dropout`` (the branch's) and ``hidden_dropout`` (after the
    hidden activation) are fc2's passes' keep masks. ``bias``: both linears have one, unless
    ``fc2_bias`` (None: as ``bias``) says otherwise for fc2."""
    pre_act: str | None = "relu"
    pre_act_param: float = 0.0
    act: str = "relu"
    act_param: float = 0.0
    alpha: str | None = None
    learnable_alpha: bool = False
    bias: bool = True
    row_scale: bool = False
    norm: str | None = None
    norm_weight: bool = True
    norm_bias: bool = True
    batch_stats: bool = True
    hidden_norm: str | None = None
    hidden_norm_weight: bool = True
    hidden_norm_bias: bool = True
    hidden_batch_stats: bool = True
    dropout: bool = False
    hidden_dropout: bool = False
    next_norm: str | None = None
    fc2_bias: bool | None = None

    def passes(self, needs: frozenset | None = None) -> tuple[PassRecipe, ...]:
        """fc1's and fc2's forwards; then dh, dW2, dx, dW1: a training step's six launches.
        ``needs``: the gradients the step wants, named as :data:`MLP_GRADS` (None: every one); a
        backward pass no wanted gradient needs is not launched (as :meth:`Recipe.passes`)."""
        return tuple(p for p in self.launches(needs).values() if p is not None)

    def launches(self, needs: frozenset | None = None) -> dict:
        """:meth:`passes` by role: ``fc1`` and ``fc2`` (the forwards), ``dh`` and ``dw2`` (fc2's
        backward), ``dx`` and ``dw1`` (fc1's), None for a pass not launched."""
        want = _wanted(needs, MLP_GRADS)
        alpha = self.alpha
        dalpha = self.learnable_alpha and alpha in ("scalar", "channel") and want("alpha")
        rs = {"row_scale"} if self.row_scale else set()
        rs |= {p for p, on in (("dropout", self.dropout), ("dropout_a", self.hidden_dropout)) if on}
        has_b2 = self.bias if self.fc2_bias is None else self.fc2_bias
        bias, bias2 = ({"bias"} if self.bias else set()), ({"bias"} if has_b2 else set())
        pre, act = (self.pre_act, self.pre_act_param), (self.act, self.act_param)
        need_norm = want("norm_weight") or want("norm_bias")
        affine, dx_residual = _norm_pieces(self, want("x"), need_norm)
        need_dh = want("x") or want("fc1_weight") or want("fc1_bias") or (self.norm is not None and need_norm)
        need_hidden = self.hidden_norm is not None and (want("hidden_norm_weight") or want("hidden_norm_bias"))
        hidden = _HiddenNorm(self.hidden_norm, self.hidden_norm_weight, self.hidden_norm_bias, self.hidden_batch_stats)
        h_affine, h_sinks = _norm_pieces(hidden, need_dh, need_hidden)
        if self.hidden_norm is None:
            h_sinks, stats = set(), set()
        else:       # fc1's epilogue emits the hidden norm's statistics partials (batch statistics)
            stats = stats_sink(self.hidden_norm) if self.hidden_norm != "batch" or self.hidden_batch_stats else set()
        launched = dict.fromkeys(("fc1", "fc2", "dh", "dw2", "dx", "dw1"))
        launched["fc1"] = PassRecipe("fwd", *pre, None, bias | affine | stats, self.norm)
        launched["fc2"] = PassRecipe("fwd", *act, alpha, bias2 | {"residual"} | rs | h_affine
                                     | stats_sink(self.next_norm), self.hidden_norm)
        if need_dh or need_hidden:
            launched["dh"] = PassRecipe("dx", *act, alpha, rs | h_affine | h_sinks, self.hidden_norm)
        db2 = has_b2 and want("fc2_bias")
        if want("fc2_weight") or db2 or dalpha:
            launched["dw2"] = PassRecipe("dw", *act, alpha, rs | h_affine | {p for p, on in (
                ("db", db2), ("dalpha", dalpha), ("dalpha_bias", dalpha and has_b2)) if on}, self.hidden_norm)
        if want("x") or (self.norm is not None and need_norm):
            launched["dx"] = PassRecipe("dx", *pre, None, dx_residual | affine, self.norm)
        if want("fc1_weight") or want("fc1_bias"):
            launched["dw1"] = PassRecipe("dw", *pre, None,
                                         ({"db"} if self.bias and want("fc1_bias") else set()) | affine, self.norm)
        return launched


#: The gradients a single block's step may want (:meth:`Recipe.passes`' ``needs``).
SINGLE_GRADS = frozenset({"x", "weight", "bias", "alpha", "proj_weight", "norm_weight", "norm_bias"})
#: The gradients an MLP block's step may want (:meth:`MLPRecipe.passes`' ``needs``).
MLP_GRADS = frozenset({"x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "alpha", "norm_weight", "norm_bias",
                       "hidden_norm_weight", "hidden_norm_bias"})


def _wanted(needs: frozenset | None, names: frozenset):
    """``needs`` as a predicate over ``names`` (None: every one)."""
    if needs is None:
        return names.__contains__
    unknown = set(needs) - names
    if unknown:
        raise ValueError(f"passes: unknown gradients {sorted(unknown)}; one of {sorted(names)}")
    return frozenset(needs).__contains__


def stats_sink(norm: str | None) -> set:
    """The forward's sink of a norm's statistics partials of its output: per column (BatchNorm),
    per row (LayerNorm, RMSNorm), none (None)."""
    return set() if norm is None else {"stats_col_partials" if norm == "batch" else "stats_row_partials"}


@dataclass(frozen=True)
class _HiddenNorm:
    """The MLP block's hidden norm, named as a recipe's norm (for :func:`_norm_pieces`)."""
    norm: str | None
    norm_weight: bool
    norm_bias: bool
    batch_stats: bool


def _norm_pieces(recipe, need_input: bool = True, need_affine: bool = True) -> tuple[set, set]:
    """A recipe's norm affine pieces, and what its dx pass gets instead of the residual gradient:
    with a norm, dz's sinks (the finishing pass adds the residual); without, ``residual``. The
    sinks are those the wanted gradients use: the column sums for the affine's gradients and
    BatchNorm's correction of the input gradient (batch statistics), the row sums for LayerNorm's
    and RMSNorm's correction."""
    if recipe.norm is None:
        return set(), {"residual"}
    affine = {p for p, on in (("norm_weight", recipe.norm_weight), ("norm_bias", recipe.norm_bias)) if on}
    sinks = {p for p, on in (("norm_col_sums", (bool(affine) and need_affine)
                              or (need_input and recipe.norm == "batch" and recipe.batch_stats)),
                             ("norm_row_sums", need_input and recipe.norm != "batch")) if on}
    return affine, sinks


#: The blocks the pass table (docs/kernel-family.md) shows: the mission's block, LayerScale with DropPath, a
#: projection with a learnable alpha, timm's MLP half (LN's block: no pre-activation, GELU), and rtdl's
#: block with both dropouts (training).
TABLE_RECIPES = (
    ("FusedResidualBlock(D)", Recipe(alpha="scalar")),
    ("FusedResidualBlock(D, act='gelu', alpha_per_channel=True, drop_path=0.1)",
     Recipe(act="gelu", alpha="channel", learnable_alpha=True, row_scale=True)),
    ("FusedResidualBlock(D, 2 * D, learnable_alpha=True)", Recipe(alpha="scalar", learnable_alpha=True, proj=True)),
    ("FusedResidualMLPBlock(D, 4 * D, pre_act=None, act='gelu', alpha_per_channel=True)",
     MLPRecipe(pre_act=None, act="gelu", alpha="channel", learnable_alpha=True)),
    ("FusedResidualMLPBlock(D, 2 * D, norm='batch', pre_act=None, hidden_dropout=0.15, dropout=0.1)",
     MLPRecipe(pre_act=None, norm="batch", hidden_dropout=True, dropout=True)),
)
_MLP_PASS_NAMES = ("fwd (fc1)", "fwd (fc2)", "dx (dh)", "dw (dW2)", "dx (dx)", "dw (dW1)")


def pass_table(recipes=TABLE_RECIPES) -> str:
    """The pass table of docs/kernel-family.md: each block's launches with their prologue, epilogue and column
    sums, as its recipe yields them (markdown)."""
    lines = ["| block | pass | A-tile prologue | epilogue | column sums | recipe key |",
             "|---|---|---|---|---|---|"]
    for name, recipe in recipes:
        passes = recipe.passes()
        names = _MLP_PASS_NAMES if isinstance(recipe, MLPRecipe) else ("fwd", "dx", "dw")
        for i, (label, p) in enumerate(zip(names, passes)):
            prologue, epilogue, sums = p.describe()
            lines.append(f"| {f'`{name}`' if i == 0 else ''} | {label} | {prologue} | {epilogue} | {sums} "
                         f"| `{p.key.replace('|', chr(92) + '|')}` |")
    return "\n".join(lines)
