"""Dropout's bytes (issue 23): the blocks with and without dropout, fused against eager.

The fused kernels regenerate the keep mask from a seed in every pass that needs it: the only new
bytes are each launch's reads of its seed (8 B) and of ``[p, 1 / (1 - p)]`` (8 B in fp32) per
dropout site. Eager dropout (``F.dropout``: torch's ``native_dropout``) writes a mask and the
dropped tensor in the forward and reads the mask again in the backward, for each dropout.

Fused: the distinct bytes of every Triton launch through the interpreter instrument. Eager:
``fusedres.residual_reference`` / ``residual_mlp_reference`` with ``F.dropout``, forward and
autograd backward, under the aten dispatch counter. Bytes only, measured on the CPU: no GPU time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

#: single: the block with the branch dropout; mlp: rtdl's block (BatchNorm, no pre-activation,
#: dropout1 after the hidden ReLU, dropout2 on the branch), H = 2D as rtdl's README sets it.
BLOCKS = ("single", "mlp")
DEFAULT_SIZE = (512, 128)
P_HIDDEN, P_BRANCH = 0.15, 0.1
#: What a fused launch reads per dropout site besides the plain block: the seed and [p, scale].
SITE_BYTES = 8 + 2 * 4


@dataclass
class DropoutCase:
    block: str
    fused: dict = field(default_factory=dict)       # (mode, with dropout) -> (launches, unique bytes)
    eager: dict = field(default_factory=dict)       # (mode, with dropout) -> bytes
    sites: dict = field(default_factory=dict)       # mode -> dropout sites read over the pass's launches
    violations: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return {"single": f"FusedResidualBlock, dropout={P_BRANCH}",
                "mlp": f"rtdl block (BatchNorm, H = 2D), hidden_dropout={P_HIDDEN}, dropout={P_BRANCH}"}[self.block]


@dataclass
class DropoutMeasurement:
    M: int
    D: int
    cases: list = field(default_factory=list)
    seconds: float = 0.0


def measure(M: int = DEFAULT_SIZE[0], D: int = DEFAULT_SIZE[1], seed: int = 0) -> DropoutMeasurement:
    """Each block fused and eager, with and without dropout, forward and backward, fp32."""
    import fusedres
    from fusedres.traffic import InterpreterTraffic

    from .counters import DispatchTraffic
    from .cpu import require_interpreter
    require_interpreter()
    t0 = time.perf_counter()
    out = DropoutMeasurement(M, D)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=gen)

    def uniform(*shape):
        return (torch.rand(*shape, generator=gen) * 2 - 1) / shape[-1] ** 0.5

    single = (uniform(D, D), uniform(D))
    mlp = (uniform(2 * D, D), uniform(2 * D), uniform(D, 2 * D), uniform(D))
    g = torch.randn(M, D, generator=gen)
    for block in BLOCKS:
        case = DropoutCase(block)
        for impl in ("fused", "eager"):
            for dropped in (False, True):
                torch.manual_seed(seed)
                leaves = [t.clone().requires_grad_() for t in ((x, *single) if block == "single" else (x, *mlp))]
                if block == "single":
                    fn = fusedres.fused_residual if impl == "fused" else fusedres.residual_reference
                    kwargs = dict(dropout=P_BRANCH if dropped else 0.0)
                else:
                    fn = fusedres.fused_residual_mlp if impl == "fused" else fusedres.residual_mlp_reference
                    kwargs = dict(pre_act=None, norm=torch.nn.BatchNorm1d(D), dropout=P_BRANCH if dropped else 0.0,
                                  hidden_dropout=P_HIDDEN if dropped else 0.0)
                counter = InterpreterTraffic if impl == "fused" else DispatchTraffic
                with counter() as f:
                    y = fn(*leaves, **kwargs)
                with counter() as b:
                    torch.autograd.grad(y, leaves, g)
                for mode, t in (("fwd", f), ("bwd", b)):
                    if impl == "fused":
                        case.fused[mode, dropped] = (len(t.launches), sum(lc.unique_bytes for lc in t.launches))
                        case.violations += list(t.violations)
                        if dropped:
                            case.sites[mode] = sum(1 for lc in t.launches for name in lc.args
                                                   if name in ("drop_seed_ptr", "a_drop_seed_ptr"))
                    else:
                        case.eager[mode, dropped] = sum(o.bytes for o in t.ops)
        out.cases.append(case)
    out.seconds = time.perf_counter() - t0
    return out


def bytes_table(m: DropoutMeasurement) -> str:
    from .report import markdown_table
    rows = []
    for c in m.cases:
        for mode in ("fwd", "bwd"):
            (n0, f0), (n1, f1) = c.fused[mode, False], c.fused[mode, True]
            e0, e1 = c.eager[mode, False], c.eager[mode, True]
            rows.append([c.label, mode, f"{n0} / {n1}", f"{f0:,}", f"{f1:,}", f"{f1 - f0:,}", f"{e0:,}", f"{e1:,}",
                         f"{e1 - e0:,}"])
    return markdown_table(["block", "mode", "fused launches (no dropout / dropout)", "fused B, no dropout",
                           "fused B, dropout", "fused: dropout's bytes", "eager B, no dropout", "eager B, dropout",
                           "eager: dropout's bytes"], rows)


def section(m: DropoutMeasurement) -> tuple[list[str], bool]:
    """The CPU report's "dropout" section, and whether it holds: the fused passes launch the same
    kernels with and without dropout, and dropout's only fused bytes are each launch's seed and
    parameters (:data:`SITE_BYTES` per site); no lane out of bounds."""
    ok = not any(c.violations for c in m.cases)
    for c in m.cases:
        for mode in ("fwd", "bwd"):
            (n0, f0), (n1, f1) = c.fused[mode, False], c.fused[mode, True]
            ok = ok and n0 == n1 and f1 - f0 == SITE_BYTES * c.sites[mode]
    lines = [f"## Dropout: bytes per call, M={m.M}, D={m.D}, fp32", "",
             "Each block with and without dropout, fused and eager, forward and backward (every gradient). Bytes "
             "MEASURED on this CPU, no GPU time: fused = distinct bytes per Triton launch through the interpreter "
             "instrument; eager = fusedres.residual_reference / residual_mlp_reference with F.dropout (torch's mask "
             "and dropped tensor) and its autograd backward under the aten dispatch counter.", "",
             bytes_table(m), "",
             f"- fused: the same launches with and without dropout, and dropout's only bytes are each launch's seed "
             f"and [p, 1/(1-p)] ({SITE_BYTES} B per dropout site and launch): {'yes' if ok else 'NO'}",
             "- eager: each dropout writes a mask and the dropped tensor and reads the mask again in the backward",
             f"- measured in {m.seconds:.1f} s on this CPU", ""]
    return lines, ok


def records(m: DropoutMeasurement) -> list[dict]:
    out = []
    for c in m.cases:
        for mode in ("fwd", "bwd"):
            for dropped in (False, True):
                base = dict(section="dropout", block=c.block, dropout=dropped, mode=mode, M=m.M, D=m.D, dtype="fp32",
                            ms=None, measured=False, bytes_source="measured")
                n, f = c.fused[mode, dropped]
                out.append(dict(base, impl="fused", launches=n, unique_bytes=f))
                out.append(dict(base, impl="eager", bytes=c.eager[mode, dropped]))
    return out
