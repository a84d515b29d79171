"""``python -m bench --plan``: the launch plan of every single-block kernel in every shipped config,
from :mod:`fusedres.kernels.plan` (the rule the launchers use), for a named GPU. Runs anywhere: no
kernel runs, neither on a GPU nor in the interpreter.

Per (kernel, config): programs, splits (dW's M reduction), waves and fill at one resident program
per SM (occupancy is not modelled), and ``model_us``: the MODEL v2 time of that launch
(:mod:`bench.model`: ``max(wave-quantised compute, HBM, L2) + launch latency``). The chosen config of
each kernel is the one with the least model time (ties: the best fill, then the first, the largest
tile); a dW config is charged its own time plus its reduce's, and the reduce follows the chosen dW.
The ``fwd``/``dx``/``dw`` records also carry ``compute_us``, ``hbm_us`` and ``l2_us`` (the three terms).
"""
from __future__ import annotations

import json

DTYPE_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}


def plan_records(gpu: str, M: int, D: int, dtype: str) -> list[dict]:
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
    return out


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
    rows = [(r["kernel"], r["config"] + (f" (after dW {r['after']})" if "after" in r else ""), str(r["programs"]),
             str(r["splits"]), str(r["waves"]), f"{r['fill']:.2f}", f"{r['model_us']:.1f}",
             "<-- chosen" if r["chosen"] else "")
            for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    title = (f"Launch plan (PLAN, no kernel run): {r0['gpu']}, M={r0['M']}, D={r0['D']}, {r0['dtype']}; one resident "
             "program per SM; fill = programs / (waves x SMs); MODEL us = model v2, max(wave-quantised compute, HBM, L2) "
             "+ launch latency (bench/model.py; L2 bandwidth and latency ASSUMED); chosen = least MODEL time "
             "(dW with its reduce; ties: best fill)")
    return "\n".join([title, fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt.format(*row) for row in rows])


def main(args) -> int:
    M, D = args.size
    records = plan_records(args.gpu, M, D, args.dtype)
    print(format_plan(records))
    if getattr(args, "stack_table", False):
        from .stack import stack_v2_table
        print()
        print(stack_v2_table())
    if args.json:
        args.json.write_text(json.dumps(public(records), indent=1))
    return 0
