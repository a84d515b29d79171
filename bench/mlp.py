"""The MLP block's bytes (issue 16): measured on this CPU, against the compulsory minimum and eager.

``y = x + alpha * s * (relu(relu(x) @ W1.T + b1) @ W2.T + b2)``, ``W1 [H, D]``, ``W2 [D, H]``,
:func:`fusedres.fused_residual_mlp` (two forward launches of ``residual_fwd``; backward: two
``residual_dx`` and two ``residual_dw``, plus, with ``recompute=True``, forward 1 again).

What is measured, per call at one size, with ``H = 4D`` (a transformer's feed-forward) and ``H = D``:

- **fused**: the Triton kernels in Triton's interpreter under
  :class:`fusedres.traffic.InterpreterTraffic`: per launch the distinct bytes read and written
  (``unique``: a perfect cache) and the request bytes (every active lane of every load and store,
  tile re-reads included). The forward and the backward are two separate counters.
- **eager**: :func:`fusedres.residual_mlp_reference` forward and its autograd backward under
  :class:`bench.counters.DispatchTraffic` (each aten op's tensor inputs and outputs, once each).

Nothing here is a time: no GPU ran. The formulas, in elements (times ``e``, the element size; all
biases present, ``alpha`` a float, no ``sample_scale``):

**Compulsory minimum of the two-launch design** (each launch reads each of its operands once and
writes each of its results once; :func:`fused_launches`)::

    fwd 1  h = relu(x) @ W1.T + b1         reads x, W1, b1        writes h        MD + HD + H  + MH
    fwd 2  y = x + relu(h) @ W2.T + b2     reads h, W2, b2, x     writes y        MH + DH + D  + 2MD
    bwd 1  dh = [h > 0] (g @ W2)           reads g, h, W2         writes dh       MD + MH + DH + MH
    bwd 2  dW2 = g.T relu(h), db2          reads g, h             writes dW2, db2 MD + MH + DH + D
    bwd 3  dx = g + [x > 0] (dh @ W1)      reads dh, x, W1, g     writes dx       MH + 2MD + HD + MD
    bwd 4  dW1 = dh.T relu(x), db1         reads dh, x            writes dW1, db1 MH + MD + HD + H

    forward   3MD + 2MH + 2HD + H + D
    backward  6MD + 5MH + 4HD + H + D      (recompute: + fwd 1 = 7MD + 6MH + 5HD + 2H + D)

**Absolute minimum of the block** (x read once, y written once, h written once for the backward,
each weight and bias once; backward: g, x, h and the weights read once, every gradient written once)::

    forward   2MD + MH + 2HD + H + D       (recompute: 2MD + 2HD + H + D, h never stored)
    backward  3MD + MH + 4HD + H + D       (recompute: 3MD + 4HD + 2H + D, b1 read to rebuild h)

**Eager** (:func:`eager_ops`: relu, addmm, relu, addmm, add; backward: two mm and a sum per linear,
two threshold_backward, the residual add)::

    forward   7MD + 4MH + 2HD + H + D
    backward  11MD + 8MH + 4HD + H + D

The dW kernel's db column sums re-read g (dh) from L2 in 16-row pieces: requests, not distinct
bytes (the single block's ``e M N`` term in :func:`bench.model.v2_dw`). The unique bytes are what
the formulas count; the request bytes are shown beside them. A split-M dW (never in the
interpreter, which plans for one SM, unless forced) adds its fp32 partial slabs, written once and
read back once by the reduce: ``8 S (N K + N)`` per split weight gradient (:func:`split_bytes`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .model import ELEMENT_SIZE

DEFAULT_SIZE = (512, 128)           # M, D: the two H values run in about 5 s in the interpreter on 2 cores
HIDDEN_RATIOS = (4, 1)              # H = 4D, H = D
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ("fused", "fused-recompute")


# ---------------------------------------------------------------------------------------------
# Formulas (bytes)


def fused_launches(M: int, D: int, H: int, e: int, recompute: bool = False) -> dict[str, list[tuple]]:
    """The two-launch design's compulsory minimum, launch by launch: ``{"fwd": [...], "bwd": [...]}``,
    each ``(name, kernel, bytes read, bytes written)``: each operand read once, each result written once."""
    fwd1 = ("fwd 1: h = relu(x) @ W1.T + b1", "residual_fwd_kernel", M * D + H * D + H, M * H)
    fwd2 = ("fwd 2: y = x + relu(h) @ W2.T + b2", "residual_fwd_kernel", M * H + D * H + D + M * D, M * D)
    bwd = [("bwd 1: dh = [h > 0] (g @ W2)", "residual_dx_kernel", M * D + M * H + D * H, M * H),
           ("bwd 2: dW2 = g.T @ relu(h), db2", "residual_dw_kernel", M * D + M * H, D * H + D),
           ("bwd 3: dx = g + [x > 0] (dh @ W1)", "residual_dx_kernel", M * H + 2 * M * D + H * D, M * D),
           ("bwd 4: dW1 = dh.T @ relu(x), db1", "residual_dw_kernel", M * H + M * D, H * D + H)]
    if recompute:
        bwd = [("bwd 0: recompute h (fwd 1 again)",) + fwd1[1:]] + bwd
    scale = (lambda rows: [(n, k, e * r, e * w) for n, k, r, w in rows])
    return {"fwd": scale([fwd1, fwd2]), "bwd": scale(bwd)}


def split_bytes(D: int, H: int, splits: int) -> int:
    """Extra unique bytes of a split-M backward (``S = splits`` > 1, both dW launches split): the dW
    kernels write ``S`` fp32 partial slabs of dW and db and the reduces read them back once."""
    if splits <= 1:
        return 0
    return 2 * 4 * splits * ((D * H + D) + (H * D + H))


def two_launch_bytes(mode: str, M: int, D: int, H: int, e: int, recompute: bool = False, splits: int = 1) -> int:
    """The compulsory minimum of the two-launch design (module docstring), bytes."""
    ls = fused_launches(M, D, H, e, recompute)
    total = {m: sum(r + w for _, _, r, w in ls[m]) for m in ("fwd", "bwd")}
    total["bwd"] += split_bytes(D, H, splits)
    total["full"] = total["fwd"] + total["bwd"]
    return total[mode]


def absolute_min_bytes(mode: str, M: int, D: int, H: int, e: int, recompute: bool = False) -> int:
    """The block's absolute minimum: x read once, y written once, h written once (read once by the
    backward; with ``recompute`` never stored), the weights and biases once, bytes."""
    w = 2 * H * D + H + D
    if recompute:
        fwd = 2 * M * D + w
        bwd = 3 * M * D + 4 * H * D + 2 * H + D
    else:
        fwd = 2 * M * D + M * H + w
        bwd = 3 * M * D + M * H + 4 * H * D + H + D
    return e * {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def eager_ops(M: int, D: int, H: int, e: int) -> dict[str, list[tuple]]:
    """Eager's model, op by op, as the dispatch counter counts them: ``(op, bytes read, bytes written)``."""
    fwd = [("relu(x)", M * D, M * D),
           ("addmm: h", M * D + H * D + H, M * H),
           ("relu(h)", M * H, M * H),
           ("addmm: branch", M * H + D * H + D, M * D),
           ("add (residual)", 2 * M * D, M * D)]
    bwd = [("mm g @ W2", M * D + D * H, M * H),
           ("mm g.T @ relu(h): dW2", M * D + M * H, D * H),
           ("sum g: db2", M * D, D),
           ("threshold_backward (h)", 2 * M * H, M * H),
           ("mm dh @ W1", M * H + H * D, M * D),
           ("mm dh.T @ relu(x): dW1", M * H + M * D, H * D),
           ("sum dh: db1", M * H, H),
           ("threshold_backward (x)", 2 * M * D, M * D),
           ("add (residual grad)", 2 * M * D, M * D)]
    return {m: [(n, e * r, e * w) for n, r, w in ops] for m, ops in (("fwd", fwd), ("bwd", bwd))}


