"""The normalized blocks' bytes (issue 22): ``y = x + act(norm(x)) @ W.T + b`` and the MLP block
``y = x + act(norm(x) @ W1.T + b1) @ W2.T + b2`` (H = 4D, rtdl's and timm's order) with BatchNorm,
LayerNorm and RMSNorm, fused against eager and against the compulsory minimum.

Fused: the distinct bytes of every Triton launch through the interpreter instrument (the
statistics pass, the GEMMs, dx's sinks, the finishing pass). Eager: ``fusedres.residual_reference``
with torch's own norm module, forward and autograd backward, under the aten dispatch counter.
Bytes only, measured on the CPU: no GPU time.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

KINDS = ("batch", "layer", "rms")
#: single: the block; mlp: the MLP block with the norm on x (pre_act None, rtdl's and timm's order);
#: mlp-hidden: He et al.'s two-layer form, the same norm on x and on h (relu before each GEMM).
BLOCKS = ("single", "mlp", "mlp-hidden")
#: Chains of ``CHAIN_DEPTH`` blocks with the same norm (fusedres.chain): each block's forward emits
#: the next one's statistics, so only the first block's input has a statistics pass.
CHAINS = ("chain-single", "chain-mlp")
CHAIN_DEPTH = 3
DEFAULT_SIZE = (512, 128)
_MODULES = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "rms": nn.RMSNorm}


def compulsory_bytes(mode: str, kind: str, M: int, D: int, e: int, H: int | None = None, hidden: bool = False) -> int:
    """Each tensor of the block touched once: forward x, W, b, the norm's affine read, y written;
    backward g, x, W, the affine read, dx, dW, db and the affine's gradients written. The MLP block
    (``H``): its absolute minimum (bench/mlp.py: h written once forward and read once backward)
    plus the affine's."""
    P = D if kind == "rms" else 2 * D       # the affine: weight (and bias)
    if H is not None and hidden:
        P += H if kind == "rms" else 2 * H
    if H is not None:
        from .mlp import absolute_min_bytes
        return absolute_min_bytes(mode, M, D, H, e) + e * (P if mode == "fwd" else 2 * P)
    if mode == "fwd":
        return e * (2 * M * D + D * D + D + P)
    return e * (3 * M * D + 2 * D * D + D + 2 * P)


@dataclass
class NormCase:
    kind: str
    block: str = "single"                          # or "mlp"
    fused: dict = field(default_factory=dict)      # mode -> [(kernel, unique bytes, request bytes)]
    eager: dict = field(default_factory=dict)      # mode -> bytes
    max_abs_diff: float = 0.0
    violations: list = field(default_factory=list)

    def fused_bytes(self, mode: str) -> int:
        return sum(u for _, u, _ in self.fused[mode])

    def writes_of_x_size(self) -> int:
        return self.fused["fwd_writes_x_size"]

    @property
    def label(self) -> str:
        return {"single": "FusedResidualBlock", "mlp": "FusedResidualMLPBlock, H = 4D",
                "mlp-hidden": "FusedResidualMLPBlock, H = 4D, hidden_norm",
                "chain-single": f"{CHAIN_DEPTH} x FusedResidualBlock, chained",
                "chain-mlp": f"{CHAIN_DEPTH} x FusedResidualMLPBlock, H = 4D, chained"}[self.block] + f": {self.kind}"

    @property
    def depth(self) -> int:
        return CHAIN_DEPTH if self.block in CHAINS else 1

    def stats_launches(self, mode: str = "fwd") -> int:
        return sum(1 for k, _, _ in self.fused[mode] if k in ("col_stats_kernel", "row_stats_kernel"))


@dataclass
class NormMeasurement:
    M: int
    D: int
    cases: list = field(default_factory=list)
    seconds: float = 0.0


