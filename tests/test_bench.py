"""The benchmark harness (bench/): byte counters, the model, the CPU pipeline end to end at a tiny
size, and the GPU pipeline exercised on a CPU with a stand-in timer (its rows never claim a GPU)."""
import csv
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # bench/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

import fusedres  # noqa: E402
from bench import cpu, gate, gpu, model  # noqa: E402
from bench.counters import DispatchTraffic, tensor_bytes  # noqa: E402
from bench.inductor_probe import parse_wrapper  # noqa: E402
from bench.report import upsert_csv  # noqa: E402
from helpers import fixed_tiles  # noqa: E402

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
# Progress bars: off when stderr is not a TTY (CI, log files), as tqdm's disable=None


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_are_off_when_stderr_is_not_a_tty(monkeypatch, tmp_path):
    from bench.report import progress_bar
    log = io.StringIO()                                   # a log file: isatty() is False
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(total=300, desc="x")
    assert bar.disable
    for _ in range(300):
        bar.update(1)
    bar.close()
    assert cpu._program_bar(True) is None                 # not even a per-program callback
    # the compile gate's bar, fed 300 "[n/total]" lines
    js, out = tmp_path / "gate.json", tmp_path / "gate.log"
    js.write_text("[]")
    out.write_text("")

    class Proc:
        stderr = iter(f"[{i}/300] compiling\n" for i in range(1, 301))

        def wait(self, timeout=None):
            return 0

    run = gate.GateRun("quick", [], proc=Proc(), json_path=str(js), stdout_path=str(out))
    records, _ = gate.collect(run, progress=True)
    assert records == []
    assert log.getvalue() == ""


def test_progress_bars_draw_on_a_tty(monkeypatch):
    from bench.report import progress_bar
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress_bar(total=3, desc="x")
    assert not bar.disable
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue()
    pb = cpu._program_bar(True)
    assert pb is not None
    pb.close()


# ---------------------------------------------------------------------------------------------
# Without matplotlib (the bench extra not installed): records first, plots skipped, exit 0


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)      # import matplotlib -> ImportError