def eager_bytes(mode: str, M: int, D: int, H: int, e: int) -> int:
    """Eager's model: ``e(7MD + 4MH + 2HD + H + D)`` forward, ``e(11MD + 8MH + 4HD + H + D)`` backward."""
    ops = eager_ops(M, D, H, e)
    total = {m: sum(r + w for _, r, w in ops[m]) for m in ("fwd", "bwd")}
    total["full"] = total["fwd"] + total["bwd"]
    return total[mode]


# ---------------------------------------------------------------------------------------------
# Measurements


def make_inputs(M: int, D: int, H: int, dtype: torch.dtype, seed: int = 0):
    """x, g ~ N(0, 1); fc1, fc2 as nn.Linear initialises them (U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, fan_in):
        return ((torch.rand(*shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)).to(dtype)

    x = torch.randn(M, D, generator=gen).to(dtype)
    w1, b1 = uniform((H, D), D), uniform((H,), D)
    w2, b2 = uniform((D, H), H), uniform((D,), H)
    g = torch.randn(M, D, generator=gen).to(dtype)
    return x, w1, b1, w2, b2, g


@dataclass(frozen=True)
class Launch:
    """One measured fused launch: distinct bytes read and written, request bytes, grid."""
    kernel: str
    grid: tuple
    unique_read: int
    unique_written: int
    requests: int

    @property
    def unique(self) -> int:
        return self.unique_read + self.unique_written


def measure_fused(x, w1, b1, w2, b2, g, recompute: bool = False):
    """Fused forward and backward (every gradient) in the interpreter, under two traffic counters.
    Returns ``({"fwd": [Launch], "bwd": [Launch]}, outputs, violations)``."""
    import fusedres
    from fusedres.traffic import InterpreterTraffic

    from .cpu import require_interpreter
    require_interpreter()
    params = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    with InterpreterTraffic() as tf:
        y = fusedres.fused_residual_mlp(*params, recompute=recompute)
    with InterpreterTraffic() as tb:
        grads = torch.autograd.grad(y, params, g)
    launches = {mode: [Launch(lc.kernel, tuple(lc.grid or ()), lc.unique_read, lc.unique_written,
                              lc.bytes_read + lc.bytes_written) for lc in t.launches]
                for mode, t in (("fwd", tf), ("bwd", tb))}
    return launches, (y.detach(), *grads), list(tf.violations) + list(tb.violations)


def measure_eager(x, w1, b1, w2, b2, g):
    """Eager forward and autograd backward under the aten dispatch byte counter.
    Returns ``({"fwd": [OpTraffic], "bwd": [OpTraffic]}, outputs)``."""
    from fusedres import residual_mlp_reference

    from .counters import DispatchTraffic

    params = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    with DispatchTraffic() as f:
        y = residual_mlp_reference(*params)
    with DispatchTraffic() as b:
        grads = torch.autograd.grad(y, params, g)
    return {"fwd": list(f.ops), "bwd": list(b.ops)}, (y.detach(), *grads)


@dataclass
class HiddenCase:
    """One hidden width: the fused launches (plain and recompute), eager's ops, parity."""
    H: int
    fused: dict = field(default_factory=dict)         # variant -> {"fwd": [Launch], "bwd": [Launch]}
    eager: dict = field(default_factory=dict)         # {"fwd": [OpTraffic], "bwd": [OpTraffic]}
    max_abs_diff: float = 0.0                         # fused vs eager, over y and every gradient
    violations: list = field(default_factory=list)

    def fused_bytes(self, variant: str, mode: str, kind: str = "unique") -> int:
        modes = ("fwd", "bwd") if mode == "full" else (mode,)
        return sum(getattr(lc, kind) for m in modes for lc in self.fused[variant][m])

    def eager_bytes(self, mode: str) -> int:
        modes = ("fwd", "bwd") if mode == "full" else (mode,)
        return sum(o.bytes_read + o.bytes_written for m in modes for o in self.eager[m])

    def launch_count(self, variant: str, mode: str) -> int:
        modes = ("fwd", "bwd") if mode == "full" else (mode,)
        return sum(len(self.fused[variant][m]) for m in modes)


