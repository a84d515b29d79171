"""What a GPU lets one kernel launch have: shared memory per block, threads, registers, and the
oldest GPU the kernels support.

Triton compiles a config whatever it asks for and refuses it only when the kernel is loaded
(``OutOfResources``). The autotuner survives that (it scores the config as infinitely slow), but
every launch that takes a fixed config (the split-M dW, its reduce, the narrow stack, pinned
configs) would crash. So each config list is filtered by the launching device's limits before
anything is chosen from it, and the compile gate (``python -m fusedres.aot``) compiles each arch's
list under that arch's own limit.

Where there is no GPU (the interpreter) nothing limits a launch: the lists are the sm_80/sm_90
ones, as the compile gate checks them. :func:`simulated_device` makes every choice in its block be
made for a recorded device instead, so that the choices for an RTX 4090 can be tested (and
gated) on a CPU.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

#: The oldest compute capability the kernels support: bf16 and tf32 tensor-core MMAs (``mma.sync``
#: for bf16/tf32 needs sm_80), asynchronous copies for the pipelined K loops, and the oldest arch
#: the compile gate compiles. Turing (7.5) and Volta (7.0) are refused with a clear error.
MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DeviceLimits:
    """One GPU's per-launch limits, as ``torch.cuda.get_device_properties`` reports them."""
    name: str
    capability: tuple[int, int]
    #: opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes
    shared_per_block: int
    sms: int
    registers_per_block: int = 65536
    max_threads_per_block: int = 1024

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def supported(self) -> bool:
        return self.capability >= MIN_CAPABILITY


#: Opt-in shared memory per block by compute capability (CUDA C++ Programming Guide, "Technical
#: Specifications per Compute Capability"): 163 KB on 8.0 and 8.7, 99 KB on 8.6, 8.9 and 12.x,
#: 227 KB on 9.0 and 10.0.
SHARED_PER_BLOCK = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
                    (10, 0): 232448, (12, 0): 101376}

#: Recorded properties (``torch.cuda.get_device_properties``: name, major.minor,
#: ``shared_memory_per_block_optin``, ``multi_processor_count``) of the parts the tests and the
#: bench reason about. The oldest supported part is the A100 (8.0); V100 and T4 are recorded to
#: test the refusal.
RECORDED = {
    "a100": DeviceLimits("NVIDIA A100-SXM4-80GB", (8, 0), 166912, 108),
    "h100": DeviceLimits("NVIDIA H100 80GB HBM3", (9, 0), 232448, 132),
    "rtx3090": DeviceLimits("NVIDIA GeForce RTX 3090", (8, 6), 101376, 82),
    "rtx4090": DeviceLimits("NVIDIA GeForce RTX 4090", (8, 9), 101376, 128),
    "l4": DeviceLimits("NVIDIA L4", (8, 9), 101376, 58),
    "rtx5090": DeviceLimits("NVIDIA GeForce RTX 5090", (12, 0), 101376, 170),
    "b200": DeviceLimits("NVIDIA B200", (10, 0), 232448, 148),
    "v100": DeviceLimits("Tesla V100-SXM2-16GB", (7, 0), 98304, 80),
    "t4": DeviceLimits("Tesla T4", (7, 5), 65536, 40),
}
#: The oldest part the package supports.
OLDEST_SUPPORTED = RECORDED["a100"]


def limits_of(props) -> DeviceLimits:
    """:class:`DeviceLimits` from a ``torch.cuda.get_device_properties`` object."""
    capability = (props.major, props.minor)
    shared = getattr(props, "shared_memory_per_block_optin", None) or SHARED_PER_BLOCK.get(capability, 101376)
    return DeviceLimits(props.name, capability, int(shared), int(props.multi_processor_count),
                        int(getattr(props, "regs_per_multiprocessor", 65536) or 65536))


class UnsupportedDeviceError(RuntimeError):
    """A CUDA device older than :data:`MIN_CAPABILITY`."""


_by_index: dict[int, DeviceLimits] = {}
_simulated = threading.local()


def cuda_limits(index: int) -> DeviceLimits:
    """The limits of CUDA device ``index`` (read once); raises :class:`UnsupportedDeviceError`
    for a device older than :data:`MIN_CAPABILITY`."""
    limits = _by_index.get(index)
    if limits is None:
        limits = limits_of(torch.cuda.get_device_properties(index))
        if not limits.supported:
            raise UnsupportedDeviceError(
                f"fusedres: {limits.name} (cuda:{index}) has compute capability "
                f"{limits.capability[0]}.{limits.capability[1]}; the fused kernels need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere: A100, RTX 30 series and later) for "
                "their bf16/tf32 tensor-core instructions. Use the eager blocks (ResidualBlock, or "
                "fusedres.set_backend('eager')) on this GPU.")
        _by_index[index] = limits
    return limits


def limits_for(device) -> DeviceLimits | None:
    """The limits a launch on ``device`` must fit: :func:`simulated_device`'s within its block,
    else the CUDA device's own (see :func:`cuda_limits`), else None (a CPU tensor: the
    interpreter, where nothing limits a launch)."""
    simulated = getattr(_simulated, "value", None)
    if simulated is not None:
        return simulated
    if device.type != "cuda":
        return None
    return cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def simulated_device(limits: DeviceLimits | None):
    """Within the block (this thread), every config choice is made for ``limits``, whatever
    device the tensors are on: the tests' recorded GPUs, and the compile gate's archs."""
    from . import configs
    saved = getattr(_simulated, "value", None)
    _simulated.value = limits
    configs.clear_prepared()
    try:
        yield
    finally:
        _simulated.value = saved
        configs.clear_prepared()
