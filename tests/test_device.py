"""Every fixed-config launch fits the device it runs on (issue 20, item 2), and a GPU older than
the kernels support is refused with a clear error (item 4).

Tested with recorded device properties (``fusedres.kernels.device.RECORDED``: A100, H100, RTX
3090, RTX 4090, L4, RTX 5090, B200; V100 and T4 for the refusal). Shared memory here is the
launchers' own estimate (``pipeline_smem_bytes``); the compile gate checks the compiled figure of
every config shipped for each arch under that arch's limit (tests/test_aot.py).
"""
from __future__ import annotations

import types

import pytest
import torch

from fusedres import aot
from fusedres.kernels import configs, device, plan
from fusedres.kernels import residual_bwd

SUPPORTED = [name for name, d in device.RECORDED.items() if d.supported]
SMALL = [name for name in SUPPORTED if device.RECORDED[name].shared_per_block < 166912]
#: (GEMM element size, (A, B) operand sizes as loaded) of 16-bit, fp32 and autocast launches, per kernel
OPERANDS = {"16bit": (2, None), "fp32": (4, None), "autocast": (2, "fp32")}


def _operand_sizes(kind, mix):
    if mix is None:
        return None
    return {"fwd": (4, 2), "dx": (4, 2), "dw": (4, 4)}[kind]


def test_recorded_parts_and_the_oldest_supported():
    assert {"a100", "h100", "rtx4090", "l4", "rtx5090"} <= set(SUPPORTED)
    assert {d.arch for d in map(device.RECORDED.get, SMALL)} == {"sm_86", "sm_89", "sm_120"}
    assert device.OLDEST_SUPPORTED.capability == device.MIN_CAPABILITY == (8, 0)
    assert not device.RECORDED["v100"].supported and not device.RECORDED["t4"].supported
    for d in device.RECORDED.values():
        assert d.shared_per_block == device.SHARED_PER_BLOCK.get(d.capability, d.shared_per_block)


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("kind", ["fwd", "dx", "dw"])
def test_every_shipped_config_fits_the_device(name, kind):
    limits = device.RECORDED[name]
    budget = configs.smem_budget(limits)
    assert budget <= limits.shared_per_block - configs.SMEM_HEADROOM
    for mix, (elem, act) in OPERANDS.items():
        sizes = _operand_sizes(kind, act)
        for two_level in (False, True):
            for proj in (False, True):
                for row_scale in (False, True):
                    shipped = configs.shipped_configs(kind, elem, two_level, sizes, proj, row_scale, limits)
                    assert shipped, (mix, two_level, proj, row_scale)
                    for c in shipped:
                        smem = configs.pipeline_smem_bytes(kind, c, elem, sizes)
                        assert smem <= budget and c.num_warps * 32 <= limits.max_threads_per_block, \
                            (name, kind, mix, aot.config_name(kind, c), smem, budget)


def test_the_99kb_parts_lose_only_what_does_not_fit():
    """The same lists, filtered: an A100 and an H100 keep today's (the 160 KB budget), a 99 KB part
    keeps every tile whose pipeline fits in 96 KB and that its arch's compiler does not spill
    (``configs.dropped_tiles(..., arch=...)``, from the compile gate), largest first."""
    for kind in ("fwd", "dx", "dw"):
        for elem in (2, 4):
            full = configs.shipped_configs(kind, elem)
            for name in ("a100", "h100"):       # (less the tiles this release spills on that arch only)
                spills = configs.dropped_tiles(kind, elem, arch=device.RECORDED[name].arch)
                assert configs.shipped_configs(kind, elem, limits=device.RECORDED[name]) == \
                    [c for c in full if configs._tile(kind, c) not in spills]
            for name in SMALL:
                limits = device.RECORDED[name]
                arch = configs.gate_arch(limits.capability)
                spills = configs.dropped_tiles(kind, elem, arch=arch)
                # (tiles a release adds on an arch whose compiler spills every listed one)
                added = configs._ADDED_ON_ARCH.get(configs.TRITON_VERSION, {}).get(arch, {}).get(kind, {}).get(
                    (elem, False), [])
                small = {configs._tile(kind, c) for c in configs.shipped_configs(kind, elem, limits=limits)}
                assert small == {configs._tile(kind, c) for c in configs.CONFIGS[kind]
                                 if (c in full or configs._tile(kind, c) in added)
                                 and configs.pipeline_smem_bytes(kind, c, elem) <= 96 * 1024
                                 and configs._tile(kind, c) not in spills}, (name, kind, elem)
    names = [aot.config_name("fwd", c) for c in configs.shipped_configs("fwd", 2, limits=device.RECORDED["l4"])]
    assert names[0] == "128x128x64 w8 s3" and "128x128x64 w8 s4" not in names


def _dw_launch(dtype, M, D):
    args, consts = aot.example_launch("dw", dtype, M=M, D=D)
    tuned = residual_bwd.residual_dw_kernel_tuned
    return {**dict(zip(tuned.arg_names, args)), **consts}, consts