@dataclass
class MlpMeasurement:
    M: int
    D: int
    dtype: str
    cases: list = field(default_factory=list)          # HiddenCase per H
    seconds: float = 0.0

    @property
    def e(self) -> int:
        return ELEMENT_SIZE[self.dtype]

    def formula(self, variant: str, mode: str, H: int) -> int:
        return two_launch_bytes(mode, self.M, self.D, H, self.e, recompute=variant == "fused-recompute")

    def exact(self) -> bool:
        """Every fused unique total and every launch equals its two-launch formula."""
        for c in self.cases:
            for v in VARIANTS:
                for mode in ("fwd", "bwd"):
                    want = fused_launches(self.M, self.D, c.H, self.e, v == "fused-recompute")[mode]
                    got = c.fused[v][mode]
                    if len(got) != len(want):
                        return False
                    for lc, (_, kernel, r, w) in zip(got, want):
                        if lc.kernel != kernel or (lc.unique_read, lc.unique_written) != (r, w):
                            return False
        return True


def measure(M: int = DEFAULT_SIZE[0], D: int = DEFAULT_SIZE[1], dtype: str = "fp32", seed: int = 0,
            ratios=HIDDEN_RATIOS) -> MlpMeasurement:
    """Fused (plain and ``recompute=True``) and eager, forward and backward, for ``H = r D`` per ratio."""
    t0 = time.perf_counter()
    m = MlpMeasurement(M, D, dtype)
    for r in ratios:
        H = r * D
        inputs = make_inputs(M, D, H, DTYPES[dtype], seed)
        case = HiddenCase(H)
        case.eager, ref = measure_eager(*inputs)
        for v in VARIANTS:
            case.fused[v], outs, viol = measure_fused(*inputs, recompute=v == "fused-recompute")
            case.violations += viol
            diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(outs, ref))
            case.max_abs_diff = max(case.max_abs_diff, diff)
        m.cases.append(case)
    m.seconds = time.perf_counter() - t0
    return m


