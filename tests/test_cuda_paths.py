"""The code paths that only a GPU takes, exercised on the CPU (issue 13, items 1-4).

- Triton's real ``Autotuner`` runs in the interpreter when the launcher's interpreter switch is
  off, with a stand-in benchmarker that runs each config once: what a first GPU call does.
- The device guard and the CUDA-graph capture guard are checked with recorded fakes: a recording
  ``torch.cuda.device``, a fake "capturing" state, and Triton's real ``JITFunction.run`` over a
  fake driver whose compiler only files the specialisation in the JIT cache.

What needs a GPU (a real cuda:1 launch, a real capture) is listed in docs/correctness.md, "What is verified where".
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton
from torch import nn

import fusedres
from fusedres import FusedResidualBlock, FusedResidualStack, ResidualBlock, fused_residual, residual_reference, tuning
from fusedres._layout import plan_rows
from fusedres import kernels
from fusedres.kernels import configs
from fusedres.kernels import device as device_limits
from fusedres.kernels import residual_stack as stack_kernels
from fusedres.kernels.residual_bwd import dalpha_workspace_size, residual_dw, residual_dx
from fusedres.kernels.residual_fwd import residual_fwd
from fusedres.validate import parity

from conftest import DEVICE
from helpers import run

cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="drives the interpreter in place of the GPU; on a GPU the "
                                                      "real autotuner, device and capture paths run anyway")


def _tile(config: triton.Config) -> int:
    size = 1
    for k, v in config.kwargs.items():
        if k.startswith("BLOCK_"):
            size *= v
    return size


@pytest.fixture
def real_autotuner(monkeypatch):
    """Launches go through Triton's own Autotuner (the GPU path), whose benchmarker is replaced by
    a stand-in that runs the candidate once. ``set_winner("largest" | "smallest")`` picks which tile
    wins; returns (set_winner, benched) with benched the (kind, config) pairs that ran."""
    benched = []
    winner = {"sign": -1}          # largest tile wins by default: the smaller ones run and lose
    monkeypatch.setattr(configs, "INTERPRET", False)
    for kind, tuned in tuning.TUNED_KERNELS.items():
        monkeypatch.setattr(tuned, "cache", {})
        # Several fp32-sized tiles (reduction step 16), whichever a triton release ships: the
        # hazard needs a tuning call with more than one candidate.
        red = configs._TILE_NAMES[kind][2]
        several = [c for c in tuned.configs if c.kwargs[red] == 16]
        monkeypatch.setattr(tuned, "early_config_prune", lambda cfgs, nargs, _keep=several, **kw: _keep)
        current = {}
        bench = type(tuned)._bench.__get__(tuned)

        def recording_bench(*args, config, _bench=bench, _current=current, _kind=kind, **meta):
            _current["config"] = config
            benched.append((_kind, config))
            return _bench(*args, config=config, **meta)

        def do_bench(kernel_call, quantiles=None, _current=current):
            kernel_call()          # the candidate really runs, on the real outputs, as on a GPU
            return [winner["sign"] * float(_tile(_current["config"]))] * 3

        monkeypatch.setattr(tuned, "_bench", recording_bench)
        # do_bench is a cached_property on every supported triton: set the instance's entry
        monkeypatch.setitem(tuned.__dict__, "do_bench", do_bench)

    def set_winner(which: str) -> None:
        winner["sign"] = -1 if which == "largest" else 1

    return set_winner, benched


# ---------------------------------------------------------------------------------------------
# Item 1: nothing a losing config wrote survives the tuning call


@cpu_only
def test_first_call_dalpha_is_eagers(real_autotuner, launches):
    """Issue 13's reproduction: the first call for a new key autotunes, and the dalpha partials that
    smaller dW tiles (more programs) left in the workspace were summed too (the issue measured
    10.18 against eager's 30.60)."""
    _, benched = real_autotuner
    torch.manual_seed(0)
    block = FusedResidualBlock(96, alpha=0.5, learnable_alpha=True)
    eager = ResidualBlock(96, alpha=0.5, learnable_alpha=True)
    eager.load_state_dict(block.state_dict())
    x = torch.randn(300, 96)
    block(x).sum().backward()
    eager(x).sum().backward()
    assert len({c.kwargs["BLOCK_K"] for k, c in benched if k == "dw"}) > 1, "the autotuner must try several tiles"
    assert launches() == {"residual_fwd": 1, "residual_dw": 1}
    ref = ResidualBlock(96, alpha=0.5, learnable_alpha=True, dtype=torch.float64)
    ref.load_state_dict(block.state_dict())
    ref(x.double()).sum().backward()
    for name in ("alpha", "weight", "bias"):
        f, e, r = (getattr(m, name).grad for m in (block, eager, ref))
        p = parity(f, e, r)
        assert p.ok, f"d{name} on the tuning call: {p}"
    first = block.alpha.grad.clone()
    block.alpha.grad = None
    block(x).sum().backward()                              # cached key: only the chosen config runs
    assert torch.equal(block.alpha.grad, first)


@cpu_only
@pytest.mark.parametrize("winner", ["largest", "smallest"])
def test_tuned_launches_write_every_output(real_autotuner, winner, launches):
    """Audit of every autotuned launch: y, dx, dW, db, dP and the dalpha workspace start as NaN,
    and the tuning call must leave exactly what a cached call (the chosen config alone) leaves;
    the dalpha partials summed are exactly the chosen config's programs'."""
    set_winner, benched = real_autotuner
    set_winner(winner)
    gen = torch.Generator().manual_seed(3)
    M, D = 136, 80          # (ragged for every tile: 136 = 128 + 8)
    x = torch.randn(M, D, generator=gen)
    w, p = torch.randn(2 * D, D, generator=gen) / 9, torch.randn(2 * D, D, generator=gen) / 9
    b = torch.randn(2 * D, generator=gen)
    g = torch.randn(M, 2 * D, generator=gen)
    alpha = torch.tensor(0.7)
    rows, (gs, xs), (gk, xk) = plan_rows(g, x)

    def outputs():
        y, dx = torch.full((M, 2 * D), float("nan")), torch.full((M, D), float("nan"))
        dw, dp, db = (torch.full(s, float("nan")) for s in ((2 * D, D), (2 * D, D), (2 * D,)))
        partials = torch.full((dalpha_workspace_size(2 * D, D, True),), float("nan"))
        residual_fwd(xk, xs, w, b, y, rows, alpha=alpha, proj_weight=p)
        residual_dx(gk, gs, xk, xs, w, dx, rows, alpha=alpha, proj_weight=p)
        n = residual_dw(gk, gs, xk, xs, dw, db, rows, weight=w, bias=b, alpha=alpha, dalpha_partials=partials,
                        dp=dp).programs
        chosen = tuning.TUNED_KERNELS["dw"].cache[next(iter(tuning.TUNED_KERNELS["dw"].cache))]
        assert n == triton.cdiv(D, chosen.kwargs["BLOCK_K"]) * 2 * triton.cdiv(2 * D, chosen.kwargs["BLOCK_N"])
        return dict(y=y, dx=dx, dw=dw, db=db, dp=dp, partials=partials[:n], dalpha=partials[:n].sum())

    tuning_call = outputs()
    assert {k for k, _ in benched} == {"fwd", "dx", "dw"} and len(benched) > 3
    cached_call = outputs()
    for name, t in tuning_call.items():
        assert not t.isnan().any(), f"{name}: part of it was never written"
        assert torch.equal(t, cached_call[name]), f"{name} differs between the tuning call and a cached call"
    ref_dalpha = (g.T.double() @ x.double().relu() * w.double()).sum() + (g.double().sum(0) * b.double()).sum()
    torch.testing.assert_close(tuning_call["dalpha"].double(), ref_dalpha, rtol=1e-5, atol=1e-4)
    assert launches() == {"residual_fwd": 2, "residual_dx": 2, "residual_dw": 2}


class _NanEmpty:
    """``torch`` as seen by the stack's launcher, with ``empty``/``empty_like`` filled with NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    @staticmethod
    def empty_like(*args, **kwargs):
        t = torch.empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@cpu_only
@pytest.mark.parametrize("chunk", [None, 1])
def test_stack_workspace_is_written_before_it_is_summed(monkeypatch, chunk, launches):
    """The stack's per-program partials (and dx, and the chunk carry) are allocated uninitialised:
    with NaN there, every element must still be written before it is read or reduced."""
    monkeypatch.setattr(stack_kernels, "torch", _NanEmpty())
    gen = torch.Generator().manual_seed(5)
    L, D, M = 3, 32, 150
    x = torch.randn(M, D, generator=gen)
    w = torch.randn(L, D, D, generator=gen) / 6
    saved = torch.randn(L - 1, M, D, generator=gen)
    g = torch.randn(M, D, generator=gen)
    dx, dw, db = stack_kernels.residual_stack_bwd(g, x, saved, w, has_bias=True, need_dx=True, need_params=True,
                                                  programs=3, chunk=chunk)
    for name, t in (("dx", dx), ("dw", dw), ("db", db)):
        assert not t.isnan().any(), name
    acts = torch.cat([x[None], saved])
    gl = g.double()
    for l in reversed(range(L)):                # reference: g_l = g_{l+1} + [x_l > 0] (g_{l+1} @ W_l)
        torch.testing.assert_close(dw[l].double(), gl.T @ acts[l].double().relu(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(db[l].double(), gl.sum(0), rtol=1e-4, atol=1e-4)
        gl = gl + torch.where(acts[l] > 0, gl @ w[l].double(), 0)
    torch.testing.assert_close(dx.double(), gl, rtol=1e-4, atol=1e-4)
    assert launches() == {"residual_stack_bwd": 1, "residual_stack_reduce": 1}


# ---------------------------------------------------------------------------------------------
# Item 2: every launch on its tensors' device


class _RecordingDevice:
    entered: list = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _RecordingDevice.entered.append(self.device)

    def __exit__(self, *exc):
        return False


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    _RecordingDevice.entered = []
    monkeypatch.setattr(torch.cuda, "device", _RecordingDevice)
    # cuda:1's properties as read on its first launch (the guard refuses a GPU older than sm_80)
    monkeypatch.setitem(device_limits._by_index, 1, device_limits.RECORDED["h100"])
    with configs.device_guard(torch.device("cuda", 1)):
        pass
    assert _RecordingDevice.entered == [torch.device("cuda", 1)]
    # on the CPU: a shared no-op context, and torch.cuda is not touched
    assert configs.device_guard(torch.device("cpu")) is configs.device_guard(torch.device("cpu"))
    with configs.device_guard(torch.device("cpu")):
        pass
    assert _RecordingDevice.entered == [torch.device("cuda", 1)]


def test_every_launch_runs_under_its_tensors_device(monkeypatch, device, launches):
    """Every kernel launch (single block: fwd, dx, dW; the stack: fwd, bwd, reduce) enters the
    device guard with its own tensors' device, and checks for capture inside it (capture state is
    per device and stream)."""
    guard = configs.device_guard
    state = {"inside": None, "entered": [], "checked": []}

    @contextlib.contextmanager
    def recording_guard(dev):
        state["entered"].append(dev)
        with guard(dev):
            state["inside"] = dev
            yield
            state["inside"] = None

    check = configs._check_capture_safe

    def recording_check(kind, *args, **kwargs):
        state["checked"].append((kind, state["inside"]))
        return check(kind, *args, **kwargs)

    monkeypatch.setattr(configs, "device_guard", recording_guard)
    monkeypatch.setattr(configs, "_check_capture_safe", recording_check)
    torch.manual_seed(0)
    block = FusedResidualBlock(32, 48, alpha=0.5, learnable_alpha=True, device=device)
    x = torch.randn(20, 32, device=device, requires_grad=True)
    block(x).sum().backward()
    stack = FusedResidualStack(16, 2, device=device)
    stack(torch.randn(40, 16, device=device, requires_grad=True)).sum().backward()
    n = sum(launches().values())
    assert n == 6 and launches()["residual_stack_reduce"] == 1
    assert state["entered"] == [x.device] * n
    assert [inside for _, inside in state["checked"]] == [x.device] * n


# ---------------------------------------------------------------------------------------------
# Item 3: warmup(model, example_inputs), and a capture guard that knows the JIT cache


class _FakeKernel:
    function = packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        pass


class _FakeDriver:
    """A GPU driver as ``JITFunction.run`` sees it, for compiling nothing on the CPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        raise AssertionError("the autotuner's benchmarker is replaced in these tests")