def measure(M: int = DEFAULT_SIZE[0], D: int = DEFAULT_SIZE[1], seed: int = 0) -> NormMeasurement:
    """Fused and eager, forward and backward (every gradient, the norm's affine included), fp32."""
    import fusedres

    from .cpu import require_interpreter
    require_interpreter()
    t0 = time.perf_counter()
    out = NormMeasurement(M, D)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=gen) + 0.5

    def uniform(*shape):
        return (torch.rand(*shape, generator=gen) * 2 - 1) / shape[-1] ** 0.5

    w, b = uniform(D, D), uniform(D)
    mlp = (uniform(4 * D, D), uniform(4 * D), uniform(D, 4 * D), uniform(D))
    g = torch.randn(M, D, generator=gen)
    for block, kind in [(blk, k) for blk in BLOCKS for k in KINDS]:
        case = NormCase(kind, block)
        norm = _MODULES[kind](D)
        results = {}
        for impl in ("fused", "eager"):
            nm = copy.deepcopy(norm)
            leaves = [t.clone().requires_grad_() for t in ((x, w, b) if block == "single" else (x, *mlp))]
            params = leaves + list(nm.parameters())
            if block == "single":
                fn = fusedres.fused_residual if impl == "fused" else fusedres.residual_reference
                kwargs = {}
            else:
                fn = fusedres.fused_residual_mlp if impl == "fused" else fusedres.residual_mlp_reference
                kwargs = dict(pre_act=None)
                if block == "mlp-hidden":
                    hn = _MODULES[kind](4 * D)
                    params += list(hn.parameters())
                    kwargs = dict(pre_act="relu", hidden_norm=hn)
            results[impl] = _count(case, impl, lambda: fn(*leaves, norm=nm, **kwargs), params, g, x.numel())
        case.max_abs_diff = max(float((a - c).abs().max()) for a, c in zip(results["fused"], results["eager"]))
        out.cases.append(case)
    for block, kind in [(blk, k) for blk in CHAINS for k in KINDS]:
        out.cases.append(_chain_case(block, kind, x, g, seed))
    out.seconds = time.perf_counter() - t0
    return out


def _chain_case(block: str, kind: str, x, g, seed: int) -> NormCase:
    """A chain of CHAIN_DEPTH blocks in an nn.Sequential, fused (linked ahead of the call, as
    ResidualMLP links its blocks: fusedres.chain) and eager (the same state_dict on fusedres's
    eager classes), one forward and backward each."""
    import fusedres
    from fusedres.chain import link_blocks
    D = x.shape[-1]
    torch.manual_seed(seed)
    if block == "chain-single":
        make = [lambda cls: cls(D, norm=kind)] * 2
        classes = (fusedres.FusedResidualBlock, fusedres.ResidualBlock)
    else:
        make = [lambda cls: cls(D, 4 * D, norm=kind, pre_act=None)] * 2
        classes = (fusedres.FusedResidualMLPBlock, fusedres.ResidualMLPBlock)
    fused = nn.Sequential(*[make[0](classes[0]) for _ in range(CHAIN_DEPTH)])
    eager = nn.Sequential(*[make[1](classes[1]) for _ in range(CHAIN_DEPTH)])
    eager.load_state_dict(fused.state_dict())
    link_blocks(fused)
    case = NormCase(kind, block)
    results = {}
    for impl, model in (("fused", fused), ("eager", eager)):
        xx = x.clone().requires_grad_()
        params = [xx] + list(model.parameters())
        results[impl] = _count(case, impl, lambda: model(xx), params, g, x.numel())
    case.max_abs_diff = max(float((a - c).abs().max()) for a, c in zip(results["fused"], results["eager"]))
    return case


def _count(case: NormCase, impl: str, forward, params, g, numel: int) -> tuple:
    """Run ``forward`` and its backward (the gradients of ``params``) under the byte counters into
    ``case``: the fused launches through the interpreter instrument, eager's aten ops under the
    dispatch counter. Returns ``(y, *grads)``."""
    from fusedres.traffic import InterpreterTraffic

    from .counters import DispatchTraffic
    counter = InterpreterTraffic if impl == "fused" else DispatchTraffic
    with counter() as f:
        y = forward()
    with counter() as bwd:
        grads = torch.autograd.grad(y, params, g)
    if impl == "fused":
        for mode, t in (("fwd", f), ("bwd", bwd)):
            case.fused[mode] = [(lc.kernel, lc.unique_bytes, lc.bytes_read + lc.bytes_written) for lc in t.launches]
            case.violations += list(t.violations)
        # tensors of x's size (or larger) written in the forward: y (each block's), the MLP block's h
        case.fused["fwd_writes_x_size"] = sum(
            1 for lc in f.launches for a in lc.args.values() if a.unique_written >= numel * 4)
    else:
        case.eager = {"fwd": sum(o.bytes for o in f.ops), "bwd": sum(o.bytes for o in bwd.ops)}
    return (y.detach(), *grads)


def bytes_table(m: NormMeasurement) -> str:
    from .report import markdown_table
    rows = []
    for c in m.cases:
        for mode in ("fwd", "bwd"):
            fu, ea = c.fused_bytes(mode), c.eager[mode]
            cm = case_compulsory_bytes(c, mode, m)
            rows.append([c.label, mode, str(len(c.fused[mode])), str(c.stats_launches(mode)), f"{fu:,}", f"{ea:,}",
                         f"{cm:,}", f"{ea / fu:.2f}x", f"{fu / cm:.2f}x"])
    return markdown_table(["block: norm", "mode", "fused launches", "statistics passes", "fused unique B (measured)",
                           "eager B (measured)", "compulsory minimum B", "eager / fused", "fused / minimum"], rows)