@interpreted
def test_cpu_mode_without_matplotlib(tmp_path, capsys, no_matplotlib):
    from bench.cli import main
    from bench.report import PLOTS_HINT
    out = tmp_path / "out"
    rc = main(["--mode", "cpu", "--size", "64x32", "--no-stack", "--no-mlp", "--no-norm", "--gate", "off",
               "--no-inductor-probe",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    assert (out / "cpu_traffic.md").stat().st_size > 0
    assert json.loads((out / "cpu_records.json").read_text())
    assert not list(out.glob("*.png"))
    assert "MLP block" not in (out / "cpu_traffic.md").read_text()          # --no-mlp
    stdout = capsys.readouterr().out
    assert PLOTS_HINT in stdout and "pip install -e '.[bench]'" in stdout


@interpreted
def test_gpu_outputs_without_matplotlib(tmp_path, no_matplotlib):
    device = gpu.cpu_standin_device(name="fake-gpu (cpu stand-in)", reps=1)
    cfg = gpu.GpuConfig(D=(32,), M=(16,), dtypes=("fp32",), modes=("fwd",), impls=("fused", "eager"))
    rows = gpu.run_gpu(cfg, device, {"torch": torch.__version__, "triton": "t", "cuda": "none", "python": "p",
                                          "git_commit": "abc"}, progress=False)
    paths = gpu.write_outputs(rows, tmp_path, plots=True)
    assert paths["plots"] == [] and not (tmp_path / "plots").exists()
    assert paths["csv"].stat().st_size > 0 and "| fused" in paths["markdown"].read_text()


# ---------------------------------------------------------------------------------------------
# CPU mode, end to end at a tiny size


@interpreted
def test_cpu_mode_end_to_end(tmp_path):
    from bench.cli import main
    out = tmp_path / "out"
    js = tmp_path / "records.json"
    rc = main(["--mode", "cpu", "--size", "128x64", "--stack", "200x16x3", "--mlp-size", "64x32", "--norm-size", "64x32",
               "--dropout-size", "64x32", "--gate", "off",
               "--no-inductor-probe", "--no-progress", "--out", str(out), "--json", str(js)])
    assert rc == 0
    for name in ("cpu_traffic.md", "cpu_bytes.png", "cpu_model_time.png", "cpu_records.json"):
        assert (out / name).stat().st_size > 0
    recs = json.loads(js.read_text())
    stack = {(r["impl"], r["mode"]): r for r in recs if r.get("section") == "stack"}
    host = {(r["impl"], r["mode"]): r for r in recs if r.get("section") == "host"}
    mlp = {(r["impl"], r["H"], r["mode"]): r for r in recs if r.get("section") == "mlp"}
    norm = {(r["impl"], r["block"], r["norm"], r["mode"]): r for r in recs if r.get("section") == "norm"}
    drop = {(r["impl"], r["block"], r["dropout"], r["mode"]): r for r in recs if r.get("section") == "dropout"}
    recs = [r for r in recs if r.get("section") not in ("stack", "host", "mlp", "norm", "dropout")]
    # dropout (bench/dropout.py): the same fused launches with and without it, only the seeds'
    # and parameters' bytes more; eager's dropout moves tensors of the branch's size
    assert set(drop) == {(i, blk, d, m) for i in ("fused", "eager") for blk in ("single", "mlp")
                         for d in (False, True) for m in ("fwd", "bwd")}
    for blk in ("single", "mlp"):
        for mode in ("fwd", "bwd"):
            off, on = drop[("fused", blk, False, mode)], drop[("fused", blk, True, mode)]
            assert on["launches"] == off["launches"] and 0 < on["unique_bytes"] - off["unique_bytes"] <= 64
            assert drop[("eager", blk, True, mode)]["bytes"] - drop[("eager", blk, False, mode)]["bytes"] >= 64 * 32
    # the normalized block (bench/norm.py): fused bytes below eager's, above the compulsory minimum
    assert set(norm) == {(i, blk, k, m) for i in ("fused", "eager")
                         for blk in ("single", "mlp", "mlp-hidden", "chain-single", "chain-mlp")
                         for k in ("batch", "layer", "rms") for m in ("fwd", "bwd")}
    for (impl, blk, kind, mode), r in norm.items():
        if impl == "fused":
            assert r["compulsory_min_bytes"] < r["unique_bytes"] < norm[("eager", blk, kind, mode)]["bytes"]
            # a chain of 3 (fusedres.chain): one statistics pass, over its input; none backward
            assert r["launches"] == {"single": {"fwd": 2, "bwd": 3}, "mlp": {"fwd": 3, "bwd": 5},
                                     "mlp-hidden": {"fwd": 3, "bwd": 6}, "chain-single": {"fwd": 4, "bwd": 9},
                                     "chain-mlp": {"fwd": 7, "bwd": 15}}[blk][mode]
            assert r["statistics_passes"] == (1 if mode == "fwd" else 0)
    # the MLP block (bench/mlp.py): H = 4D and H = D, fused bytes equal to the two-launch formula
    assert set(mlp) == {(i, h, m) for i in ("fused", "fused-recompute", "eager") for h in (128, 32)
                        for m in ("fwd", "bwd", "full")}
    for (impl, h, mode), r in mlp.items():
        assert r["ms"] is None and r["measured"] is False and (r["M"], r["D"]) == (64, 32)
        if impl == "eager":
            assert r["bytes"] == r["model_bytes"] > mlp[("fused", h, mode)]["unique_bytes"]
        else:
            assert r["unique_bytes"] == r["formula_bytes"]
    assert set(host) == {(i, m) for i in ("fused", "eager")
                         for m in ("host_fwd", "host_fwd_grad", "host_full", "host_stack")}
    for r in host.values():                                  # a host time, reported, never asserted
        assert r["host_us"] > 0 and "stubbed" in r["how"] and r["fused_over_eager"] > 0
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
        v2 = r["model_v2"]                                         # MODEL v2 beside the v1 ceiling
        assert "MODEL" in v2["note"] and set(v2["time_us_model"]) == {"H100 SXM", "A100 SXM 80GB", "H200 SXM"}
        assert all(t >= model.LAUNCH_US for t in v2["time_us_model"].values())
    by = {(r["impl"], r["mode"]): r for r in recs}
    for gpu, sp in by[("eager", "full")]["model_v2"]["speedup_over_eager_model"].items():
        assert sp == pytest.approx(1.0)
    # the fused request bytes measured here equal the v2 formula at the config the interpreter ran
    table = (out / "cpu_traffic.md").read_text().split("measured here vs the v2 formula")[1].split("###")[0]
    assert [line.split("|")[-2].strip() for line in table.splitlines() if line.startswith("| d") or
            line.startswith("| f")] == ["1.0000"] * 3
    M, D, e = 128, 64, 4
    assert by[("fused", "fwd")]["unique_bytes"] == e * (2 * M * D + D * D + D)
    assert by[("fused", "bwd")]["unique_bytes"] == e * (5 * M * D + 2 * D * D + D)
    assert by[("eager", "fwd")]["bytes_source"] == "measured"
    assert by[("compile", "fwd")]["bytes_source"] == "model"
    text = (out / "cpu_traffic.md").read_text()
    assert "parity" in text and "PASS" in text and "MODEL" in text
    assert " ms" not in text.replace("ms: null", "")     # no millisecond figure anywhere in CPU mode
    assert "Narrow stack" in text and "stack bytes equal the MODEL exactly: yes" in text
    assert "## MLP block" in text and "equal the two-launch formula exactly, every launch: yes" in text


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


@interpreted
def test_stack_gpu_rows_check_the_backward(monkeypatch):
    """A stack whose forward is right and whose backward is wrong is reported, not timed."""
    import fusedres
    from bench import stack

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, g):
            return 1.5 * g

    right = fusedres.fused_residual_stack
    monkeypatch.setattr(fusedres, "fused_residual_stack", lambda x, w, b: WrongGrad.apply(right(x, w, b)))
    device = gpu.cpu_standin_device(name="fake-gpu (cpu stand-in)", reps=1)
    rows = stack.time_stack(device, M=64, D=16, L=3, dtype="fp32")
    by = {(r["impl"], r["mode"]): r for r in rows}
    assert all(by[("stack", m)]["parity"] == "FAIL" and by[("stack", m)]["ms"] is None for m in stack.MODES)
    assert "dx FAIL" in by[("stack", "fwd")]["parity_detail"] and "y ok" in by[("stack", "fwd")]["parity_detail"]
    assert all(by[("blocks", m)]["parity"] == "ok" for m in stack.MODES)
    assert "dW ok" in by[("blocks", "bwd")]["parity_detail"]


def test_max_autotune_peer_runs_without_cuda_graphs(monkeypatch):
    """mode="max-autotune" captures CUDA graphs; every other implementation runs without them."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    gpu.make_impl("compile-max-autotune")
    gpu.make_impl("compile")
    assert seen[0]["mode"] == "max-autotune-no-cudagraphs" and seen[1]["mode"] is None
    from torch._inductor import list_mode_options
    options = list_mode_options()[seen[0]["mode"]]
    assert options.get("max_autotune") and not options.get("triton.cudagraphs")


def test_fp64_baseline_size_check_skips_what_would_not_fit(monkeypatch, tmp_path):
    """The issue's case (M = 65536, D = 8192) needs 55-60 GiB of fp64 baseline: checked against the
    free memory before anything is built, and a case that does not fit is skipped with a message;
    a baseline that fails anyway skips its case only."""
    from bench import parity
    assert 55 * 2 ** 30 <= gpu.baseline_bytes(65536, 8192) <= 66 * 2 ** 30
    built = []

    class Baseline(parity.Baseline):
        def __init__(self, x, *rest):
            built.append(x.shape)
            if x.shape[1] == 32:
                raise torch.OutOfMemoryError("CUDA out of memory (planted)")
            super().__init__(x, *rest)

    monkeypatch.setattr(parity, "Baseline", Baseline)
    device = gpu.cpu_standin_device(reps=1)
    device.free_memory = lambda: gpu.baseline_bytes(64, 60)          # room for D = 48, not for D = 64
    fusedres.set_backend("eager")                                     # the pipeline, not the kernels (reset by conftest)
    cfg = gpu.GpuConfig(D=(32, 48, 64), M=(64,), dtypes=("fp32",), impls=("fused", "eager"), modes=("fwd",))
    rows = gpu.run_gpu(cfg, device, {"git_commit": "x"}, progress=False)
    assert built == [(64, 32), (64, 48)]                               # D = 64 was never built
    by = {(r["D"], r["impl"]): r for r in rows}
    for D in (32, 64):
        for impl in ("fused", "eager"):
            r = by[(D, impl)]
            assert r["parity"] == "skipped" and r["ms"] is None and r["error"].startswith("skipped: the fp64")
    assert "GiB are free" in by[(64, "fused")]["error"] and "planted" in by[(32, "fused")]["error"]
    assert by[(48, "fused")]["parity"] == "ok" and by[(48, "fused")]["ms"] is not None


def test_csv_key_keeps_tf32_and_ieee_rows_apart(tmp_path):
    from bench.report import CSV_KEY
    assert "fp32_precision" in CSV_KEY
    path = tmp_path / "r.csv"
    cols = ["impl", "mode", "M", "D", "dtype", "gpu", "fp32_precision", "ms"]
    row = {"impl": "fused", "mode": "fwd", "M": 1, "D": 2, "dtype": "fp32", "gpu": "X", "fp32_precision": "highest",
           "ms": 1.0}
    upsert_csv(path, [row], cols)
    upsert_csv(path, [dict(row, fp32_precision="high", ms=2.0)], cols)
    bf16 = dict(row, dtype="bf16", ms=3.0)
    upsert_csv(path, [bf16], cols)
    upsert_csv(path, [dict(bf16, fp32_precision="high", ms=4.0)], cols)   # 16-bit: the precision is moot
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["dtype"], r["fp32_precision"], r["ms"]) for r in rows] == [
        ("fp32", "highest", "1"), ("fp32", "high", "2"), ("bf16", "high", "4")]


# ---------------------------------------------------------------------------------------------
# python -m bench --gpu-check, in the interpreter with a stand-in timer

_TINY_CHECK = dict(M=40, D=32, stack_widths=(16, 32), stack_width=16, stack_M=130, stack_L=2,
                   timing_sizes=((64, 32), (96, 32)))


def _specialisation(named: dict) -> tuple:
    """What a GPU compile is keyed on, as far as these launches differ: dtypes, 16-byte alignment,
    16-divisible or unit integers, and every other value (constexprs)."""
    out = []
    for k, v in named.items():
        if isinstance(v, torch.Tensor):
            out.append((k, str(v.dtype), v.data_ptr() % 16 == 0))
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            out.append((k, repr(v)))
        elif isinstance(v, int):
            out.append((k, v % 16 == 0, v == 1))
    return tuple(out)


@interpreted
def test_gpu_check_runs_every_variant_with_a_standin(monkeypatch, tmp_path):
    """Every single-block variant x dtype and every stack case passes parity with pinned configs, the
    Triton kernels ran each time, the timing rows carry the MODEL beside a stand-in time that never
    claims a GPU, and the specialisations launched are the planned compile count."""
    from bench import gpucheck
    from bench.report import write_json
    from fusedres.kernels import configs, residual_stack as ks

    specs = set()
    pinned = configs.pinned_config

    def spy_pinned(kind, named):
        config = pinned(kind, named)
        specs.add((kind, _specialisation(named), str(config)))
        return config

    launch = ks._launch

    def spy_launch(kernel, name, grid, args, consts, config):
        specs.add((name, _specialisation(dict(zip(kernel.arg_names, args))), repr(sorted(consts.items())), str(config)))
        return launch(kernel, name, grid, args, consts, config)

    monkeypatch.setattr(configs, "pinned_config", spy_pinned)
    monkeypatch.setattr(ks, "_launch", spy_launch)
    plan = gpucheck.CheckPlan(**_TINY_CHECK)
    res = gpucheck.run_check(gpu.cpu_standin_device(reps=1), plan, {"git_commit": "x"}, log=lambda s: None)
    assert res.ok, [c for c in res.cases if not c["ok"]]
    assert {(c["variant"], c["dtype"]) for c in res.cases if c["section"] == "block"} == \
        {(v, d) for v in gpucheck.BLOCK_VARIANTS for d in gpucheck.DTYPES}
    assert {(c["variant"], c["dtype"], c["D"]) for c in res.cases if c["section"] == "stack"} >= \
        {("train", "bf16", 32)} | {(v, d, 16) for v in gpucheck.STACK_VARIANTS for d in gpucheck.STACK_DTYPES}
    block = next(c for c in res.cases if c["variant"] == "projection" and c["dtype"] == "autocast-bf16")
    assert set(block["checks"]) == {"y", "dx", "dweight", "dbias", "dalpha", "dproj_weight"}
    assert len(specs) == res.planned_compiles == gpucheck.planned_compiles(plan)
    assert len(res.timing) == 2 * 3
    for r in res.timing:
        assert r["measured"] is False and "not a GPU" in r["gpu"] and r["fused_ms"] and r["eager_ms"]
        assert r["model_ms"] > 0 and r["model_gpu"] == model.H100.name
    assert "NOT a GPU" in gpucheck.timing_table(res.timing) and "MODEL" in gpucheck.timing_table(res.timing)
    write_json(tmp_path / "check.json", res.as_json())
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["ok"] and doc["measured"] is False and len(doc["cases"]) == len(res.cases)


@interpreted
def test_gpu_check_fails_a_wrong_variant(monkeypatch):
    """A kernel path that breaks one variant (here: a Python-float alpha applied twice) fails that
    variant's cases and no other."""
    import fusedres
    from bench import gpucheck
    right = fusedres.fused_residual

    def wrong(x, w, b=None, *, alpha=1.0, proj_weight=None):
        y = right(x, w, b, alpha=alpha, proj_weight=proj_weight)
        return y + (alpha - 1) * 0.25 * y if isinstance(alpha, float) and alpha != 1.0 else y

    monkeypatch.setattr(fusedres, "fused_residual", wrong)
    plan = gpucheck.CheckPlan(**dict(_TINY_CHECK, stack_widths=(), timing_sizes=()), dtypes=("fp32", "bf16"))
    plan.stack_cases = lambda: []
    res = gpucheck.run_check(gpu.cpu_standin_device(reps=1), plan, log=lambda s: None)
    failed = {(c["variant"], c["dtype"]) for c in res.cases if not c["ok"]}
    assert failed == {("alpha-float-nobias", "fp32"), ("alpha-float-nobias", "bf16")} and not res.ok


@interpreted
def test_gpu_check_pins_configs_on_the_gpu_launch_path(monkeypatch):
    """On the GPU launch path (the interpreter switch off, as on CUDA) nothing autotunes."""
    from bench import gpucheck
    from fusedres import tuning
    from fusedres.kernels import configs

    monkeypatch.setattr(configs, "INTERPRET", False)
    for tuned in tuning.TUNED_KERNELS.values():
        monkeypatch.setattr(tuned, "_bench", lambda *a, **k: pytest.fail("autotuned under pinned configs"))
    plan = gpucheck.CheckPlan(**dict(_TINY_CHECK, timing_sizes=()), dtypes=("fp32",))
    plan.stack_cases = lambda: []
    res = gpucheck.run_check(gpu.cpu_standin_device(reps=1), plan, log=lambda s: None)
    assert res.ok and len(res.cases) == len(gpucheck.BLOCK_VARIANTS)
    assert all(not t.cache for t in tuning.TUNED_KERNELS.values())


def test_gpu_check_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("tests the refusal on a machine without CUDA; here `--gpu-check` runs for real instead")
    from bench.cli import main
    assert main(["--gpu-check"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_plan_compile_count():
    """The default plan's compile count, from which the runtime estimate of docs/benchmarks.md is made."""
    from bench import gpucheck
    plan = gpucheck.CheckPlan()
    assert len(plan.block_cases()) == 30 and len(plan.stack_cases()) == 15
    assert gpucheck.planned_compiles(plan) == 124


# ---------------------------------------------------------------------------------------------
# MODEL v2 in the launch plan (issue 14, items 1-2)

_PLAN_SIZES = ((65536, 256), (65536, 512), (8192, 1024), (65536, 4096))


@pytest.mark.parametrize("M,D", _PLAN_SIZES)
def test_plan_model_v2_bounds_fill_and_splits(M, D):
    """No model_us below its kernel's own compute (FLOPs / peak) or HBM (unique bytes / bandwidth)
    lower bound; every chosen single-block kernel fills >= 0.9 of an H100; dW splits at D <= 512."""
    from bench import plan as bplan
    recs = bplan.plan_records("h100", M, D, "bf16")
    gv2 = model.GPUS_V2["h100"]
    for r, k in bplan.plan_kernels(recs):
        assert r["model_us"] is not None
        if r["kernel"] == "dw_reduce" and not r["programs"]:
            continue
        comp, hbm = model.lower_bounds_us(k, gv2, "bf16")
        assert r["model_us"] >= comp and r["model_us"] >= hbm, r
        assert r["model_us"] >= gv2.launch_us
    chosen = {r["kernel"]: r for r in recs if r["chosen"]}
    assert set(chosen) >= {"fwd", "dx", "dw"}
    for kind in ("fwd", "dx", "dw"):
        assert chosen[kind]["fill"] >= 0.9, chosen[kind]
        same = [r for r in recs if r["kernel"] == kind]
        cost = (lambda r: r["_total"]) if kind == "dw" else (lambda r: r["model_us"])   # dW: with its reduce
        assert all(cost(chosen[kind]) <= cost(r) for r in same)
    if D <= 512:
        assert chosen["dw"]["splits"] > 1
        assert chosen["dw_reduce"]["after"] == chosen["dw"]["config"]
    assert all(set(r) >= {"kernel", "config", "gpu", "M", "D", "dtype", "programs", "splits", "waves", "fill",
                          "model_us", "chosen"} for r in bplan.public(recs))


def test_model_v2_terms():
    """The v2 formula: wave-quantised compute, launch latency added once; an underfilled dW pays its
    whole reduction in one program."""
    gv2 = model.GPUS_V2["h100"]
    kw = {"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_M": 64}
    one = model.v2_dw(65536, 256, 2, kw, programs=4, waves=1, splits=1, tiles_per_split=1024)
    t = model.terms_us(one, gv2, "bf16")
    assert t["compute"] == pytest.approx(1e6 * 2 * 128 * 128 * 65536 / (989e12 / 132))
    assert model.time_us(one, gv2, "bf16") == pytest.approx(max(t.values()) + model.LAUNCH_US)
    split = model.v2_dw(65536, 256, 2, kw, programs=128, waves=1, splits=32, tiles_per_split=32)
    assert model.time_us(split, gv2, "bf16") < model.time_us(one, gv2, "bf16") / 10
    assert split.hbm_bytes - one.hbm_bytes == 4 * 32 * (256 * 256 + 256) - 2 * (256 * 256 + 256)


def test_stack_v2_table_counts_the_l2_partials():
    """The stack-vs-blocks MODEL v2 table: 16 rows; the backward's L2 partials are 8 D^2 / BLOCK_M bytes
    per row per layer (2x the bf16 activation at D = 64 with 128-row tiles, as issue 14 says)."""
    from bench import stack
    rows = [r for r in stack.stack_v2_table().splitlines() if r.startswith("| h100") or r.startswith("| a100")]
    assert len(rows) == 16
    r = stack.stack_v2_us(65536, 64, 8, "bf16", "h100")
    assert r["bwd_block_m"] == 128 and r["l2_partial_per_row_layer"] == 2 * r["act_per_row_layer"] == 256
    assert r["stack_us"] > 0 and r["blocks_us"] > 0


# ---------------------------------------------------------------------------------------------
# MODEL v2: request bytes measured vs formula, stack rows, small M, the peers (issue 14 follow-up)




@interpreted
@pytest.mark.parametrize("M,D,tile,splits", [(256, 128, (64, 64, 32), 1), (200, 96, (64, 32, 32), 1),
                                             (200, 96, (16, 32, 32), 3)])
def test_v2_request_bytes_formula_matches_the_interpreter(M, D, tile, splits):
    """bench/model.py's request-bytes formulas (the v2 L2 term) equal the interpreter's count of every
    active lane of every load and store, per kernel, in a pinned config: tiles that divide, ragged
    tiles (M = 200, D = 96), and a forced split-M dW (S = 3, ragged last split) with its reduce."""
    from fusedres.kernels import configs, plan
    from fusedres.traffic import InterpreterTraffic
    x, w, b, g = cpu.make_inputs(M, D, torch.float32)
    choose = fixed_tiles(*tile)
    with configs.config_override(choose), plan.force_splits(splits):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        with InterpreterTraffic() as t:
            y = fusedres.fused_residual(xs, ws, bs)
            torch.autograd.grad(y, (xs, ws, bs), g)
    measured = {}
    for lc in t.launches:
        measured[lc.kernel] = measured.get(lc.kernel, 0) + lc.bytes_read + lc.bytes_written
    e = 4
    for kind in ("fwd", "dx", "dw"):
        c = choose(kind, None)
        if kind == "dw":
            p = plan.plan_dw(plan.INTERPRETER_SMS, M, D, D, c, splits=splits)
            k = model.v2_dw(M, D, e, c.kwargs, p.programs, p.waves, p.splits, p.tiles_per_split)
        else:
            p = {"fwd": plan.plan_fwd, "dx": plan.plan_dx}[kind](plan.INTERPRETER_SMS, M, D, D, c)
            k = {"fwd": model.v2_fwd, "dx": model.v2_dx}[kind](M, D, e, c.kwargs, p.programs, p.waves)
        assert measured[f"residual_{kind}_kernel"] == k.l2_bytes, kind
    if splits > 1:
        assert measured["residual_dw_reduce_kernel"] == model.v2_reduce(D, e, 1, 1, p.splits).l2_bytes
    else:
        assert "residual_dw_reduce_kernel" not in measured


def test_plan_lists_the_stack_kernels():
    """At D <= 128 the plan has the stack's kernels as rows with the plan's keys; their MODEL v2 times
    sum to bench.stack.stack_v2_us's stack time (one copy of the stack's model), and none is below its
    own compute or HBM lower bound. Without stack_layers (bench.stack's own use) there are none."""
    from bench import plan as bplan
    from bench import stack
    keys = {"kernel", "config", "gpu", "M", "D", "dtype", "programs", "splits", "waves", "fill", "model_us", "chosen"}
    for gpu in ("h100", "a100"):
        for D in (16, 64, 128):
            recs = bplan.plan_records(gpu, 65536, D, "bf16", stack_layers=8)
            rows = [r for r in recs if r["kernel"].startswith("stack_")]
            assert [r["kernel"] for r in rows] == ["stack_fwd", "stack_bwd", "stack_reduce"]
            assert all(set(r) >= keys and r["chosen"] and r["L"] == 8 for r in bplan.public(rows))
            want = stack.stack_v2_us(65536, D, 8, "bf16", gpu)["stack_us"]
            assert sum(r["model_us"] for r in rows) == pytest.approx(want, rel=1e-4)
            gv2 = model.GPUS_V2[gpu]
            for r, k in bplan.plan_kernels(rows):
                comp, hbm = model.lower_bounds_us(k, gv2, "bf16")
                assert r["model_us"] >= max(comp, hbm) and 0 < r["fill"] <= 1
    assert not [r for r in bplan.plan_records("h100", 65536, 64, "bf16") if r["kernel"].startswith("stack_")]
    assert not [r for r in bplan.plan_records("h100", 65536, 256, "bf16", stack_layers=8)
                if r["kernel"].startswith("stack_")]


def test_small_m_report_and_bounds():
    """fwd and dx at M in {512, 2048, 8192} x D in {1024, 4096}, bf16, H100 and A100: 24 rows; every
    plan record there respects the lower bounds; the best fill over the shipped configs reaches half a
    wave everywhere (the small-M table of docs/grid-fill.md)."""
    from bench import plan as bplan
    rows = bplan.small_m_records()
    assert len(rows) == 2 * 3 * 2 * 2
    assert all(r["half_wave"] and 0 < r["fill"] <= r["best_fill"] <= 1 for r in rows)
    text = bplan.format_small_m(rows)
    assert "MODEL" in text and text.count("\n| h100") == 12 and text.count("\n| a100") == 12
    for gpu in ("h100", "a100"):
        gv2 = model.GPUS_V2[gpu]
        for M in bplan.SMALL_M:
            for D in bplan.SMALL_M_D:
                for r, k in bplan.plan_kernels(bplan.plan_records(gpu, M, D, "bf16")):
                    if r["kernel"] == "dw_reduce" and not r["programs"]:
                        continue
                    comp, hbm = model.lower_bounds_us(k, gv2, "bf16")
                    assert r["model_us"] >= comp and r["model_us"] >= hbm, r


@pytest.mark.parametrize("impl", ["eager", "compile", "compile-max-autotune", "compile-max-autotune+prologue"])
def test_peer_v2_full_fill_respects_the_bounds(impl):
    """The peers in MODEL v2 (full fill, GEMM re-reads at a 128 x 128 tile): never below FLOPs / peak or
    bytes / HBM bandwidth; and the fused v2 time never below the fused minimum's bounds."""
    from bench import plan as bplan
    for gpu, gv2 in model.GPUS_V2.items():
        for M, D in ((65536, 256), (8192, 1024), (512, 4096)):
            for mode in ("fwd", "bwd", "full"):
                ks = model.kernels(impl, mode, M, D, 2)
                t = model.peer_v2_us(ks, gv2, "bf16", M, D)
                peak = model.peak_tflops_v2(gv2, "bf16") * 1e12
                assert t >= 1e6 * sum(k.flops for k in ks) / peak
                assert t >= 1e6 * sum(k.bytes for k in ks) / (gv2.spec.tbps * 1e12)
                assert t >= len(ks) * gv2.launch_us
                fused = bplan.fused_v2_us(gpu, M, D, "bf16", mode)
                fmin = model.kernels("fused-min", mode, M, D, 2)
                assert fused >= 1e6 * sum(k.flops for k in fmin) / peak
                assert fused >= 1e6 * sum(k.bytes for k in fmin) / (gv2.spec.tbps * 1e12)


def test_l2_bandwidths_are_sourced():
    """The v2 L2 figures are the published measurements adopted in bench/model.py, not the old
    assumptions; L2 above HBM bandwidth on every GPU."""
    assert {k: g.l2_tbps for k, g in model.GPUS_V2.items()} == {"h100": 9.0, "a100": 5.4, "h200": 9.7}
    src = (ROOT / "bench" / "model.py").read_text()
    assert "te42kyfo/gpu-benches" in src and "L2 bandwidth: ASSUMED" not in src
    assert all(g.l2_tbps > g.spec.tbps for g in model.GPUS_V2.values())


def test_plan_cli_small_m_and_stack_rows(tmp_path, capsys):
    from bench.cli import main
    js = tmp_path / "plan.json"
    assert main(["--plan", "--gpu", "a100", "--size", "65536x128", "--dtype", "bf16", "--small-m",
                 "--stack-layers", "4", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "stack_bwd (L=4)" in out and "Small M, fwd and dx" in out
    recs = json.loads(js.read_text())
    stack_rows = [r for r in recs if r["kernel"].startswith("stack_")]
    assert len(stack_rows) == 3 and all(r["L"] == 4 and r["gpu"] == "a100" for r in stack_rows)
    assert len([r for r in recs if r.get("section") == "small_m"]) == 24


def test_fused_v2_takes_the_measured_request_bytes(monkeypatch):
    """The CPU report's fused v2 L2 term: the measured request bytes (scaled fp32 -> bf16) where the
    interpreter ran the chosen output tile unsplit; elsewhere the formula times measured / formula."""
    from bench import plan as bplan
    res = cpu.CpuResult(65536, 512, "fp32")
    chosen = {r["kernel"]: r for r in bplan.plan_records("h100", 65536, 512, "bf16") if r["chosen"]}
    assert chosen["fwd"]["config"].startswith("128x128") and chosen["dw"]["splits"] > 1
    fake = {"fwd": dict(tile=(128, 128), splits=1, measured=10 ** 9, ratio=1.0),
            "dx": dict(tile=(1, 1), splits=1, measured=1, ratio=2.0),
            "dw": dict(tile=(128, 128), splits=1, measured=1, ratio=None)}
    monkeypatch.setattr(cpu, "fused_l2_check", lambda r: fake)
    ks = {k["kernel"]: k for k in cpu.fused_v2_kernels(res, "h100", "bf16")}
    assert ks["fwd"]["l2_source"] == "measured" and ks["fwd"]["l2_bytes"] == 10 ** 9 // 2
    assert ks["dx"]["l2_source"].startswith("formula x 2.000")
    assert ks["dx"]["l2_bytes"] == 2 * bplan.plan_kernels([chosen["dx"]])[0][1].l2_bytes
    assert ks["dw"]["l2_source"] == "formula" and ks["dw_reduce"]["l2_source"] == "formula"
    gv2 = model.GPUS_V2["h100"]
    for k in ks.values():
        comp, hbm = model.lower_bounds_us(k["_k"], gv2, "bf16")
        assert k["model_us"] >= max(comp, hbm) + gv2.launch_us
