"""The narrow stack in ``python -m bench``: L blocks of width D <= 128 as one fused stack, as L
single-block fused kernels, and as eager PyTorch.

CPU mode MEASURES the bytes of all three at one size (the stack and the single blocks through
the interpreter instrument, eager through the aten dispatch counter) and checks the stack's
against its MODEL, byte for byte. The ceilings are the roofline MODEL of the three kernel lists
on named GPUs at a large M: never a measured time.

Model of the stack (``e`` element size, ``a`` the partials' accumulator size, 4; ``P`` backward
programs, one per SM; the bias included):

- forward, training: read ``x, W, b``: ``e(MD + LD^2 + LD)``; write ``x_1 .. x_{L-1}`` and ``y``: ``e LMD``;
- forward, inference: ``e(2MD + LD^2 + LD)``;
- backward kernel: read ``g, x_0, x_1 .. x_{L-1}, W``: ``e((L+1)MD + LD^2)``; write ``dx``: ``e MD``, and the
  partials ``a P L (D^2 + D)`` once (a program re-reads its own partials for every further row tile:
  that read-modify-write is sized to stay in L2 by the layer chunks, so it is not HBM traffic;
  the interpreter counts it, as ``ws re-read``);
- reduce: read the partials ``a P L (D^2 + D)``; write ``dW, db``: ``e(LD^2 + LD)``;
- when the layers need more than one chunk, ``g`` waits in an fp32 ``[M, D]`` buffer between chunks:
  ``2 a MD`` per chunk boundary.

FLOPs: ``2 L M D^2`` forward, ``4 L M D^2`` backward, as L blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import model
from .model import Kernel

#: Streaming multiprocessors and L2 bytes of the projection GPUs (datasheets): the backward's
#: programs and its layer chunks.
GPU_SMS_L2 = {"H100 SXM": (132, 50 * 2 ** 20), "A100 SXM 80GB": (108, 40 * 2 ** 20), "H200 SXM": (132, 50 * 2 ** 20)}
#: the L2 the launcher assumes without a GPU (fusedres.kernels.residual_stack.DEFAULT_L2_BYTES)
DEFAULT_L2 = 50 * 2 ** 20
IMPLS = ("stack", "blocks", "eager")
MODES = ("fwd", "bwd", "full", "nograd")
DESCRIPTIONS = {"stack": "FusedResidualStack: one forward kernel, one backward kernel + reduce",
                "blocks": "L FusedResidualBlocks: L x (forward; dx + dW kernels)",
                "eager": "L eager ResidualBlocks, op by op"}


def chunks(L: int, D: int, programs: int, l2_bytes: int, acc: int = 4) -> int:
    """Layer chunks of the deterministic backward, by the launcher's own rule."""
    from fusedres.kernels.residual_stack import layers_per_chunk
    return math.ceil(L / layers_per_chunk(L, D, programs, acc, l2_bytes))


