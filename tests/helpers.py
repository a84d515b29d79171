"""Shared builders for the parity tests: inputs in every layout, the three runs (fused, eager in
the same dtype, fp64 on the same rounded inputs), and the parity rule."""
from __future__ import annotations

import contextlib

import torch
import triton

from fusedres import fused_residual, fused_residual_mlp, residual_mlp_reference, residual_reference
from fusedres.kernels import configs
from fusedres.validate import parity

NAMES = ("y", "dx", "dweight", "dbias", "dalpha", "dproj_weight")
LAYOUTS = ("contiguous", "sliced", "transposed", "feature-strided")


def make_x(shape, dtype, device, layout="contiguous", seed=0):
    """``x`` of ``shape`` in the named memory layout. Every 5th feature is exactly 0, where a wrong
    relu mask (relu'(0) = 1) would show."""
    gen = torch.Generator().manual_seed(seed)
    *lead, D = shape
    if layout == "contiguous":
        x = torch.randn(*shape, generator=gen)
    elif layout == "sliced":  # row stride 2D, last stride 1
        x = torch.randn(*lead, 2 * D, generator=gen)[..., D // 2: D // 2 + D]
    elif layout == "transposed":  # [T, B, D] storage seen as [B, T, D]: two row strides
        x = torch.randn(lead[1], lead[0], D, generator=gen).transpose(0, 1)
    elif layout == "feature-strided":  # last stride 2
        x = torch.randn(*shape, 2, generator=gen)[..., 0]
    else:
        raise ValueError(layout)
    x[..., ::5] = 0
    # .to() on a view would make it contiguous: convert the storage, then take the same view.
    return _same_view(x, dtype, device)


def _same_view(x, dtype, device):
    base = x._base if x._base is not None else x
    converted = base.to(device=device, dtype=dtype)
    return converted.as_strided(x.shape, x.stride(), x.storage_offset())


def make_params(D, dtype, device, bias=True, weight_layout="contiguous", seed=1):
    gen = torch.Generator().manual_seed(seed)
    bound = D ** -0.5
    if weight_layout == "contiguous":
        w = torch.empty(D, D).uniform_(-bound, bound, generator=gen)
    elif weight_layout == "transposed":
        w = torch.empty(D, D).uniform_(-bound, bound, generator=gen).t()
    elif weight_layout == "sliced":
        w = torch.empty(D, 2 * D).uniform_(-bound, bound, generator=gen)[:, :D]
    else:
        raise ValueError(weight_layout)
    w = _same_view(w, dtype, device)
    b = torch.empty(D).uniform_(-bound, bound, generator=gen).to(device=device, dtype=dtype) if bias else None
    return w, b


def run(fn, x, w, b, g, dtype=None, alpha=None, proj=None, act="relu"):
    """Forward and backward of ``fn``; returns (y, dx, dW, db, dalpha, dP), None for what is not
    there, with the inputs cast to ``dtype``."""
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
    leaves = [cast(t).requires_grad_() if t is not None else None for t in (x, w, b, alpha, proj)]
    xx, ww, bb, aa, pp = leaves
    kwargs = {} if act == "relu" else {"act": act}
    if aa is not None:
        kwargs["alpha"] = aa
    if pp is not None:
        kwargs["proj_weight"] = pp
    y = fn(xx, ww, bb, **kwargs)
    y.backward(cast(g))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def check_parity(x, w, b, g=None, *, alpha=None, proj=None, names=NAMES, act="relu"):
    """Run fused, eager and fp64 on the same rounded inputs and assert the parity rule for every
    output and gradient. Returns the fused results (y, dx, dW, db, dalpha, dP)."""
    if g is None:
        g = torch.randn((*x.shape[:-1], w.shape[0]), generator=torch.Generator().manual_seed(7)).to(x.device, x.dtype)
    fused = run(fused_residual, x, w, b, g, alpha=alpha, proj=proj, act=act)
    eager = run(residual_reference, x, w, b, g, alpha=alpha, proj=proj, act=act)
    ref = run(residual_reference, x, w, b, g, dtype=torch.float64, alpha=alpha, proj=proj, act=act)
    absolute = [t.abs() if t is not None else None for t in (x, w, b, g, alpha, proj)]
    scale = run(residual_reference, *absolute[:4], dtype=torch.float64, alpha=absolute[4], proj=absolute[5], act=act)
    for name, f, e, r, sc in zip(names, fused, eager, ref, scale):
        if r is None:
            assert f is None and e is None, name
            continue
        assert f.shape == e.shape and f.dtype == e.dtype, (name, f.shape, e.shape, f.dtype, e.dtype)
        p = parity(f, e, r, sc)
        assert p.ok, f"{name} [{x.dtype}, x {list(x.shape)} strides {x.stride()}]: {p}"
    return fused


MLP_NAMES = ("y", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias", "dalpha")


def mlp_params(D, H, device, bias=True, seed=3):
    """fc1_weight [H, D], fc1_bias [H], fc2_weight [D, H], fc2_bias [D] (biases None without ``bias``)."""
    gen = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(H, D, generator=gen) / D ** 0.5).to(device)
    w2 = (torch.randn(D, H, generator=gen) / H ** 0.5).to(device)
    b1 = (torch.randn(H, generator=gen) * 0.1).to(device) if bias else None
    b2 = (torch.randn(D, generator=gen) * 0.1).to(device) if bias else None
    return w1, b1, w2, b2


def run_mlp(fn, x, w1, b1, w2, b2, g, alpha, s, dtype, **kwargs):
    cast = lambda t: None if t is None else t.detach().to(dtype)   # noqa: E731
    leaves = [cast(t).requires_grad_() if t is not None else None for t in (x, w1, b1, w2, b2)]
    a = cast(alpha).requires_grad_() if isinstance(alpha, torch.Tensor) else alpha
    y = fn(*leaves, alpha=a, sample_scale=cast(s), **kwargs)
    y.backward(cast(g))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves] + \
        [a.grad if isinstance(a, torch.Tensor) else None]


