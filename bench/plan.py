"""``python -m bench --plan``: the launch plan of every single-block kernel in every shipped config,
from :mod:`fusedres.kernels.plan` (the rule the launchers use), for a named GPU. Runs anywhere: no
kernel runs, neither on a GPU nor in the interpreter.

Per (kernel, config): programs, splits (dW's M reduction), waves and fill at one resident program
per SM (occupancy is not modelled), and ``model_us``: the MODEL v2 time of that launch
(:mod:`bench.model`: ``max(wave-quantised compute, HBM, L2) + launch latency``). The chosen config of
each kernel is the one with the least model time (ties: the best fill, then the first, the largest
tile); a dW config is charged its own time plus its reduce's, and the reduce follows the chosen dW.
The ``fwd``/``dx``/``dw`` records also carry ``compute_us``, ``hbm_us`` and ``l2_us`` (the three terms).

At ``D <= 128`` the narrow stack's kernels follow as rows with the same keys (``stack_fwd``,
``stack_bwd``, ``stack_reduce``; depth ``L`` from ``--stack-layers``, default 8; each kernel has one
shipped config per width, operand class and arch, so each is ``chosen``). ``--small-m`` prints the
fill and MODEL time of fwd and dx at M in {512, 2048, 8192} x D in {1024, 4096}, bf16, H100 and A100.
"""
from __future__ import annotations

import json

DTYPE_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}


def plan_records(gpu: str, M: int, D: int, dtype: str, stack_layers: int | None = None) -> list[dict]:
    """One record per (kernel, config) of the single-block kernels, then (``D <= 128`` and
    ``stack_layers``, which ``python -m bench --plan`` passes: default 8) the narrow stack's kernels at
    depth ``stack_layers`` (:func:`stack_records`). Without ``stack_layers`` (the default) only the
    single-block kernels: :func:`bench.stack.stack_v2_us` sums their chosen records as one block."""
    from fusedres.aot import config_name
    from fusedres.kernels import configs, plan

    from . import model

    sms = plan.GPU_SMS[gpu]
    gv2 = model.GPUS_V2[gpu]
    assert gv2.sms == sms, "bench.model.GPUS_V2 and fusedres.kernels.plan.GPU_SMS disagree"
    elem = DTYPE_SIZES[dtype]
    out = []
    base = dict(gpu=gpu, M=M, D=D, dtype=dtype)
    for kind, fn in (("fwd", plan.plan_fwd), ("dx", plan.plan_dx), ("dw", None)):
        recs = []
        for c in configs.shipped_configs(kind, elem):
            p = fn(sms, M, D, D, c) if fn else plan.plan_dw(sms, M, D, D, c)
            if kind == "fwd":
                k = model.v2_fwd(M, D, elem, c.kwargs, p.programs, p.waves)
            elif kind == "dx":
                k = model.v2_dx(M, D, elem, c.kwargs, p.programs, p.waves)
            else:
                k = model.v2_dw(M, D, elem, c.kwargs, p.programs, p.waves, p.splits, p.tiles_per_split)
            terms = model.terms_us(k, gv2, dtype)
            recs.append(dict(kernel=kind, config=config_name(kind, c), **base, programs=p.programs,
                             splits=p.splits, waves=p.waves, fill=round(p.fill, 4),
                             model_us=round(model.time_us(k, gv2, dtype), 3),
                             **{f"{t}_us": round(v, 3) for t, v in terms.items()}, chosen=False, _k=k))
            if kind == "dw":
                rc, r = plan.choose_reduce(sms, D, D, p.splits)
                rk = model.v2_reduce(D, elem, r.programs, r.waves, r.splits)
                recs.append(dict(kernel="dw_reduce", config=_reduce_name(rc), after=recs[-1]["config"], **base,
                                 programs=r.programs, splits=r.splits, waves=r.waves, fill=round(r.fill, 4),
                                 model_us=round(model.time_us(rk, gv2, dtype), 3) if r.programs else 0.0,
                                 chosen=False, _k=rk))
                recs[-2]["_total"] = recs[-2]["model_us"] + recs[-1]["model_us"]
        main = [r for r in recs if r["kernel"] == kind]
        # least model time (dW: with its reduce); ties: the best fill; min() keeps the first of equals
        best = min(main, key=lambda r: (r.get("_total", r["model_us"]), -r["fill"]))
        best["chosen"] = True
        for r in recs:
            if r["kernel"] == "dw_reduce" and r["after"] == best["config"] and r["programs"]:
                r["chosen"] = True
        out += recs
    if stack_layers and D <= 128:
        out += stack_records(gpu, M, D, stack_layers, dtype)
    return out


