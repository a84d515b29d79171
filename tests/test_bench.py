"""The benchmark harness (bench/): byte counters, the model, the CPU pipeline end to end at a tiny
size, and the GPU pipeline exercised on a CPU with a stand-in timer (its rows never claim a GPU)."""
import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # bench/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from bench import cpu, gate, gpu, model  # noqa: E402
from bench.counters import DispatchTraffic, tensor_bytes  # noqa: E402
from bench.inductor_probe import parse_wrapper  # noqa: E402
from bench.report import upsert_csv  # noqa: E402

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                 reason="CPU mode measures the fused kernels in Triton's interpreter")


# ---------------------------------------------------------------------------------------------
# The eager byte counter


def test_dispatch_counter_on_a_matmul_and_an_add():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    with DispatchTraffic() as t:
        c = a @ b.t().contiguous().t()          # contiguous() copies (counted); t() is a view (not)
    ops = t.by_op()
    assert ops["mm"] == (1, (64 * 32 + 32 * 16) * 4, 64 * 16 * 4)
    assert ops["clone"] == (1, 32 * 16 * 4, 32 * 16 * 4)
    assert "t" not in ops
    assert t.flops == 2 * 64 * 32 * 16
    with DispatchTraffic() as t:
        c + c
    assert (t.bytes_read, t.bytes_written) == (2 * 64 * 16 * 4, 64 * 16 * 4)