def check_mlp_parity(x, w1, b1, w2, b2, *, alpha=1.0, s=None, **kwargs):
    """Fused, eager in the same dtype, fp64 on the same rounded inputs, and the absolute-value
    computation for the floor: the parity rule for y and every gradient. Returns the fused results."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x.device, x.dtype)
    acts = {k: kwargs[k] for k in ("pre_act", "act") if k in kwargs}     # the block's definition: every run
    fused = run_mlp(fused_residual_mlp, x, w1, b1, w2, b2, g, alpha, s, x.dtype, **kwargs)
    eager = run_mlp(residual_mlp_reference, x, w1, b1, w2, b2, g, alpha, s, x.dtype, **acts)
    ref = run_mlp(residual_mlp_reference, x, w1, b1, w2, b2, g, alpha, s, torch.float64, **acts)
    absolute = [t.abs() if isinstance(t, torch.Tensor) else t for t in (x, w1, b1, w2, b2, g, alpha, s)]
    scale = run_mlp(residual_mlp_reference, *absolute[:6], absolute[6], absolute[7], torch.float64, **acts)
    for name, f, e, r, sc in zip(MLP_NAMES, fused, eager, ref, scale):
        if r is None:
            assert f is None and e is None, name
            continue
        assert f.shape == e.shape and f.dtype == e.dtype, (name, f.shape, e.shape, f.dtype, e.dtype)
        p = parity(f, e, r, sc)
        assert p.ok, f"{name} [{x.dtype}, x {list(x.shape)} strides {x.stride()}, H {w1.shape[0]}]: {p}"
    return fused


def fixed_tiles(bm: int, bn: int, bk: int):
    """A ``configs.config_override`` chooser: one ``bm x bn x bk`` config (4 warps, 1 stage) for
    every single-block kernel kind (fwd: M x N x K; dx: M x K x N; dW: M x K x N), None for others."""
    names = {"fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), "dx": ("BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M"),
             "dw": ("BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_K")}

    def choose(kind, named_args):
        if kind not in names:
            return None
        a, b, c, g = names[kind]
        return triton.Config({a: bm, b: bn, c: bk, g: 8}, num_warps=4, num_stages=1)
    return choose


@contextlib.contextmanager
def small_tiles(block: int = 16, group: int = 2):
    """Every single-block launch in the block takes ``block``-wide tiles in every dimension and
    grouped order ``group``, compiled on a GPU as in the interpreter (no autotuning): several
    K-loop trips and tiles per dimension at test sizes. Yields the ``(kind, config)`` launched.
    (16x16x16 at 4 warps, 2 stages compiles for sm_80 and sm_90, with mma.sync on both.)"""
    used = []

    def choose(kind, named_args):
        tiles = {name: block for name in configs._TILE_NAMES[kind]}
        config = triton.Config({**tiles, configs.GROUP_NAME[kind]: group}, num_warps=4, num_stages=2)
        used.append((kind, config))
        return config

    with configs.config_override(choose):
        yield used
