"""Autotuning logic, with Triton's benchmark replaced by a fake timer. On a CPU the GPU launch path
(autotune among the shipped configs) runs in the interpreter; on a CUDA machine the same tests
tune CUDA tensors (CPU tensors would take the eager path there, and nothing would be tuned)."""
import json

import pytest
import torch
import triton

import fusedres
from fusedres import fused_residual, tuning
from fusedres.kernels import configs


@pytest.fixture
def autotuned(monkeypatch):
    """Route launches through the autotuners, with a deterministic fake benchmark; returns the
    list of (kernel, config) pairs that were benchmarked."""
    benched = []
    monkeypatch.setattr(configs, "INTERPRET", False)  # take the GPU launch path (gemm flags: fp32 only)
    monkeypatch.setattr(configs, "_config_override", None)  # autotune even under FUSEDRES_PIN_CONFIGS=1
    for kind, tuned in tuning.TUNED_KERNELS.items():
        monkeypatch.setattr(tuned, "cache", {})

        def fake_bench(*args, config, _kind=kind, **kwargs):
            benched.append((_kind, config))
            # pretend the smallest tile wins, so the interpreter runs fast
            size = 1
            for k, v in config.kwargs.items():
                if k.startswith("BLOCK_"):
                    size *= v
            return [float(size)] * 3
        monkeypatch.setattr(tuned, "_bench", fake_bench)
    return benched


def test_warmup_tunes_each_bucket_once(autotuned, launches, device):
    # each kernel under two recipes (RECIPE: the block's tensor alpha, the function's none)
    assert fusedres.warmup(32, [100, 120], dtypes=[torch.float32], device=device) == 6
    first = len(autotuned)
    assert {k for k, _ in autotuned} == {"fwd", "dx", "dw"}
    # every shipped config that fits was a candidate, once per recipe
    for kind in ("fwd", "dx", "dw"):
        assert len([c for k, c in autotuned if k == kind]) == 2 * len(configs.shipped_configs(kind, 4))
    x = torch.randn(127, 32, device=device, requires_grad=True)  # same power-of-two bucket: no new tuning
    w = torch.randn(32, 32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    fused_residual(x, w, b).sum().backward()
    assert len(autotuned) == first
    fused_residual(torch.randn(300, 32, device=device), w.detach())  # a new bucket tunes the forward again
    assert len(autotuned) > first and tuning.TUNED_KERNELS["fwd"].cache.__len__() == 3


def test_autotune_key_is_the_autotuners(autotuned, device):
    fusedres.warmup(32, [64], dtypes=[torch.float32], device=device)
    from fusedres._layout import plan_rows
    from fusedres.kernels.residual_fwd import fwd_launch_args
    x, w = torch.randn(64, 32, device=device), torch.randn(32, 32, device=device)
    rows, (xs,), _ = plan_rows(x)
    b = torch.randn(32, device=device)        # as warmup's FusedResidualBlock(32): a bias (a piece of the recipe)
    args, consts, _ = fwd_launch_args(x, xs, w, b, torch.empty(64, 32, device=device), rows)
    assert configs.autotune_key(tuning.TUNED_KERNELS["fwd"], args, consts) in tuning.TUNED_KERNELS["fwd"].cache


def test_save_and_load_tuning(autotuned, tmp_path, device):
    fusedres.warmup(32, [64, 1000], dtypes=[torch.float32], device=device)
    saved = {k: dict(t.cache) for k, t in tuning.TUNED_KERNELS.items()}
    path = tmp_path / "tuning.json"
    assert fusedres.save_tuning(path) == sum(len(c) for c in saved.values()) == 12    # 2 buckets x 2 recipes
    doc = json.loads(path.read_text())
    assert doc["device"] == tuning._device_name() and doc["triton"]
    for t in tuning.TUNED_KERNELS.values():
        t.cache.clear()
    assert fusedres.load_tuning(path) == 12
    for kind, t in tuning.TUNED_KERNELS.items():
        assert {k: (c.kwargs, c.num_warps, c.num_stages) for k, c in t.cache.items()} == \
               {k: (c.kwargs, c.num_warps, c.num_stages) for k, c in saved[kind].items()}
    n = len(autotuned)
    fused_residual(torch.randn(64, 32, device=device), torch.randn(32, 32, device=device),
                   torch.randn(32, device=device))  # loaded (warmup's recipe: with a bias): no tuning
    assert len(autotuned) == n
    doc["device"] = "Some Other GPU"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="tuned on"):
        fusedres.load_tuning(path)
    assert fusedres.load_tuning(path, strict=False) == 12