def stack_kernels(impl: str, mode: str, M: int, D: int, L: int, e: int, programs: int = 132,
                  l2_bytes: int = DEFAULT_L2, acc: int = 4) -> list[Kernel]:
    """The MODEL's kernels of ``impl`` ("stack", "blocks", "eager") for ``mode`` ("fwd" is the
    training forward, "nograd" the inference forward, "bwd", "full" = fwd + bwd)."""
    if impl in ("blocks", "eager"):
        per_block = model.kernels("fused-min" if impl == "blocks" else "eager", mode, M, D, e)
        return [Kernel(f"layer {l}: {k.name}", k.read, k.written, k.flops) for l in range(L) for k in per_block]
    if impl != "stack":
        raise ValueError(f"unknown impl {impl!r}; one of {IMPLS}")
    ws = acc * programs * L * (D * D + D)
    fwd = [Kernel("stack fwd (training: saves x_1..x_{L-1})", e * (M * D + L * D * D + L * D), e * L * M * D,
                  2 * L * M * D * D)]
    nograd = [Kernel("stack fwd (inference)", e * (M * D + L * D * D + L * D), e * M * D, 2 * L * M * D * D)]
    carry = 2 * acc * M * D * (chunks(L, D, programs, l2_bytes, acc) - 1)
    bwd = [Kernel("stack bwd (dx; dW/db partials)", e * ((L + 1) * M * D + L * D * D) + carry // 2,
                  e * M * D + ws + carry // 2, 4 * L * M * D * D),
           Kernel("stack reduce (fixed order)", ws, e * (L * D * D + L * D), 0)]
    return {"fwd": fwd, "nograd": nograd, "bwd": bwd, "full": fwd + bwd}[mode]


@dataclass
class StackMeasurement:
    M: int
    D: int
    L: int
    dtype: str
    programs: int
    #: (impl, mode) -> unique bytes per call (interpreter for stack/blocks; aten counter for eager)
    measured: dict
    #: the stack's partials re-read inside its backward kernel (L2-resident by design, see above)
    ws_reread: int
    flops: dict
    launches: dict

    def hbm_bytes(self, impl: str, mode: str) -> int:
        """Measured bytes less the stack's in-kernel partial re-reads (L2-resident by design)."""
        reread = self.ws_reread if impl == "stack" and mode in ("bwd", "full") else 0
        return self.measured[(impl, mode)] - reread

    def model(self, impl: str, mode: str) -> int:
        """The MODEL's bytes at this measurement's size and programs (the interpreter's L2: one chunk)."""
        return model_bytes(impl, mode, self.M, self.D, self.L, model.ELEMENT_SIZE[self.dtype], self.programs,
                           DEFAULT_L2)


def measure(M: int = 4096, D: int = 64, L: int = 8, dtype: str = "bf16", seed: int = 0) -> StackMeasurement:
    """Run the stack, L single blocks and eager once each (training forward + backward, and
    inference forward) under the byte counters. Needs the interpreter (``python -m bench`` sets it)."""
    import fusedres
    from fusedres.kernels import residual_stack as ks
    from fusedres.traffic import InterpreterTraffic

    from .counters import DispatchTraffic

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(seed)
    stack = fusedres.FusedResidualStack(D, L)
    with torch.no_grad():
        stack.weight.copy_(torch.empty(L, D, D).uniform_(-D ** -0.5, D ** -0.5, generator=gen))
    stack = stack.to(tdtype)
    x = torch.randn(M, D, generator=gen).to(tdtype)
    g = torch.randn(M, D, generator=gen).to(tdtype)
    blocks = torch.nn.Sequential(*stack.to_blocks())
    eager = torch.nn.Sequential(*stack.to_blocks(fusedres.ResidualBlock))
    measured, flops, launches = {}, {}, {}

    stack_k = {"fwd": ["residual_stack_fwd_kernel"], "nograd": ["residual_stack_fwd_kernel"],
               "bwd": ["residual_stack_bwd_kernel", "residual_stack_reduce_kernel"]}
    block_k = {"fwd": ["residual_fwd_kernel"], "nograd": ["residual_fwd_kernel"],
               "bwd": ["residual_dx_kernel", "residual_dw_kernel"]}
    ws_reread = 0
    for impl, module, names in (("stack", stack, stack_k), ("blocks", blocks, block_k)):
        xs = x.clone().requires_grad_()
        with InterpreterTraffic() as t:
            y = module(xs)
            torch.autograd.grad(y, [xs, *module.parameters()], g)
            with torch.no_grad():
                module(x)
        forwards = t.select(names["fwd"])          # the training forward's launches, then the inference one's
        train_fwd, infer_fwd = forwards[:len(forwards) // 2], forwards[len(forwards) // 2:]
        bwd = t.select(names["bwd"])
        for mode, launches_ in (("fwd", train_fwd), ("nograd", infer_fwd), ("bwd", bwd)):
            measured[(impl, mode)] = sum(lc.unique_bytes for lc in launches_)
            flops[(impl, mode)] = sum(lc.dot_flops for lc in launches_)
            launches[(impl, mode)] = len(launches_)
        if impl == "stack":
            ws_reread = sum(lc.args["ws_ptr"].unique_read for lc in t.select(["residual_stack_bwd_kernel"]))
    xs = x.clone().requires_grad_()
    with DispatchTraffic() as fwd:
        y = eager(xs)
    with DispatchTraffic() as bwd:
        torch.autograd.grad(y, [xs, *eager.parameters()], g)
    with torch.no_grad(), DispatchTraffic() as nograd:
        eager(x)
    for mode, ops in (("fwd", fwd.ops), ("bwd", bwd.ops), ("nograd", nograd.ops)):
        measured[("eager", mode)] = sum(o.bytes for o in ops)
        flops[("eager", mode)] = sum(o.flops for o in ops)
        launches[("eager", mode)] = len(ops)
    for impl in IMPLS:
        measured[(impl, "full")] = measured[(impl, "fwd")] + measured[(impl, "bwd")]
        flops[(impl, "full")] = flops[(impl, "fwd")] + flops[(impl, "bwd")]
        launches[(impl, "full")] = launches[(impl, "fwd")] + launches[(impl, "bwd")]
    config = ks.stack_config("stack_bwd", D, ks.stack_operand_class(tdtype))
    return StackMeasurement(M, D, L, dtype, ks.stack_programs(M, D, "cpu", config),
                            measured, ws_reread, flops, launches)


def model_bytes(impl: str, mode: str, M: int, D: int, L: int, e: int, programs: int, l2_bytes: int) -> int:
    return sum(k.bytes for k in stack_kernels(impl, mode, M, D, L, e, programs, l2_bytes))


def measured_table(m: StackMeasurement) -> str:
    rows = ["| impl | mode | launches | measured bytes | per row | MODEL bytes | measured / MODEL |",
            "|---|---|---|---|---|---|---|"]
    for impl in IMPLS:
        for mode in MODES:
            got, want = m.hbm_bytes(impl, mode), m.model(impl, mode)
            rows.append(f"| {impl} | {mode} | {m.launches[(impl, mode)]} | {got:,} | {got / m.M:,.0f} | {want:,} | "
                        f"{got / want:.3f} |")
    return "\n".join(rows)


def ceiling_table(M: int = 2 ** 20, widths=(64, 128), L: int = 8, dtype: str = "bf16") -> str:
    """MODEL: roofline time of eager and of L single blocks over the stack's, per GPU and mode."""
    e = model.ELEMENT_SIZE[dtype]
    rows = ["| GPU | D | mode | stack bytes/row | blocks bytes/row | eager bytes/row | stack over blocks | "
            "stack over eager |", "|---|---|---|---|---|---|---|---|"]
    for spec in model.PROJECTION_GPUS:
        sms, l2 = GPU_SMS_L2[spec.name]
        for D in widths:
            for mode in MODES:
                t = {impl: model.roofline_time_s(stack_kernels(impl, mode, M, D, L, e, sms, l2), spec, dtype)
                     for impl in IMPLS}
                b = {impl: model_bytes(impl, mode, M, D, L, e, sms, l2) / M for impl in IMPLS}
                rows.append(f"| {spec.name} | {D} | {mode} | {b['stack']:,.0f} | {b['blocks']:,.0f} | "
                            f"{b['eager']:,.0f} | {t['blocks'] / t['stack']:.2f}x | {t['eager'] / t['stack']:.1f}x |")
    return "\n".join(rows)


def section(m: StackMeasurement) -> list[str]:
    exact = all(m.hbm_bytes("stack", mode) == m.model("stack", mode) for mode in MODES)
    return [
        f"## Narrow stack: L={m.L} blocks of D={m.D}, M={m.M}, {m.dtype}", "",
        "Bytes MEASURED per call (stack and single blocks: unique bytes per launch through the interpreter "
        "instrument; eager: aten dispatch counter), against the MODEL's formulas (bench/stack.py). The stack's "
        f"backward runs {m.programs} persistent programs here (one per SM on a GPU); its partials' read-modify-"
        f"write inside the backward kernel ({m.ws_reread:,} B re-read here) is L2-resident by design and left "
        "out of the HBM bytes. fwd = training forward, nograd = inference forward.", "",
        measured_table(m), "",
        f"- stack bytes equal the MODEL exactly: {'yes' if exact else 'NO'}",
        "", f"## Narrow stack: ceiling speedups, M=2^20, L={m.L}, bf16 (roofline MODEL, not a measurement)", "",
        "Per kernel max(bytes / bandwidth, FLOPs / peak), summed; P = the GPU's SM count, layer chunks from half "
        "its L2. Launch latency is not modelled (it favours the stack further: 1-2 launches instead of 2L-3L).", "",
        ceiling_table(L=m.L), "",
    ], exact


def records(m: StackMeasurement) -> list[dict]:
    """JSON records of the stack section: measured bytes with their MODEL; no time (ms: None)."""
    out = []
    for impl in IMPLS:
        for mode in MODES:
            out.append(dict(section="stack", impl=impl, mode=mode, M=m.M, D=m.D, L=m.L, dtype=m.dtype,
                            launches=m.launches[(impl, mode)], bytes=m.hbm_bytes(impl, mode), bytes_source="measured",
                            model_bytes=m.model(impl, mode), ms=None, measured=False))
    return out


# ---------------------------------------------------------------------------------------------
# GPU mode: real timings (only on a GPU; ``measured`` is the device's ``is_gpu``)


def stack_parity(impl: str, fn, x, w, b, g, eager_y, reference_y) -> tuple[bool, str]:
    """``impl``'s forward and backward under the parity rule: ``y`` against the fp64 chain from the
    same rounded inputs; ``dx``, ``dW``, ``db`` against an fp64 backward given the layer inputs the
    implementation itself produced, beside eager's backward from the same (end to end, relu-mask
    flips near zero would dominate any low-precision comparison), with the rule's floor at the
    scale of that backward on absolute values. ``eager`` is that reference: its forward only.
    Returns (ok, detail)."""
    from fusedres.reference import eager_stack_backward
    from fusedres.validate import parity

    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    packed, inputs = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = fn(*leaves, inputs=inputs) if impl == "blocks" else fn(*leaves)
    checks = {"y": parity(y, eager_y, reference_y)}
    if impl != "eager":
        y.backward(g)
        L, D = w.shape[0], w.shape[-1]
        if impl == "stack":   # x_1 .. x_{L-1}, as the stack's forward saved them
            saved = [t for t in packed if t.dim() == 3 and t.shape[0] == L - 1 and t.shape[1:] == x.shape]
            saved = saved[0] if L > 1 else x.new_empty(0, *x.shape)
        else:
            saved = torch.stack(inputs[1:]) if L > 1 else x.new_empty(0, *x.shape)
        eager = eager_stack_backward(g, x, saved, w, True, True, True)
        d = [t.detach().double() for t in (g, x, saved, w)]
        ref = eager_stack_backward(*d, True, True, True)
        # the parity rule's scale: the same backward on absolute values
        scale = eager_stack_backward(*(t.abs() for t in d), True, True, True)
        for name, f, e, r, sc in zip(("dx", "dW", "db"), (t.grad for t in leaves), eager, ref, scale):
            checks[name] = parity(f, e, r, sc)
    ok = all(p.ok for p in checks.values())
    return ok, "; ".join(f"{n} {'ok' if p.ok else 'FAIL'} ({p})" for n, p in checks.items())


def time_stack(device, M: int = 65536, D: int = 64, L: int = 8, dtype: str = "bf16", seed: int = 0,
               meta: dict | None = None) -> list[dict]:
    """Time the stack, L single-block fused kernels and eager in fwd/bwd/full/nograd with the
    device's timer (``bench.gpu.Device``). Each implementation's forward and backward are first
    held to the parity rule (:func:`stack_parity`); one that fails is reported and not timed."""
    import fusedres

    from .gpu import DTYPES as GPU_DTYPES, mode_fn

    tdtype = GPU_DTYPES[dtype]
    gen = torch.Generator(device=device.torch_device).manual_seed(seed)
    bound = D ** -0.5
    x = torch.randn(M, D, generator=gen, device=device.torch_device).to(tdtype)
    w = ((torch.rand(L, D, D, generator=gen, device=device.torch_device) * 2 - 1) * bound).to(tdtype)
    b = ((torch.rand(L, D, generator=gen, device=device.torch_device) * 2 - 1) * bound).to(tdtype)
    g = torch.randn(M, D, generator=gen, device=device.torch_device).to(tdtype)

    def blocks(x, w, b, inputs=None):
        for l in range(w.shape[0]):
            if inputs is not None:
                inputs.append(x.detach())
            x = fusedres.fused_residual(x, w[l], b[l])
        return x

    impls = {"stack": fusedres.fused_residual_stack, "blocks": blocks, "eager": fusedres.stack_reference}
    reference = fusedres.stack_reference(x.double(), w.double(), b.double())
    eager_y = fusedres.stack_reference(x, w, b)
    e = model.ELEMENT_SIZE[dtype]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device.is_gpu else 132
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device.is_gpu else DEFAULT_L2
    rows = []
    for impl, fn in impls.items():
        ok, detail = stack_parity(impl, fn, x, w, b, g, eager_y, reference)
        for mode in MODES:
            row = dict(section="stack", impl=impl, mode=mode, M=M, D=D, L=L, dtype=dtype, gpu=device.name,
                       measured=device.is_gpu, ms=None, ms_p20=None, ms_p80=None, parity="ok" if ok else "FAIL",
                       parity_detail=detail, model_bytes=model_bytes(impl, mode, M, D, L, e, sms, l2), **(meta or {}))
            if ok:
                row["ms_p20"], row["ms"], row["ms_p80"] = device.time_ms(mode_fn(mode, fn, x, w, b, g))
            rows.append(row)
    by = {(r["impl"], r["mode"]): r for r in rows}
    for r in rows:
        for peer in ("blocks", "eager"):
            other = by[(peer, r["mode"])]["ms"]
            r[f"speedup_vs_{peer}"] = other / r["ms"] if r["ms"] and other else None
        spec = device.spec
        r["ceiling_vs_blocks_model"] = r["ceiling_vs_eager_model"] = None
        if spec is not None and r["impl"] == "stack":
            t = {i: model.roofline_time_s(stack_kernels(i, r["mode"], M, D, L, e, sms, l2), spec, dtype)
                 for i in IMPLS}
            r["ceiling_vs_blocks_model"], r["ceiling_vs_eager_model"] = t["blocks"] / t["stack"], t["eager"] / t["stack"]
    return rows


def gpu_markdown(rows: list[dict]) -> str:
    measured = all(r["measured"] for r in rows)
    head = (f"## Narrow stack on {rows[0]['gpu']}: M={rows[0]['M']}, D={rows[0]['D']}, L={rows[0]['L']}, "
            f"{rows[0]['dtype']}" + ("" if measured else " (NOT a GPU measurement: a CPU stand-in timer)"))
    lines = [head, "", "| impl | mode | ms (p50) | speedup of the stack over it | stack's MODEL ceiling over it | parity |",
             "|---|---|---|---|---|---|"]
    by = {(r["impl"], r["mode"]): r for r in rows}
    for r in rows:
        s = by[("stack", r["mode"])]
        over = s.get(f"speedup_vs_{r['impl']}") if r["impl"] != "stack" else None
        ceil = s.get(f"ceiling_vs_{r['impl']}_model") if r["impl"] != "stack" else None
        ms = "-" if r["ms"] is None else f"{r['ms']:.4f}"
        over = "-" if over is None else f"{over:.2f}x"
        ceil = "-" if ceil is None else f"{ceil:.2f}x (MODEL)"
        lines.append(f"| {r['impl']} | {r['mode']} | {ms} | {over} | {ceil} | {r['parity']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# MODEL v2 (bench.model): the stack against L single blocks, with the backward's L2 partial traffic


def stack_v2_us(M: int, D: int, L: int, dtype: str, gpu: str) -> dict:
    """MODEL v2 times, us, of the stack's training forward + backward + reduce at ``dtype``
    ("bf16", or "tf32": fp32 operands on tf32 tensor cores) on ``gpu`` ("h100", "a100"), with the
    shipped stack configs (sm_90 entries for h100/h200, sm_80 for a100).

    - forward: ``cdiv(M, BLOCK_M)`` programs; one program's FLOPs ``2 L BLOCK_M D^2``; unique bytes as
      :func:`stack_kernels`; request bytes = unique bytes + every program's re-read of the L weights
      ``e L (D^2 + D)``;
    - backward: ``P`` = SMs persistent programs, one wave, each ``cdiv(cdiv(M, BLOCK_M), P)`` row tiles of
      ``4 L BLOCK_M D^2`` FLOPs; request bytes = unique bytes + per row tile the L weights ``e L D^2`` and
      the fp32 partial read-modify-write ``8 L (D^2 + D)``, i.e. ``8 D^2 / BLOCK_M`` bytes per row per
      layer (:func:`bench.model.stack_bwd_l2_bytes_per_row`);
    - reduce: unique = request bytes, no FLOPs, one wave."""
    from fusedres.kernels import configs
    gv2 = model.GPUS_V2[gpu]
    e = 2 if dtype == "bf16" else 4
    cap = (8, 0) if gpu == "a100" else None
    ops = "16bit" if dtype == "bf16" else "tf32"
    mdt = "bf16" if dtype == "bf16" else "fp32"
    sms, l2 = gv2.sms, gv2.l2_mb * 2 ** 20
    fwd_k, bwd_k, red_k = stack_kernels("stack", "full", M, D, L, e, sms, l2)
    bmf = configs.stack_config("stack_fwd", D, ops, cap).kwargs["BLOCK_M"]
    bmb = configs.stack_config("stack_bwd", D, ops, cap).kwargs["BLOCK_M"]
    pf = -(-M // bmf)
    kf = model.KernelV2("stack fwd", -(-pf // sms), 2 * L * bmf * D * D, fwd_k.flops, fwd_k.bytes,
                        fwd_k.bytes + pf * e * L * (D * D + D))
    rt = -(-M // bmb)
    l2_partials = rt * 8 * L * (D * D + D)
    kb = model.KernelV2("stack bwd", 1, 4 * L * bmb * D * D * -(-rt // sms), bwd_k.flops, bwd_k.bytes,
                        bwd_k.bytes + rt * e * L * D * D + l2_partials)
    kr = model.KernelV2("stack reduce", 1, 0, 0, red_k.bytes, red_k.bytes)
    t = {k.name: model.time_us(k, gv2, mdt) for k in (kf, kb, kr)}
    stack = sum(t.values())
    from .plan import plan_records
    chosen = [r for r in plan_records(gpu, M, D, mdt) if r["chosen"]]
    blocks = L * sum(r["model_us"] for r in chosen)
    return dict(stack_us=stack, blocks_us=blocks, stack_bwd_us=t["stack bwd"],
                bwd_terms=model.terms_us(kb, gv2, mdt), bwd_block_m=bmb,
                l2_partial_per_row_layer=model.stack_bwd_l2_bytes_per_row(D, bmb), act_per_row_layer=e * D)


def stack_v2_table(M: int = 65536, widths=(16, 32, 64, 128), L: int = 8) -> str:
    """MODEL v2: the stack (fwd + bwd + reduce) against L single blocks (fwd, dx, dW and any reduce,
    each in its plan-chosen config), bf16 and tf32, H100 and A100."""
    rows = [f"MODEL v2 (no kernel run; L2 bandwidth from published measurements, launch latency ASSUMED, "
            f"bench/model.py): the narrow stack "
            f"vs {L} single blocks, training fwd + bwd, M = {M}",
            "| GPU | dtype | D | stack bwd BLOCK_M | L2 partials B/row/layer | act. B/row/layer | stack bwd bound | "
            "stack us | blocks us | blocks / stack |", "|---|---|---|---|---|---|---|---|---|---|"]
    for gpu in ("h100", "a100"):
        for dtype in ("bf16", "tf32"):
            for D in widths:
                r = stack_v2_us(M, D, L, dtype, gpu)
                bound = max(r["bwd_terms"], key=r["bwd_terms"].get)
                rows.append(f"| {gpu} | {dtype} | {D} | {r['bwd_block_m']} | {r['l2_partial_per_row_layer']:.0f} | "
                            f"{r['act_per_row_layer']} | {bound} | {r['stack_us']:.1f} | {r['blocks_us']:.1f} | "
                            f"{r['blocks_us'] / r['stack_us']:.2f}x |")
    return "\n".join(rows)
