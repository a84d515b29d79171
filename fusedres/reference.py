"""The eager reference: the spec that every fused path is measured against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ACTIVATIONS, Activation, ActLike, resolve as resolve_act
from .recipes import forward_steps, named_mlp, named_single
from .kernels.recipe import MLPRecipe, Recipe
from .norm import apply_norm, make_norm
from .droppath import apply_sample_scale, check_drop_path, check_sample_scale, drop_path_scale, sample_rows
from .dropout import apply_mask, check_p


_RELU = ACTIVATIONS["relu"]


def residual_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, alpha: float | Tensor = 1.0,
                       proj_weight: Tensor | None = None, sample_scale: Tensor | None = None,
                       act: ActLike = "relu", norm=None, dropout: float = 0.0, training: bool = True,
                       dropout_mask: Tensor | None = None) -> Tensor:
    """The definition of the block, in plain PyTorch:

    ``x + alpha * F.linear(act(x), weight, bias)``, or with a projection shortcut
    ``F.linear(x, proj_weight) + alpha * F.linear(act(x), weight, bias)``. ``act``: a name or
    module of :mod:`fusedres.activations` (default relu). ``alpha``: a float, a one-element
    tensor, or a per-channel tensor ``[out]`` (LayerScale).

    ``sample_scale`` (stochastic depth, see :mod:`fusedres.droppath`): None, or a 1-D tensor ``s``
    of ``x.shape[0]`` values scaling each sample's branch,
    ``y[b] = shortcut[b] + s[b] * alpha * F.linear(F.relu(x[b]), weight, bias)``; where
    ``s[b] == 0`` the sample's output is its shortcut exactly.

    ``norm`` (:mod:`fusedres.norm`): None, a name, or an ``nn.BatchNorm1d``, ``nn.LayerNorm`` or
    ``nn.RMSNorm`` instance (exactly those types, as the fused blocks take) applied before the
    activation, ``x + alpha * F.linear(act(norm(x)), weight, bias)`` (He et al.'s full
    pre-activation); the module is called as it is, so BatchNorm updates its running statistics.

    ``dropout`` (with ``training``): the branch's dropout, before the scales and the add:
    ``x + alpha * s * dropout(F.linear(...))``, torch's ``F.dropout`` (its RNG), or with
    ``dropout_mask`` (bool, the branch's shape) exactly that keep mask, ``z * mask / (1 - p)``:
    the eager block given the mask a fused call used (:func:`fusedres.record_dropout`).
    """
    check_sample_scale(sample_scale, x, "residual_reference")
    dropout = _rate(dropout)
    act = resolve_act(act, "residual_reference")
    _, steps = named_single(act, alpha, bias=bias is not None, proj=proj_weight is not None,
                            sample_scale=sample_scale is not None, norm=norm,
                            dropout=bool(training) and dropout > 0, who="residual_reference")
    return _run(steps, x, ((weight, bias, norm, (dropout, dropout_mask), _NO_DROP),), alpha, proj_weight,
                sample_scale)


def _rate(p) -> float:
    """A dropout rate as the reference takes it (as ``F.dropout`` did before it): a false value
    (None, 0, False) is none; anything else a number in [0, 1] (``check_p``'s error otherwise)."""
    return check_p(float(p), "residual_reference") if p else 0.0


_NO_DROP = (0.0, None)


def recipe_forward(recipe: Recipe | MLPRecipe, x: Tensor, stages: tuple, *, alpha: float | Tensor = 1.0,
                   proj_weight: Tensor | None = None, sample_scale: Tensor | None = None) -> Tensor:
    """A block's forward in eager PyTorch, as its recipe names it: each forward pass of
    ``recipe.passes()`` in order (the MLP block's fc1, then fc2), the output of one the A operand
    of the next. ``stages[i]`` is that pass's ``(weight, bias, norm, dropout, dropout_a)``: the
    norm on its A operand (a name, a torch module or None), and the ``(p, keep mask or None)`` of
    the dropout on its output and on its activated A operand (plain tuples: this runs on every
    eager call).
    A pass is the kernels' skeleton with its pieces, each here the torch op that defines it:

    - A-tile prologue: the norm (``apply_norm``: the module itself, so BatchNorm updates its running
      statistics), the activation (its torch function), the hidden dropout (``dropout_a``);
    - the GEMM with its bias, ``F.linear``;
    - epilogue: the branch's dropout, stochastic depth's row scale ``sample_scale``, the residual
      scale ``alpha`` and the shortcut (``x``, or ``x @ proj_weight.T``: pieces ``residual``,
      ``proj``).

    The pieces a pass gets are its recipe's alone: a dropout rate or a sample scale whose piece
    is absent is not applied. Statistics sinks (a chain's ``stats_*`` pieces) write no output and
    have no eager counterpart."""
    return _run(forward_steps(recipe), x, stages, alpha, proj_weight, sample_scale)


def _run(steps: tuple, x: Tensor, stages: tuple, alpha, proj_weight, sample_scale) -> Tensor:
    """:func:`recipe_forward` given the recipe's steps (:func:`fusedres.recipes.forward_steps`)."""
    if len(steps) != len(stages):
        raise ValueError(f"recipe_forward: the recipe has {len(steps)} forward passes, {len(stages)} stages given")
    shortcut = x if proj_weight is None else F.linear(x, proj_weight)
    a = x
    for (norm, act, bias, dropout_a, dropout, row_scale, add, scaled), t in zip(steps, stages):
        if norm:
            a = apply_norm(t[2], a)
        if act is not None:
            a = act(a)
        if dropout_a:
            a = _dropout(a, *t[4])
        a = F.linear(a, t[0], t[1] if bias else None)
        if dropout:
            a = _dropout(a, *t[3])
        if row_scale:
            a = apply_sample_scale(a, sample_scale)
        if add:
            a = _add_branch(shortcut, a, alpha if scaled else 1.0)
    return a


def _dropout(t: Tensor, p: float, mask: Tensor | None) -> Tensor:
    """A dropout piece (training, ``p > 0``): the given keep mask, else ``F.dropout`` (torch's RNG)."""
    return apply_mask(t, mask, p) if mask is not None else F.dropout(t, p, True)


def _add_branch(shortcut: Tensor, branch: Tensor, alpha: float | Tensor) -> Tensor:
    """``shortcut + alpha * branch``, skipping the multiply for a float alpha of 1."""
    if isinstance(alpha, Tensor):
        return torch.addcmul(shortcut, alpha, branch)
    return shortcut + branch if alpha == 1.0 else shortcut + alpha * branch


def residual_mlp_reference(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                           fc2_bias: Tensor | None, *, alpha: float | Tensor = 1.0,
                           sample_scale: Tensor | None = None, pre_act: ActLike = "relu",
                           act: ActLike = "relu", norm=None, hidden_norm=None, dropout: float = 0.0,
                           hidden_dropout: float = 0.0, training: bool = True, dropout_mask: Tensor | None = None,
                           hidden_dropout_mask: Tensor | None = None) -> Tensor:
    """The definition of the block with a hidden layer (the MLP block), in plain PyTorch:

    ``y = x + alpha * s * (act(pre_act(x) @ W1.T + b1) @ W2.T + b2)``

    ``pre_act`` (default relu; None: none, the pre-norm blocks of timm and rtdl) applies to x
    before fc1, ``act`` (default relu) to the hidden layer; each a name or module of
    :mod:`fusedres.activations`. ``norm`` (:mod:`fusedres.norm`) normalizes x before ``pre_act``:
    ``y = x + alpha * s * (act(pre_act(norm(x)) @ W1.T + b1) @ W2.T + b2)``; ``hidden_norm``
    normalizes h before ``act``: ``act(hidden_norm(h))``.

    with ``W1 = fc1_weight [H, D]``, ``b1 = fc1_bias [H]``, ``W2 = fc2_weight [D, H]``,
    ``b2 = fc2_bias [D]`` (either bias may be None), ``x (..., D)``, and ``s`` the per-sample scale
    ``sample_scale`` (1-D, ``x.shape[0]`` values, one per index of x's first dimension; None: 1).
    Where ``s[b] == 0`` the sample's output is ``x[b]`` exactly.

    ``hidden_dropout`` after the hidden activation and ``dropout`` on the branch, with
    ``training`` (rtdl's dropout1 and dropout2, timm's drop1 and drop2):
    ``y = x + alpha * s * dropout(dropout_h(act(h)) @ W2.T + b2)``; with the masks given, exactly
    those (see :func:`residual_reference`).
    """
    check_sample_scale(sample_scale, x, "residual_mlp_reference")
    D = x.shape[-1] if x.dim() else None
    if fc1_weight.dim() != 2 or fc2_weight.dim() != 2 or fc1_weight.shape[1] != D or \
            tuple(fc2_weight.shape) != (D, fc1_weight.shape[0]):
        raise ValueError("residual_mlp_reference: expected fc1_weight [H, D] and fc2_weight [D, H] with "
                         f"D = x.shape[-1] = {D}, got fc1_weight {list(fc1_weight.shape)} and fc2_weight "
                         f"{list(fc2_weight.shape)}")
    pre = resolve_act(pre_act, "residual_mlp_reference", allow_none=True)
    act = resolve_act(act, "residual_mlp_reference")
    dropout, hidden_dropout = _rate(dropout), _rate(hidden_dropout)
    _, steps = named_mlp(pre, act, alpha, bias=fc1_bias is not None, fc2_bias=fc2_bias is not None,
                         sample_scale=sample_scale is not None, norm=norm, hidden_norm=hidden_norm,
                         dropout=bool(training) and dropout > 0, hidden_dropout=bool(training) and hidden_dropout > 0,
                         who="residual_mlp_reference")
    return _run(steps, x, ((fc1_weight, fc1_bias, norm, _NO_DROP, _NO_DROP),
                           (fc2_weight, fc2_bias, hidden_norm, (dropout, dropout_mask),
                            (hidden_dropout, hidden_dropout_mask))), alpha, None, sample_scale)


def eager_forward(x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor | None = None,
                  proj_weight: Tensor | None = None, sample_scale: Tensor | None = None,
                  act: Activation = _RELU) -> Tensor:
    """The reference forward in the dtypes the kernels see: the GEMMs in ``weight``'s dtype (under
    autocast the wrapper has cast the parameters), the residual add in eager's type promotion.
    ``act``: a row of :data:`fusedres.activations.ACTIVATIONS`."""
    h = act(x).to(weight.dtype)
    branch = F.linear(h, weight, bias)
    if sample_scale is not None:
        branch = branch * sample_rows(sample_scale, branch)
    if alpha is not None:
        branch = alpha * branch
    shortcut = x if proj_weight is None else F.linear(x.to(weight.dtype), proj_weight)
    return shortcut + branch


def eager_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor | None,
                   proj_weight: Tensor | None, need_dx: bool, need_weight: bool, need_bias: bool,
                   need_alpha: bool, need_proj: bool, sample_scale: Tensor | None = None,
                   act: Activation = _RELU):
    """The reference gradients of :func:`eager_forward` as eager autograd computes them, None
    where not asked for: (dx, dW, db, dalpha, dP). The activation's derivative is torch's own
    backward (``relu``'s is ``threshold_backward``, ``x <= 0 -> 0``, which lets the gradient
    through at NaN). With ``sample_scale`` the branch's gradient is ``s * g`` (the shortcut's,
    and dP's, stay ``g``). A per-channel alpha scales g's columns before the GEMM, as autograd
    does."""
    N, K = weight.shape
    g_shortcut = grad.to(weight.dtype)
    g = g_shortcut if sample_scale is None else g_shortcut * sample_rows(sample_scale, g_shortcut)
    g2 = g.reshape(-1, N)
    h2 = act(x).to(weight.dtype).reshape(-1, K)
    scale = (lambda t: t) if alpha is None else (lambda t: alpha * t)
    per_channel = isinstance(alpha, Tensor) and alpha.numel() > 1
    dx = dw = db = dalpha = dp = None
    if need_dx:
        dh = (alpha * g).to(weight.dtype) @ weight if per_channel else scale(g @ weight)
        branch = torch.where(x <= 0, 0, dh) if act.name == "relu" else act.backward(x, dh)
        shortcut = grad if proj_weight is None else g_shortcut @ proj_weight
        dx = (shortcut + branch).to(x.dtype)
    if need_weight:
        dw = (((alpha * g2).to(weight.dtype).T @ h2) if per_channel else scale(g2.T @ h2)).to(weight.dtype)
    if need_bias:
        db = scale(g2.sum(0)).to(weight.dtype)
    if need_alpha:
        lin = F.linear(h2, weight, bias)
        dalpha = ((g2 * lin).sum(0) if per_channel else (g2 * lin).sum()).to(alpha.dtype).reshape(alpha.shape)
    if need_proj:
        dp = g_shortcut.reshape(-1, N).T @ x.to(weight.dtype).reshape(-1, K)
    return dx, dw, db, dalpha, dp


class _ResidualAlpha(nn.Module):
    """What every residual block shares besides its GEMM weights: the branch scale ``alpha`` (a 0-dim
    buffer of that name, or with ``learnable_alpha`` a parameter), loading a checkpoint that has no
    ``alpha``, and the stochastic-depth rate ``drop_path`` (a plain float, not in the state_dict)."""

    def _init_alpha(self, alpha: float, learnable_alpha: bool, device, dtype, per_channel: int | None = None) -> None:
        """``alpha``: a 0-dim buffer (a parameter with ``learnable_alpha``), or with
        ``per_channel = n`` a parameter of shape ``[n]`` filled with ``alpha`` (timm's LayerScale,
        whose ``init_values`` is typically 1e-5)."""
        if per_channel is not None:
            self.alpha = nn.Parameter(torch.full((per_channel,), float(alpha), device=device, dtype=dtype))
            self._alpha_init = float(alpha)
            return
        alpha_t = torch.tensor(float(alpha), device=device, dtype=dtype)
        if learnable_alpha:
            self.alpha = nn.Parameter(alpha_t)
        else:
            self.register_buffer("alpha", alpha_t)
        self._alpha_init = float(alpha)

    def _init_drop_path(self, drop_path: float) -> None:
        self.drop_path = check_drop_path(drop_path, f"{type(self).__name__}: drop_path")

    def _init_dropout(self, **rates: float) -> None:
        """Dropout rates (``dropout``, ``hidden_dropout``): plain floats outside the state_dict,
        active in training as ``nn.Dropout``'s; a rate outside [0, 1] raises its error."""
        for name, p in rates.items():
            setattr(self, name, check_p(p, f"{type(self).__name__}: {name}"))

    def _sample_scale(self, x: Tensor) -> Tensor | None:
        """Stochastic depth's per-sample scale for this forward (None: the plain block)."""
        return drop_path_scale(x, getattr(self, "drop_path", 0.0), self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A checkpoint without ``alpha`` (an nn.Linear's, or a {weight, bias} block's) keeps this
        # module's own alpha, as _BatchNorm keeps its num_batches_tracked: the key is filled in
        # with the current value (a fresh one of the constructor's value on the meta device, so
        # that ``assign=True`` materialises it). Every other key is checked as usual.
        key = prefix + "alpha"
        if key not in state_dict:
            alpha = self.alpha
            if alpha.device.type == "meta":
                alpha = torch.full(alpha.shape, getattr(self, "_alpha_init", 1.0), dtype=alpha.dtype)
            state_dict[key] = alpha
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _alpha_repr(self) -> str:
        alpha = self.alpha
        act = getattr(self, "act", None)
        acts = "" if act is None or act.name == "relu" else f"act={act.spec}, "
        pre = getattr(self, "pre_act", ACTIVATIONS["relu"])
        acts = ("" if pre is not None and pre.name == "relu" else f"pre_act={pre.spec if pre else None}, ") + acts
        drop = "".join(f", {name}={getattr(self, name, 0.0):g}" for name in ("drop_path", "dropout", "hidden_dropout")
                       if getattr(self, name, 0.0))
        if alpha.dim() == 1:
            return f"{acts}alpha=[{alpha.numel()}] per channel, init {getattr(self, '_alpha_init', 1.0):g}" + drop
        value = getattr(self, "_alpha_init", 1.0) if alpha.device.type == "meta" else alpha.item()
        learnable = " (learnable)" if isinstance(alpha, nn.Parameter) else ""
        return f"{acts}alpha={value:g}{learnable}" + drop


class _ResidualParameters(_ResidualAlpha):
    """The block's parameters, named and initialised as in ``nn.Linear``, so a state_dict moves
    between the eager and the fused block unchanged:

    - ``weight [out, in]`` and ``bias [out]``: ``nn.Linear(in, out)``'s;
    - ``alpha``: a 0-dim buffer, or with ``learnable_alpha`` a parameter, of that name;
    - ``proj_weight [out, in]`` when ``out != in``: ``nn.Linear(in, out, bias=False)``'s weight.

    ``out_features`` may be left out (``None``: a square block). For the issue-2 signature
    ``(dim, bias)``, a bool in second place is taken as ``bias``. ``drop_path`` is the
    stochastic-depth rate (:mod:`fusedres.droppath`) and ``dropout`` the branch's dropout rate,
    float attributes outside the state_dict.
    """

    #: Whether the class runs the fused kernels (which refuse dropout with a projection).
    _fused_kernels = False

    def __init__(self, dim: int, out_features: int | None = None, bias: bool = True, *, alpha: float = 1.0,
                 learnable_alpha: bool = False, drop_path: float = 0.0, act: ActLike = "relu",
                 alpha_per_channel: bool = False, norm=None, dropout: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.act = resolve_act(act, type(self).__name__)
        if isinstance(out_features, bool):
            out_features, bias = None, out_features
        out_features = dim if out_features is None else out_features
        for name, n in (("dim", dim), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {n!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = dim, out_features
        self.weight = nn.Parameter(torch.empty(out_features, dim, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        if out_features != dim:
            self.proj_weight = nn.Parameter(torch.empty(out_features, dim, **factory))
        else:
            self.register_parameter("proj_weight", None)
        self._init_alpha(alpha, learnable_alpha, device, dtype, out_features if alpha_per_channel else None)
        self._init_drop_path(drop_path)
        self._init_dropout(dropout=dropout)
        if self.dropout and out_features != dim and self._fused_kernels:
            raise ValueError(f"{type(self).__name__}: dropout with a projection shortcut (out_features != dim) is not "
                             "supported by the fused kernels; use fusedres.ResidualBlock for such a block")
        if norm is not None and out_features != dim:
            raise ValueError(f"{type(self).__name__}: norm with a projection shortcut (out_features != dim) is not "
                             "supported")
        # the norm is a real torch module named ``norm``: its state_dict keys are torch's own
        self.norm = make_norm(norm, dim, type(self).__name__, device, dtype)
        self.reset_parameters()

    @property
    def dim(self) -> int:
        return self.in_features

    def reset_parameters(self) -> None:
        # nn.Linear.reset_parameters in effect: kaiming_uniform(a=sqrt(5)) and a uniform bias in
        # +-1/sqrt(fan_in); the same RNG draws in the same order. The projection comes after.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.proj_weight is not None:
            nn.init.kaiming_uniform_(self.proj_weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        shape = (f"dim={self.in_features}" if self.proj_weight is None
                 else f"in_features={self.in_features}, out_features={self.out_features}")
        return f"{shape}, bias={self.bias is not None}, {self._alpha_repr()}"


class ResidualBlock(_ResidualParameters):
    """Pre-activation residual block in eager PyTorch, the reference :class:`fusedres.FusedResidualBlock`
    must match: ``y = x + alpha * (relu(x) @ weight.T + bias)``, or with ``out_features != dim``
    ``y = x @ proj_weight.T + alpha * (relu(x) @ weight.T + bias)``.

    With ``drop_path = p > 0``, in training, each sample (index of x's first dimension) keeps its
    branch scaled by ``1/(1 - p)`` with probability ``1 - p`` or drops it (stochastic depth,
    timm's ``DropPath``; :func:`fusedres.drop_path_scale`). Eval mode is the plain block.

    Shapes: ``x`` is ``(..., dim)``; ``y`` is ``(..., out_features)`` in ``x``'s dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        return residual_reference(x, self.weight, self.bias, alpha=self.alpha, proj_weight=self.proj_weight,
                                  sample_scale=self._sample_scale(x), act=self.act, norm=self.norm,
                                  dropout=self.dropout, training=self.training)


class _ResidualMLPParameters(_ResidualAlpha):
    """The MLP block's parameters and settings, shared by the eager and the fused MLP block so a
    state_dict moves between them (and from a timm-style ``Mlp``) unchanged:

    - ``fc1 = nn.Linear(dim, hidden_features, bias)`` and ``fc2 = nn.Linear(hidden_features, dim, bias)``:
      timm's ``Mlp`` names, ``nn.Linear``'s init (fc1 drawn first, then fc2);
    - ``alpha``: a 0-dim buffer, or with ``learnable_alpha`` a parameter; a state_dict without it
      keeps the module's own value;
    - ``drop_path``: the stochastic-depth rate, ``dropout`` (the branch's) and ``hidden_dropout``
      (after the hidden activation) dropout rates: floats outside the state_dict;
    - ``recompute``: a bool for the fused block (save only x for the backward and
      recompute the hidden pre-activation); the eager block ignores it.
    """

    def __init__(self, dim: int, hidden_features: int, bias: bool = True, *, alpha: float = 1.0,
                 learnable_alpha: bool = False, drop_path: float = 0.0, recompute: bool = False,
                 pre_act: ActLike = "relu", act: ActLike = "relu", alpha_per_channel: bool = False, norm=None,
                 hidden_norm=None, dropout: float = 0.0, hidden_dropout: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.pre_act = resolve_act(pre_act, type(self).__name__, allow_none=True)
        self.act = resolve_act(act, type(self).__name__)
        for name, n in (("dim", dim), ("hidden_features", hidden_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {n!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_features = dim, hidden_features
        self.fc1 = nn.Linear(dim, hidden_features, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_features, dim, bias=bias, **factory)
        self._init_alpha(alpha, learnable_alpha, device, dtype, dim if alpha_per_channel else None)
        self._init_drop_path(drop_path)
        self._init_dropout(dropout=dropout, hidden_dropout=hidden_dropout)
        self.recompute = bool(recompute)
        # the norm on x, a real torch module named ``norm`` (state_dict keys ``norm.*``)
        self.norm = make_norm(norm, dim, type(self).__name__, device, dtype)
        # the norm on the hidden layer (He et al.'s two-layer form), ``hidden_norm.*``
        self.hidden_norm = make_norm(hidden_norm, hidden_features, type(self).__name__, device, dtype)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_features={self.hidden_features}, bias={self.fc1.bias is not None}, "
                f"{self._alpha_repr()}" + (", recompute=True" if self.recompute else ""))


class ResidualMLPBlock(_ResidualMLPParameters):
    """Pre-activation residual block with a hidden layer in eager PyTorch, the reference
    :class:`fusedres.FusedResidualMLPBlock` must match:

    ``y = x + alpha * s * (relu(relu(x) @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias)``

    Args:
        dim: the block's width ``D`` (input and output).
        hidden_features: the hidden width ``H`` (``4 * dim`` is a transformer's feed-forward shape).
        bias: learn ``fc1.bias`` and ``fc2.bias``.
        alpha: residual-branch scale (a buffer named ``alpha``); 0 with ``learnable_alpha`` is ReZero.
        learnable_alpha: make ``alpha`` a parameter.
        drop_path: stochastic-depth rate ``p``: in training, ``s[b] = m_b / (1 - p)`` with
            ``m_b ~ Bernoulli(1 - p)`` per sample (index of x's first dimension); ``s = 1`` in eval
            mode or at ``p = 0`` (:func:`fusedres.drop_path_scale`).
        recompute: stored for the fused block (which then saves only x); the eager block ignores it.

    The state_dict holds ``fc1.weight [H, D]``, ``fc1.bias [H]``, ``fc2.weight [D, H]``,
    ``fc2.bias [D]`` and ``alpha``: a timm-style ``Mlp``'s state_dict (no ``alpha``) loads as is.

    Shapes: ``x`` is ``(..., dim)``; ``y`` is ``(..., dim)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return residual_mlp_reference(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                      alpha=self.alpha, sample_scale=self._sample_scale(x), pre_act=self.pre_act,
                                      act=self.act, norm=self.norm, hidden_norm=self.hidden_norm,
                                      dropout=self.dropout, hidden_dropout=self.hidden_dropout,
                                      training=self.training)


# ---------------------------------------------------------------------------------------------
# The narrow stack: L square blocks without alpha, ``weight [L, D, D]``, ``bias [L, D]``


def stack_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The definition of the stack in plain PyTorch: ``x_{l+1} = x_l + relu(x_l) @ W_l.T + b_l``."""
    for l in range(weight.shape[0]):
        x = residual_reference(x, weight[l], None if bias is None else bias[l])
    return x


def eager_stack_forward(x: Tensor, weight: Tensor, bias: Tensor | None, save: bool) -> tuple[Tensor, Tensor]:
    """``(x_L, saved)`` as eager computes them, block after block in the dtypes the kernels see;
    ``saved`` is ``[L-1, M, D]`` holding ``x_1 .. x_{L-1}`` with ``save``, else empty."""
    xs = []
    for l in range(weight.shape[0]):
        if l:
            xs.append(x)
        x = eager_forward(x, weight[l], None if bias is None else bias[l])
    saved = torch.stack(xs) if save and xs else x.new_empty(0, *x.shape)
    return x, saved


def eager_stack_backward(grad: Tensor, x: Tensor, saved: Tensor, weight: Tensor, has_bias: bool, need_dx: bool,
                         need_params: bool):
    """``(dx, dW, db)`` as eager autograd computes them given the saved activations: each layer's
    backward (:func:`eager_backward`) from ``x_l`` and the incoming gradient, top layer first. In
    fp64 on fp64 copies of the same saved activations this is the backward's reference (end to
    end, relu-mask flips near zero would dominate any low-precision comparison)."""
    L = weight.shape[0]
    dws, dbs = [None] * L, [None] * L
    g = grad
    for l in reversed(range(L)):
        x_l = x if l == 0 else saved[l - 1]
        g, dws[l], dbs[l], _, _ = eager_backward(g, x_l, weight[l], None, None, None, True, need_params,
                                                  need_params and has_bias, False, False)
    dw = torch.stack(dws) if need_params else None
    db = torch.stack(dbs) if need_params and has_bias else None
    return (g if need_dx else None), dw, db
