"""Property-based fuzzing of the fused op: random shapes (M = 0 and 1, D not a power of two, D
below the smallest tile), layouts, dtypes, bias, residual scale and projection shortcut, each
judged by the parity rule.

CI runs a fixed, derandomised budget of 200 examples on the primary pair, and a smoke budget of
``FUSEDRES_FUZZ_SMOKE`` (still derandomised) on the other triton releases (.ci/matrix). For a
deeper, randomised run:

    FUSEDRES_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py
"""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import LAYOUTS, check_mlp_parity, check_parity, make_params, make_x, mlp_params

EXAMPLES = int(os.environ.get("FUSEDRES_FUZZ_EXAMPLES", os.environ.get("FUSEDRES_FUZZ_SMOKE", "200")))
DEEP = "FUSEDRES_FUZZ_EXAMPLES" in os.environ


@st.composite
def cases(draw):
    D = draw(st.one_of(st.integers(1, 15), st.integers(16, 96)))
    lead = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "transposed" and len(lead) != 2:
        layout = "contiguous"
    variant = draw(st.sampled_from(["plain", "plain", "alpha", "proj"]))
    return dict(shape=(*lead, D), layout=layout, variant=variant,
                alpha=draw(st.sampled_from([0.0, -0.5, 0.3, 2.0])),
                out=draw(st.integers(1, 80)),
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                bias=draw(st.booleans()),
                weight_layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
                seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not DEEP, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_fuzz_parity(case):
    from conftest import DEVICE

    x = make_x(case["shape"], case["dtype"], DEVICE, layout=case["layout"], seed=case["seed"])
    w, b = make_params(case["shape"][-1], case["dtype"], DEVICE, bias=case["bias"],
                       weight_layout=case["weight_layout"], seed=case["seed"] + 1)
    dtype, variant = case["dtype"], case["variant"]
    alpha = torch.tensor(case["alpha"], dtype=dtype, device=DEVICE) if variant != "plain" else None
    proj = None
    if variant == "proj":  # a width change: weight, bias and projection of [out, in]
        gen = torch.Generator().manual_seed(case["seed"] + 2)
        D, out = case["shape"][-1], case["out"]
        w, proj = ((torch.rand(out, D, generator=gen) - 0.5).div(D ** 0.5).to(DEVICE, dtype) for _ in range(2))
        b = (torch.rand(out, generator=gen) - 0.5).to(DEVICE, dtype) if case["bias"] else None
    check_parity(x, w, b, alpha=alpha, proj=proj)


@st.composite
def mlp_cases(draw):
    D = draw(st.one_of(st.integers(1, 15), st.integers(16, 72)))
    H = draw(st.one_of(st.integers(1, 15), st.integers(16, 160)))
    lead = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "transposed" and len(lead) != 2:
        layout = "contiguous"
    return dict(shape=(*lead, D), H=H, layout=layout,
                alpha=draw(st.sampled_from([1.0, 0.5, "tensor"])),
                drop=draw(st.booleans()) and len(lead) >= 1 and lead[0] > 0,
                recompute=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=max(EXAMPLES // 4, 1), deadline=None, derandomize=not DEEP, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=mlp_cases())
def test_fuzz_mlp_parity(case):
    """The MLP block: hidden width from 1, ragged D, M = 0 and 1, every layout, stochastic depth."""
    from conftest import DEVICE

    x = make_x(case["shape"], case["dtype"], DEVICE, layout=case["layout"], seed=case["seed"])
    params = mlp_params(case["shape"][-1], case["H"], DEVICE, bias=case["bias"], seed=case["seed"] + 1)
    w1, b1, w2, b2 = (t.to(case["dtype"]) if t is not None else None for t in params)
    alpha = torch.tensor(0.6, dtype=case["dtype"], device=DEVICE) if case["alpha"] == "tensor" else case["alpha"]
    s = None
    if case["drop"]:
        gen = torch.Generator().manual_seed(case["seed"] + 2)
        s = (torch.rand(case["shape"][0], generator=gen) < 0.5).to(DEVICE, case["dtype"]) * 2
    check_mlp_parity(x, w1, b1, w2, b2, alpha=alpha, s=s, recompute=case["recompute"])