@pytest.mark.parametrize("name", SUPPORTED)
def test_split_dw_under_autocast_fits(name, monkeypatch):
    """The crash of issue 20: bf16 autocast training at M = 8192, D = 512 splits dW on a 128-SM part,
    and the plan picked by fill alone 128x128x64 w8 s3, whose pipeline of fp32 x and g tiles needs
    more than an RTX 4090's 101,376 B. Now the candidates are the device's."""
    limits = device.RECORDED[name]
    monkeypatch.setattr(residual_bwd, "_split_choice", {})
    named, consts = _dw_launch("autocast-bf16", 8192, 512)
    with device.simulated_device(limits):
        config = residual_bwd._gpu_split_config(limits.sms, 8192, 512, 512, named, consts)
        pinned = configs.pinned_config("dw", named)
    for c in filter(None, (config, pinned)):
        smem = configs.pipeline_smem_bytes("dw", c, 2, (4, 4))
        assert smem <= configs.smem_budget(limits) <= limits.shared_per_block, (name, aot.config_name("dw", c))
    if name == "rtx4090":
        assert config is not None and plan.plan_dw(limits.sms, 8192, 512, 512, config).splits > 1
        # what the plan chose without the device's limits: over the 4090's shared memory
        old, _ = plan.choose_dw(limits.sms, 8192, 512, 512,
                                configs.shipped_configs("dw", 2, operand_sizes=(4, 4)))
        assert aot.config_name("dw", old) == "128x128x64 w8 s3"
        assert configs.pipeline_smem_bytes("dw", old, 2, (4, 4)) > limits.shared_per_block


def test_the_plan_counts_the_simulated_devices_sms():
    assert plan.sm_count("cpu") == plan.INTERPRETER_SMS
    with device.simulated_device(device.RECORDED["l4"]):
        assert plan.sm_count("cpu") == 58


@pytest.mark.parametrize("name", SUPPORTED)
def test_stack_configs_fit_the_device(name):
    """The narrow stack's fixed configs: the forward's pipeline holds (stages - 1) [D, D] weight
    tiles and one [BLOCK_M, D] activation tile (the compiled figure on the mma.sync archs; the
    gate checks both kernels' real figures per arch). At D = 128 in fp32 the sm_80 entry needs
    147,456 B: the 99 KB parts take 2 stages."""
    limits = device.RECORDED[name]
    for operands, (w, a) in {"16bit": (2, 2), "tf32": (4, 4), "ieee": (4, 4), "autocast": (2, 4)}.items():
        for D in (16, 32, 64, 128):
            c = configs.stack_config("stack_fwd", D, operands, limits=limits)
            smem = (max(c.num_stages - 1, 1)) * D * D * w + c.kwargs["BLOCK_M"] * D * max(a, w)
            if configs.stack_table_arch(limits.capability) == "sm_80":
                assert smem <= limits.shared_per_block, (name, operands, D, c)
            assert c.num_warps * 32 <= limits.max_threads_per_block
            b = configs.stack_config("stack_bwd", D, operands, limits=limits)
            assert b.num_warps * 32 <= limits.max_threads_per_block
    if name in SMALL:       # (sm_120's ieee entry is also narrower: ptxas 13.1 spills 32 rows)
        c = configs.stack_config("stack_fwd", 128, "ieee", limits=limits)
        assert c.num_stages == 2 and c.kwargs["BLOCK_M"] == (16 if limits.capability[0] == 12 else 32)
    # Blackwell's consumer parts (12.x) are mma.sync parts: the sm_80 tables, not Hopper's
    assert configs.stack_table_arch((12, 0)) == configs.stack_table_arch((8, 9)) == "sm_80"
    assert configs.stack_table_arch((10, 0)) == configs.stack_table_arch((9, 0)) == "sm_90"


def _props(d: device.DeviceLimits):
    return types.SimpleNamespace(name=d.name, major=d.capability[0], minor=d.capability[1],
                                 shared_memory_per_block_optin=d.shared_per_block, multi_processor_count=d.sms,
                                 regs_per_multiprocessor=65536)


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda.get_device_properties`` answering with a recorded part's properties."""
    current = {}

    def use(name):
        current["props"] = _props(device.RECORDED[name])
        monkeypatch.setattr(device, "_by_index", {})

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: current["props"])
    return use


@pytest.mark.parametrize("name", SUPPORTED)
def test_limits_are_read_from_the_device_properties(name, fake_cuda):
    fake_cuda(name)
    assert device.cuda_limits(0) == device.RECORDED[name]
    assert device.limits_for(torch.device("cuda", 0)) == device.RECORDED[name]
    assert device.limits_for(torch.device("cpu")) is None


@pytest.mark.parametrize("name", ["v100", "t4"])
def test_an_older_gpu_is_refused_with_a_clear_error(name, fake_cuda):
    """The first launch on a device enters ``device_guard``: there, not in a Triton traceback."""
    fake_cuda(name)
    with pytest.raises(device.UnsupportedDeviceError, match=r"compute capability 7\.\d.*need 8\.0 or newer"):
        configs.device_guard(torch.device("cuda", 0))
    with pytest.raises(device.UnsupportedDeviceError, match="eager"):
        device.limits_for(torch.device("cuda", 0))
