"""The roofline MODEL: kernel-by-kernel bytes and FLOPs of each implementation, and their projection
onto named GPUs. Nothing in this module is a measurement.

Every implementation is described as the list of kernels it launches, each with the bytes it
must move (each operand read once from DRAM, each result written once) and its FLOPs. A kernel's
model time on a GPU is ``max(bytes / bandwidth, flops / peak)`` (the roofline), and an
implementation's is the sum over its kernels: kernels run one after another and each is bounded
by whichever resource it saturates. With ``e`` the element size:

- fused (this package): forward ``e(2MD + D^2 + D)``; backward (dx and dW kernels) ``e(5MD + 2D^2 + D)``;
- eager PyTorch: forward ``e(7MD + D^2 + D)`` (relu, addmm, add); backward ``e(11MD + 2D^2 + D)``;
- torch.compile, default mode, on a GPU: an extern cuBLAS GEMM and fused Triton pointwise kernels;
  forward as eager, ``e(7MD + D^2 + D)``; backward ``e(8MD + 2D^2 + D)`` (the relu mask, the residual
  gradient and the bias column sum fused in one kernel, the structure Inductor generates on CPU);
- torch.compile, max-autotune: Triton GEMM templates with the pointwise ops fused as epilogues:
  forward ``e(5MD + D^2 + D)`` (relu still its own kernel); backward ``e(7MD + 2D^2 + D)``;
- max-autotune with prologue fusion (relu fused into the GEMM's A-operand load, where Inductor's
  heuristics allow it): forward ``e(3MD + D^2 + D)``; backward ``e(7MD + 2D^2 + D)``.

FLOPs are the GEMMs': ``2MD^2`` forward, ``4MD^2`` backward (pointwise work is not counted).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MODES = ("fwd", "bwd", "full")
ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


@dataclass(frozen=True)
class Kernel:
    """One kernel of a model: bytes read, bytes written, FLOPs."""
    name: str
    read: int
    written: int
    flops: int = 0

    @property
    def bytes(self) -> int:
        return self.read + self.written


# ---------------------------------------------------------------------------------------------
# Kernel lists, per implementation and direction (in elements; scaled by e in `kernels`)


def _fused(M, D):
    fwd = [("fwd: relu(x) @ W.T + b + x", M * D + D * D + D, M * D, 2 * M * D * D)]
    bwd = [("dx: g + (g @ W) * [x > 0]", 2 * M * D + D * D, M * D, 2 * M * D * D),
           ("dW: relu(x).T @ g, db = sum g", 2 * M * D, D * D + D, 2 * M * D * D)]
    return fwd, bwd


def _eager(M, D):
    fwd = [("relu", M * D, M * D, 0),
           ("addmm (cuBLAS)", M * D + D * D + D, M * D, 2 * M * D * D),
           ("add (residual)", 2 * M * D, M * D, 0)]
    bwd = [("mm g @ W (cuBLAS)", M * D + D * D, M * D, 2 * M * D * D),
           ("mm g.T @ h (cuBLAS)", 2 * M * D, D * D, 2 * M * D * D),
           ("sum g (db)", M * D, D, 0),
           ("threshold_backward", 2 * M * D, M * D, 0),
           ("add (residual grad)", 2 * M * D, M * D, 0)]
    return fwd, bwd


def _compile_default(M, D):
    fwd = [("triton pointwise: relu", M * D, M * D, 0),
           ("extern addmm (cuBLAS)", M * D + D * D + D, M * D, 2 * M * D * D),
           ("triton pointwise: add", 2 * M * D, M * D, 0)]
    bwd = [("extern mm g @ W (cuBLAS)", M * D + D * D, M * D, 2 * M * D * D),
           ("extern mm g.T @ h (cuBLAS)", 2 * M * D, D * D, 2 * M * D * D),
           ("triton fused: threshold_backward + add + sum", 3 * M * D, M * D + D, 0)]
    return fwd, bwd


def _compile_max_autotune(M, D):
    fwd = [("triton pointwise: relu", M * D, M * D, 0),
           ("triton mm template + bias/residual epilogue", 2 * M * D + D * D + D, M * D, 2 * M * D * D)]
    bwd = [("triton mm template g @ W + mask/residual epilogue", 3 * M * D + D * D, M * D, 2 * M * D * D),
           ("triton mm template g.T @ h", 2 * M * D, D * D, 2 * M * D * D),
           ("triton reduction: sum g (db)", M * D, D, 0)]
    return fwd, bwd


def _compile_max_autotune_prologue(M, D):
    fwd = [("triton mm template, relu prologue + bias/residual epilogue", 2 * M * D + D * D + D, M * D,
            2 * M * D * D)]
    _, bwd = _compile_max_autotune(M, D)
    return fwd, bwd


MODELS = {
    "fused-min": _fused,
    "eager": _eager,
    "compile": _compile_default,
    "compile-max-autotune": _compile_max_autotune,
    "compile-max-autotune+prologue": _compile_max_autotune_prologue,
}

DESCRIPTIONS = {
    "fused-min": "compulsory minimum of the fused kernels: each operand read once, each result written once",
    "eager": "eager PyTorch op by op",
    "compile": "torch.compile default on a GPU: extern cuBLAS GEMMs + fused Triton pointwise kernels",
    "compile-max-autotune": "torch.compile max-autotune on a GPU: Triton GEMM templates with epilogue fusion",
    "compile-max-autotune+prologue": "max-autotune where Inductor also fuses the relu as a GEMM prologue",
}


def kernels(impl: str, mode: str, M: int, D: int, e: int) -> list[Kernel]:
    """The model's kernels of ``impl`` for ``mode`` ("fwd", "bwd", "full"), bytes for element size ``e``."""
    fwd, bwd = MODELS[impl](M, D)
    chosen = {"fwd": fwd, "nograd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]
    return [Kernel(n, e * r, e * w, f) for n, r, w, f in chosen]


def model_bytes(impl: str, mode: str, M: int, D: int, e: int) -> int:
    return sum(k.bytes for k in kernels(impl, mode, M, D, e))


def minimum_bytes(mode: str, M: int, D: int, e: int) -> int:
    """The fused compulsory minimum: ``e(2MD + D^2 + D)`` forward, ``e(5MD + 2D^2 + D)`` backward."""
    return model_bytes("fused-min", mode, M, D, e)


def gemm_flops(mode: str, M: int, D: int) -> int:
    return {"fwd": 2, "nograd": 2, "bwd": 4, "full": 6}[mode] * M * D * D


# ---------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet peaks (dense, no sparsity). TFLOP/s per operand type; bandwidth in TB/s."""
    name: str
    bf16: float          # bf16/fp16 tensor cores, fp32 accumulate
    tf32: float          # tf32 tensor cores
    fp32: float          # IEEE fp32 (no tensor cores): torch's default matmul precision 'highest'
    tbps: float

    def peak_tflops(self, dtype: str, fp32_precision: str = "highest") -> float:
        if dtype in ("bf16", "fp16"):
            return self.bf16
        if dtype == "fp32":
            return self.fp32 if fp32_precision == "highest" else self.tf32
        raise ValueError(f"no peak for {dtype}")


# The three of the brief first: they are the projection targets in CPU mode.
H100 = GpuSpec("H100 SXM", bf16=989.0, tf32=494.7, fp32=66.9, tbps=3.35)
A100 = GpuSpec("A100 SXM 80GB", bf16=312.0, tf32=156.0, fp32=19.5, tbps=2.04)
H200 = GpuSpec("H200 SXM", bf16=989.0, tf32=494.7, fp32=66.9, tbps=4.8)
PROJECTION_GPUS = (H100, A100, H200)

# Detection by device name (torch.cuda.get_device_name), for % of roofline in GPU mode.
_KNOWN = [
    (r"H200", H200),
    (r"H100.*(PCIe|PCIE)", GpuSpec("H100 PCIe", bf16=756.0, tf32=378.0, fp32=51.2, tbps=2.0)),
    (r"H100", H100),
    (r"A100.*SXM.*40GB|A100-SXM4-40GB", GpuSpec("A100 SXM 40GB", bf16=312.0, tf32=156.0, fp32=19.5, tbps=1.555)),
    (r"A100.*(PCIe|PCIE).*40GB|A100-PCIE-40GB", GpuSpec("A100 PCIe 40GB", 312.0, 156.0, 19.5, 1.555)),
    (r"A100.*80GB.*(PCIe|PCIE)", GpuSpec("A100 PCIe 80GB", 312.0, 156.0, 19.5, 1.935)),
    (r"A100", A100),
    (r"\bL4\b", GpuSpec("L4", bf16=121.0, tf32=60.0, fp32=30.3, tbps=0.3)),
]


def detect_gpu(device_name: str) -> GpuSpec | None:
    """The datasheet spec of a GPU from its device name, or None if it is not in the table."""
    for pattern, spec in _KNOWN:
        if re.search(pattern, device_name, re.IGNORECASE):
            return spec
    return None


# ---------------------------------------------------------------------------------------------
# Roofline


def kernel_time_s(read_written: int, flops: int, spec: GpuSpec, dtype: str, fp32_precision: str = "highest") -> float:
    """Roofline time of one kernel: the larger of its memory time and its compute time."""
    return max(read_written / (spec.tbps * 1e12), flops / (spec.peak_tflops(dtype, fp32_precision) * 1e12))


def roofline_time_s(ks, spec: GpuSpec, dtype: str, fp32_precision: str = "highest") -> float:
    """Model time of a kernel sequence: the sum of each kernel's roofline time.

    ``ks`` is an iterable of objects with ``bytes`` and ``flops`` (``Kernel``, or measured kernels)."""
    return sum(kernel_time_s(k.bytes, k.flops, spec, dtype, fp32_precision) for k in ks)


def bound(ks, spec: GpuSpec, dtype: str, fp32_precision: str = "highest") -> str:
    """"memory" or "compute": which side of the roofline dominates the sequence's model time."""
    mem = sum(k.bytes / (spec.tbps * 1e12) for k in ks)
    comp = sum(k.flops / (spec.peak_tflops(dtype, fp32_precision) * 1e12) for k in ks)
    return "memory" if mem >= comp else "compute"


def ceiling_speedup(peer: str, mode: str, M: int, D: int, dtype: str, spec: GpuSpec,
                    fp32_precision: str = "highest") -> float:
    """MODEL: the largest speedup of the fused kernels over ``peer`` that the roofline allows."""
    e = ELEMENT_SIZE[dtype]
    fused = roofline_time_s(kernels("fused-min", mode, M, D, e), spec, dtype, fp32_precision)
    other = roofline_time_s(kernels(peer, mode, M, D, e), spec, dtype, fp32_precision)
    return other / fused


# ---------------------------------------------------------------------------------------------
# MODEL v2 (issue 14, item 2): wave-quantised compute, HBM and L2 terms, plus a launch latency
#
# The v1 byte ceiling above stays as it is (one column of the reports). v2 is per kernel launch:
#
#     time = max(compute, HBM, L2) + LAUNCH_US
#     compute = waves * (FLOPs of one program) / (peak / SMs)      (one resident program per SM)
#     HBM     = unique bytes / HBM bandwidth
#     L2      = request bytes / L2 bandwidth
#
# Limits, stated: the HBM and L2 terms assume the grid issues enough requests to reach the full
# bandwidth whatever its fill (an underfilled grid is slower still, so v2 can be optimistic for
# an underfilled memory-bound kernel); occupancy above one program per SM is not modelled; pointwise
# work and epilogues cost no compute. Eager's and Inductor's GEMMs (cuBLAS, Triton templates) are
# modelled at full fill: cuBLAS picks its own split-K, so they have no wave term (``v2_full_fill``);
# their L2 term charges their GEMMs' operand re-reads at a 128 x 128 output tile, as the fused
# kernels' request bytes are charged theirs. Everything here is a MODEL, never a measurement.


@dataclass(frozen=True)
class GpuV2:
    """The v2 constants of one GPU. ``spec``: the datasheet peaks above (dense bf16 / tf32 TFLOP/s
    and HBM TB/s, NVIDIA datasheets); ``sms``: SM count; ``l2_tbps``: L2 bandwidth, TB/s;
    ``l2_mb``: L2 size; ``launch_us``: per-launch latency added to every kernel."""
    key: str
    spec: GpuSpec
    sms: int
    l2_tbps: float
    l2_mb: int
    launch_us: float


#: Per-launch latency, us: ASSUMED (a few us between back-to-back launches on one stream is the
#: usual order of magnitude; not measured for this package).
LAUNCH_US = 3.0

#: MODEL v2 GPUs. Sources:
#: - H100 SXM: 989 TFLOP/s dense bf16, 494.7 tf32, 3.35 TB/s HBM3, 132 SMs, 50 MB L2 (NVIDIA H100
#:   datasheet / Hopper whitepaper).
#: - A100 SXM 80GB: 312 TFLOP/s dense bf16, 156 tf32, 2.04 TB/s HBM2e, 108 SMs, 40 MB L2 (NVIDIA A100
#:   datasheet / Ampere whitepaper).
#: - H200 SXM: 989 TFLOP/s dense bf16 (same GH100 compute as H100 SXM), 4.8 TB/s HBM3e, 132 SMs, 50 MB
#:   L2 (NVIDIA H200 datasheet; L2 as H100's, same die).
#: - L2 bandwidth: MEASURED by others, read from their published raw data (nothing here ran on a GPU).
#:   Source: Dominik Ernst (NHR@FAU), "gpu-benches", benchmark ``gpu-l2-cache`` ("Measures bandwidths
#:   of shared cache levels. This benchmark explicitly does not target the L1 caches."),
#:   https://github.com/te42kyfo/gpu-benches, files ``gpu-l2-cache/h200.txt`` and ``a100_80.txt``
#:   (commit 3088b33, 2024-04-03) and ``gpu-l2-cache/h100_pcie.txt`` (commit f54baaa, 2023-11-02);
#:   column "Eff. bw" of the rows whose total data volume (2nd column) lies inside the L2 plateau:
#:   * H200 (132 SMs): 9.68-10.25 TB/s over the 18 rows at 8-30 MB (mean 9.87 TB/s): adopted 9.7 TB/s,
#:     the plateau's low end.
#:   * A100 80GB ("a100_80"; SXM or PCIe not stated in the file: both have 108 SMs at a 1410 MHz boost
#:     clock): 5.26-5.48 TB/s over the 28 rows at 2-25 MB (mean 5.40 TB/s): adopted 5.4 TB/s.
#:   * H100 SXM: not measured there. The file measures an H100 PCIe (114 SMs, 1755 MHz boost):
#:     6.87-7.03 TB/s over the 18 rows at 8-30 MB (mean 6.95 TB/s). Scaled by SMs x boost clock to the
#:     SXM (132 SMs, 1980 MHz): 6.95 x 132/114 x 1980/1755 = 9.1 TB/s, below the H200's 9.7-10.3 TB/s on
#:     the same 132-SM GH100 configuration. Adopted 9.0 TB/s (the scaled PCIe figure, rounded down).
#:   Also searched, not adopted: Chips and Cheese, "Nvidia's H100: Funny L2, and Tons of Bandwidth"
#:   (2023-07-02, https://chipsandcheese.com/2023/07/02/nvidias-h100-funny-l2-and-tons-of-bandwidth/;
#:   it measured an H100 PCIe and an A100-SXM4-40GB; its L2 figure was not in the stored text
#:   available here); Luo et al., "Dissecting the NVIDIA Hopper Architecture through
#:   Microbenchmarking and Multiple Level Analysis" (arXiv:2501.12084; abstract only available here).
#:   The benchmark reads only; the model charges L2 stores at the same rate.
#:   A table of theoretical full-die figures (PMC10448217, Table 3: "L2 cache bandwidth (GB/s)" 7219
#:   A100, 8986 H100, i.e. 5120 B/clk x boost clock) agrees in order of magnitude; not adopted.
GPUS_V2 = {
    "h100": GpuV2("h100", H100, sms=132, l2_tbps=9.0, l2_mb=50, launch_us=LAUNCH_US),
    "a100": GpuV2("a100", A100, sms=108, l2_tbps=5.4, l2_mb=40, launch_us=LAUNCH_US),
    "h200": GpuV2("h200", H200, sms=132, l2_tbps=9.7, l2_mb=50, launch_us=LAUNCH_US),
}


@dataclass(frozen=True)
class KernelV2:
    """MODEL v2 inputs of one launch: ``waves``, ``program_flops`` (FLOPs of one program, full tiles),
    ``flops`` (the kernel's own useful FLOPs), ``hbm_bytes`` (unique bytes: each operand read once,
    each result written once, split-M partial slabs included), ``l2_bytes`` (request bytes: every
    program's tile loads and stores)."""
    name: str
    waves: int
    program_flops: int
    flops: int
    hbm_bytes: int
    l2_bytes: int


def peak_tflops_v2(gpu: GpuV2, dtype: str) -> float:
    """Dense tensor-core peak: bf16/fp16, or tf32 for fp32 operands (the kernels' default precision)."""
    return gpu.spec.bf16 if dtype in ("bf16", "fp16") else gpu.spec.tf32


def terms_us(k: KernelV2, gpu: GpuV2, dtype: str) -> dict:
    """MODEL v2: the three terms of one launch, us (``compute`` wave-quantised)."""
    per_sm = peak_tflops_v2(gpu, dtype) * 1e12 / gpu.sms
    return {"compute": 1e6 * k.waves * k.program_flops / per_sm,
            "hbm": 1e6 * k.hbm_bytes / (gpu.spec.tbps * 1e12),
            "l2": 1e6 * k.l2_bytes / (gpu.l2_tbps * 1e12)}


def time_us(k: KernelV2, gpu: GpuV2, dtype: str) -> float:
    """MODEL v2 time of one launch: ``max(compute, HBM, L2) + launch latency``, us."""
    return max(terms_us(k, gpu, dtype).values()) + gpu.launch_us


def lower_bounds_us(k: KernelV2, gpu: GpuV2, dtype: str) -> tuple[float, float]:
    """``(FLOPs / peak, unique bytes / HBM bandwidth)``, us: no v2 time may be below either."""
    return (1e6 * k.flops / (peak_tflops_v2(gpu, dtype) * 1e12), 1e6 * k.hbm_bytes / (gpu.spec.tbps * 1e12))


def _cd(a: int, b: int) -> int:
    return -(-a // b)


def v2_fwd(M: int, D: int, e: int, kw: dict, programs: int, waves: int) -> KernelV2:
    """Forward ``y = relu(x) @ W.T + b + x`` (``N = K = D``), tile ``[BM, BN]`` over ``BK``.

    unique bytes ``e(2MD + D^2 + D)``. Request bytes, every active lane of every load and store (as
    the interpreter instrument counts them; masked-off lanes of ragged tiles are not requests), with
    ``nM = cdiv(M, BM)``, ``nN = cdiv(N, BN)``: ``e(nN M K + nM N K + 2 M N + nM N)``: each column
    of programs reads all of x's rows (its A slabs), each row of programs all of W (its B slabs),
    the residual x tile and the y tile once, the bias once per row of programs. Per program at full
    tiles that is ``e(BM K + BN K + 2 BM BN + BN)``. FLOPs of one program ``2 BM BN K`` (K rounded up
    to BK)."""
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    kp = _cd(D, bk) * bk
    nm, nn = _cd(M, bm), _cd(D, bn)
    return KernelV2("fwd", waves, 2 * bm * bn * kp, 2 * M * D * D, e * (2 * M * D + D * D + D),
                    e * (nn * M * D + nm * D * D + 2 * M * D + nm * D))


def v2_dx(M: int, D: int, e: int, kw: dict, programs: int, waves: int) -> KernelV2:
    """dx ``= g + (g @ W) * [x > 0]``, tile ``[BM, BK]`` over ``BN``.

    unique bytes ``e(3MD + D^2)``; request bytes (active lanes, ``nM = cdiv(M, BM)``,
    ``nK = cdiv(K, BK)``) ``e(nK M N + nM N K + 3 M K)``: g row slabs, W column slabs, the g and x
    tiles of the epilogue and the dx tile (per program at full tiles ``e(BM N + BK N + 3 BM BK)``);
    FLOPs ``2 BM BK N``."""
    bm, bk, bn = kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_N"]
    npad = _cd(D, bn) * bn
    nm, nk = _cd(M, bm), _cd(D, bk)
    return KernelV2("dx", waves, 2 * bm * bk * npad, 2 * M * D * D, e * (3 * M * D + D * D),
                    e * (nk * M * D + nm * D * D + 3 * M * D))


def v2_dw(M: int, D: int, e: int, kw: dict, programs: int, waves: int, splits: int, tiles_per_split: int,
          bias: bool = True) -> KernelV2:
    """dW ``= relu(x).T @ g`` and db, tile ``[BK, BN]``, reducing ``tiles_per_split`` row tiles of ``BM``.

    unique bytes ``e 2MD`` read, and written: ``e(D^2 + D)`` when ``S = 1``, else the fp32 partial
    slabs ``4 S (D^2 + D)``. Request bytes (active lanes; ``nK = cdiv(K, BK)``, ``nN = cdiv(N, BN)``;
    the splits partition the rows, so they do not multiply the reads):
    ``e(nN M K + nK M N)`` (x and g row slabs) ``+ e M N`` (with ``bias``: the first column of K
    tiles re-reads its g tiles for db, in 16-row pieces) plus the outputs: ``e(D^2 + D)`` when
    ``S = 1``, else ``4 S (D^2 + D)`` (the fp32 partial tiles, and the db partials of the first
    column). FLOPs of one program ``2 BK BN rows`` with ``rows = tiles_per_split BM``."""
    bk, bn, bm = kw["BLOCK_K"], kw["BLOCK_N"], kw["BLOCK_M"]
    rows = tiles_per_split * bm
    nk, nn = _cd(D, bk), _cd(D, bn)
    db = bias
    out = (4 * splits if splits > 1 else e) * (D * D + (D if db else 0))
    reads = e * (nn * M * D + nk * M * D + (M * D if db else 0))
    return KernelV2("dw", waves, 2 * bk * bn * rows, 2 * M * D * D, e * 2 * M * D + out, reads + out)


def v2_reduce(D: int, e: int, programs: int, waves: int, splits: int) -> KernelV2:
    """The split-dW reduce: reads the ``S`` fp32 slabs once, writes dW and db: unique bytes =
    request bytes = ``4 S (D^2 + D) + e (D^2 + D)``; no FLOPs counted. ``programs == 0``: no launch."""
    b = (4 * splits + e) * (D * D + D) if programs else 0
    return KernelV2("dw_reduce", waves, 0, 0, b, b)


def stack_bwd_l2_bytes_per_row(D: int, block_m: int) -> float:
    """MODEL: the narrow stack backward's fp32 partial read-modify-write through L2, bytes per row per
    layer: ``8 D^2 / BLOCK_M`` (each BLOCK_M row tile reads and writes a ``D x D`` fp32 partial)."""
    return 8 * D * D / block_m


# ---------------------------------------------------------------------------------------------
# MODEL v2 of the peers (eager PyTorch, torch.compile): their kernels at full fill


#: The output tile the peers' GEMMs are charged their L2 re-reads at (cuBLAS's and Inductor's own tiles
#: are not known here): 128 x 128, the largest output tile of the shipped fused configs.
PEER_TILE = 128


def v2_full_fill(k, gpu: GpuV2, M: int | None = None, D: int | None = None, e: int | None = None) -> KernelV2:
    """A peer's kernel (``Kernel``: a cuBLAS GEMM, an Inductor Triton template or pointwise kernel, an
    eager aten op) in MODEL v2 **at full fill**: cuBLAS picks its own split-K (and Inductor's templates
    their own tiles), so no wave term is charged: compute = FLOPs / peak (``cdiv(FLOPs, SMs)`` per SM,
    one wave), HBM = its bytes. L2 = its bytes plus, for a GEMM of the block (``FLOPs > 0``, with ``M``,
    ``D``, ``e`` given), the operand re-reads of a :data:`PEER_TILE` square output tile, the same
    accounting as the fused kernels' request bytes: ``e((cdiv(D, T) - 1) MD + (cdiv(M, T) - 1) D^2)`` for
    an ``[M, D]`` output (addmm, ``g @ W``), ``e (cdiv(D, T) - 1) 2MD`` for the ``[D, D]`` weight
    gradient (written bytes ``<= e(D^2 + D)``). Plus the launch latency, as every fused launch."""
    l2 = k.bytes
    if k.flops and M is not None and D is not None and e is not None:
        t = PEER_TILE
        if k.written <= e * (D * D + D):
            l2 += e * (_cd(D, t) - 1) * 2 * M * D
        else:
            l2 += e * ((_cd(D, t) - 1) * M * D + (_cd(M, t) - 1) * D * D)
    return KernelV2(k.name, 1, _cd(k.flops, gpu.sms), k.flops, k.bytes, l2)


def peer_v2_us(ks, gpu: GpuV2, dtype: str, M: int | None = None, D: int | None = None) -> float:
    """MODEL v2 time, us, of a peer's kernel sequence (each at full fill, :func:`v2_full_fill`; with
    ``M`` and ``D``, its GEMMs' L2 re-reads at :data:`PEER_TILE`), summed."""
    e = ELEMENT_SIZE[dtype]
    return sum(time_us(v2_full_fill(k, gpu, M, D, e), gpu, dtype) for k in ks)


def v2_dtype(project_dtype: str) -> str:
    """The dtype v2 is evaluated in for a projection dtype: ``tf32`` -> ``fp32`` operands (v2 always
    takes the tensor-core peak: bf16/fp16, or tf32 for fp32 operands; IEEE fp32 is not modelled)."""
    return "fp32" if project_dtype == "tf32" else project_dtype
