"""Autotuning logic, exercised on the CPU: the GPU path (autotune among the shipped configs) runs
in the interpreter with Triton's benchmark replaced by a fake timer, since only a GPU can time."""
import json

import pytest
import torch

import fusedres
from fusedres import fused_residual, tuning
from fusedres.kernels import configs


@pytest.fixture
def autotuned(monkeypatch):
    """Route launches through the autotuners, with a deterministic fake benchmark; returns the
    list of (kernel, config) pairs that were benchmarked."""
    benched = []
    monkeypatch.setattr(configs, "INTERPRET", False)  # take the GPU launch path (gemm flags: fp32 only)
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


def test_warmup_tunes_each_bucket_once(autotuned, launches):
    assert fusedres.warmup(32, [100, 120], dtypes=[torch.float32], device="cpu") == 3
    first = len(autotuned)
    assert {k for k, _ in autotuned} == {"fwd", "dx", "dw"}
    # every shipped config that fits was a candidate
    for kind in ("fwd", "dx", "dw"):
        assert len([c for k, c in autotuned if k == kind]) == len(configs.shipped_configs(kind, 4))
    x = torch.randn(127, 32, requires_grad=True)  # same power-of-two bucket: no new tuning
    w = torch.randn(32, 32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    fused_residual(x, w, b).sum().backward()
    assert len(autotuned) == first
    fused_residual(torch.randn(300, 32), w.detach())  # a new bucket tunes the forward again
    assert len(autotuned) > first and tuning.TUNED_KERNELS["fwd"].cache.__len__() == 2


def test_autotune_key_is_the_autotuners(autotuned):
    fusedres.warmup(32, [64], dtypes=[torch.float32], device="cpu")
    from fusedres._layout import plan_rows
    from fusedres.kernels.residual_fwd import fwd_launch_args
    x, w = torch.randn(64, 32), torch.randn(32, 32)
    rows, (xs,), _ = plan_rows(x)
    args, consts, _ = fwd_launch_args(x, xs, w, None, torch.empty(64, 32), rows)
    assert configs.autotune_key(tuning.TUNED_KERNELS["fwd"], args, consts) in tuning.TUNED_KERNELS["fwd"].cache


def test_save_and_load_tuning(autotuned, tmp_path):
    fusedres.warmup(32, [64, 1000], dtypes=[torch.float32], device="cpu")
    saved = {k: dict(t.cache) for k, t in tuning.TUNED_KERNELS.items()}
    path = tmp_path / "tuning.json"
    assert fusedres.save_tuning(path) == sum(len(c) for c in saved.values()) == 6
    doc = json.loads(path.read_text())
    assert doc["device"] == "cpu" and doc["triton"]
    for t in tuning.TUNED_KERNELS.values():
        t.cache.clear()
    assert fusedres.load_tuning(path) == 6
    for kind, t in tuning.TUNED_KERNELS.items():
        assert {k: (c.kwargs, c.num_warps, c.num_stages) for k, c in t.cache.items()} == \
               {k: (c.kwargs, c.num_warps, c.num_stages) for k, c in saved[kind].items()}
    n = len(autotuned)
    fused_residual(torch.randn(64, 32), torch.randn(32, 32))  # loaded: no tuning
    assert len(autotuned) == n
    doc["device"] = "NVIDIA H100 80GB HBM3"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="tuned on"):
        fusedres.load_tuning(path)
    assert fusedres.load_tuning(path, strict=False) == 6


def test_capture_never_autotunes(autotuned, monkeypatch):
    fusedres.warmup(32, [64], dtypes=[torch.float32], device="cpu", training=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    w = torch.randn(32, 32)
    fused_residual(torch.randn(50, 32), w)  # bucket 64 was tuned: fine
    n = len(autotuned)
    with pytest.raises(RuntimeError, match="warmup"):
        fused_residual(torch.randn(500, 32), w)
    assert len(autotuned) == n