def test_capture_never_autotunes(autotuned, monkeypatch, device):
    fusedres.warmup(32, [64], dtypes=[torch.float32], device=device, training=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    w, b = torch.randn(32, 32, device=device), torch.randn(32, device=device)
    # bucket 64 was tuned, and (on a GPU) this exact specialisation compiled: bias, M % 16 == 0
    fused_residual(torch.randn(48, 32, device=device), w, b)
    n = len(autotuned)
    with pytest.raises(RuntimeError, match="warmup"):
        fused_residual(torch.randn(500, 32, device=device), w, b)
    assert len(autotuned) == n


def test_tf32_and_ieee_tune_separately(autotuned, device):
    """INPUT_PRECISION is in the autotune key: a choice tuned under IEEE fp32 is not reused for tf32."""
    x, w = torch.randn(64, 32, device=device), torch.randn(32, 32, device=device)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        fused_residual(x, w)
        torch.set_float32_matmul_precision("high")
        fused_residual(x, w)
    finally:
        torch.set_float32_matmul_precision(old)
    keys = list(tuning.TUNED_KERNELS["fwd"].cache)
    assert len(keys) == 2 and {k for key in keys for k in key if k in ("ieee", "tf32")} == {"ieee", "tf32"}
    assert len([k for k, _ in autotuned if k == "fwd"]) == 2 * len(configs.shipped_configs("fwd", 4))


def test_autocast_prunes_by_the_operands_shared_memory(autotuned, device):
    """Under autocast fp32 activations meet bf16 weights: the dW pipeline holds fp32 tiles, and the
    prune drops the config that then exceeds sm_80's shared memory (128x128x64 at 4 stages)."""
    x = torch.randn(64, 64, device=device, requires_grad=True)
    w = torch.randn(64, 64, device=device, requires_grad=True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        fused_residual(x, w).sum().backward()
    dw = [c for k, c in autotuned if k == "dw"]
    assert len(dw) == len(configs.shipped_configs("dw", 2)) - 1 and dw
    assert not any((c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_stages) == (128, 128, 64, 4)
                   for c in dw)
    assert len([c for k, c in autotuned if k == "fwd"]) == len(configs.shipped_configs("fwd", 2))


def test_pinned_configs_never_autotune(autotuned, launches, device):
    """configs.pin_configs(): one config per kernel and operand dtypes, on the GPU launch path, with
    no benchmark (``FUSEDRES_PIN_CONFIGS=1`` runs the suite so; ``python -m bench --gpu-check``)."""
    x = torch.randn(100, 32, device=device, requires_grad=True)
    w = torch.randn(32, 32, device=device, requires_grad=True)
    with configs.pin_configs():
        fused_residual(x, w, alpha=0.5).sum().backward()
    assert launches() == {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}
    assert autotuned == [] and not any(t.cache for t in tuning.TUNED_KERNELS.values())
    named = {"w_ptr": w, "x_ptr": x, "g_ptr": x, "dw_ptr": w, "dp_ptr": None, "TWO_LEVEL_ROWS": False}
    assert configs.pinned_config("dw", named) is configs.shipped_configs("dw", 4)[0]


def test_pin_configs_mode_is_session_wide():
    from conftest import PIN_CONFIGS
    assert (configs._config_override is configs.pinned_config) == PIN_CONFIGS


def test_pin_configs_environment_variable():
    """FUSEDRES_PIN_CONFIGS=1 pins the whole test session (tests/conftest.py)."""
    import os
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_pin_configs_mode_is_session_wide"],
                          env={**os.environ, "FUSEDRES_PIN_CONFIGS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:]


def test_load_tuning_refuses_keys_of_another_format(tmp_path):
    """Keys written before the kernels keyed on their recipe string would never match a launch:
    refused, with what to do, instead of loading entries no launch can find."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"device": tuning._device_name(), "triton": triton.__version__, "kernels": {}}))
    with pytest.raises(ValueError, match="format 1.*tune again"):
        fusedres.load_tuning(path)