@pytest.fixture
def fake_gpu(monkeypatch, real_autotuner):
    """Triton's real ``JITFunction.run`` (binder, specialisation, cache key, device cache) over a
    fake driver; "compiling" files a no-op kernel under the key run() computed. Returns the list of
    compiled (kernel name, key) pairs. Kernel outputs are garbage: only the launch logic is real."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(driver, "_active", _FakeDriver())
    for index in (0, 1):        # the fake driver's target: an sm_90 part, as read on a first launch
        monkeypatch.setitem(device_limits._by_index, index, device_limits.RECORDED["h100"])
    compiled = []

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        compiled.append((self.__name__, key))
        self.device_caches[device][0][key] = kernel = _FakeKernel()
        return kernel

    monkeypatch.setattr(JITFunction, "_do_compile", fake_compile)
    for tuned in tuning.TUNED_KERNELS.values():
        monkeypatch.setattr(tuned, "fn", JITFunction(tuned.fn.fn))
    for name in ("residual_stack_fwd_kernel", "residual_stack_bwd_kernel", "residual_stack_reduce_kernel"):
        monkeypatch.setattr(stack_kernels, name, JITFunction(getattr(stack_kernels, name).fn))
    return compiled


@pytest.fixture
def capturing(monkeypatch):
    """``capturing(True)``: torch reports a CUDA stream capture in progress."""
    state = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])

    def set_capturing(on: bool) -> None:
        state["on"] = on

    return set_capturing


def _step(model, x):
    y = model(x)
    torch.autograd.grad(y.sum(), [p for p in model.parameters() if p.requires_grad])


@cpu_only
def test_warmup_model_compiles_what_capture_launches(fake_gpu, capturing, launches):
    compiled = fake_gpu
    torch.manual_seed(0)
    model = nn.Sequential(
        FusedResidualBlock(32),                                     # alpha buffer: a tensor pointer
        FusedResidualBlock(32, alpha=0.5, learnable_alpha=True),    # dalpha
        FusedResidualBlock(32, 48),                                 # projection
        nn.Linear(48, 32),
        FusedResidualStack(32, 2),                                  # the stack, training and inference
    )
    x = torch.randn(64, 32)
    # fwd, dx, dW at width 32, dW again with dalpha (the learnable alpha's recipe), and the projection's three
    assert fusedres.warmup(model, x) == 7
    assert model[1].alpha.grad is None and model[0].weight.grad is None   # no trace left
    n = len(compiled)
    capturing(True)
    _step(model, x)                                     # what warmup ran: nothing compiles
    with torch.no_grad():
        model(x)
    assert len(compiled) == n
    # same power-of-two bucket, so the tuned key exists, but 50 rows are not 16-divisible
    with pytest.raises(RuntimeError, match="would compile during CUDA-graph capture"):
        model(x[:50])
    assert len(compiled) == n


@cpu_only
def test_capture_guard_checks_the_variant_not_only_the_key(fake_gpu, capturing):
    """The older warmup(dim, batch_sizes) tunes every key a FusedResidualBlock(dim) uses; a
    learnable alpha, a Python-float alpha or autocast are other specialisations (recipes)."""
    compiled = fake_gpu
    # the older form: each kernel under two recipes (the block's tensor alpha, the function's none:
    # the recipe, activation and scale kind, is part of the autotune key)
    assert fusedres.warmup(32, batch_sizes=[64], dtypes=[torch.float32], device="cpu") == 6
    capturing(True)
    x = torch.randn(64, 32, requires_grad=True)
    block = FusedResidualBlock(32)
    _step(block, x)                                      # warmed: its alpha tensor and the plain function
    fused_residual(x, block.weight, block.bias)
    n = len(compiled)
    for variant in ("learnable", "float", "autocast"):
        with pytest.raises(RuntimeError, match="would (compile|autotune) during CUDA-graph capture"):
            if variant == "learnable":
                _step(FusedResidualBlock(32, alpha=0.3, learnable_alpha=True), x)
            elif variant == "float":
                fused_residual(x, block.weight, block.bias, alpha=0.3)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    block(x)
    assert len(compiled) == n
    capturing(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):     # warm under autocast: then it may be captured
        fusedres.warmup(block, x)
    capturing(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _step(block, x)


@cpu_only
def test_load_tuning_without_a_warm_launch_is_refused_in_capture(fake_gpu, capturing, tmp_path, monkeypatch):
    compiled = fake_gpu
    monkeypatch.setattr(tuning, "_device_name", lambda: "cpu")
    block = FusedResidualBlock(32)
    x = torch.randn(64, 32)
    fusedres.warmup(block, x)
    path = tmp_path / "tuning.json"
    fusedres.save_tuning(path)
    for tuned in tuning.TUNED_KERNELS.values():     # a new process: choices loaded, nothing compiled
        tuned.cache.clear()
        tuned.fn.device_caches.clear()
    fusedres.load_tuning(path, strict=False)
    capturing(True)
    with pytest.raises(RuntimeError, match="would compile"):
        block(x)
    capturing(False)
    n = len(compiled)
    fusedres.warmup(block, x)                       # compiles, tunes nothing
    assert len(compiled) > n
    capturing(True)
    block(x)


def test_jit_check_is_silent_in_the_interpreter():
    """Under the interpreter there is no JIT cache to consult: the guard must not invent misses."""
    if DEVICE != "cpu":
        pytest.skip("checks the guard under the interpreter, which has no JIT cache; on a CUDA machine the guard "
                    "reads the real one (the fake-driver tests model it on CPU)")
    x, w = torch.randn(16, 16), torch.randn(16, 16)
    rows, (xs,), (xk,) = plan_rows(x)
    from fusedres.kernels.residual_fwd import fwd_launch_args, residual_fwd_kernel
    args, consts, _ = fwd_launch_args(xk, xs, w, None, torch.empty(16, 16), rows)
    assert configs.jit_compiled(residual_fwd_kernel, args, consts) is None


# ---------------------------------------------------------------------------------------------
# Item 4: a Python-float alpha is a kernel argument, not a tensor


def _float_alpha_parity(x, w, b, alpha):
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(x.shape[:-1] + (w.shape[0],), generator=gen).to(x.device, x.dtype)
    fused = run(lambda *t: fused_residual(*t, alpha=alpha), x, w, b, g)
    eager = run(lambda *t: residual_reference(*t, alpha=alpha), x, w, b, g)
    ref = run(lambda *t: residual_reference(*t, alpha=alpha), x, w, b, g, dtype=torch.float64)
    scale = run(lambda *t: residual_reference(*t, alpha=abs(alpha)), x.abs(), w.abs(), b.abs(), g.abs(),
                dtype=torch.float64)
    for name, f, e, r, s in zip(("y", "dx", "dweight", "dbias"), fused, eager, ref, scale):
        p = parity(f, e, r, s)
        assert p.ok, f"{name} [{x.dtype}, alpha {alpha}]: {p}"
    return fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_float_alpha_parity(dtype, device, launches):
    """0.1 is not a binary fraction: fp64 must see the double, fp16/bf16/fp32 eager's fp32 rounding."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 40, generator=gen).to(device, dtype)
    w = (torch.randn(40, 40, generator=gen) / 7).to(device, dtype)
    b = torch.randn(40, generator=gen).to(device, dtype)
    _float_alpha_parity(x, w, b, 0.1)
    _float_alpha_parity(x, w, b, -2.5)
    if dtype == torch.float64:      # exact: the scalar travels as fp64
        y = fused_residual(x, w, b, alpha=0.1)
        torch.testing.assert_close(y, residual_reference(x, w, b, alpha=0.1), rtol=1e-15, atol=1e-15)
    assert launches() == {"residual_fwd": 3 if dtype == torch.float64 else 2, "residual_dx": 2, "residual_dw": 2}