def test_dispatch_counter_counts_a_broadcast_operand_once():
    x, bias = torch.randn(128, 64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
    assert tensor_bytes(bias.expand(128, 64)) == 64 * 2
    with DispatchTraffic() as t:
        x + bias
    assert (t.bytes_read, t.bytes_written) == ((128 * 64 + 64) * 2, 128 * 64 * 2)


def test_eager_block_moves_7MD_forward_and_11MD_backward():
    M, D, e = 96, 48, 4
    x, w, b, g = cpu.make_inputs(M, D, torch.float32)
    traffic = cpu.measure_eager(x, w, b, g)
    assert traffic["fwd"].bytes_total == e * (7 * M * D + D * D + D)
    assert traffic["bwd"].bytes_total == e * (11 * M * D + 2 * D * D + D)
    assert traffic["fwd"].bytes_total == model.model_bytes("eager", "fwd", M, D, e)
    assert traffic["bwd"].bytes_total == model.model_bytes("eager", "bwd", M, D, e)
    assert traffic["full"].flops == 6 * M * D * D


# ---------------------------------------------------------------------------------------------
# The model


def test_minimum_bytes_formulas():
    M, D, e = 4096, 1024, 2
    assert model.minimum_bytes("fwd", M, D, e) == e * (2 * M * D + D * D + D)
    assert model.minimum_bytes("bwd", M, D, e) == e * (5 * M * D + 2 * D * D + D)
    assert model.model_bytes("compile", "fwd", M, D, e) == model.model_bytes("eager", "fwd", M, D, e)
    assert model.model_bytes("compile-max-autotune", "fwd", M, D, e) == e * (5 * M * D + D * D + D)
    assert model.model_bytes("compile-max-autotune+prologue", "fwd", M, D, e) == e * (3 * M * D + D * D + D)


@pytest.mark.parametrize("D,expected", [(256, 2.57), (512, 2.57), (1024, 2.15), (2048, 1.58), (4096, 1.29),
                                        (8192, 1.14)])
def test_ceiling_speedup_over_eager_matches_design(D, expected):
    """design.md section 4: fwd+bwd, bf16, H100."""
    assert model.ceiling_speedup("eager", "full", 65536, D, "bf16", model.H100) == pytest.approx(expected, abs=0.01)


def test_gpu_detection():
    assert model.detect_gpu("NVIDIA H100 80GB HBM3") is model.H100
    assert model.detect_gpu("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert model.detect_gpu("NVIDIA A100-SXM4-80GB") is model.A100
    assert model.detect_gpu("NVIDIA H200") is model.H200
    assert model.detect_gpu("Some Future GPU") is None


# ---------------------------------------------------------------------------------------------
# Inductor's code and the compile gate, on canned inputs (no compile here)

_WRAPPER = '''
cpp_fused_relu_0 = async_compile.cpp_pybinding(['const float*', 'float*'], r\'\'\'
extern "C"  void  kernel(const float* in_ptr0,
                       float* out_ptr0)
{}
\'\'\')
cpp_fused_add_1 = async_compile.cpp_pybinding(['float*', 'const float*'], r\'\'\'
extern "C"  void  kernel(float* in_out_ptr0,
                       const float* in_ptr0)
{}
\'\'\')
    def call(self, args):
        primals_1, primals_2, primals_3 = args
        buf0 = empty_strided_cpu((256, 128), (128, 1), torch.float32)
        cpp_fused_relu_0(primals_1, buf0)
        buf1 = empty_strided_cpu((256, 128), (128, 1), torch.float32)
        extern_kernels.addmm(primals_3, buf0, reinterpret_tensor(primals_2, (128, 128), (1, 128), 0), alpha=1, beta=1, out=buf1)
        buf2 = buf1; del buf1  # reuse
        cpp_fused_add_1(buf2, primals_1)
        return (buf2, buf0, primals_2, )
def get_args():
    primals_1 = rand_strided((256, 128), (128, 1), device='cpu', dtype=torch.float32)
    primals_2 = rand_strided((128, 128), (128, 1), device='cpu', dtype=torch.float32)
    primals_3 = rand_strided((128, ), (1, ), device='cpu', dtype=torch.float32)
'''


def test_parse_inductor_wrapper():
    graph = parse_wrapper(_WRAPPER)
    assert graph.parsed
    assert [(k.name, k.read, k.written) for k in graph.kernels] == [
        ("cpp_fused_relu_0", 256 * 128, 256 * 128),
        ("extern_kernels.addmm", 128 + 256 * 128 + 128 * 128, 256 * 128),
        ("cpp_fused_add_1", 2 * 256 * 128, 256 * 128),
    ]
    M, D = 256, 128
    assert graph.elements() == model.model_bytes("compile", "fwd", M, D, 1)      # the model's 7MD + D^2 + D


def test_gate_summary_of_records():
    recs = [dict(kernel="fwd", arch="sm_90", dtype="bf16", config_name="128x128x64", registers=120, spill_bytes=0,
                 shared_bytes=81920, shared_limit=232448, tensor_core=True, advisories=[], ok=True),
            dict(kernel="fwd", arch="sm_90", dtype="bf16", config_name="128x256x64", registers=255, spill_bytes=64,
                 shared_bytes=147456, shared_limit=232448, tensor_core=True,
                 advisories=["ptxas info : (C7515) wgmma serialized"], ok=False, failures=["spills"])]
    text = gate.summarize(recs)
    assert "2 compiles" in text and "1 ok, 1 failed" in text
    assert "C7515 x1" in text and "spill bytes total 64" in text and "FAIL fwd sm_90 bf16 128x256x64: spills" in text


def test_gate_degrades_without_the_module(monkeypatch):
    monkeypatch.setattr(gate, "available", lambda: False)
    run = gate.start("quick")
    records, note = gate.collect(run, progress=False)
    assert records is None and "fusedres.aot" in note


# ---------------------------------------------------------------------------------------------
# CPU mode, end to end at a tiny size


@interpreted
def test_cpu_mode_end_to_end(tmp_path):
    from bench.cli import main
    out = tmp_path / "out"
    js = tmp_path / "records.json"
    rc = main(["--mode", "cpu", "--size", "128x64", "--stack", "200x16x3", "--gate", "off", "--no-inductor-probe",
               "--no-progress", "--out", str(out), "--json", str(js)])
    assert rc == 0
    for name in ("cpu_traffic.md", "cpu_bytes.png", "cpu_model_time.png", "cpu_records.json"):
        assert (out / name).stat().st_size > 0
    recs = json.loads(js.read_text())
    stack = {(r["impl"], r["mode"]): r for r in recs if r.get("section") == "stack"}
    recs = [r for r in recs if r.get("section") != "stack"]
    assert set(stack) == {(i, m) for i in ("stack", "blocks", "eager") for m in ("fwd", "bwd", "full", "nograd")}
    for r in stack.values():
        assert r["ms"] is None and r["bytes_source"] == "measured"
    for mode in ("fwd", "bwd", "full", "nograd"):
        assert stack[("stack", mode)]["bytes"] == stack[("stack", mode)]["model_bytes"]
        assert stack[("blocks", mode)]["bytes"] > stack[("stack", mode)]["bytes"]
    assert stack[("stack", "fwd")]["launches"] == 1 and stack[("stack", "bwd")]["launches"] == 2
    assert {r["impl"] for r in recs} >= {"fused", "eager", "compile", "compile-max-autotune"}
    assert {r["mode"] for r in recs} == {"fwd", "bwd", "full"}
    for r in recs:
        assert r["measured"] is False and r["ms"] is None          # never a GPU time on a CPU
        for key in ("M", "D", "dtype", "bytes_read", "bytes_written", "unique_bytes", "flops"):
            assert key in r
        assert "MODEL" in r["model_projection"]["note"]
    by = {(r["impl"], r["mode"]): r for r in recs}
    M, D, e = 128, 64, 4
    assert by[("fused", "fwd")]["unique_bytes"] == e * (2 * M * D + D * D + D)
    assert by[("fused", "bwd")]["unique_bytes"] == e * (5 * M * D + 2 * D * D + D)
    assert by[("eager", "fwd")]["bytes_source"] == "measured"
    assert by[("compile", "fwd")]["bytes_source"] == "model"
    text = (out / "cpu_traffic.md").read_text()
    assert "parity" in text and "PASS" in text and "MODEL" in text
    assert " ms" not in text.replace("ms: null", "")     # no millisecond figure anywhere in CPU mode
    assert "Narrow stack" in text and "stack bytes equal the MODEL exactly: yes" in text


# ---------------------------------------------------------------------------------------------
# GPU mode's pipeline, on the CPU with a stand-in timer


@interpreted
def test_gpu_pipeline_with_a_cpu_standin(tmp_path):
    device = gpu.cpu_standin_device(name="fake-gpu (cpu stand-in)", reps=1)
    cfg = gpu.GpuConfig(D=(32, 64), M=(64,), dtypes=("fp32",), impls=("fused", "eager"))
    meta = {"torch": torch.__version__, "triton": "t", "cuda": "none", "python": "p", "git_commit": "abc"}
    rows = gpu.run_gpu(cfg, device, meta, progress=False)
    assert len(rows) == 2 * 2 * 4
    assert all(r["parity"] == "ok" and r["ms"] is not None for r in rows)
    assert all(r["measured"] is False and r["gpu"] == "fake-gpu (cpu stand-in)" for r in rows)
    fused = [r for r in rows if r["impl"] == "fused"]
    assert all(r["speedup_vs_eager"] > 0 for r in fused)
    assert all(r["min_bytes_model"] == model.minimum_bytes("fwd" if r["mode"] == "nograd" else r["mode"], 64,
                                                            r["D"], 4) for r in rows)

    paths = gpu.write_outputs(rows, tmp_path, plots=True)
    assert len(paths["plots"]) == 4 and all(p.stat().st_size > 0 for p in paths["plots"])
    md = paths["markdown"].read_text()
    assert "NOT a GPU measurement" in md and "| fused" in md and "| eager" in md
    with open(paths["csv"]) as f:
        first = list(csv.DictReader(f))
    assert len(first) == 16 and first[0]["gpu"] == "fake-gpu (cpu stand-in)" and first[0]["git_commit"] == "abc"

    # upsert: the same keys again replace their rows; nothing is duplicated
    again = [dict(r, ms=123.0) for r in rows[:4]]
    gpu.write_outputs(again, tmp_path, plots=False)
    with open(paths["csv"]) as f:
        second = list(csv.DictReader(f))
    assert len(second) == 16
    assert sum(float(r["ms"]) == 123.0 for r in second) == 4


def test_csv_upsert_keys(tmp_path):
    path = tmp_path / "r.csv"
    row = {"impl": "fused", "mode": "fwd", "M": 1, "D": 2, "dtype": "bf16", "gpu": "X", "ms": 1.0}
    upsert_csv(path, [row], ["impl", "mode", "M", "D", "dtype", "gpu", "ms"])
    upsert_csv(path, [dict(row, ms=2.0), dict(row, gpu="Y")], ["impl", "mode", "M", "D", "dtype", "gpu", "ms"])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["gpu"], r["ms"]) for r in rows] == [("X", "2"), ("Y", "1")]


