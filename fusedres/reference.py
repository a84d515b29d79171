"""The eager reference: the spec that every fused path is measured against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def residual_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, alpha: float | Tensor = 1.0,
                       proj_weight: Tensor | None = None) -> Tensor:
    """The definition of the block, in plain PyTorch:

    ``x + alpha * F.linear(F.relu(x), weight, bias)``, or with a projection shortcut
    ``F.linear(x, proj_weight) + alpha * F.linear(F.relu(x), weight, bias)``.
    """
    shortcut = x if proj_weight is None else F.linear(x, proj_weight)
    branch = F.linear(F.relu(x), weight, bias)
    if isinstance(alpha, Tensor):
        return torch.addcmul(shortcut, alpha, branch)
    return shortcut + branch if alpha == 1.0 else shortcut + alpha * branch


def eager_forward(x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor | None = None,
                  proj_weight: Tensor | None = None) -> Tensor:
    """The reference forward in the dtypes the kernels see: the GEMMs in ``weight``'s dtype (under
    autocast the wrapper has cast the parameters), the residual add in eager's type promotion."""
    h = F.relu(x).to(weight.dtype)
    branch = F.linear(h, weight, bias)
    if alpha is not None:
        branch = alpha * branch
    shortcut = x if proj_weight is None else F.linear(x.to(weight.dtype), proj_weight)
    return shortcut + branch


def eager_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor | None,
                   proj_weight: Tensor | None, need_dx: bool, need_weight: bool, need_bias: bool,
                   need_alpha: bool, need_proj: bool):
    """The reference gradients of :func:`eager_forward` as eager autograd computes them, None
    where not asked for: (dx, dW, db, dalpha, dP). ``relu``'s backward is ``threshold_backward``,
    ``x <= 0 -> 0``, which lets the gradient through at NaN."""
    N, K = weight.shape
    g = grad.to(weight.dtype)
    g2 = g.reshape(-1, N)
    h2 = F.relu(x).to(weight.dtype).reshape(-1, K)
    scale = (lambda t: t) if alpha is None else (lambda t: alpha * t)
    dx = dw = db = dalpha = dp = None
    if need_dx:
        branch = torch.where(x <= 0, 0, scale(g @ weight))
        shortcut = grad if proj_weight is None else g @ proj_weight
        dx = (shortcut + branch).to(x.dtype)
    if need_weight:
        dw = scale(g2.T @ h2).to(weight.dtype)
    if need_bias:
        db = scale(g2.sum(0)).to(weight.dtype)
    if need_alpha:
        lin = F.linear(h2, weight, bias)
        dalpha = (g2 * lin).sum().to(alpha.dtype).reshape(alpha.shape)
    if need_proj:
        dp = g2.T @ x.to(weight.dtype).reshape(-1, K)
    return dx, dw, db, dalpha, dp


class _ResidualParameters(nn.Module):
    """The block's parameters, named and initialised as in ``nn.Linear``, so a state_dict moves
    between the eager and the fused block unchanged:

    - ``weight [out, in]`` and ``bias [out]``: ``nn.Linear(in, out)``'s;
    - ``alpha``: a 0-dim buffer, or with ``learnable_alpha`` a parameter, of that name;
    - ``proj_weight [out, in]`` when ``out != in``: ``nn.Linear(in, out, bias=False)``'s weight.

    ``out_features`` may be left out (``None``: a square block). For the issue-2 signature
    ``(dim, bias)``, a bool in second place is taken as ``bias``.
    """

    def __init__(self, dim: int, out_features: int | None = None, bias: bool = True, *, alpha: float = 1.0,
                 learnable_alpha: bool = False, device=None, dtype=None) -> None:
        super().__init__()
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
        alpha_t = torch.tensor(float(alpha), device=device, dtype=dtype)
        if learnable_alpha:
            self.alpha = nn.Parameter(alpha_t)
        else:
            self.register_buffer("alpha", alpha_t)
        self._alpha_init = float(alpha)
        self.reset_parameters()

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
                alpha = torch.tensor(getattr(self, "_alpha_init", 1.0), dtype=alpha.dtype)
            state_dict[key] = alpha
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
        learnable = " (learnable)" if isinstance(self.alpha, nn.Parameter) else ""
        return f"{shape}, bias={self.bias is not None}, alpha={self.alpha.item():g}{learnable}"


class ResidualBlock(_ResidualParameters):
    """Pre-activation residual block in eager PyTorch, the reference :class:`fusedres.FusedResidualBlock`
    must match: ``y = x + alpha * (relu(x) @ weight.T + bias)``, or with ``out_features != dim``
    ``y = x @ proj_weight.T + alpha * (relu(x) @ weight.T + bias)``.

    Shapes: ``x`` is ``(..., dim)``; ``y`` is ``(..., out_features)`` in ``x``'s dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        return residual_reference(x, self.weight, self.bias, alpha=self.alpha, proj_weight=self.proj_weight)


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
