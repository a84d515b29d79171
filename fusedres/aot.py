"""The compile gate: ``python -m fusedres.aot``. GPU readiness without a GPU.

Every kernel (fwd, dx, dW) is compiled ahead of time for real NVIDIA targets (sm_80 and sm_90 by
default, sm_100 on request) in every autotune config it ships for the dtype (the list the
autotuner's own ``early_config_prune`` keeps, which is
:func:`fusedres.kernels.configs.shipped_configs`), for fp16, bf16, fp32 in torch's default
matmul precision ('highest': IEEE, CUDA-core FMA) and fp32 as tf32 (precision 'high').

Nothing about the signature is written by hand. An example launch builds CPU tensors shaped like
a large real launch (M=8192, D=1024, contiguous, bias, dW with db); the launchers' own argument
builders (``fwd_launch_args``, ``dx_launch_args``, ``dw_launch_args``) turn them into ``(args,
consts)``; the autotuner's config kwargs are added as ``Autotuner.run`` adds them; and the JIT
function's own binder (``create_function_from_signature``, i.e. ``specialize_impl``) and
``_pack_args`` produce the signature, the constexprs (strides equal to 1 included) and the
16-byte ``tt.divisibility`` attributes, exactly as ``JITFunction.run`` does before it compiles.
Then ``triton.compile`` runs the whole pipeline to a cubin for ``GPUTarget("cuda", cc, 32)``.

Per compile it reads:

- registers per thread: the bundled ``cuobjdump --dump-resource-usage`` on the cubin;
- spills and advisories: the ``ptxas -v`` log of that very compile (``TRITON_DUMP_PTXAS_LOG``;
  ptxas prints the wgmma-serialisation advisory C7515 as an ``info`` line, not a warning);
- shared memory: ``metadata.shared`` against the arch's opt-in per-block limit;
- the tensor-core instruction in the PTX: ``mma.sync`` (sm_80), ``wgmma.mma_async`` (sm_90),
  ``tcgen05.mma`` (sm_100).

A record fails, and the exit status is 1, if the compile fails, anything spills, shared memory
exceeds the limit, the expected tensor-core instruction is missing (IEEE fp32 runs on CUDA cores
and expects none; fp64 expects ``mma.sync``), or ptxas reports wgmma serialisation (C751x).

It must run without ``TRITON_INTERPRET``: the interpreter replaces the JIT functions and patches
``triton.language``. ``python -m fusedres.aot`` re-executes itself without it;
:func:`compile_config` and :func:`run_gate` refuse to run in an interpreted process.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import pprint
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
import dataclasses
from dataclasses import dataclass

import torch
import triton

from . import kernels
from ._layout import plan_rows
from .kernels import configs as _configs
from .kernels import device as _device
from .kernels import plan as _plan
from .kernels.residual_bwd import (
    dw_launch_args,
    dw_reduce_launch_args,
    dw_split_workspaces,
    dx_launch_args,
    residual_dw_reduce_kernel,
)
from .kernels.launch import pass_arguments
from .kernels.residual_fwd import fwd_launch_args
from .kernels import residual_stack as _stack
from .kernels import activations as _act_kernels
from .kernels.recipe import MLPRecipe, PassRecipe, Recipe
from .tuning import TUNED_KERNELS

# Triton 3.9 warns once per process that its fp-fusion default will change; the gate compiles
# the default a launch gets today (``enable_fp_fusion`` is in each record).
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

# ---------------------------------------------------------------------------------------------
# What is compiled


@dataclass(frozen=True)
class Arch:
    name: str
    cc: int
    #: opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes
    shared_limit: int
    #: the tensor-core MMA instruction Triton emits for this target, and a PTX regex for it
    tensor_core: str
    tensor_core_re: str


_MMA_SYNC, _WGMMA, _TCGEN05 = (("mma.sync", r"\bmma\.sync\.aligned\."), ("wgmma.mma_async", r"\bwgmma\.mma_async\."),
                                ("tcgen05.mma", r"\btcgen05\.mma\."))
ARCHS = {
    # A100, A30 (8.0): 163 KB per block opt-in
    "sm_80": Arch("sm_80", 80, _device.SHARED_PER_BLOCK[(8, 0)], *_MMA_SYNC),
    # RTX 30 series, A10, A40 (8.6): 99 KB
    "sm_86": Arch("sm_86", 86, _device.SHARED_PER_BLOCK[(8, 6)], *_MMA_SYNC),
    # RTX 40 series, L4, L40S (8.9): 99 KB
    "sm_89": Arch("sm_89", 89, _device.SHARED_PER_BLOCK[(8, 9)], *_MMA_SYNC),
    # H100, H200 (9.0): 227 KB
    "sm_90": Arch("sm_90", 90, _device.SHARED_PER_BLOCK[(9, 0)], *_WGMMA),
    # RTX 50 series, RTX PRO Blackwell (12.0): 99 KB, and mma.sync (no wgmma, no tcgen05)
    "sm_120": Arch("sm_120", 120, _device.SHARED_PER_BLOCK[(12, 0)], *_MMA_SYNC),
    # B200 (10.0): 227 KB, as on Hopper. Opt-in: --archs ...,sm_100 (see the README's support matrix)
    "sm_100": Arch("sm_100", 100, _device.SHARED_PER_BLOCK[(10, 0)], *_TCGEN05),
}
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_120")
#: Registers per block on every supported arch: a config's registers per thread times its threads
#: must fit, or the launch fails ("too many resources requested").
REGISTERS_PER_BLOCK = 65536


def arch_limits(arch: str) -> _device.DeviceLimits:
    """The limits every config shipped for ``arch`` is chosen under (:func:`_device.simulated_device`)."""
    a = ARCHS[arch]
    return _device.DeviceLimits(arch, (a.cc // 10, a.cc % 10), a.shared_limit, 132, REGISTERS_PER_BLOCK)

#: dtype variants: name -> (torch dtype, float32 matmul precision set around the launch, or None
#: for this process's, which is torch's default 'highest' -> IEEE)
DTYPES = {
    "fp16": (torch.float16, None),
    "bf16": (torch.bfloat16, None),
    "fp32": (torch.float32, None),      # what a default user gets: IEEE, CUDA-core FMA
    "tf32": (torch.float32, "tf32"),    # fp32 with tf32 allowed (either of torch's precision switches)
    "fp64": (torch.float64, None),      # opt-in
    # torch.autocast: fp32 activations (x, y, g, dx) meet 16-bit weights (and dW, db, dP)
    "autocast-bf16": (torch.bfloat16, None),
    "autocast-fp16": (torch.float16, None),
}
#: the activations' dtype where it is not the weights' (DTYPES gives the weights')
ACTIVATIONS = {"autocast-bf16": torch.float32, "autocast-fp16": torch.float32}
DEFAULT_DTYPES = ("fp16", "bf16", "fp32", "tf32", "autocast-bf16", "autocast-fp16")
KINDS = ("fwd", "dx", "dw")
#: The narrow stack's kernels (``fusedres.kernels.residual_stack``): one config per width and
#: arch, compiled at every width of ``STACK_WIDTHS`` in each of its variants.
STACK_KINDS = ("stack_fwd", "stack_bwd", "stack_reduce")
ALL_KINDS = KINDS + STACK_KINDS + ("norm_row_stats", "norm_col_stats", "norm_dx")
STACK_VARIANTS = {"stack_fwd": ("train", "inference"), "stack_bwd": ("deterministic", "atomic"),
                  "stack_reduce": ("base",)}
STACK_WIDTHS = _stack.STACK_WIDTHS
#: The stack's example launch: 2**16 rows, 8 layers, bias.
STACK_EXAMPLE_M, STACK_EXAMPLE_L = 65536, 8

#: The autotuned kernels a launch goes through; walking ``.fn`` (Autotuner, Heuristics) reaches
#: the JITFunction that a GPU launch compiles.
TUNED = TUNED_KERNELS

#: The example launch: M and D multiples of 16 (so they specialise as 16-divisible, as large
#: launches do), contiguous operands (one-level rows), or with ``two_level`` a
#: ``[B, T, D].transpose(0, 1)`` view; bias, and dW with db.
EXAMPLE_M, EXAMPLE_D, EXAMPLE_B = 8192, 1024, 8

#: Kernel variants the example launch takes: ``base`` (bias; dW with db) and ``alpha+proj`` (the
#: residual scale with its dalpha partials, and a projection shortcut widening D to 2D: the second
#: K loop in the forward and dx, dP tiles in dW). Every constexpr branch a user can reach is in one
#: of them. ``alpha-value``: a Python-float alpha, passed by value (a tensor alpha is a pointer).
#: ``drop-path``: stochastic depth's per-sample row scale (``s_ptr``) with a tensor alpha, 1024
#: rows per sample. ``mlp``: the MLP block's passes that no single block makes: the forward and dx
#: kernels without a residual (``r_ptr`` None: its first GEMM, ``N = 4D``, and its ``dh``,
#: ``K = 4D``, masked by the hidden tensor), and dW2 (``g [M, D]`` against the hidden
#: ``[M, 4D]``), each with the row scale and a tensor alpha.
#: ``layerscale``: a per-channel tensor alpha ``[N]`` (timm's LayerScale) with its dalpha partials and
#: the row scale (LayerScale and DropPath sit together on a ViT branch): the per-channel epilogues
#: and, in dx, the alpha prologue on g.
#:
#: A variant may name the activation after an ``@`` (``"alpha+proj@gelu"``, a key of
#: :data:`fusedres.kernels.activations.KERNELS`); without one it is relu, the default block's.
#: ``no-bias``: no bias anywhere (the forward's epilogue without it, dW without db and without the
#: column sum of g) and a learnable tensor alpha (dalpha without its bias term).
FEATURES = ("base", "alpha+proj", "alpha-value", "drop-path", "mlp", "layerscale", "no-bias")
#: Each variant is a block's recipe (``fusedres.kernels.recipe``): its example launch of each
#: kernel is one of the recipe's passes (``mlp``: the MLP block's passes no single block makes),
#: with the activation of its ``@`` suffix (``tests/test_recipe.py`` checks every pair).
FEATURE_RECIPES = {
    "base": Recipe(),
    "alpha+proj": Recipe(alpha="scalar", learnable_alpha=True, proj=True),
    "alpha-value": Recipe(alpha="value"),
    "drop-path": Recipe(alpha="scalar", learnable_alpha=True, row_scale=True),
    "mlp": MLPRecipe(alpha="scalar", learnable_alpha=True, row_scale=True),
    "layerscale": Recipe(alpha="channel", learnable_alpha=True, row_scale=True),
    "no-bias": Recipe(alpha="scalar", learnable_alpha=True, bias=False),
    # the normalizations (issue 22), each with its heaviest company: BatchNorm in training with a
    # learnable alpha (dx's column sums: dgamma, dbeta, the batch correction); LayerNorm with
    # LayerScale and DropPath (dx's row and column sums); RMSNorm with a float alpha
    "norm-batch": Recipe(alpha="scalar", learnable_alpha=True, norm="batch"),
    "norm-layer": Recipe(alpha="channel", learnable_alpha=True, row_scale=True, norm="layer"),
    "norm-rms": Recipe(alpha="value", norm="rms", norm_bias=False),
    # the MLP block's hidden norm: fc1's epilogue emits its statistics partials (per column for
    # BatchNorm, per row for LayerNorm), fc2's passes normalize h (dh's sinks, dW2's prologue)
    "norm-hidden-batch": MLPRecipe(alpha="scalar", learnable_alpha=True, row_scale=True, norm="layer",
                                   hidden_norm="batch"),
    "norm-hidden-layer": MLPRecipe(alpha="scalar", learnable_alpha=True, row_scale=True, norm="batch",
                                   hidden_norm="layer"),
}
#: The normalization variants: compiled when asked for (``--features norm-batch,norm-layer,norm-rms``),
#: each with the norm's own kernels (:data:`NORM_KINDS`) beside the GEMMs.
NORM_FEATURES = ("norm-batch", "norm-layer", "norm-rms", "norm-hidden-batch", "norm-hidden-layer")
# dropout (issue 23): the keep mask regenerated in every pass, each with its heaviest company:
# the single block with DropPath and a learnable alpha; with LayerNorm and LayerScale (dx's sinks
# beside the mask on g); the MLP block's fc2 passes with both dropouts and the hidden BatchNorm
FEATURE_RECIPES.update({
    "dropout": Recipe(alpha="scalar", learnable_alpha=True, row_scale=True, dropout=True),
    "dropout-norm": Recipe(alpha="channel", learnable_alpha=True, row_scale=True, norm="layer", dropout=True),
    "dropout-mlp": MLPRecipe(alpha="scalar", learnable_alpha=True, row_scale=True, norm="layer", hidden_norm="batch",
                             dropout=True, hidden_dropout=True),
})
#: The dropout variants, compiled when asked for (``--features dropout,dropout-norm,dropout-mlp``).
#: ``dropout-mlp``'s forward is fc2's (the one with the masks), not fc1's.
DROPOUT_FEATURES = ("dropout", "dropout-norm", "dropout-mlp")
# chains (issue 22): a block's forward epilogue emits the next block's norm statistics partials of
# its output y (``fusedres.chain``), beside the residual add: per column for a BatchNorm next, per
# row for a LayerNorm or RMSNorm next. Each on the heaviest forward of its block: the single block
# with BatchNorm and dropout (rtdl's), with LayerNorm, LayerScale, DropPath and dropout (timm's);
# the MLP block's fc2 with the hidden BatchNorm and both dropouts
#: chain variant -> (the variant whose forward it extends, the next block's norm). Forward only:
#: the sink is the forward's; the other passes are their base variant's.
CHAIN_FEATURES = {"chain-batch": ("dropout-norm-batch", "batch"), "chain-layer": ("dropout-norm", "layer"),
                  "chain-mlp-batch": ("dropout-mlp", "batch"), "chain-mlp-layer": ("dropout-mlp", "layer")}
FEATURE_RECIPES["dropout-norm-batch"] = Recipe(alpha="scalar", learnable_alpha=True, norm="batch", dropout=True)
FEATURE_RECIPES.update({name: dataclasses.replace(FEATURE_RECIPES[base], next_norm=kind)
                        for name, (base, kind) in CHAIN_FEATURES.items()})
#: The variants the gate compiles only on request, each as its own group of the covering set.
ON_REQUEST_FEATURES = NORM_FEATURES + DROPOUT_FEATURES + tuple(CHAIN_FEATURES)


def feature_kinds(features: str) -> tuple[str, ...]:
    """The kernels a variant has passes of (a chain variant: the forward only)."""
    return ("fwd",) if split_features(features)[0] in CHAIN_FEATURES else KINDS
#: The normalization's own small kernels (``fusedres.kernels.norm``), one config each
#: (``NORM_CONFIGS``), compiled with the norm variants that launch them.
NORM_KINDS = ("norm_row_stats", "norm_col_stats", "norm_dx")
_NORM_KIND_FEATURES = {"norm_row_stats": ("norm-layer", "norm-rms"), "norm_col_stats": ("norm-batch",),
                       "norm_dx": ("norm-batch", "norm-layer", "norm-rms")}
#: The activations besides relu, and ``identity`` (no activation: the MLP block's ``pre_act=None``),
#: as :func:`gate_jobs`'s ``acts`` and ``--acts`` take them.
GATE_ACTS = tuple(a for a in _act_kernels.KERNELS if a != "relu") + ("identity",)
#: Each row's own parameter as the public API's default gives it (leaky_relu's slope).
_ACT_PARAMS = {"leaky_relu": 0.01}
#: dW only: the split-M variant (``part_ptr``: fp32 partial slabs, no epilogue) of the dW kernel, in
#: every shipped dW config, plus its reduce kernel (``dw_reduce``, :data:`fusedres.kernels.plan.REDUCE_CONFIGS`):
#: ``split`` (bias: db partials) and ``split+alpha+proj`` (dP's slab rows; the reduce with a tensor
#: alpha, dalpha partials and dP). The CLI compiles them by default; fwd and dx skip them.
SPLIT_FEATURES = ("split", "split+alpha+proj", "split+drop-path", "split+layerscale")
#: The recipe each split variant splits (its dW pass, with partial slabs).
_SPLIT_BASE = {"split": "base", "split+alpha+proj": "alpha+proj", "split+drop-path": "drop-path",
               "split+layerscale": "layerscale"}
#: The CLI's default variants: all of them.
DEFAULT_FEATURES = FEATURES + SPLIT_FEATURES
#: The reduce kernel, compiled with each split variant of dW (not a ``--kernels`` choice of its own).
REDUCE_KIND = "dw_reduce"
#: The example split: S slabs, with a ragged tile count per split (not 1, not a multiple of 16).
EXAMPLE_SPLITS, EXAMPLE_TILES_PER_SPLIT = 4, 5

#: ptxas advisories that fail the gate: wgmma serialised (C7515 and its siblings, e.g. C7511 when
#: too few registers are left for the wgmma pipeline), by code or by text.
_FATAL_ADVISORY = re.compile(r"\bC751\d\b|serializ", re.IGNORECASE)
#: ``ptxas -v`` lines that are statistics, not advisories
_ROUTINE = re.compile(r"^(Compiling entry function|Function properties for|Used \d+ registers|Compile time"
                      r"|\d+ bytes gmem)")
_TC_RES = {a.tensor_core: a.tensor_core_re for a in ARCHS.values()}


def _require_compiler() -> None:
    if kernels.INTERPRET or os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "fusedres.aot compiles for real GPU targets and cannot run in a process with TRITON_INTERPRET=1 "
            "(the interpreter replaces the JIT functions and patches triton.language). Run "
            "`python -m fusedres.aot` (it re-executes itself without TRITON_INTERPRET), or call this from a "
            "subprocess whose environment lacks TRITON_INTERPRET.")


def _matmul_precision(precision: str | None):
    """The fp32 matmul precision of a dtype variant (None: the process's, IEEE by default)."""
    return _configs.fp32_matmul_precision_set(precision)


def expected_tensor_core(arch: str, dtype: str) -> str | None:
    """The tensor-core instruction a compile must contain: the arch's own for fp16, bf16 and
    tf32; ``mma.sync`` (DMMA) for fp64, which has no wgmma form; none for IEEE fp32, which
    tensor cores cannot compute."""
    tdtype, precision = DTYPES[dtype]
    if tdtype == torch.float64:
        return "mma.sync"
    if tdtype == torch.float32:
        with _matmul_precision(precision):
            if _configs.gemm_flags(tdtype)["INPUT_PRECISION"] == "ieee":
                return None
    return ARCHS[arch].tensor_core


def _jit_fn(kernel):
    fn = _configs.jit_function(kernel)
    if fn is None:
        raise RuntimeError(f"fusedres.aot: {kernel!r} is not a JIT function (an interpreted process?)")
    return fn


# ---------------------------------------------------------------------------------------------
# The example launch and the configs


def gate_recipe(features: str):
    """The recipe a gate variant (``"layerscale@gelu"``: a variant of :data:`FEATURE_RECIPES`, a
    split variant's base, with the activation of its ``@`` suffix, both of an MLP block's) names."""
    features, act_name = split_features(features)
    if features not in FEATURES + SPLIT_FEATURES + ON_REQUEST_FEATURES:
        raise ValueError(f"unknown features {features!r}; one of {FEATURES + SPLIT_FEATURES + ON_REQUEST_FEATURES}")
    recipe = FEATURE_RECIPES[_SPLIT_BASE.get(features, features)]
    act = dict(act=None if act_name == "identity" else act_name, act_param=_ACT_PARAMS.get(act_name, 0.0))
    if isinstance(recipe, MLPRecipe):
        return dataclasses.replace(recipe, pre_act=act["act"], pre_act_param=act["act_param"], **act)
    return dataclasses.replace(recipe, **act)


def gate_pass(recipe, kind: str) -> tuple[PassRecipe, int]:
    """The pass of ``recipe`` the gate compiles for ``kind`` (``fwd``, ``dx``, ``dw``), with its
    index in ``recipe.passes()``: the single block's three; the MLP block's dh and dW2 (fc2's
    backward, the passes no single block makes) and its forward with the most pieces: fc2 when it
    carries a keep mask or the next norm's statistics sink, else fc1 (its own pieces: no residual,
    the hidden norm's statistics sink)."""
    passes = recipe.passes()
    if isinstance(recipe, MLPRecipe):
        fc2 = recipe.dropout or recipe.hidden_dropout or recipe.next_norm is not None
        index = {"fwd": 1 if fc2 else 0, "dx": 2, "dw": 3}[kind]
    else:
        index = {"fwd": 0, "dx": 1, "dw": 2}[kind]
    return passes[index], index


def example_launch(kind: str, dtype: str, two_level: bool = False, M: int = EXAMPLE_M, D: int = EXAMPLE_D,
                   features: str = "base"):
    """``(args, consts)`` of a real launch of ``kind``, made by the launcher's own code from CPU
    tensors: ``plan_rows`` (as ``fusedres.op`` calls it), then ``*_launch_args``, with the operands
    the variant's recipe gives the pass (:func:`gate_recipe`, :func:`gate_pass`): each piece of the
    pass is an operand, every other operand None. ``M`` rows of width ``D`` (the MLP block's hidden
    width ``4 D``; a projection's output ``2 D``)."""
    tdtype, precision = DTYPES[dtype]
    act_dtype = ACTIVATIONS.get(dtype, tdtype)     # x, y, g, dx (and a module's alpha, a norm's affine)
    acc_t = torch.float64 if tdtype == torch.float64 else torch.float32
    recipe = gate_recipe(features)
    base = split_features(features)[0]
    split = base in SPLIT_FEATURES
    if split and kind not in ("dw", REDUCE_KIND):
        raise ValueError(f"{kind}: the split variants are dW's and its reduce's only")
    if kind in NORM_KINDS:
        return _norm_kind_launch(kind, recipe, dtype, two_level, M, D)
    if kind not in KINDS + (REDUCE_KIND,):
        raise ValueError(f"unknown kernel {kind!r}; one of {KINDS + NORM_KINDS}")
    if kind not in feature_kinds(base) + ((REDUCE_KIND,) if split else ()):
        raise ValueError(f"{kind}: the {base} variant has the forward only")
    p, index = gate_pass(recipe, "dw" if kind == REDUCE_KIND else kind)
    has = p.pieces.__contains__
    mlp = isinstance(recipe, MLPRecipe)
    H = 4 * D
    # the GEMM's widths: A operand (reduction of the forward), output; the MLP's fc1 writes h,
    # fc2 and its backward read h (in the GEMM dtype)
    K, N = {0: (D, H), 1: (H, D), 2: (H, D), 3: (H, D)}[index] if mlp else (D, 2 * D if has("proj") else D)
    a_is_h = mlp and index > 0

    def act(width, gemm_dtype=False):
        if two_level:   # [T, B, D] view of a [B, T, D] tensor: its rows need two strides
            t = torch.empty(EXAMPLE_B, M // EXAMPLE_B, width, dtype=act_dtype).transpose(0, 1)
        else:
            t = torch.empty(M, width, dtype=act_dtype)
        return t.to(tdtype) if gemm_dtype else t

    def vec(n, dtype=act_dtype):
        return torch.empty(n, dtype=dtype)

    w = torch.empty(N, K, dtype=tdtype)
    alpha = {None: None, "value": 0.5, "scalar": torch.empty((), dtype=act_dtype), "channel": vec(N)}[p.alpha]
    proj = torch.empty(N, K, dtype=tdtype)
    norm = kernels.NO_NORM
    if p.norm is not None:
        # the statistics in fp32, the affine in the activations' dtype (a module's parameters)
        stats = vec(K if p.norm == "batch" else M, torch.float32)
        norm = kernels.norm_operands(p.norm, None if p.norm == "rms" else stats, stats, vec(K), vec(K))
    # Every operand a call could give; the pass takes those it names (kernels.launch.pass_arguments,
    # as the ops' launches do). Dropout: one int64 seed and [p, 1 / (1 - p)] in the accumulator
    # dtype per site (fusedres.dropout).
    operands = dict(bias=vec(N, tdtype), alpha=alpha, sample_scale=vec(EXAMPLE_B), rows_per_sample=M // EXAMPLE_B,
                    norm=norm, dropout=(torch.empty(1, dtype=torch.int64), vec(2, acc_t)),
                    dropout_a=(torch.empty(1, dtype=torch.int64), vec(2, acc_t)))
    with _matmul_precision(precision):
        if kind == "fwd":
            x = act(K, gemm_dtype=a_is_h)
            r = act(N) if a_is_h else None         # fc2's residual: x, beside h
            rows, strides, kt = plan_rows(x, *([r] if r is not None else []))
            y = torch.empty(rows.M, N, dtype=tdtype if mlp and index == 0 else act_dtype)
            sinks = (vec(M // 16 * 2 * N, torch.float32), vec(N // 16 * 2 * M, torch.float32))
            args, keywords = pass_arguments(p, rows, kt[0], strides[0], w, y, proj_weight=proj,
                                            residual=(kt[1], strides[1]) if r is not None else None,
                                            stats_partials=sinks, **operands)
            args, consts, _ = fwd_launch_args(*args, **keywords)
        elif kind == "dx":
            g, x = act(N), act(K, gemm_dtype=a_is_h)
            rows, (gs, xs), (gk, xk) = plan_rows(g, x)
            dx = torch.empty(rows.M, K, dtype=tdtype if a_is_h else act_dtype)
            sums = (vec(rows.M // 16 * 2 * K, torch.float32), vec(K // 16 * 2 * rows.M, torch.float32))
            args, keywords = pass_arguments(p, rows, xk, xs, w, dx, g=gk, gs=gs, proj_weight=proj, norm_sums=sums,
                                            **operands)
            args, consts, _ = dx_launch_args(*args, **keywords)
        else:
            g, x = act(N), act(K, gemm_dtype=a_is_h)
            rows, (gs, xs), (gk, xk) = plan_rows(g, x)
            dw, db = torch.empty(N, K, dtype=tdtype), vec(N, tdtype)
            partials = vec(kernels.dalpha_workspace_size(N, K, has("proj"), p.alpha == "channel"), torch.float32)
            slabs = dw_split_workspaces(dw, EXAMPLE_SPLITS, proj=has("proj"), sum_g=True) if split else None
            args, keywords = pass_arguments(p, rows, xk, xs, w, dw, g=gk, gs=gs, db=db, dalpha_partials=partials,
                                            dp=torch.empty(N, K, dtype=tdtype), **operands)
            if kind == REDUCE_KIND:     # (the reduce's epilogue operands: the dW pass's)
                taken_db = args[5]      # (residual_dw(g, gs, x, xs, dw, db, rows))
                args, consts, _ = dw_reduce_launch_args(*slabs, EXAMPLE_SPLITS, dw, taken_db, weight=w,
                                                        bias=keywords["bias"], alpha=keywords["alpha"],
                                                        dalpha_partials=keywords["dalpha_partials"], dp=keywords["dp"])
            else:
                args, consts, _ = dw_launch_args(*args, **keywords, split=(*slabs, EXAMPLE_SPLITS,
                                                                           EXAMPLE_TILES_PER_SPLIT) if split else None)
    if rows.two_level != two_level:
        raise AssertionError(f"the example launch has two_level={rows.two_level}, asked for {two_level}")
    return args, consts


def _norm_kind_launch(kind: str, recipe, dtype: str, two_level: bool, M: int, D: int):
    """The example launch of a norm kernel (:data:`NORM_KINDS`) for a single-block norm recipe."""
    if not isinstance(recipe, Recipe) or recipe.norm is None:
        raise ValueError(f"{kind}: the norm kernels are the single block's norm variants'")
    tdtype, precision = DTYPES[dtype]
    act_dtype = ACTIVATIONS.get(dtype, tdtype)
    x = (torch.empty(EXAMPLE_B, M // EXAMPLE_B, D, dtype=act_dtype).transpose(0, 1) if two_level
         else torch.empty(M, D, dtype=act_dtype))
    stats = torch.empty(D if recipe.norm == "batch" else M, dtype=torch.float32)
    norm = kernels.norm_operands(recipe.norm, None if recipe.norm == "rms" else stats, stats,
                                 torch.empty(D, dtype=act_dtype) if recipe.norm_weight else None,
                                 torch.empty(D, dtype=act_dtype) if recipe.norm_bias and recipe.norm != "rms" else None)
    with _matmul_precision(precision):
        rows, (xs,), (xk,) = plan_rows(x)
        args, consts, _ = norm_example_launch(kind, xk, xs, rows, norm)
    if rows.two_level != two_level:
        raise AssertionError(f"the example launch has two_level={rows.two_level}, asked for {two_level}")
    return args, consts


def norm_example_launch(kind: str, x, xs, rows, norm: tuple):
    """``(args, consts, grid)`` of the norm kernel ``kind`` on ``x``, by its launcher's builder."""
    from .kernels import norm as _norm
    row_mean, row_rstd, col_mean, col_rstd, weight, _ = norm
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if kind == "norm_row_stats":
        return _norm.row_stats_launch_args(x, xs, rows, row_mean, row_rstd)
    if kind == "norm_col_stats":
        S, _ = _norm.col_splits(rows.M, x.shape[-1])
        return _norm.col_stats_launch_args(x, xs, rows, torch.empty(S, x.shape[-1], dtype=acc),
                                           torch.empty(S, x.shape[-1], dtype=acc))
    stats = row_rstd if row_rstd is not None else col_rstd
    return _norm.norm_dx_launch_args(torch.empty(rows.M, x.shape[-1], dtype=x.dtype), torch.empty_like(x), xs, x, xs,
                                     rows, norm, None if row_mean is None and col_mean is None else stats, stats)


def split_features(features: str) -> tuple[str, str]:
    """``"alpha+proj@gelu"`` -> ``("alpha+proj", "gelu")``; no ``@``: relu."""
    base, _, act = features.partition("@")
    act = act or "relu"
    if act not in _act_kernels.KERNELS and act != "identity":
        raise ValueError(f"unknown activation {act!r} in {features!r}; one of {tuple(_act_kernels.KERNELS)}")
    return base, act


def stack_example_launch(kind: str, dtype: str, width: int, variant: str, misaligned: bool = False):
    """``(args, consts)`` of a stack launch at ``width``, from the stack launchers' own argument
    builders: contiguous operands as ``fusedres`` hands them over, bias, M = 2**16, L = 8.
    ``variant``: ``train``/``inference`` (forward), ``deterministic``/``atomic`` (backward).
    ``misaligned`` (to test the gate) offsets the activations by one element, as a launch
    without the wrapper's alignment guarantee would see them."""
    if variant not in STACK_VARIANTS[kind]:
        raise ValueError(f"{kind}: unknown variant {variant!r}; one of {STACK_VARIANTS[kind]}")
    tdtype, precision = DTYPES[dtype]
    act = ACTIVATIONS.get(dtype, tdtype)      # under autocast: fp32 x, saved x_l, grad and dx; 16-bit W
    M, L, D = STACK_EXAMPLE_M, STACK_EXAMPLE_L, width
    acc = torch.float64 if tdtype == torch.float64 else torch.float32
    w, b = torch.empty(L, D, D, dtype=tdtype), torch.empty(L, D, dtype=tdtype)
    x = torch.empty(M * D + 1, dtype=act)[1:].view(M, D) if misaligned else torch.empty(M, D, dtype=act)
    with _matmul_precision(precision):
        config = _configs.stack_config(kind, D, _configs.stack_operand_class(tdtype, act))
        if kind == "stack_fwd":
            saved = torch.empty(L - 1, M, D, dtype=act) if variant == "train" else None
            args, consts, _ = _stack.stack_fwd_launch_args(x, w, b, saved, torch.empty_like(x), config)
        elif kind == "stack_bwd":
            det = variant == "deterministic"
            P = 132
            ws = torch.empty((P if det else 1) * L * (D * D + D), dtype=acc)
            args, consts, _ = _stack.stack_bwd_launch_args(
                torch.empty_like(x), x, torch.empty(L - 1, M, D, dtype=act), w, torch.empty_like(x),
                torch.empty(M, D, dtype=acc), ws, chunk=3, need_dx=True, need_params=True, has_bias=True,
                deterministic=det, programs=P, config=config)
        else:
            args, consts, _ = _stack.reduce_launch_args(torch.empty(132 * L * (D * D + D), dtype=acc), w, b, 132,
                                                        config)
    return args, consts


def stack_gate_config(kind: str, width: int, arch: str, dtype: str) -> triton.Config:
    """The config a launch of the stack kernel ``kind`` at ``width`` takes on ``arch`` for ``dtype``."""
    tdtype, precision = DTYPES[dtype]
    with _matmul_precision(precision):
        return _configs.stack_config(kind, width, _configs.stack_operand_class(tdtype, ACTIVATIONS.get(dtype)),
                                     limits=arch_limits(arch))


def gate_configs(kind: str, dtype: str, two_level: bool = False, features: str = "base",
                 arch: str = "sm_90") -> list[triton.Config]:
    """The configs the autotuner keeps for ``kind``, ``dtype``, the row layout and the variant on
    ``arch``: its own ``early_config_prune`` on its own config list, with the example launch's
    arguments, as on a device with that arch's limits (checked against ``shipped_configs``)."""
    tuned = TUNED[kind]
    args, consts = example_launch(kind, dtype, two_level, features=features)
    named = dict(zip(tuned.arg_names, args))
    limits = arch_limits(arch)
    with _device.simulated_device(limits):
        kept = tuned.early_config_prune(tuned.configs, named, **consts) if tuned.early_config_prune else tuned.configs
    elem_size, operand_sizes = _configs.launch_operand_sizes(kind, {**named, **consts})
    expected = _configs.shipped_configs(kind, elem_size, two_level, operand_sizes,
                                        _configs.launch_has(kind, named, "proj"),
                                        _configs.launch_has(kind, named, "row_scale"), limits,
                                        _configs.act_name_of(consts.get("RECIPE")),
                                        _configs.launch_has(kind, named, "channel_alpha"),
                                        _configs.norm_sites(named), _configs.dropout_sites(named))
    if [id(c) for c in kept] != [id(c) for c in expected]:
        raise AssertionError(f"{kind}: the autotuner's prune and shipped_configs disagree")
    return list(kept)


def config_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_name(kind: str, config: triton.Config) -> str:
    """Output tile rows x cols x reduction step, warps, stages: ``128x128x64 w8 s3``; a stack
    kernel's tile: ``BLOCK_M=128 DW_COLS=64 w8 s2``."""
    if kind in STACK_KINDS or kind == REDUCE_KIND or kind in NORM_KINDS:
        return " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"
    rows, cols, red = (config.kwargs.get(n, "?") for n in _configs._TILE_NAMES[kind])
    return f"{rows}x{cols}x{red} w{config.num_warps} s{config.num_stages}"


def config_from_name(kind: str, name: str) -> triton.Config:
    """The inverse of :func:`config_name` (group size 8): a config to try, e.g. ``64x64x32 w4 s3``."""
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s+w(\d+)\s+s(\d+)\s*", name)
    if not m:
        raise ValueError(f"config {name!r}: expected 'ROWSxCOLSxSTEP wWARPS sSTAGES', e.g. '128x128x64 w8 s3'")
    r, c, k, w, s = map(int, m.groups())
    rows, cols, red = _configs._TILE_NAMES[kind]
    group = _configs.GROUP_NAME[kind]
    return triton.Config({rows: r, cols: c, red: k, group: _configs.GROUP}, num_warps=w, num_stages=s)


# ---------------------------------------------------------------------------------------------
# Compile one config


def _bind(fn, kind: str, config: triton.Config, dtype: str, backend, two_level: bool, features: str = "base",
          width: int | None = None, misaligned: bool = False):
    """Signature, constexprs, attrs and options, derived as ``JITFunction.run`` derives them."""
    from triton.runtime.jit import create_function_from_signature

    if kind in STACK_KINDS:
        args, consts = stack_example_launch(kind, dtype, width, features, misaligned)
    else:
        args, consts = example_launch(kind, dtype, two_level, features=features)
    # what Autotuner.run passes to the JIT function, then what JITFunction.run adds
    kwargs = _configs.jit_run_kwargs(fn, {**consts, **config.all_kwargs()})
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


@contextlib.contextmanager
def _capture_fd2():
    """Collect what C++ (MLIR, LLVM) writes to file descriptor 2 during a compile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        out = io.StringIO()
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.write(tmp.read().decode(errors="replace"))


def _resource_usage(cubin: bytes) -> dict:
    """REG, SHARED, LOCAL, STACK of the kernel from the bundled ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", out)}
    if "reg" not in usage:
        raise RuntimeError(f"cannot read the registers from cuobjdump's output:\n{out}")
    return usage


def _ptxas_log(ptx: str, cc: int, options) -> str:
    """``ptxas -v`` on the PTX with the backend's flags; used only if the compile's own log was not
    seen (a Triton that no longer prints it)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        cmd = [get_ptxas(cc).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(d, "k.o")]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def _error_chain(err: BaseException) -> str:
    """A compile error, root cause first: an error inside a jit helper (the K loop) reaches the
    kernel as a CompilationError at the call site, whose own message names only that call."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\nraised through ".join(reversed(parts))


def parse_ptxas_log(log: str) -> tuple[int, int, int, list[str]]:
    """(spill store bytes, spill load bytes, stack frame bytes, advisories) of a ``ptxas -v`` log.
    Advisories are every ``ptxas[-blackwell] <level> : ...`` line but the routine statistics."""
    stores = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", log))
    stack = sum(int(v) for v in re.findall(r"(\d+) bytes stack frame", log))
    advisories = []
    for line in log.splitlines():
        m = re.match(r"\s*ptxas(?:-blackwell)?\s+(\w+)\s*:\s*(.*\S)", line)
        if m and not _ROUTINE.search(m.group(2)):
            advisories.append(f"{m.group(1)}: {m.group(2)}")
    return stores, loads, stack, advisories


def compile_config(kind: str, config: triton.Config, dtype: str = "fp16", arch: str = "sm_90", *,
                   two_level: bool = False, features: str = "base", width: int | None = None, kernel=None,
                   keep_ir: bool = False, misaligned: bool = False) -> dict:
    """Compile ``kind`` (``"fwd"``, ``"dx"``, ``"dw"``, or a stack kernel of :data:`STACK_KINDS`
    at ``width``, with ``features`` one of its :data:`STACK_VARIANTS`) in ``config`` for
    ``dtype`` (a key of :data:`DTYPES`) and ``arch`` (a key of :data:`ARCHS`) and return its
    record. ``kernel`` replaces the shipped kernel (same signature), and ``misaligned`` shifts a
    stack launch's input off 16-byte alignment, to test the gate itself.

    Never raises for a kernel that fails to compile: the record then has ``ok=False`` and the
    error. ``keep_ir`` adds the TTIR and PTX to the record. Needs a process without
    ``TRITON_INTERPRET``."""
    _require_compiler()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    a = ARCHS[arch]
    tdtype, precision = DTYPES[dtype]
    with _matmul_precision(precision):
        input_precision = _configs.gemm_flags(tdtype)["INPUT_PRECISION"]
    rec = dict(kernel=kind, arch=arch, dtype=str(tdtype).removeprefix("torch.").replace("float", "fp")
               .replace("bfp16", "bf16"), variant=dtype,
               activations=str(ACTIVATIONS.get(dtype, tdtype)).removeprefix("torch.").replace("float", "fp")
               .replace("bfp16", "bf16"), input_precision=input_precision, two_level=two_level,
               features=features, width=width,
               config=config_dict(config), config_name=config_name(kind, config),
               registers=None, spill_bytes=None, spill_stores=None, spill_loads=None, stack_bytes=None,
               local_bytes=None, shared_bytes=None, shared_limit=a.shared_limit, tensor_core=False,
               tensor_core_instr=None,
               tensor_core_expected=(None if kind in ("stack_reduce", REDUCE_KIND, *NORM_KINDS)
                                     else expected_tensor_core(arch, dtype)),
               advisories=[],
               scalar_loads=None, vector_loads=None, atomics=None, non_relaxed_atomics=None,
               divisible_by_16=None, equal_to_1=None, enable_fp_fusion=None, compile_s=None, error=None,
               failures=[], ok=False)
    target = GPUTarget("cuda", a.cc, 32)
    backend = make_backend(target)
    fn = _jit_fn(kernel if kernel is not None else TUNED[kind] if kind in KINDS
                 else residual_dw_reduce_kernel if kind == REDUCE_KIND else _norm_kernel(kind) if kind in NORM_KINDS
                 else _STACK_KERNELS[kind])
    t0 = time.perf_counter()
    stdout = io.StringIO()
    try:
        options, signature, constexprs, attrs = _bind(fn, kind, config, dtype, backend, two_level, features, width,
                                                      misaligned)
        names = fn.arg_names
        rec.update(divisible_by_16=[names[p[0]] for p, v in attrs.items() if ["tt.divisibility", 16] in v],
                   equal_to_1=[names[p[0]] for p, v in constexprs.items()
                               if not fn.params[p[0]].is_constexpr and v == 1],
                   enable_fp_fusion=options.enable_fp_fusion)
        with contextlib.ExitStack() as stack:
            for k in (triton.knobs.nvidia, triton.knobs.compilation, triton.knobs.cache):
                stack.enter_context(k.scope())
            triton.knobs.cache.dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fusedres-aot-"))
            triton.knobs.compilation.always_compile = True     # so that ptxas runs, and logs
            triton.knobs.nvidia.dump_ptxas_log = True          # the log is print()ed on success
            stack.enter_context(contextlib.redirect_stdout(stdout))
            fd2 = stack.enter_context(_capture_fd2())
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
                err = None
            except Exception as e:  # noqa: BLE001 - every compile error is a gate failure
                err = e
        if err is not None:
            tail = fd2.getvalue().strip()
            raise RuntimeError(_error_chain(err) + (f"\n{tail[-2000:]}" if tail else ""))
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        log = stdout.getvalue()
        if "Used " not in log:
            log = _ptxas_log(compiled.asm["ptx"], a.cc, options)
        stores, loads, stack_frame, advisories = parse_ptxas_log(log)
        usage = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        found = [name for name, pat in _TC_RES.items() if re.search(pat, ptx)]
        want = rec["tensor_core_expected"]
        rec.update(registers=usage["reg"], spill_stores=stores, spill_loads=loads, spill_bytes=stores + loads,
                   stack_bytes=stack_frame, local_bytes=usage.get("local", 0), shared_bytes=compiled.metadata.shared,
                   tensor_core=want in found if want else bool(found),
                   tensor_core_instr=(want if want in found else found[0]) if found else None,
                   advisories=advisories)
        if kind in STACK_KINDS:
            rec.update(memory_instructions(ptx))
        if keep_ir:
            rec["ttir"], rec["ptx"] = compiled.asm["ttir"], ptx
    except Exception as e:  # noqa: BLE001
        rec["error"] = str(e)[:4000]
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
    rec["failures"] = failures(rec)
    rec["ok"] = not rec["failures"]
    return rec


def _norm_kernel(kind: str):
    from .kernels import norm as _norm
    return {"norm_row_stats": _norm.row_stats_kernel, "norm_col_stats": _norm.col_stats_kernel,
            "norm_dx": _norm.norm_dx_kernel}[kind]


_STACK_KERNELS = {"stack_fwd": _stack.residual_stack_fwd_kernel, "stack_bwd": _stack.residual_stack_bwd_kernel,
                  "stack_reduce": _stack.residual_stack_reduce_kernel}
_GLOBAL_LOAD = re.compile(r"^\s*(?:@%p\d+\s+)?(ld\.global\S*|cp\.async\.\w+\.shared\.global\s.*?,\s*(0x[0-9a-f]+|\d+))",
                          re.MULTILINE)
_ATOMIC = re.compile(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.\S+", re.MULTILINE)


def memory_instructions(ptx: str) -> dict:
    """The stack kernels' global loads and atomics in the PTX: ``vector_loads`` move 128 bits
    (``ld.global.v4.b32``, ``.v2.b64``, or a 16-byte ``cp.async``), ``scalar_loads`` move 16 bits
    or less (what a kernel compiled without the 16-byte alignment hints does for 2-byte
    activations), and every atomic that is not ``.relaxed``."""
    vector = scalar = 0
    for instr, cp_bytes in _GLOBAL_LOAD.findall(ptx):
        if cp_bytes:
            size = int(cp_bytes, 0) * 8
        else:
            m = re.search(r"\.v(\d)\.[a-z]*(\d+)", instr) or re.search(r"()\.[a-z]*(\d+)$", instr)
            size = int(m.group(1) or 1) * int(m.group(2))
        vector += size >= 128
        scalar += size <= 16
    atomics = [a.strip() for a in _ATOMIC.findall(ptx)]
    return dict(vector_loads=vector, scalar_loads=scalar, atomics=len(atomics),
                non_relaxed_atomics=sorted({a for a in atomics if ".relaxed" not in a}))


def failures(rec: dict) -> list[str]:
    """Why a record fails the gate (empty: it passes)."""
    if rec["error"] is not None:
        return ["compile error"]
    out = []
    if rec["spill_bytes"] or rec["local_bytes"]:
        out.append(f"spills {rec['spill_bytes']} B")
    if rec["shared_bytes"] > rec["shared_limit"]:
        out.append(f"shared memory {rec['shared_bytes']} B > {rec['shared_limit']} B")
    threads = rec.get("config", {}).get("num_warps", 0) * 32
    if (rec.get("registers") or 0) * threads > REGISTERS_PER_BLOCK:
        out.append(f"registers {rec['registers']} x {threads} threads > {REGISTERS_PER_BLOCK}")
    if rec["tensor_core_expected"] and not rec["tensor_core"]:
        out.append(f"no {rec['tensor_core_expected']}")
    out += [f"ptxas {a}" for a in rec["advisories"] if _FATAL_ADVISORY.search(a)]
    if rec.get("kernel") in STACK_KINDS:
        # Every load of a stack kernel is a whole aligned row segment: a scalar load means the
        # alignment the launcher guarantees did not reach the compiler.
        if rec["scalar_loads"]:
            out.append(f"{rec['scalar_loads']} scalar 16-bit global loads")
        if not rec["vector_loads"]:
            out.append("no 128-bit global loads")
        if rec["non_relaxed_atomics"]:
            out.append(f"non-relaxed atomics {rec['non_relaxed_atomics']}")
    return out


# ---------------------------------------------------------------------------------------------
# The gate


#: The covering set's order of variants, heaviest first (the most live registers: a projection's
#: second K loop and a tensor alpha, then the row scale, then the rest): each shipped config is
#: compiled once, in the heaviest variant that ships it.
COVER_ORDER = ("split+alpha+proj", "alpha+proj", "split+layerscale", "layerscale", "split+drop-path", "drop-path",
               "mlp", "split", "alpha-value", "base", "no-bias")
#: The stack kernels' heavier variant of each pair (the covering set compiles only these).
STACK_COVER = {"stack_fwd": ("train",), "stack_bwd": ("deterministic",), "stack_reduce": ("base",)}


def gate_jobs(kinds=ALL_KINDS, archs=DEFAULT_ARCHS, dtypes=DEFAULT_DTYPES, two_level=(False,), configs=None,
              features=FEATURES, widths=STACK_WIDTHS, cover: bool = False, acts=("relu",)):
    """Every (kind, config, dtype, arch, two_level, features, width) to compile: the autotuner's
    configs on each arch, or the ``configs`` given as names (``"64x64x32 w4 s3"``); for the stack
    kernels, the shipped config of each width in ``widths`` and each variant (``width`` is None
    for the single-block kernels).

    ``cover``: the covering set instead of the full product. Per kernel, dtype, row layout and
    arch, every config shipped there in any of ``features``, each compiled once, in the heaviest
    variant (:data:`COVER_ORDER`) that ships it; the reduce once per dtype and arch in the heaviest
    split variant; the stack's heavier variant of each kernel (:data:`STACK_COVER`).

    ``acts``: the activations (keys of :data:`fusedres.kernels.activations.KERNELS`) each
    single-block variant is compiled with (``"variant@act"``; relu's has no suffix). In the
    covering set each activation gets its own pass: every config shipped, once, in the heaviest
    variant. The reduce has no activation: once, with the first."""
    jobs = []
    for kind in kinds:
        if kind in NORM_KINDS:
            # the norm's own kernels: one config, with each norm variant asked for that launches them
            from .kernels.norm import NORM_CONFIGS
            jobs += [(kind, NORM_CONFIGS[kind], dtype, arch, tl_, feats, None)
                     for feats in features if feats in _NORM_KIND_FEATURES[kind]
                     for dtype in dtypes for tl_ in two_level for arch in archs]
            continue
        if kind in STACK_KINDS:
            if not _configs.stack_supported():      # a triton older than STACK_MIN_TRITON: its launches refuse
                continue
            # Under autocast the stack's fwd and bwd carry fp32 activations beside 16-bit weights; its
            # reduce sees only the fp32 partials and the weights' dtype, as in the 16-bit variant.
            variants = STACK_COVER[kind] if cover else STACK_VARIANTS[kind]
            jobs += [(kind, stack_gate_config(kind, width, arch, dtype), dtype, arch, False, variant, width)
                     for dtype in dtypes if not (kind == "stack_reduce" and dtype in ACTIVATIONS)
                     for width in widths for variant in variants for arch in archs]
            continue
        feats_of_kind = [f for f in features
                         if (f not in SPLIT_FEATURES or kind == "dw") and f not in ON_REQUEST_FEATURES]
        if cover:
            feats_of_kind = sorted(feats_of_kind, key=lambda f: COVER_ORDER.index(f))
        # each norm variant gets its own pass of the covering set: its prologue is in no other variant
        groups = [feats_of_kind] + [[f] for f in features if f in ON_REQUEST_FEATURES and kind in feature_kinds(f)]
        for dtype in dtypes:
            for tl_ in two_level:
                for arch in archs:
                    for act, group in ((a, g) for a in acts for g in groups if g):
                        suffix = "" if act == "relu" else "@" + act
                        done: set = set()
                        for feats in group:
                            cfgs = (gate_configs(kind, dtype, tl_, feats + suffix, arch) if configs is None
                                    else [config_from_name(kind, n) for n in configs])
                            for config in cfgs:
                                if cover and config_name(kind, config) in done:
                                    continue
                                done.add(config_name(kind, config))
                                jobs.append((kind, config, dtype, arch, tl_, feats + suffix, None))
                            if (feats in SPLIT_FEATURES and tl_ == two_level[0] and act == acts[0]
                                    and not (cover and "reduce" in done)):
                                # the reduce reads no rows: once per dtype, variant and arch
                                done.add("reduce")
                                jobs += [(REDUCE_KIND, c, dtype, arch, False, feats, None)
                                         for c in _plan.reduce_configs(DTYPES[dtype][0].itemsize, arch_limits(arch))]
    return jobs


def derive_act_drops(records: list[dict]) -> dict:
    """:data:`fusedres.kernels.configs.ACT_DROPPED` from gate records: every single-block record of
    an activation other than relu (``"variant@act"``) that failed, as activation -> arch -> kind ->
    (element size, projection) -> tiles, under the variant's own projection flag (a launch with a
    projection also drops the tiles without: :func:`fusedres.kernels.configs.act_dropped`)."""
    out: dict = {}
    for r in records:
        if r["ok"] or r["kernel"] not in KINDS or "@" not in r.get("features", ""):
            continue
        feats, act = split_features(r["features"])
        elem = DTYPES[r["variant"]][0].itemsize
        tile = _configs._tile(r["kernel"], config_from_name(r["kernel"], r["config_name"]))
        by_kind = out.setdefault(act, {}).setdefault(r["arch"], {}).setdefault(r["kernel"], {})
        by_kind.setdefault((elem, feats in ("alpha+proj", "split+alpha+proj")), set()).add(tile)
    return {a: {arch: {k: {key: sorted(t, reverse=True) for key, t in sorted(keys.items())}
                       for k, keys in sorted(kinds.items())} for arch, kinds in sorted(arches.items())}
            for a, arches in sorted(out.items())}


def _derive_drops(records: list[dict], features: tuple, key) -> dict:
    """arch -> kind -> key(record) -> tiles, from the failed GEMM records of ``features``."""
    out: dict = {}
    for r in records:
        feats = split_features(r.get("features", ""))[0]
        if r["ok"] or r["kernel"] not in KINDS or feats not in features:
            continue
        tile = _configs._tile(r["kernel"], config_from_name(r["kernel"], r["config_name"]))
        out.setdefault(r["arch"], {}).setdefault(r["kernel"], {}).setdefault(key(r, feats), set()).add(tile)
    return {arch: {k: {e: sorted(t, reverse=True) for e, t in sorted(by.items())} for k, by in sorted(kinds.items())}
            for arch, kinds in sorted(out.items())}


def derive_norm_drops(records: list[dict]) -> dict:
    """:data:`fusedres.kernels.configs.NORM_DROPPED` from gate records: every GEMM record of a norm
    variant that failed, as arch -> kind -> (element size, mixed) -> tiles (mixed: autocast's fp32
    activations beside 16-bit weights)."""
    return _derive_drops(records, NORM_FEATURES,
                         lambda r, feats: (DTYPES[r["variant"]][0].itemsize, r["variant"] in ACTIVATIONS))


def derive_chain_drops(records: list[dict]) -> dict:
    """:data:`fusedres.kernels.configs.CHAIN_DROPPED` from gate records: every failed forward of a
    chain variant, as arch -> kind -> (element size, mixed) -> tiles, ``mixed`` as the launch's own
    prune sees it (its A and B operands wider than the GEMM dtype: the single block under autocast;
    the MLP block's fc2 reads h in the GEMM dtype, so its autocast launch is not mixed). Every arch
    the records compiled gets an entry, empty where all compiled clean: an arch absent from a drop
    table takes every arch's drops (as an ungated one must)."""
    def key(r, feats):
        args, consts = example_launch(r["kernel"], r["variant"], r.get("two_level", False), features=r["features"])
        elem, operands = _configs.launch_operand_sizes(r["kernel"], dict(zip(TUNED[r["kernel"]].arg_names, args)))
        return elem, max(operands) > elem
    gated = {r["arch"] for r in records if split_features(r.get("features", ""))[0] in CHAIN_FEATURES}
    return {arch: {} for arch in sorted(gated)} | _derive_drops(records, tuple(CHAIN_FEATURES), key)


def derive_dropout_drops(records: list[dict]) -> dict:
    """:data:`fusedres.kernels.configs.DROPOUT_DROPPED` from gate records: every failed GEMM record
    of a dropout variant, as arch -> kind -> (element size, mixed, both) -> tiles, ``both`` for the
    launches with both masks (``dropout-mlp``: fc2's passes), so that a block with one dropout
    keeps the tiles only the two-mask passes spill in."""
    return _derive_drops(records, DROPOUT_FEATURES, lambda r, feats: (
        DTYPES[r["variant"]][0].itemsize, r["variant"] in ACTIVATIONS, feats == "dropout-mlp"))


def _format_act_drops(table: dict) -> str:
    """The table as the Python literal configs.py holds."""
    lines = ["ACT_DROPPED: dict = {"]
    for act, arches in table.items():
        lines.append(f"    {act!r}: {{")
        for arch, kinds in arches.items():
            lines.append(f"        {arch!r}: {{")
            for kind, keys in kinds.items():
                lines.append(f"            {kind!r}: {{")
                for key, tiles in keys.items():
                    head = f"                {key!r}: {{"
                    line = head
                    for i, t in enumerate(tiles):
                        item = repr(t) + (", " if i < len(tiles) - 1 else "},")
                        if len(line) + len(item) > 116:
                            lines.append(line.rstrip())
                            line = " " * len(head)
                        line += item
                    lines.append(line)
                lines.append("            },")
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


def _run_job(job):
    kind, config, dtype, arch, two_level, features, width = job
    return compile_config(kind, config, dtype, arch, two_level=two_level, features=features, width=width)


def run_gate(kinds=ALL_KINDS, archs=DEFAULT_ARCHS, dtypes=DEFAULT_DTYPES, two_level=(False,), *, configs=None,
             features=FEATURES, widths=STACK_WIDTHS, jobs: int = 1, progress=None, cover: bool = False,
             acts=("relu",)) -> list[dict]:
    """Compile every combination (``cover``: the covering set, see :func:`gate_jobs`); the
    records come back in a fixed order. ``jobs > 1`` compiles in that many worker processes
    (spawned: Triton's compiler is not fork-safe)."""
    _require_compiler()
    todo = gate_jobs(kinds, archs, dtypes, two_level, configs, features, widths, cover, acts)
    records: list = [None] * len(todo)
    if jobs <= 1:
        for i, job in enumerate(todo):
            records[i] = _run_job(job)
            if progress:
                progress(records[i], i + 1, len(todo))
        return records
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_job, job): i for i, job in enumerate(todo)}
        for n, fut in enumerate(as_completed(futures), 1):
            records[futures[fut]] = fut.result()
            if progress:
                progress(records[futures[fut]], n, len(todo))
    return records


def error_summary(error: str) -> str:
    """One line of a compile error: Triton puts the source excerpt first and the reason last."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip() and ln.strip() != "^"]
    first = lines[0] if lines else ""
    return first if len(lines) < 2 else f"{first.split(':')[0]}: {lines[-1]}"


def format_table(records: list[dict]) -> str:
    head = ("kernel", "arch", "dtype", "config", "regs", "spill B", "smem KB / limit", "tensor core", "advisories",
            "compile s", "ok")
    rows = []
    for r in records:
        dtype = r["variant"] if r["variant"] != "fp32" else "fp32 (ieee)"
        if r["two_level"]:
            dtype += " 2lvl"
        if r.get("width"):
            dtype += f" D={r['width']} {r['features']}"
        elif r.get("features", "base") != "base":
            dtype += " +" + r["features"]
        if r["error"] is not None:
            rows.append((r["kernel"], r["arch"], dtype, r["config_name"], "-", "-", "-", "-",
                         error_summary(r["error"])[:90], f"{r['compile_s']:.1f}", "FAIL: compile error"))
            continue
        tc = r["tensor_core_instr"] or ("- (FMA)" if not r["tensor_core_expected"] else "MISSING")
        adv = "; ".join(a[:70] for a in r["advisories"]) or "-"
        rows.append((r["kernel"], r["arch"], dtype, r["config_name"], str(r["registers"]), str(r["spill_bytes"]),
                     f"{r['shared_bytes'] / 1024:.0f} / {r['shared_limit'] / 1024:.0f}", tc, adv,
                     f"{r['compile_s']:.1f}", "ok" if r["ok"] else "FAIL: " + ", ".join(r["failures"])))
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    return "\n".join([fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt.format(*row) for row in rows])


def _ptxas_versions(archs) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return ", ".join(f"{a} {get_ptxas(ARCHS[a].cc).version}" for a in archs)


def _choices(allowed):
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {bad or value!r}; choose from {', '.join(allowed)}")
        return items
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fusedres.aot",
        description="Compile every shipped kernel config for real GPU targets (no GPU needed) and check "
                    "registers, spills, shared memory, tensor-core instructions and ptxas advisories. "
                    "Exit status 1 if any config fails.")
    parser.add_argument("--kernels", default=ALL_KINDS, type=_choices(ALL_KINDS),
                        help=f"comma list of {','.join(ALL_KINDS)} (all)")
    parser.add_argument("--widths", default=STACK_WIDTHS, type=_choices([str(w) for w in STACK_WIDTHS]),
                        help="stack kernels: the widths D to compile (all of 16,32,64,128)")
    parser.add_argument("--archs", "--arch", default=DEFAULT_ARCHS, type=_choices(ARCHS),
                        help=f"comma list of {','.join(ARCHS)} (default {','.join(DEFAULT_ARCHS)})")
    parser.add_argument("--dtypes", default=DEFAULT_DTYPES, type=_choices(DTYPES),
                        help="comma list of fp16,bf16,fp32,tf32,fp64 (default fp16,bf16,fp32,tf32). fp32 is "
                             "torch's default matmul precision 'highest' (IEEE), tf32 is fp32 under 'high'")
    parser.add_argument("--two-level", choices=("no", "yes", "both"), default="no",
                        help="rows of the example launch: contiguous (no, default), a [B,T,D].transpose(0,1) "
                             "view (yes), or both")
    parser.add_argument("--features", default=DEFAULT_FEATURES,
                        type=_choices(FEATURES + SPLIT_FEATURES + ON_REQUEST_FEATURES),
                        help="kernel variants: base (bias, db), alpha+proj (tensor residual scale with dalpha, "
                             "projection shortcut), alpha-value (a Python-float alpha, by value), drop-path "
                             "(stochastic depth's row scale), mlp (the MLP block's passes) and layerscale (a "
                             "per-channel alpha with the row scale); dW only: split, split+alpha+proj, "
                             "split+drop-path and split+layerscale (split-M partials, plus the reduce kernel); "
                             "no-bias; default all of these. On request: norm-batch, norm-layer, norm-rms, "
                             "norm-hidden-batch, norm-hidden-layer (the normalizations, with their statistics and "
                             "finishing kernels) and dropout, dropout-norm, dropout-mlp (the keep masks)")
    parser.add_argument("--acts", default=("relu",), type=_choices(tuple(_act_kernels.KERNELS) + ("identity",)),
                        help="activations each single-block variant is compiled with, comma list of "
                             f"{','.join(_act_kernels.KERNELS)},identity (default relu; each row compiles "
                             "the tiles configs.ACT_DROPPED leaves it)")
    parser.add_argument("--derive-act-drops", action="store_true",
                        help="print configs.ACT_DROPPED as derived from this run's failures (derive_act_drops)")
    parser.add_argument("--derive-norm-drops", action="store_true",
                        help="print configs.NORM_DROPPED as derived from this run's failures (derive_norm_drops)")
    parser.add_argument("--derive-dropout-drops", action="store_true",
                        help="print configs.DROPOUT_DROPPED as derived from this run's failures "
                             "(derive_dropout_drops)")
    parser.add_argument("--derive-chain-drops", action="store_true",
                        help="print configs.CHAIN_DROPPED as derived from this run's failures (derive_chain_drops)")
    parser.add_argument("--from-json", action="append", metavar="PATH",
                        help="with --derive-act-drops: derive from these saved records instead of compiling")
    parser.add_argument("--cover", action="store_true",
                        help="the covering set instead of the full product: every config shipped for each kernel, "
                             "dtype and arch compiled once, in the heaviest variant that ships it (CI's set on "
                             "the releases besides the primary pair)")
    parser.add_argument("--config", action="append", metavar="'RxCxK wW sS'",
                        help="compile this config instead of the shipped ones (repeatable), e.g. '64x64x32 w4 s3'")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (CPUs)")
    parser.add_argument("--json", metavar="PATH", help="write the records to PATH as a JSON list")
    parser.add_argument("-q", "--quiet", action="store_true", help="no table and no progress, only the summary")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print("fusedres.aot: TRITON_INTERPRET=1 is set; re-running without it", file=sys.stderr, flush=True)
        return subprocess.call([sys.executable, "-m", "fusedres.aot", *(sys.argv[1:] if argv is None else argv)],
                               env=env)

    def print_derived(records):
        if args.derive_act_drops:
            print(_format_act_drops(derive_act_drops(records)))
        for wanted, name, derive in ((args.derive_norm_drops, "NORM_DROPPED", derive_norm_drops),
                                     (args.derive_dropout_drops, "DROPOUT_DROPPED", derive_dropout_drops),
                                     (args.derive_chain_drops, "CHAIN_DROPPED", derive_chain_drops)):
            if wanted:
                print(f"{name}: dict = " + pprint.pformat(derive(records), width=110))

    if (args.derive_act_drops or args.derive_norm_drops or args.derive_dropout_drops
            or args.derive_chain_drops) and args.from_json:
        print_derived([r for path in args.from_json for r in json.load(open(path))])
        return 0
    t0 = time.perf_counter()
    if not _configs.stack_supported() and set(args.kernels) & set(STACK_KINDS):
        print(f"fusedres.aot: triton {triton.__version__} does not ship the narrow stack "
              f"(configs.STACK_MIN_TRITON); its kernels are not compiled", file=sys.stderr, flush=True)

    def progress(rec, n, total):
        if not args.quiet or not rec["ok"]:
            state = "ok" if rec["ok"] else "FAIL: " + ", ".join(rec["failures"])
            width = f" D={rec['width']}" if rec["width"] else ""
            print(f"[{n}/{total}] {rec['kernel']}{width} {rec['arch']} {rec['variant']} {rec['features']} "
                  f"{rec['config_name']}: "
                  f"{state}",
                  file=sys.stderr, flush=True)

    records = run_gate(args.kernels, args.archs, args.dtypes,
                       {"no": (False,), "yes": (True,), "both": (False, True)}[args.two_level],
                       configs=args.config, features=args.features, widths=tuple(int(w) for w in args.widths),
                       jobs=max(1, args.jobs), progress=progress, cover=args.cover, acts=args.acts)
    wall = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if not args.quiet:
        print(format_table(records))
    print_derived(records)
    failed = [r for r in records if not r["ok"]]
    print(f"\nfusedres.aot: {len(records)} compiles{' (covering set)' if args.cover else ''} "
          f"({','.join(args.kernels)} x {','.join(args.archs)} x "
          f"{','.join(args.dtypes)}), {len(failed)} failed, {wall:.0f} s with {args.jobs} jobs; "
          f"triton {triton.__version__}; ptxas {_ptxas_versions(args.archs)}")
    for r in failed:
        print(f"FAIL {r['kernel']}{' D=%s' % r['width'] if r['width'] else ''} {r['arch']} {r['variant']} "
              f"{r['config_name']} ({r['features']}): "
              f"{', '.join(r['failures'])}"
              + (f"\n    {error_summary(r['error'])}" if r["error"] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