def case_compulsory_bytes(c: NormCase, mode: str, m: NormMeasurement) -> int:
    """A case's compulsory minimum: its block's, times the chain's depth (each block's input read
    and output written once: block k's output is block k+1's input, and a GEMM lies between)."""
    return c.depth * compulsory_bytes(mode, c.kind, m.M, m.D, 4,
                                      None if c.block in ("single", "chain-single") else 4 * m.D,
                                      hidden=c.block == "mlp-hidden")


def launch_table(m: NormMeasurement) -> str:
    from .report import markdown_table
    rows = [[c.label, mode, kernel, f"{u:,}", f"{r:,}"] for c in m.cases for mode in ("fwd", "bwd")
            for kernel, u, r in c.fused[mode]]
    return markdown_table(["block: norm", "mode", "kernel", "unique B", "requests B"], rows)


def section(m: NormMeasurement) -> tuple[list[str], bool]:
    """The CPU report's "normalized block" section, and whether it holds: no lane out of bounds, and
    the forward writes one tensor of x's size (y)."""
    ok = all(not c.violations and c.writes_of_x_size() == c.depth * (1 if c.block in ("single", "chain-single")
                                                                      else 2) for c in m.cases)
    # a chain: one statistics pass, over the first block's input; the others come from epilogues
    chained = all(c.stats_launches("fwd") == 1 for c in m.cases if c.block in CHAINS)
    ok = ok and chained
    # the hidden norm's statistics come from fc1's epilogue: no launch reads h for them
    ok = ok and all(len(c.fused["fwd"]) == 3 for c in m.cases if c.block == "mlp-hidden")
    worst = max((c.max_abs_diff for c in m.cases), default=0.0)
    lines = [f"## Normalized block: bytes per call, M={m.M}, D={m.D}, fp32", "",
             "y = x + relu(norm(x)) @ W.T + b, and the MLP block y = x + relu(norm(x) @ W1.T + b1) @ W2.T + b2 "
             "(H = 4D, pre_act=None: rtdl's order), with nn.BatchNorm1d (training), nn.LayerNorm, nn.RMSNorm "
             "(default settings; every gradient, the norm's affine included). Bytes MEASURED on this CPU, no GPU time: fused = "
             "distinct bytes per Triton launch through the interpreter instrument (the small [D] or [M] vector ops "
             "between launches, torch's, are not counted: O(D + M) each); eager = fusedres.residual_reference with "
             "the same norm module and its autograd backward under the aten dispatch counter. Compulsory minimum "
             "(bench/norm.py): each tensor touched once, forward e(2MD + D^2 + D + P), backward "
             "e(3MD + 2D^2 + D + 2P), P the affine's size; the MLP block's absolute minimum (bench/mlp.py) plus P "
             "forward and 2P backward.", "",
             bytes_table(m), "", "Per launch:", "", launch_table(m), "",
             "- the forward reads x twice (the statistics pass, then the GEMM's A tiles) and writes only y (and the "
             f"MLP block's h) and the statistic vectors: {'yes' if ok else 'NO'}",
             "- the backward's extra pass is the correction the norm's global reduction forces: dx's GEMM writes dz "
             "with its column/row sums, the finishing pass reads dz, g and x and writes dx",
             f"- a chain of {CHAIN_DEPTH} blocks (fusedres.chain) runs one statistics pass, over its input; each block's "
             "forward epilogue emits the next block's statistics partials of its output (combined with Chan's "
             f"formula over [tiles, D] or [tiles, M] vectors): {'yes' if chained else 'NO'}",
             "- the backward's correction stays one finishing pass per block (norm_dx): in a chain, the next pass to "
             "read dx is the previous block's dx GEMM, whose A operand it is; folding the correction into that "
             "GEMM's A-tile prologue is not done",
             f"- fused vs eager outputs (y and every gradient), max |difference|: {worst:.3g}",
             f"- measured in {m.seconds:.1f} s on this CPU", ""]
    return lines, ok


def records(m: NormMeasurement) -> list[dict]:
    out = []
    for c in m.cases:
        for mode in ("fwd", "bwd"):
            base = dict(section="norm", block=c.block, norm=c.kind, mode=mode, M=m.M, D=m.D, dtype="fp32", ms=None, measured=False)
            out.append(dict(base, impl="fused", launches=len(c.fused[mode]), unique_bytes=c.fused_bytes(mode),
                            bytes_source="measured",
                            statistics_passes=c.stats_launches(mode),
                            compulsory_min_bytes=case_compulsory_bytes(c, mode, m)))
            out.append(dict(base, impl="eager", bytes=c.eager[mode], bytes_source="measured"))
    return out