# ---------------------------------------------------------------------------------------------
# Report


def _hname(H: int, D: int) -> str:
    return f"{H // D}D" if H % D == 0 and H != D else ("D" if H == D else str(H))


def bytes_table(m: MlpMeasurement) -> str:
    """Per H and mode: fused (plain, recompute) measured unique bytes vs the two-launch formula,
    fused requests, the absolute minimum, eager measured vs its model, and the ratios."""
    from .report import markdown_table
    rows = []
    e = m.e
    for c in m.cases:
        for mode in MODES:
            fu, fr = c.fused_bytes("fused", mode), c.fused_bytes("fused-recompute", mode)
            f_min, r_min = m.formula("fused", mode, c.H), m.formula("fused-recompute", mode, c.H)
            ea = c.eager_bytes(mode)
            absmin = absolute_min_bytes(mode, m.M, m.D, c.H, e)
            rows.append([f"H={_hname(c.H, m.D)} ({c.H})", mode, f"{fu:,}", f"{f_min:,}",
                         "yes" if fu == f_min else "NO", f"{c.fused_bytes('fused', mode, 'requests'):,}",
                         f"{fr:,}", "yes" if fr == r_min else "NO", f"{absmin:,}", f"{ea:,}",
                         "yes" if ea == eager_bytes(mode, m.M, m.D, c.H, e) else "NO",
                         f"{ea / fu:.2f}x", f"{ea / fr:.2f}x", f"{fu / absmin:.2f}x"])
    return markdown_table(["H", "mode", "fused unique B", "two-launch formula B", "equal",
                           "fused requests B", "fused recompute unique B", "= its formula",
                           "absolute minimum B", "eager B (measured)", "= eager model", "eager / fused",
                           "eager / fused recompute", "fused / absolute minimum"], rows)


def launch_table(m: MlpMeasurement) -> str:
    """Every fused launch (plain variant; recompute adds fwd 1 again at the head of the backward):
    distinct bytes read and written, the formula, requests."""
    from .report import markdown_table
    rows = []
    for c in m.cases:
        want = fused_launches(m.M, m.D, c.H, m.e)
        for mode in ("fwd", "bwd"):
            for lc, (name, _, r, w) in zip(c.fused["fused"][mode], want[mode]):
                rows.append([f"H={_hname(c.H, m.D)}", name, lc.kernel, "x".join(map(str, lc.grid)),
                             f"{lc.unique_read:,}", f"{lc.unique_written:,}", f"{r:,}", f"{w:,}",
                             "yes" if (lc.unique_read, lc.unique_written) == (r, w) else "NO",
                             f"{lc.requests:,}"])
    return markdown_table(["H", "launch", "kernel", "grid", "unique read B", "unique written B", "formula read B",
                           "formula written B", "equal", "requests B"], rows)


