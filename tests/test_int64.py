"""int64 safety: offsets past 2**31 elements are addressed correctly.

The interpreter test runs the kernels on a strided view whose rows start beyond 2**31 elements
(4 GiB of fp16) into a storage that is reserved but never touched, so it costs virtual address
space, not memory: the process's resident size is checked. With 32-bit offsets the third row's
offset wraps negative and the kernel reads outside the storage (a crash or wrong numbers), so the
test runs in a subprocess. The compile-side proof (64-bit address arithmetic in the TTIR the GPU
compiler gets) is in tests/test_aot.py.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, fusedres
    from fusedres import kernels

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    D = 32
    before = rss_mib()
    storage = torch.empty(2**31 + 4 * D, dtype=torch.float16)   # 4 GiB reserved, untouched
    x = storage.as_strided((3, D), (2**30 + 7, 1))               # row 2 starts at 2**31 + 14
    x.copy_(torch.randn(3, D).half())
    w = (torch.randn(D, D) / 6).half().requires_grad_()
    b = torch.randn(D).half().requires_grad_()
    xg = x.requires_grad_()
    y = fusedres.fused_residual(xg, w, b)
    g = torch.randn(3, D).half()
    y.backward(g)
    xc = x.detach().clone().requires_grad_()
    wc = w.detach().clone().requires_grad_()
    bc = b.detach().clone().requires_grad_()
    yr = fusedres.residual_reference(xc, wc, bc)
    yr.backward(g)
    for got, want in [(y, yr), (xg.grad, xc.grad), (w.grad, wc.grad), (b.grad, bc.grad)]:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert kernels.launch_counts() == {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}
    grew = rss_mib() - before
    assert grew < 1024, f"resident memory grew by {grew:.0f} MiB"
    print("ok", x.stride(0) * 2 * 2, "byte offset of row 2; resident growth MiB", round(grew))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read resident memory")
def test_offsets_past_2_31_elements_in_the_interpreter():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert result.stdout.startswith("ok")
