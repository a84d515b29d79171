"""Read what torch.compile (Inductor) really generated, here, for the reference block.

On a CPU, Inductor emits C++ kernels and ``torch._inductor.metrics.num_bytes_accessed`` stays 0,
so its memory traffic cannot be measured. What can be read is the generated program: which
kernels it launches (C++ loops or extern GEMM calls), and which buffers each kernel takes, in and
out. This module compiles the eager reference's forward and backward at a small size with
``torch._inductor.utils.run_and_get_code``, and parses the wrapper code:

- a C++ kernel's signature names each pointer ``in_ptrN`` (read), ``out_ptrN`` (written) or
  ``in_out_ptrN`` (both);
- an extern call (``extern_kernels.addmm(..., out=buf)``) reads its tensor arguments and writes ``out``;
- buffer sizes come from ``empty_strided_cpu``, ``assert_size_stride`` and ``reinterpret_tensor``.

The result, in multiples of ``M x D``, is *read from the generated code* (each buffer argument once
per kernel): a structural count of what the CPU program moves, not a measurement of a run, and not
what Inductor generates for a GPU (the GPU figures are the model in :mod:`bench.model`).
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field

_KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.cpp_pybinding\(\[[^\]]*\], r'''(.*?)'''", re.S | re.M)
_SIGNATURE = re.compile(r'extern "C"\s+void\s+kernel\(([^)]*)\)', re.S)
_ALLOC = re.compile(r"^\s*(\w+) = empty_strided_\w+\((\([^)]*\)), (\([^)]*\))")
_ASSERT = re.compile(r"^\s*assert_size_stride\((\w+), (\([^)]*\)), (\([^)]*\))")
_RAND = re.compile(r"^\s*(\w+) = rand_strided\((\([^)]*\)), (\([^)]*\))")
_REUSE = re.compile(r"^\s*(\w+) = (\w+); del \w+\s*# reuse")
_CALL = re.compile(r"^\s*(extern_kernels\.\w+|cpp_fused_\w+)\((.*)\)\s*$")


@dataclass
class GeneratedKernel:
    name: str
    kind: str                 # "cpp" | "extern"
    read: int = 0             # elements
    written: int = 0
    args: list = field(default_factory=list)

    @property
    def elements(self) -> int:
        return self.read + self.written


@dataclass
class GeneratedGraph:
    """One compiled graph (the forward, or the backward) as Inductor wrote it."""
    kernels: list
    parsed: bool              # False: the code did not match the expected shape; only counts are given

    def elements(self) -> int:
        return sum(k.elements for k in self.kernels)

    def describe(self) -> str:
        parts = []
        for k in self.kernels:
            parts.append(k.name.replace("extern_kernels.", "extern ") if k.kind == "extern" else k.name)
        return ", ".join(parts)


def _numel(shape: str) -> int:
    return math.prod(ast.literal_eval(shape)) if shape.strip("() ,") else 1


def _split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_wrapper(code: str) -> GeneratedGraph:
    """Parse one Inductor CPU wrapper module into its kernels with the elements they read and write."""
    signatures = {}
    for name, src in _KERNEL_DEF.findall(code):
        m = _SIGNATURE.search(src)
        if m:
            signatures[name] = [p.strip().split()[-1].lstrip("*") for p in m.group(1).split(",") if p.strip()]
    sizes: dict[str, int] = {}
    aliases: dict[str, str] = {}        # "buf3 = relu; del relu  # reuse"
    lines = code.splitlines()
    for line in lines:                 # sizes first: the inputs' sizes may come last (get_args)
        if m := (_ALLOC.match(line) or _ASSERT.match(line) or _RAND.match(line)):
            sizes[m.group(1)] = _numel(m.group(2))
        elif m := _REUSE.match(line):
            aliases[m.group(1)] = m.group(2)
    kernels = []
    parsed = True
    for line in lines:
        if m := _CALL.match(line):
            name, args = m.group(1), _split_args(m.group(2))

            def size_of(arg: str) -> int | None:
                r = re.match(r"reinterpret_tensor\((\w+), (\([^)]*\))", arg)
                if r:
                    return _numel(r.group(2))
                seen = set()
                while arg in aliases and arg not in sizes and arg not in seen:
                    seen.add(arg)
                    arg = aliases[arg]
                return sizes.get(arg)

            if name.startswith("extern_kernels."):
                k = GeneratedKernel(name, "extern")
                for a in args:
                    if "=" in a and not a.startswith("reinterpret_tensor"):
                        key, val = a.split("=", 1)
                        if key.strip() == "out":
                            n = size_of(val.strip())
                            k.written += n or 0
                            parsed &= n is not None
                        continue
                    n = size_of(a)
                    if n is not None:
                        k.read += n
                    k.args.append(a)
            else:
                k = GeneratedKernel(name, "cpp")
                sig = signatures.get(name)
                if sig is None or len(sig) != len(args):
                    parsed = False
                    sig = ["in_ptr"] * len(args)
                for a, p in zip(args, sig):
                    n = size_of(a)
                    if n is None:
                        if re.fullmatch(r"[\w.]+", a) and not a[0].isdigit():
                            parsed = False
                        continue
                    if p.startswith("in_out_ptr"):
                        k.read += n
                        k.written += n
                    elif p.startswith("out_ptr"):
                        k.written += n
                    elif p.startswith("in_ptr"):
                        k.read += n
                    k.args.append(a)
            kernels.append(k)
    return GeneratedGraph(kernels, parsed and bool(kernels))


@dataclass
class ProbeResult:
    mode: str                 # "default" | "max-autotune"
    M: int
    D: int
    forward: GeneratedGraph | None
    backward: GeneratedGraph | None
    seconds: float
    error: str | None = None

    def md_multiple(self, graph: GeneratedGraph | None) -> float | None:
        """Elements moved, in units of ``M x D`` (the ``D^2`` and ``D`` terms included)."""
        if graph is None or not graph.parsed:
            return None
        return graph.elements() / (self.M * self.D)


def probe(mode: str = "default", M: int = 256, D: int = 128) -> ProbeResult:
    """Compile the reference block's forward and backward with Inductor on this machine's CPU and
    parse what it generated. Cheap at the default size (a few seconds with a warm cache)."""
    import time

    import torch
    from torch._inductor.utils import run_and_get_code

    from fusedres import residual_reference

    t0 = time.perf_counter()
    try:
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(M, D, generator=gen, requires_grad=True)
        w = (torch.randn(D, D, generator=gen) / D ** 0.5).requires_grad_()
        b = torch.randn(D, generator=gen, requires_grad=True)
        g = torch.randn(M, D, generator=gen)
        fn = torch.compile(residual_reference, mode=None if mode == "default" else mode, dynamic=False)

        def run():
            y = fn(x, w, b)
            return torch.autograd.grad(y, (x, w, b), g)

        _, codes = run_and_get_code(run)
        graphs = [parse_wrapper(c) for c in codes]
        fwd = graphs[0] if graphs else None
        bwd = graphs[1] if len(graphs) > 1 else None
        return ProbeResult(mode, M, D, fwd, bwd, time.perf_counter() - t0)
    except Exception as exc:  # a probe must never sink the benchmark
        return ProbeResult(mode, M, D, None, None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    finally:
        torch._dynamo.reset()
