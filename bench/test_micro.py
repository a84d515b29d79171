"""Micro-benchmarks (pytest-benchmark): ``pytest bench --benchmark-only``.

Not collected by ``pytest`` alone (pytest.ini's testpaths is tests/). On a CUDA machine they time
the compiled kernels at a medium size; on a CPU they time the Triton interpreter and the
measurement instruments at a small one, which says how long the harness takes here and nothing
about GPU speed. No test asserts a time.
"""
import pytest
import torch

import fusedres
from bench.counters import DispatchTraffic
from bench.cpu import make_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
M, D = (8192, 1024) if CUDA else (256, 128)
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def inputs():
    x, w, b, g = make_inputs(M, D, DTYPE)
    return tuple(t.to(DEVICE) for t in (x, w, b, g))


def _bench(benchmark, fn):
    def run():
        out = fn()
        _sync()
        return out
    if CUDA:
        return benchmark(run)
    return benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_forward(benchmark, inputs, impl):
    x, w, b, _ = inputs
    fn = fusedres.fused_residual if impl == "fused" else fusedres.residual_reference
    with torch.no_grad():
        y = _bench(benchmark, lambda: fn(x, w, b))
    assert y.shape == x.shape


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_forward_backward(benchmark, inputs, impl):
    x, w, b, g = inputs
    fn = fusedres.fused_residual if impl == "fused" else fusedres.residual_reference
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    grads = _bench(benchmark, lambda: torch.autograd.grad(fn(xs, ws, bs), (xs, ws, bs), g))
    assert grads[0].shape == x.shape


def test_dispatch_counter_overhead(benchmark, inputs):
    x, w, b, _ = inputs

    def counted():
        with DispatchTraffic() as t:
            fusedres.residual_reference(x, w, b)
        return t
    t = _bench(benchmark, counted)
    assert t.bytes_total > 0


@pytest.mark.skipif(CUDA, reason="the traffic instrument runs only in Triton's interpreter")
def test_interpreter_traffic_overhead(benchmark, inputs):
    from fusedres.traffic import InterpreterTraffic
    x, w, b, _ = inputs

    def counted():
        with InterpreterTraffic() as t:
            fusedres.fused_residual(x, w, b)
        return t
    t = _bench(benchmark, counted)
    assert t.unique_bytes() > 0


# ---------------------------------------------------------------------------------------------
# Host overhead per call (bench/host.py): on a CPU, tiny tensors with every Triton launch of
# fusedres stubbed to a no-op, so the figure is the host work only; on CUDA, the real CPU-side
# time of a call at the same tiny size (no synchronisation per call). Reported, never asserted.


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("case", ["host_fwd", "host_fwd_grad", "host_full", "host_stack"])
def test_host(benchmark, case, impl):
    import contextlib

    from bench import host
    stub = host.no_triton_launch() if not CUDA else contextlib.nullcontext()
    with stub:
        fn = host._calls(impl, case, DEVICE, 8, 16, 4)
        benchmark.extra_info["mode"] = case
        benchmark(fn)