def stack_records(gpu: str, M: int, D: int, L: int, dtype: str) -> list[dict]:
    """The narrow stack's launches (training forward, persistent backward, fixed-order reduce) as plan
    rows: the shipped config of each (``fusedres.kernels.configs.stack_config``: sm_80 entries for
    a100, sm_90 for h100/h200; fp32 as tf32 operands), programs, waves and fill at one resident
    program per SM, and the MODEL v2 time, as :func:`bench.stack.stack_v2_us` models them:

    - ``stack_fwd``: ``cdiv(M, BLOCK_M)`` programs, one program's FLOPs ``2 L BLOCK_M D^2``; request
      bytes = unique bytes + every program's re-read of the L weights and biases ``e L (D^2 + D)``;
    - ``stack_bwd``: ``P = min(SMs, row tiles)`` persistent programs, one wave, each
      ``cdiv(row tiles, SMs)`` row tiles of ``4 L BLOCK_M D^2`` FLOPs; request bytes = unique bytes + per
      row tile the L weights ``e L D^2`` and the fp32 partial read-modify-write ``8 L (D^2 + D)``
      (``8 D^2 / BLOCK_M`` bytes per row per layer, :func:`bench.model.stack_bwd_l2_bytes_per_row`);
    - ``stack_reduce``: ``cdiv(L (D^2 + D), BLOCK)`` programs; unique = request bytes, no FLOPs.

    The records carry ``L`` besides the plan's keys; ``splits`` is 1 (the stack has no split-M)."""
    from fusedres.kernels import configs, plan

    from . import model
    from .stack import stack_kernels

    if D > 128:
        raise ValueError(f"the narrow stack has widths 16..128, not {D}")
    gv2 = model.GPUS_V2[gpu]
    e = DTYPE_SIZES[dtype]
    ops = "tf32" if dtype == "fp32" else "16bit"
    cap = (8, 0) if gpu == "a100" else None
    sms, l2 = gv2.sms, gv2.l2_mb * 2 ** 20
    cf = configs.stack_config("stack_fwd", D, ops, cap)
    cb = configs.stack_config("stack_bwd", D, ops, cap)
    cr = configs.stack_config("stack_reduce", D, capability=cap)
    bmf, bmb = cf.kwargs["BLOCK_M"], cb.kwargs["BLOCK_M"]
    pf, rt = -(-M // bmf), -(-M // bmb)
    P = max(1, min(sms, rt))
    fwd_k, bwd_k, red_k = stack_kernels("stack", "full", M, D, L, e, P, l2)
    kf = model.KernelV2("stack_fwd", -(-pf // sms), 2 * L * bmf * D * D, fwd_k.flops, fwd_k.bytes,
                        fwd_k.bytes + pf * e * L * (D * D + D))
    kb = model.KernelV2("stack_bwd", 1, 4 * L * bmb * D * D * -(-rt // sms), bwd_k.flops, bwd_k.bytes,
                        bwd_k.bytes + rt * e * L * D * D + rt * 8 * L * (D * D + D))
    pr = -(-(L * (D * D + D)) // cr.kwargs["BLOCK"])
    kr = model.KernelV2("stack_reduce", -(-pr // sms), 0, 0, red_k.bytes, red_k.bytes)
    base = dict(gpu=gpu, M=M, D=D, dtype=dtype, L=L)
    out = []
    for k, c, programs in ((kf, cf, pf), (kb, cb, P), (kr, cr, pr)):
        waves, fill = plan.waves_and_fill(programs, sms)
        if k.name == "stack_bwd":
            waves = 1                   # persistent: P <= SMs programs loop over the row tiles
        terms = model.terms_us(k, gv2, dtype)
        out.append(dict(kernel=k.name, config=_stack_name(c), **base, programs=programs, splits=1, waves=waves,
                        fill=round(fill, 4), model_us=round(model.time_us(k, gv2, dtype), 3),
                        **{f"{t}_us": round(v, 3) for t, v in terms.items()}, chosen=True, _k=k))
    return out


def _stack_name(config) -> str:
    return (" ".join(f"{k}={v}" for k, v in config.kwargs.items())
            + f" w{config.num_warps} s{config.num_stages}")


def fused_v2_us(gpu: str, M: int, D: int, dtype: str, mode: str) -> float:
    """MODEL v2 time, us, of the fused single-block kernels in their plan-chosen configs: ``fwd`` (the
    forward), ``bwd`` (dx, dW and its reduce, if it splits) or ``full`` (both)."""
    kinds = {"fwd": ("fwd",), "bwd": ("dx", "dw", "dw_reduce"), "full": ("fwd", "dx", "dw", "dw_reduce")}[mode]
    return sum(r["model_us"] for r in plan_records(gpu, M, D, dtype, stack_layers=None)
               if r["chosen"] and r["kernel"] in kinds)


SMALL_M = (512, 2048, 8192)
SMALL_M_D = (1024, 4096)


def small_m_records(gpus=("h100", "a100"), Ms=SMALL_M, Ds=SMALL_M_D, dtype: str = "bf16") -> list[dict]:
    """Forward and dx at small M (issue 14, item 5): per (gpu, M, D, kernel) the chosen config (least
    MODEL time) with its programs, waves, fill and ``model_us``, and the best fill over the shipped
    configs (``best_fill``, ``best_fill_config``); ``half_wave``: whether any config reaches fill 0.5."""
    out = []
    for gpu in gpus:
        for D in Ds:
            for M in Ms:
                recs = plan_records(gpu, M, D, dtype, stack_layers=None)
                for kind in ("fwd", "dx"):
                    same = [r for r in recs if r["kernel"] == kind]
                    ch = next(r for r in same if r["chosen"])
                    best = max(same, key=lambda r: r["fill"])
                    out.append(dict(gpu=gpu, M=M, D=D, dtype=dtype, kernel=kind, config=ch["config"],
                                    programs=ch["programs"], waves=ch["waves"], fill=ch["fill"],
                                    model_us=ch["model_us"], bound=max(("compute", "hbm", "l2"),
                                                                       key=lambda t: ch[f"{t}_us"]),
                                    best_fill=best["fill"], best_fill_config=best["config"],
                                    half_wave=best["fill"] >= 0.5))
    return out


def format_small_m(rows: list[dict]) -> str:
    head = ("GPU", "D", "M", "kernel", "chosen config", "programs", "waves", "fill", "MODEL us", "bound",
            "best fill (config)")
    body = [(r["gpu"], str(r["D"]), str(r["M"]), r["kernel"], r["config"], str(r["programs"]), str(r["waves"]),
             f"{r['fill']:.2f}", f"{r['model_us']:.1f}", r["bound"],
             f"{r['best_fill']:.2f} ({r['best_fill_config']})" + ("" if r["half_wave"] else " < half a wave"))
            for r in rows]
    title = (f"Small M, fwd and dx, {rows[0]['dtype']} (PLAN and MODEL v2, no kernel run): chosen = least MODEL "
             "time; fill = programs / (waves x SMs) at one resident program per SM; best fill over the shipped "
             "configs")
    return "\n".join([title, "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in body])


def plan_kernels(records: list[dict]) -> list[tuple[dict, object]]:
    """``(record, bench.model.KernelV2)`` pairs, for checks of the model (tests)."""
    return [(r, r["_k"]) for r in records]


def public(records: list[dict]) -> list[dict]:
    """The records without their private keys (JSON)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]


def _reduce_name(config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"


def format_plan(records: list[dict]) -> str:
    if not records:
        return ""
    r0 = records[0]
    head = ("kernel", "config", "programs", "splits", "waves", "fill", "MODEL us", "chosen")
    rows = [(r["kernel"] + (f" (L={r['L']})" if "L" in r else ""),
             r["config"] + (f" (after dW {r['after']})" if "after" in r else ""), str(r["programs"]),
             str(r["splits"]), str(r["waves"]), f"{r['fill']:.2f}", f"{r['model_us']:.1f}",
             "<-- chosen" if r["chosen"] else "")
            for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    title = (f"Launch plan (PLAN, no kernel run): {r0['gpu']}, M={r0['M']}, D={r0['D']}, {r0['dtype']}; one resident "
             "program per SM; fill = programs / (waves x SMs); MODEL us = model v2, max(wave-quantised compute, HBM, L2) "
             "+ launch latency (bench/model.py: L2 bandwidth from published measurements, launch latency ASSUMED); "
             "chosen = least MODEL time (dW with its reduce; ties: best fill); stack rows: the stack's one shipped "
             "config per kernel")
    return "\n".join([title, fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt.format(*row) for row in rows])


def main(args) -> int:
    M, D = args.size
    records = plan_records(args.gpu, M, D, args.dtype, stack_layers=getattr(args, "stack_layers", 8))
    print(format_plan(records))
    if getattr(args, "small_m", False):
        small = small_m_records()
        print()
        print(format_small_m(small))
        records = records + [dict(r, section="small_m") for r in small]
    if getattr(args, "stack_table", False):
        from .stack import stack_v2_table
        print()
        # bench/stack.py's caption predates the sourced L2 figures (bench/model.py GPUS_V2)
        print(stack_v2_table())
    if args.json:
        args.json.write_text(json.dumps(public(records), indent=1))
    return 0
