"""Split-M weight gradients (issue 14, item 3) and the launch plan (item 1).

The interpreter plans for one stand-in SM, so it never splits on its own: these tests force the
split count S with ``plan.force_splits`` (or ``residual_dw(..., splits=S)``). M = 300 rows make 3
row tiles of 128 (the interpreter's tile at this size), so S = 2 reduces 2 + 1 tiles and S = 3
1 + 1 + 1 (the last with 44 rows): ragged last splits either way."""
import functools

import pytest
import torch
import triton

from fusedres import fused_residual, residual_reference
from fusedres.kernels import configs, plan
from fusedres.kernels.residual_bwd import dalpha_workspace_size, residual_dw
from fusedres.op import plan_rows
from fusedres.validate import parity
from helpers import check_parity, make_params, make_x, run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M, D = 300, 32


def _launches(splits):
    dw = {"residual_dw": 1, "residual_dw_reduce": 1} if splits > 1 else {"residual_dw": 1}
    return {"residual_fwd": 1, "residual_dx": 1, **dw}


def test_forced_splits_are_ragged():
    cfg = configs.interpreter_config("dw", M, D)
    assert cfg.kwargs["BLOCK_M"] == 128
    p2, p3 = plan.plan_dw(1, M, D, D, cfg, splits=2), plan.plan_dw(1, M, D, D, cfg, splits=3)
    assert (p2.splits, p2.tiles_per_split, p2.programs) == (2, 2, 2)
    assert (p3.splits, p3.tiles_per_split, p3.programs) == (3, 1, 3)
    assert plan.plan_dw(1, M, D, D, cfg).splits == 1          # the interpreter never splits on its own


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_split_parity(splits, dtype, bias, device, launches):
    x = make_x((M, D), dtype, device)
    w, b = make_params(D, dtype, device, bias=bias)
    with plan.force_splits(splits):
        check_parity(x, w, b)
    assert launches() == _launches(splits)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_parity_alpha_tensor_and_projection(splits, dtype, device, launches):
    """Learnable alpha (dalpha from the reduce's partials) and a projection (dP's slab rows)."""
    x = make_x((M, D), dtype, device)
    gen = torch.Generator().manual_seed(5)
    out = 40          # N != K, and 2N = 80 slab rows: a ragged reduce tile of 32 rows
    w = (torch.rand(out, D, generator=gen) - 0.5).div(D ** 0.5).to(device, dtype)
    p = (torch.rand(out, D, generator=gen) - 0.5).div(D ** 0.5).to(device, dtype)
    b = torch.randn(out, generator=gen).div(10).to(device, dtype)
    alpha = torch.tensor(-0.7, dtype=dtype, device=device)
    with plan.force_splits(splits):
        check_parity(x, w, b, alpha=alpha, proj=p)
        w2, b2 = make_params(D, dtype, device)
        check_parity(x, w2, b2, alpha=alpha)
    assert launches() == {k: 2 * v for k, v in _launches(splits).items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_parity_float_alpha(dtype, device, launches):
    x = make_x((M, D), dtype, device)
    w, b = make_params(D, dtype, device)
    g = torch.randn(M, D, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    with plan.force_splits(3):
        fused = run(functools.partial(fused_residual, alpha=0.25), x, w, b, g)
    eager = run(functools.partial(residual_reference, alpha=0.25), x, w, b, g)
    ref = run(functools.partial(residual_reference, alpha=0.25), x, w, b, g, dtype=torch.float64)
    scale = run(functools.partial(residual_reference, alpha=0.25), x.abs(), w.abs(), b.abs(), g.abs(),
                dtype=torch.float64)
    for name, f, e, r, sc in zip(("y", "dx", "dweight", "dbias"), fused, eager, ref, scale):
        pr = parity(f, e, r, sc)
        assert pr.ok, f"{name} [{dtype}]: {pr}"
    assert launches() == _launches(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_is_bitwise_deterministic(dtype, device):
    x = make_x((M, D), dtype, device)
    gen = torch.Generator().manual_seed(5)
    w, b = make_params(D, dtype, device)
    p = (torch.rand(D, D, generator=gen) - 0.5).div(D ** 0.5).to(device, dtype)
    alpha = torch.tensor(0.3, dtype=dtype, device=device)
    g = torch.randn(M, D, generator=gen).to(device, dtype)

    def once():
        fn = functools.partial(fused_residual, alpha=alpha.clone().requires_grad_(),
                               proj_weight=p.clone().requires_grad_())
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(xx, ww, bb)
        y.backward(g)
        kw = fn.keywords
        return [y, xx.grad, ww.grad, bb.grad, kw["alpha"].grad, kw["proj_weight"].grad]

    with plan.force_splits(3):
        first, second = once(), once()
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_launcher_returns_the_reduce_programs_for_dalpha(device):
    """With S > 1 the dalpha partials come from the reduce: the launcher returns its program count,
    and summing exactly those gives dalpha (the workspace starts as NaN)."""
    gen = torch.Generator().manual_seed(3)
    N = 72
    x = torch.randn(M, D, generator=gen).to(device)
    w, p = (torch.randn(N, D, generator=gen) / 9).to(device), (torch.randn(N, D, generator=gen) / 9).to(device)
    b, g = torch.randn(N, generator=gen).to(device), torch.randn(M, N, generator=gen).to(device)
    alpha = torch.tensor(0.7, device=device)
    rows, (gs, xs), (gk, xk) = plan_rows(g, x)
    dw, dp, db = torch.full((N, D), float("nan"), device=device), torch.full((N, D), float("nan"), device=device), \
        torch.full((N,), float("nan"), device=device)
    partials = torch.full((dalpha_workspace_size(N, D, True),), float("nan"), device=device)
    cfg = configs.interpreter_config("dw", M, N)
    n = residual_dw(gk, gs, xk, xs, dw, db, rows, weight=w, bias=b, alpha=alpha, dalpha_partials=partials, dp=dp,
                    config=cfg, splits=2).programs
    assert n == plan.plan_reduce(1, N, D, 2, proj=True).programs == triton.cdiv(2 * N, 32) * triton.cdiv(D, 128)
    assert not any(t.isnan().any() for t in (dw, dp, db, partials[:n]))
    gd, xd = g.double(), x.double()
    torch.testing.assert_close(dw.double(), 0.7 * gd.T @ xd.relu(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dp.double(), gd.T @ xd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db.double(), 0.7 * gd.sum(0), rtol=1e-5, atol=1e-4)
    ref_dalpha = (gd.T @ xd.relu() * w.double()).sum() + (gd.sum(0) * b.double()).sum()
    torch.testing.assert_close(partials[:n].sum().double(), ref_dalpha, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The plan's rule (pure Python)

def _cfg(bk, bn, bm):
    return triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_M": bm, "GROUP_K": 8}, num_warps=4, num_stages=3)


@pytest.mark.parametrize("D_,tile,splits,fill", [
    (256, 128, 32, 128 / 132),  # 4 tiles on 132 SMs: 33 splits of 1024 row tiles leave 32 non-empty
    (512, 128, 8, 128 / 132),  # 16 tiles: 8 splits, 128 programs
    (1024, 128, 2, 128 / 132),  # 64 tiles: 2 splits
    (2048, 128, 1, 256 / 264),  # 256 tiles: already two waves, no split
])
def test_plan_dw_splits_under_one_wave(D_, tile, splits, fill):
    p = plan.plan_dw(plan.GPU_SMS["h100"], 65536, D_, D_, _cfg(tile, tile, 64))
    assert (p.splits, p.fill) == (splits, pytest.approx(fill))
    assert p.programs == (D_ // tile) ** 2 * splits and p.waves == triton.cdiv(p.programs, 132)


def test_plan_dw_keeps_a_few_row_tiles_per_split():
    # M = 1024 with 64-row tiles: 16 row tiles, so at most 4 splits of 4 tiles, however empty the GPU
    p = plan.plan_dw(132, 1024, 256, 256, _cfg(128, 128, 64))
    assert p.splits == 4 and p.tiles_per_split == 4
    assert plan.plan_dw(132, 64, 256, 256, _cfg(128, 128, 64)).splits == 1


def test_plan_other_kernels():
    fwd = plan.plan_fwd(108, 8192, 1024, 1024, triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}))
    assert (fwd.programs, fwd.waves, fwd.fill) == (512, 5, pytest.approx(512 / 540))
    dx = plan.plan_dx(132, 512, 1024, 4096, triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128}))
    assert (dx.programs, dx.waves) == (128, 1)
    assert plan.plan_reduce(132, 256, 256, 1).programs == 0
    assert plan.plan_reduce(132, 256, 256, 33, proj=True).programs == 16 * 2
    # at D = 256 the 32x128 reduce tile makes 16 programs on 132 SMs: the plan takes the 8x64 one
    config, red = plan.choose_reduce(132, 256, 256, 32)
    assert config is plan.REDUCE_CONFIGS[1] and (red.programs, red.fill) == (128, pytest.approx(128 / 132))
    assert plan.choose_reduce(1, 256, 256, 32)[0] is plan.REDUCE_CONFIG      # the interpreter: the first


def test_dalpha_workspace_holds_every_reduce():
    for n, k, proj in ((9, 9, False), (9, 200, True), (300, 17, True), (64, 64, False)):
        assert dalpha_workspace_size(n, k, proj) >= max(plan.reduce_programs(n, k, c, proj)
                                                        for c in plan.REDUCE_CONFIGS)


def test_bench_plan_fills_the_gpu():
    """``python -m bench --plan`` (no kernel runs): on an H100 in bf16 the chosen config of every
    single-block kernel fills >= 0.9 of a wave at the issue's sizes, and dW splits at D <= 512."""
    from bench.plan import plan_records
    keys = {"kernel", "config", "gpu", "M", "D", "dtype", "programs", "splits", "waves", "fill", "model_us", "chosen"}
    for M_, D_ in ((65536, 256), (65536, 512), (8192, 1024), (65536, 4096)):
        records = plan_records("h100", M_, D_, "bf16")
        assert all(keys <= set(r) for r in records)
        chosen = {r["kernel"]: r for r in records if r["chosen"]}
        assert {"fwd", "dx", "dw"} <= set(chosen)
        assert all(r["fill"] >= 0.9 for r in chosen.values()), chosen
        assert (chosen["dw"]["splits"] > 1) == (D_ <= 1024)
        assert ("dw_reduce" in chosen) == (chosen["dw"]["splits"] > 1)


def test_gpu_launch_takes_the_plans_split(monkeypatch, launches):
    """The GPU path (no config, no override: it would autotune) on a stand-in 132-SM GPU: at D = 32
    one 128x128 output tile leaves the GPU nearly empty, so the launcher runs the plan's config and
    split (2 launches) instead of autotuning, and the gradients are right."""
    from fusedres.kernels import residual_bwd
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(residual_bwd._plan, "sm_count", lambda device=None: 132)
    monkeypatch.setattr(residual_bwd, "_split_choice", {})
    gen = torch.Generator().manual_seed(4)
    M_, D_ = 1024, 32
    x, g = torch.randn(M_, D_, generator=gen), torch.randn(M_, D_, generator=gen)
    w, b = torch.randn(D_, D_, generator=gen) / 6, torch.randn(D_, generator=gen)
    rows, (gs, xs), (gk, xk) = plan_rows(g, x)
    dw, db = torch.empty(D_, D_), torch.empty(D_)
    residual_dw(gk, gs, xk, xs, dw, db, rows, weight=w, bias=b, alpha=0.5)
    assert launches() == {"residual_dw": 1, "residual_dw_reduce": 1}
    (config,) = [c for c in residual_bwd._split_choice.values()]
    assert plan.plan_dw(132, M_, D_, D_, config).splits > 1
    torch.testing.assert_close(dw.double(), 0.5 * g.T.double() @ x.double().relu(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db.double(), 0.5 * g.double().sum(0), rtol=1e-5, atol=1e-4)
