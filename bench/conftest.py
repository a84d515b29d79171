"""pytest setup for the micro-benchmarks (``pytest bench --benchmark-only``): like tests/conftest.py,
the kernels run compiled on CUDA and in Triton's interpreter otherwise, which must be switched on
before triton is first imported."""
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before numpy: the interpreter's tiny matmuls
import torch  # noqa: E402

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before bench/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