def test_stack_ceilings_match_the_design_study():
    """bench/stack.py's MODEL at the issue's point (H100, M = 2^20, D = 64, L = 8, bf16): the
    design study's 6.2x (training forward), 28x and 8x (inference) and 7.5x (fwd+bwd) over eager and
    over L single-block kernels where its single-block model agrees with ours (the forward)."""
    from bench import model, stack
    M, D, L, e = 2 ** 20, 64, 8, 2
    sms, l2 = stack.GPU_SMS_L2["H100 SXM"]

    def ratio(peer, mode):
        t = {i: model.roofline_time_s(stack.stack_kernels(i, mode, M, D, L, e, sms, l2), model.H100, "bf16")
             for i in ("stack", peer)}
        return t[peer] / t["stack"]

    assert ratio("eager", "fwd") == pytest.approx(6.2, abs=0.05)
    assert ratio("blocks", "fwd") == pytest.approx(1.78, abs=0.01)
    assert ratio("eager", "nograd") == pytest.approx(28.0, abs=0.05)
    assert ratio("blocks", "nograd") == pytest.approx(8.0, abs=0.01)
    assert ratio("eager", "full") == pytest.approx(7.5, abs=0.05)
    # bytes per row: the study's 256 (inference) and 2432 + the partials (training)
    assert stack.model_bytes("stack", "nograd", M, D, L, e, sms, l2) == pytest.approx(256 * M, rel=0.001)
    assert stack.model_bytes("stack", "full", M, D, L, e, sms, l2) == pytest.approx(2432 * M, rel=0.02)


@interpreted
def test_stack_gpu_pipeline_with_a_cpu_standin():
    from bench import stack
    device = gpu.cpu_standin_device(name="fake-gpu (cpu stand-in)", reps=1)
    rows = stack.time_stack(device, M=64, D=16, L=3, dtype="fp32")
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in stack.IMPLS for m in stack.MODES}
    assert all(r["parity"] == "ok" and r["ms"] is not None and r["measured"] is False for r in rows)
    s = [r for r in rows if r["impl"] == "stack"]
    assert all(r["speedup_vs_blocks"] > 0 and r["ceiling_vs_eager_model"] > 0 for r in s)
    md = stack.gpu_markdown(rows)
    assert "NOT a GPU measurement" in md and "(MODEL)" in md
