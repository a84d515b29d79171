"""Variance and gradient diagnostics, and the depth experiment as a smoke run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fusedres import ResidualMLP, diagnostics

ROOT = Path(__file__).resolve().parents[1]


def test_record_matches_direct_measurements(device):
    torch.manual_seed(0)
    model = ResidualMLP(8, 32, 3, 4, device=device)
    x = torch.randn(20, 8, device=device)
    outputs = []

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)
    handles = [b.register_forward_hook(keep) for b in model.blocks]
    with diagnostics.record(model) as rec:
        model(x).pow(2).sum().backward()
    for h in handles:
        h.remove()
    assert list(rec.blocks) == ["blocks.0", "blocks.1", "blocks.2"]
    for stats, out, block in zip(rec.blocks.values(), outputs, model.blocks):
        assert abs(stats.output_variance - out.var().item()) <= 1e-6 * out.var().item()
        assert abs(stats.grad_norm - out.grad.norm().item()) <= 1e-5 * out.grad.norm().item()
        assert abs(stats.weight_grad_norm - block.weight.grad.norm().item()) <= 1e-5 * block.weight.grad.norm().item()
    # the recording holds numbers only: no activation or gradient is kept alive by the hooks
    assert all(isinstance(v, (float, str)) for row in rec.table() for v in row.values())
    assert not model.blocks[0]._forward_hooks and not model.blocks[0]._backward_hooks


def test_variance_grows_with_depth_unless_scaled():
    """Unscaled residual branches add variance block after block; alpha = 1/sqrt(depth) tames it."""
    def last_over_first(alpha):
        torch.manual_seed(0)
        model = ResidualMLP(16, 64, 32, 4, fused=False, alpha=alpha)
        with torch.no_grad(), diagnostics.record(model) as rec:
            model(torch.randn(256, 16))
        return rec.output_variance[-1] / rec.output_variance[0]

    unscaled, scaled = last_over_first(1.0), last_over_first(32 ** -0.5)
    assert unscaled > 4 and scaled < unscaled / 3


def test_depth_example_smoke(tmp_path):
    """examples/depth.py end to end on tiny settings, with the fused kernels."""
    env = {k: v for k, v in os.environ.items()}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "depth.py"), "--smoke", "--fused",
                             "--kinds", "plain", "residual", "rezero", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "depth.json").read_text())
    assert {(r["model"], r["depth"]) for r in doc["rows"]} == {(k, d) for k in ("plain", "residual", "rezero")
                                                               for d in (2, 4)}
    assert len(list(tmp_path.glob("*.png"))) == 4
    assert "| model | depth |" in (tmp_path / "depth.md").read_text()