def test_float_alpha_allocates_no_tensor(device, monkeypatch, launches):
    """A float alpha != 1 adds no aten op at all (no torch.tensor, no host-to-device copy) to the
    forward and backward: the same op sequence as alpha = 1."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    def ops(alpha):
        x = torch.randn(32, 16, device=device, requires_grad=True)
        w = torch.randn(16, 16, device=device, requires_grad=True)
        b = torch.randn(16, device=device, requires_grad=True)
        with Ops() as mode:
            fused_residual(x, w, b, alpha=alpha).backward(torch.ones(32, 16, device=device))
        return mode.ops

    ops(1.0)                       # on a GPU the first call autotunes (the benchmarker allocates)
    assert ops(0.5) == ops(1.0)
    assert made == []
    assert launches()["residual_fwd"] == 3


def test_compile_gate_builds_both_alpha_variants():
    """The gate's example launches (what it compiles) carry a float alpha by value and a tensor
    alpha by pointer, through the launchers' own argument builders."""
    from fusedres import aot
    assert "alpha-value" in aot.FEATURES and "alpha+proj" in aot.FEATURES
    for kind in aot.KINDS:
        kernel = {"fwd": kernels.residual_fwd_kernel, "dx": kernels.residual_dx_kernel,
                  "dw": kernels.residual_dw_kernel}[kind]
        args, consts = aot.example_launch(kind, "fp32", M=64, D=32, features="alpha-value")
        named = dict(zip(kernel.arg_names, args))
        assert named["alpha_value"] == 0.5 and named["alpha_ptr"] is None and named["channel_alpha_ptr"] is None
        assert "alpha=value" in consts["RECIPE"]
        assert [a for a in args if type(a) is float] == [0.5]
        args, consts = aot.example_launch(kind, "fp32", M=64, D=32, features="alpha+proj")
        named = dict(zip(kernel.arg_names, args))
        assert named["alpha_ptr"] is not None and "alpha=scalar" in consts["RECIPE"]
        args, consts = aot.example_launch(kind, "fp32", M=64, D=32, features="base")
        named = dict(zip(kernel.arg_names, args))
        assert named["alpha_ptr"] is None and named["alpha_value"] is None and "alpha" not in consts["RECIPE"]