FORMULAS = [
    "two-launch compulsory minimum (each launch reads each operand once, writes each result once): "
    "fwd e(3MD + 2MH + 2HD + H + D); bwd e(6MD + 5MH + 4HD + H + D); with recompute the backward adds "
    "forward 1 again, e(MD + MH + HD + H)",
    "absolute minimum of the block (x read once, y written once, h written once for the backward, each "
    "weight once): fwd e(2MD + MH + 2HD + H + D); bwd e(3MD + MH + 4HD + H + D)",
    "eager (relu, addmm, relu, addmm, add; backward two mm + a sum per linear, two threshold_backward, "
    "the residual add): fwd e(7MD + 4MH + 2HD + H + D); bwd e(11MD + 8MH + 4HD + H + D)",
]


def section(m: MlpMeasurement) -> tuple[list[str], bool]:
    """The CPU report's "MLP block" section (markdown lines) and whether every fused byte count
    equals its formula (and every lane stayed in bounds)."""
    exact = m.exact() and not any(c.violations for c in m.cases)
    hs = ", ".join(f"H={_hname(c.H, m.D)}" for c in m.cases)
    worst = max((c.max_abs_diff for c in m.cases), default=0.0)
    lines = [
        f"## MLP block: bytes per call, M={m.M}, D={m.D}, {hs}, {m.dtype}", "",
        "y = x + alpha * (relu(relu(x) @ W1.T + b1) @ W2.T + b2), W1 [H, D], W2 [D, H] "
        "(fusedres.fused_residual_mlp: 2 forward launches, 4 backward; recompute: 5). Bytes MEASURED on this "
        "CPU, no GPU time: fused = distinct bytes per launch through the interpreter instrument (summed over "
        "the launches), requests = every active lane of every load and store; eager = "
        "fusedres.residual_mlp_reference and its autograd backward under the aten dispatch counter. Formulas "
        "(bench/mlp.py), e the element size:", ""]
    lines += ["- " + f for f in FORMULAS]
    lines += ["", bytes_table(m), "", "Per launch (distinct bytes against the two-launch formula):", "",
              launch_table(m), "",
              f"- fused bytes equal the two-launch formula exactly, every launch: {'yes' if exact else 'NO'}",
              "- the request bytes exceed the distinct bytes by the tile re-reads, including the dW kernels' db "
              "column sums re-reading g (dh) from L2: requests, not distinct bytes",
              f"- fused vs eager outputs (y and every gradient), max |difference|: {worst:.3g}",
              f"- measured in {m.seconds:.1f} s on this CPU", ""]
    return lines, exact


def records(m: MlpMeasurement) -> list[dict]:
    """JSON records of the MLP section: measured bytes beside their formulas; no time (ms: None)."""
    out = []
    e = m.e
    for c in m.cases:
        for mode in MODES:
            ea = c.eager_bytes(mode)
            base = dict(section="mlp", mode=mode, M=m.M, D=m.D, H=c.H, dtype=m.dtype, ms=None, measured=False)
            for v in VARIANTS:
                fu = c.fused_bytes(v, mode)
                out.append(dict(base, impl=v, launches=c.launch_count(v, mode), unique_bytes=fu,
                                request_bytes=c.fused_bytes(v, mode, "requests"), bytes_source="measured",
                                formula_bytes=m.formula(v, mode, c.H),
                                absolute_min_bytes=absolute_min_bytes(mode, m.M, m.D, c.H, e, v == "fused-recompute"),
                                eager_over_fused=ea / fu))
            out.append(dict(base, impl="eager", launches=sum(len(c.eager[x]) for x in
                                                             (("fwd", "bwd") if mode == "full" else (mode,))),
                            bytes=ea, bytes_source="measured", model_bytes=eager_bytes(mode, m.M, m.D, c.H, e)))
    return out
