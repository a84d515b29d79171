"""The MLP block's bytes (issue 16, bench/mlp.py): the fused kernels' distinct bytes, measured in the
interpreter, equal the two-launch compulsory minimum launch by launch, forward and backward, with
H = 4D and H = D, with and without recompute, in the interpreter's per-size config and in a pinned
small-tile config (distinct bytes do not depend on the tile); a forced split-M dW adds exactly its
partial slabs; eager moves its model's bytes, more than fused."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # bench/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from bench import mlp  # noqa: E402
from fusedres import traffic  # noqa: E402
from helpers import fixed_tiles  # noqa: E402

pytestmark = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                 reason="the traffic instrument needs Triton's interpreter"),
              pytest.mark.skipif(not traffic.supported()[0], reason=traffic.supported()[1])]

M, D, E = 96, 32, 4      # M and H = D ragged against 64-row / 64-column tiles in the pinned config




def _measure(H, recompute, pin):
    from fusedres.kernels import configs
    inputs = mlp.make_inputs(M, D, H, torch.float32)
    if pin:
        with configs.config_override(fixed_tiles(64, 64, 16)):
            return mlp.measure_fused(*inputs, recompute=recompute)
    return mlp.measure_fused(*inputs, recompute=recompute)


@pytest.mark.parametrize("pin", [False, True], ids=["interpreter-config", "pinned-64x64x16"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved-h", "recompute"])
@pytest.mark.parametrize("ratio", [4, 1], ids=["H=4D", "H=D"])
def test_fused_mlp_moves_exactly_the_two_launch_minimum(ratio, recompute, pin):
    H = ratio * D
    launches, outputs, violations = _measure(H, recompute, pin)
    assert violations == []
    want = mlp.fused_launches(M, D, H, E, recompute)
    for mode in ("fwd", "bwd"):
        got = [(lc.kernel, lc.unique_read, lc.unique_written) for lc in launches[mode]]
        assert got == [(k, r, w) for _, k, r, w in want[mode]], mode
        assert sum(lc.unique for lc in launches[mode]) == mlp.two_launch_bytes(mode, M, D, H, E, recompute)
        # requests include the tile re-reads (and the db column sums' re-read of g / dh): never fewer
        assert sum(lc.requests for lc in launches[mode]) >= sum(lc.unique for lc in launches[mode])
    assert len(launches["fwd"]) == 2 and len(launches["bwd"]) == 4 + recompute
    # the closed forms of the module docstring
    fwd = E * (3 * M * D + 2 * M * H + 2 * H * D + H + D)
    bwd = E * (6 * M * D + 5 * M * H + 4 * H * D + H + D)
    if recompute:
        bwd += E * (M * D + M * H + H * D + H)
    assert mlp.two_launch_bytes("fwd", M, D, H, E, recompute) == fwd
    assert mlp.two_launch_bytes("bwd", M, D, H, E, recompute) == bwd
    assert mlp.two_launch_bytes("fwd", M, D, H, E, recompute) > mlp.absolute_min_bytes("fwd", M, D, H, E, recompute)


def test_split_dw_adds_exactly_its_partial_slabs():
    from fusedres.kernels import plan
    M2, H = 300, 2 * D                 # 3 row tiles of 128: two splits of 2 + 1
    inputs = mlp.make_inputs(M2, D, H, torch.float32)
    with plan.force_splits(2):
        launches, _, violations = mlp.measure_fused(*inputs)
    assert violations == []
    assert [lc.kernel for lc in launches["bwd"]].count("residual_dw_reduce_kernel") == 2
    assert sum(lc.unique for lc in launches["bwd"]) == mlp.two_launch_bytes("bwd", M2, D, H, E, splits=2)
    assert mlp.split_bytes(D, H, 2) == 2 * 4 * 2 * (D * H + D + H * D + H)


@pytest.mark.parametrize("ratio", [4, 1], ids=["H=4D", "H=D"])
def test_eager_moves_its_model_and_more_than_fused(ratio):
    H = ratio * D
    inputs = mlp.make_inputs(M, D, H, torch.float32)
    ops, _ = mlp.measure_eager(*inputs)
    launches, _, _ = mlp.measure_fused(*inputs)
    for mode in ("fwd", "bwd"):
        eager = sum(o.bytes_read + o.bytes_written for o in ops[mode])
        fused = sum(lc.unique for lc in launches[mode])
        assert eager == mlp.eager_bytes(mode, M, D, H, E)
        assert [(o.bytes_read, o.bytes_written) for o in ops[mode]] == \
            [(r, w) for _, r, w in mlp.eager_ops(M, D, H, E)[mode]]
        assert eager > fused > mlp.absolute_min_bytes(mode, M, D, H, E)


def test_measure_section_and_records():
    m = mlp.measure(64, 32)
    lines, exact = mlp.section(m)
    assert exact and m.exact()
    text = "\n".join(lines)
    assert "## MLP block" in text and " ms" not in text
    assert "NO" not in [cell.strip() for cell in text.split("|")]
    recs = mlp.records(m)
    assert {(r["impl"], r["H"], r["mode"]) for r in recs} == {
        (i, h, mode) for i in ("fused", "fused-recompute", "eager") for h in (128, 32) for mode in mlp.MODES}
    for r in recs:
        assert r["section"] == "mlp" and r["ms"] is None and r["measured"] is False
        assert r["bytes_source"] == "measured"
        if r["impl"] == "eager":
            assert r["bytes"] == r["model_bytes"]
        else:
            assert r["unique_bytes"] == r["formula_bytes"] and r["eager_over_fused"] > 1
