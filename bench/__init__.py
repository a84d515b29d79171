"""fusedres's benchmark harness: ``python -m bench`` (run from the repository root).

- With CUDA: real timings (``triton.testing.do_bench``) of the fused kernels against eager PyTorch,
  ``torch.compile`` and ``torch.compile(mode="max-autotune")``, parity-checked first; a CSV
  (upserted), a markdown table and plots. See :mod:`bench.gpu`.
- Without CUDA: measured memory traffic per call (the fused kernels through an instrumented Triton
  interpreter, eager through an aten dispatch counter), what Inductor generated on this CPU, a
  roofline MODEL projected onto named GPUs, a parity check and the compile gate's summary. No GPU
  time is ever printed or written in this mode. See :mod:`bench.cpu`.

Importing this package has no side effects; ``python -m bench`` sets ``TRITON_INTERPRET=1`` itself
before importing triton when CUDA is absent.
"""
