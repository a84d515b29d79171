"""Data-parallel training with fused blocks: DDP and FSDP2, 2 CPU processes over gloo, with the
Triton kernels in the interpreter, on a CPU-only and a CUDA machine alike. The processes are
launched here and always reaped."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(wrapper, tmp_path, timeout=300):
    out = tmp_path / "result.json"
    port = _free_port()
    worker = Path(__file__).with_name("_dist_worker.py")
    # The ranks run on the CPU (gloo, kernels in the interpreter) on any machine; they report CUDA as
    # the accelerator, as a GPU machine would, so that a CUDA default (FSDP2's mesh) fails here too.
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "FUSEDRES_TEST_ACCELERATOR": "cuda"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(rank), "2", str(port), wrapper, str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_training_matches_eager(wrapper, tmp_path):
    result = _run_two_ranks(wrapper, tmp_path)
    assert result["launches"]["residual_fwd"] >= 12 and result["launches"]["residual_dw"] >= 12
    eager, fused = result["eager"], result["fused"]
    assert eager[-1] < eager[0]  # it trains
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=1e-5, atol=1e-6)
