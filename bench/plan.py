"""``python -m bench --plan``: the launch plan of every single-block kernel in every shipped config,
from :mod:`fusedres.kernels.plan` (the rule the launchers use), for a named GPU. Runs anywhere: no
kernel runs, neither on a GPU nor in the interpreter.

Per (kernel, config): programs, splits (dW's M reduction), waves and fill at one resident program
per SM (occupancy is not modelled). The chosen config of each kernel is the one with the best fill
(ties: the first, the largest tile); the reduce follows the chosen dW. ``model_us`` is None: the
model's time (issue 14, item 2, model v2) is future work, so the choice is by fill alone.
"""
from __future__ import annotations

import json

DTYPE_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}


def plan_records(gpu: str, M: int, D: int, dtype: str) -> list[dict]:
    from fusedres.aot import config_name
    from fusedres.kernels import configs, plan

    sms = plan.GPU_SMS[gpu]
    elem = DTYPE_SIZES[dtype]
    out = []
    base = dict(gpu=gpu, M=M, D=D, dtype=dtype, model_us=None)
    for kind, fn in (("fwd", plan.plan_fwd), ("dx", plan.plan_dx), ("dw", None)):
        recs = []
        for c in configs.shipped_configs(kind, elem):
            p = fn(sms, M, D, D, c) if fn else plan.plan_dw(sms, M, D, D, c)
            recs.append(dict(kernel=kind, config=config_name(kind, c), **base, programs=p.programs,
                             splits=p.splits, waves=p.waves, fill=round(p.fill, 4), chosen=False))
            if kind == "dw":
                rc, r = plan.choose_reduce(sms, D, D, p.splits)
                recs.append(dict(kernel="dw_reduce", config=_reduce_name(rc), after=recs[-1]["config"], **base,
                                 programs=r.programs, splits=r.splits, waves=r.waves, fill=round(r.fill, 4),
                                 chosen=False))
        main = [r for r in recs if r["kernel"] == kind]
        best = max(main, key=lambda r: r["fill"])        # max() keeps the first of equal fills
        best["chosen"] = True
        for r in recs:
            if r["kernel"] == "dw_reduce" and r["after"] == best["config"] and r["programs"]:
                r["chosen"] = True
        out += recs
    return out


def _reduce_name(config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"


def format_plan(records: list[dict]) -> str:
    if not records:
        return ""
    r0 = records[0]
    head = ("kernel", "config", "programs", "splits", "waves", "fill", "chosen")
    rows = [(r["kernel"], r["config"] + (f" (after dW {r['after']})" if "after" in r else ""), str(r["programs"]),
             str(r["splits"]), str(r["waves"]), f"{r['fill']:.2f}", "<-- chosen" if r["chosen"] else "")
            for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    title = (f"Launch plan (PLAN, no kernel run): {r0['gpu']}, M={r0['M']}, D={r0['D']}, {r0['dtype']}; one resident "
             "program per SM; fill = programs / (waves x SMs); chosen = best fill (model time: future work)")
    return "\n".join([title, fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt.format(*row) for row in rows])


def main(args) -> int:
    M, D = args.size
    records = plan_records(args.gpu, M, D, args.dtype)
    print(format_plan(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0