def test_float_alpha_ops_pass_opcheck_and_compile(device, launches):
    """The float travels through both custom ops' schemas (opcheck: fake kernels, autograd,
    aot_dispatch) and through torch.compile(fullgraph=True)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 32, generator=gen).to(device).requires_grad_()
    w = (torch.randn(32, 32, generator=gen) / 8).to(device).requires_grad_()
    b = torch.randn(32, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.fusedres.residual_forward, (x, w, b, None, None, 0.3))
    g = torch.randn(6, 32, device=device)
    plain = (x.detach(), w.detach(), b.detach(), None, None)
    torch.library.opcheck(torch.ops.fusedres.residual_backward, (g, *plain, True, True, True, False, False, 0.3))
    compiled = torch.compile(lambda x, w, b: fused_residual(x, w, b, alpha=0.3), fullgraph=True)
    fused = run(compiled, x, w, b, g)
    eager = run(lambda x, w, b: residual_reference(x, w, b, alpha=0.3), x, w, b, g)
    for f, e in zip(fused[:4], eager[:4]):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)
    assert launches()["residual_fwd"] >= 2


# ---------------------------------------------------------------------------------------------
# Issue 15: prepared launches call the compiled kernel's launcher, as JITFunction.run would


def _same_call(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(u is v or (not isinstance(u, torch.Tensor) and u == v) for u, v in zip(a, b))


@cpu_only
def test_prepared_launch_calls_the_compiled_launcher_with_the_jit_arguments(fake_gpu, monkeypatch):
    """From its second call a PreparedLaunch on a GPU calls ``CompiledKernel.run`` itself: the
    same kernel object, grid, stream and argument list (constexprs included) that Triton's own
    ``JITFunction.run`` passed it on the first call. A pointer whose 16-byte alignment differs
    from the compiled specialisation's, or a launch hook, goes back through ``kernel[grid]``;
    another current device is switched to the tensors' device for the launch."""
    import sys
    from triton.runtime.jit import JITFunction
    rf = sys.modules["fusedres.kernels.residual_fwd"]
    calls = []
    monkeypatch.setattr(_FakeKernel, "run", lambda self, *a: calls.append((self, a)))
    current = {"device": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    _RecordingDevice.entered = []
    monkeypatch.setattr(torch.cuda, "device", _RecordingDevice)
    through_jit = []
    real_run_kernel = configs.run_kernel
    monkeypatch.setattr(configs, "run_kernel", lambda *a: through_jit.append(1) or real_run_kernel(*a))
    kernel = JITFunction(rf.residual_fwd_kernel.fn)
    x, w, b = torch.randn(64, 32), torch.randn(32, 32), torch.randn(32)
    y = torch.empty(64, 32)
    rows, (xs,), _ = plan_rows(x)
    args, consts, grid = rf.fwd_launch_args(x, xs, w, b, y, rows, alpha=0.5)
    cfg = configs.interpreter_config("fwd", 64, 32)
    kw = {**consts, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    prepared = configs.PreparedLaunch(kernel, "fwd", grid(kw), args, kw, rf.FWD_HEAD, cfg)
    prepared.device = 0                                   # as for tensors on cuda:0 (the fake driver's device)
    compiled_before = len(fake_gpu)
    prepared(*args[:rf.FWD_HEAD])                         # first call: through kernel[grid] (binder, cache, compile)
    assert len(fake_gpu) == compiled_before + 1 and prepared.compiled is not None
    jit_kernel, jit_args = calls[-1]
    assert len(through_jit) == 1
    prepared(*args[:rf.FWD_HEAD])                         # second: the compiled launcher, directly
    assert len(through_jit) == 1
    ours = calls[-1][1]
    assert len(calls) == 2 and calls[-1][0] is jit_kernel and _same_call(ours[:6] + ours[9:], jit_args[:6] + jit_args[9:])
    # positions 6-8: launch metadata and the enter/exit hooks. Triton passes its empty hook chains
    # (and metadata for them); with no hook to call, the prepared launch passes None for all three
    assert ours[6:9] == (None, None, None) and jit_args[7].calls == [] and jit_args[8].calls == []
    assert len(jit_args) == 9 + len(kernel.arg_names)     # grid, stream, handles, hooks; then every argument
    # new tensors with the same alignment: the same compiled kernel, the new pointers
    x2, y2 = torch.randn(64, 32), torch.empty(64, 32)
    prepared(*rf.fwd_head(x2, w, b, y2, 0.25))
    assert len(fake_gpu) == compiled_before + 1 and calls[-1][0] is jit_kernel and len(through_jit) == 1
    at = {name: 9 + i for i, name in enumerate(kernel.arg_names)}
    assert calls[-1][1][at["x_ptr"]] is x2 and calls[-1][1][at["alpha_value"]] == 0.25
    assert calls[-1][1][at["y_ptr"]] is y2 and calls[-1][1][at["r_ptr"]] is x2 and calls[-1][1][at["p_ptr"]] is None
    # x misaligned by 4 bytes: Triton would specialise differently, so kernel[grid] decides (and compiles)
    x3 = torch.randn(64 * 32 + 1)[1:].view(64, 32)
    prepared(*rf.fwd_head(x3, w, b, y2, 0.5))
    assert len(fake_gpu) == compiled_before + 2 and calls[-1][0] is not jit_kernel and len(through_jit) == 2
    # another current device: the launch is made on the tensors' device
    current["device"] = 1
    _RecordingDevice.entered = []
    prepared(*args[:rf.FWD_HEAD])
    assert _RecordingDevice.entered == [0] and calls[-1][0] is jit_kernel and len(through_jit) == 2
    current["device"] = 0
    # a launch hook (profilers): through kernel[grid], which calls the hook
    hooked = []
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: hooked.append(metadata))
    prepared(*args[:rf.FWD_HEAD])
    assert len(through_jit) == 3                          # JITFunction.run: it builds the hook's metadata


def test_replay_runs_the_same_launches_with_the_same_results(device, launches, monkeypatch):
    """A signature's first call plans and launches through the launchers; later calls replay the
    prepared launches. Same kernels, launch counts and bits, for every variant; the launchers run
    once per signature."""
    from fusedres import kernels
    entered = []
    for name in ("residual_fwd", "residual_dx", "residual_dw"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _n=name, **k: entered.append(_n) or _real(*a, **k))
    torch.manual_seed(0)
    base = torch.randn(6, 40, 24, device=device)
    cases = [dict(), dict(alpha=0.5), dict(alpha="learnable"), dict(bias=False), dict(proj=True),
             dict(layout="transposed"), dict(dtype=torch.float16)]
    for case in cases:
        dtype = case.get("dtype", torch.float32)
        x0 = base.to(dtype)
        if case.get("layout") == "transposed":
            x0 = x0.transpose(0, 1).contiguous().transpose(0, 1)          # two-level rows, no copy
        out = 32 if case.get("proj") else 24
        w = (torch.randn(out, 24, device=device) * 0.2).to(dtype).requires_grad_()
        b = torch.randn(out, device=device).to(dtype).requires_grad_() if case.get("bias", True) else None
        p = (torch.randn(out, 24, device=device) * 0.2).to(dtype).requires_grad_() if case.get("proj") else None
        alpha = case.get("alpha", 1.0)
        if alpha == "learnable":
            alpha = torch.tensor(0.7, device=device, dtype=dtype, requires_grad=True)
        params = [t for t in (w, b, p, alpha) if isinstance(t, torch.Tensor)]
        results, counts = [], []
        entered.clear()
        for _ in range(3):
            x = x0.detach().clone().requires_grad_() if case.get("layout") != "transposed" else \
                x0.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
            before = launches()
            y = fused_residual(x, w, b, alpha=alpha, proj_weight=p)
            grads = torch.autograd.grad(y, [x, *params], torch.ones_like(y))
            after = launches()
            counts.append({k: after.get(k, 0) - before.get(k, 0) for k in after})
            results.append([y.detach(), *grads])
        assert entered == ["residual_fwd", "residual_dx", "residual_dw"], case     # planned once
        assert counts[0] == counts[1] == counts[2] and counts[0]["residual_fwd"] == 1, case
        for later in results[1:]:
            assert all(torch.equal(a, c) for a, c in zip(results[0], later)), case


def test_fused_residual_keys_its_plans_as_the_signature_rule_says(device):
    """fused_residual builds its plan key inline (a call less per call): it must be
    ``op._signature``'s, or plans would be made twice and checks skipped."""
    from fusedres import op
    x = torch.randn(10, 16, device=device)
    w, b = torch.randn(16, 16, device=device), torch.randn(16, device=device)
    for kwargs in (dict(), dict(alpha=2.0), dict(alpha=torch.tensor(0.5, device=device)),
                   dict(proj_weight=torch.randn(16, 16, device=device))):
        op._plans.clear()
        fused_residual(x, w, b, **kwargs)
        alpha = kwargs.get("alpha", 1.0)
        a, av = (alpha, 1.0) if isinstance(alpha, torch.Tensor) else (None, float(alpha))
        assert list(op._plans) == [op._signature(x, w, b, a, kwargs.get("proj_weight"), av)]


def test_a_changed_choice_replans(device, launches):
    """Prepared launches hold a config and a split: a config override, a forced split, the
    backend and the validate mode clear them."""
    from fusedres import op
    from fusedres.kernels import plan as kplan
    x = torch.randn(300, 32, device=device, requires_grad=True)
    w, b = torch.randn(32, 32, device=device, requires_grad=True), torch.randn(32, device=device)
    fused_residual(x, w, b).sum().backward()
    assert op._plans
    with kplan.force_splits(3):
        assert not op._plans
        before = launches()
        fused_residual(x, w, b).sum().backward()
        assert launches().get("residual_dw_reduce", 0) - before.get("residual_dw_reduce", 0) == 1
    assert not op._plans
    fused_residual(x, w, b)
    fusedres.set_validate(False)
    assert not op._plans
