"""The support matrix as data: what setup.py, constraints.txt and the per-release config lists say.

The matrix itself runs in CI (.ci/run: the whole suite on the primary pair, .ci/matrix: the gate,
parity and fuzz on each other supported triton); these tests keep the declarations consistent.
"""
import re
from pathlib import Path

import pytest
import triton
from packaging.specifiers import SpecifierSet

from fusedres import traffic
from fusedres.kernels import configs

ROOT = Path(__file__).resolve().parents[1]
#: torch release -> the triton its Linux CUDA wheel pins (read from PyPI's metadata: 2.14.1 and
#: 2.15.0 pin ~=3.8.0 and ~=3.9.0, whose first releases are listed)
TORCH_PINS = {"2.11.0": "3.6.0", "2.12.0": "3.7.0", "2.13.0": "3.7.1", "2.14.1": "3.8.0", "2.15.0": "3.9.0"}


def _range(package: str) -> SpecifierSet:
    text = (ROOT / "setup.py").read_text()
    return SpecifierSet(re.search(rf'"{package}([^"]*)"', text).group(1))


def _triton_range() -> SpecifierSet:
    return _range("triton")


def _pins() -> dict:
    return dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))


def test_setup_ranges_keep_the_last_five_torch_releases_and_their_tritons():
    """pip keeps the torch and triton a machine already has, for each of torch 2.11 to 2.15."""
    spec, torch_spec = _triton_range(), _range("torch")
    for torch_version, pinned in TORCH_PINS.items():
        assert torch_version in torch_spec, f"torch {torch_version} outside setup.py's {torch_spec}"
        assert pinned in spec, f"torch {torch_version} pins triton {pinned}, outside setup.py's {spec}"
    for v in configs.SUPPORTED_TRITON:
        assert f"{v[0]}.{v[1]}.0" in spec
    assert "3.5.0" not in spec and "3.10.0" not in spec
    assert "2.10.0" not in torch_spec and "2.16.0" not in torch_spec
    assert {tuple(map(int, v.split(".")[:2])) for v in TORCH_PINS.values()} == set(configs.SUPPORTED_TRITON)


def test_constraints_pin_the_pair_the_cuda_wheel_asks_for():
    pins = _pins()
    assert TORCH_PINS[pins["torch"]] == pins["triton"], pins
    assert pins["triton"] in _triton_range()


def test_installed_triton_is_supported():
    assert configs.TRITON_VERSION in configs.SUPPORTED_TRITON, triton.__version__
    assert traffic.supported() == (True, "")


@pytest.mark.parametrize("version", configs.SUPPORTED_TRITON, ids=lambda v: "%d.%d" % v)
def test_each_release_ships_a_list_without_its_dropped_tiles(monkeypatch, version):
    monkeypatch.setattr(configs, "TRITON_VERSION", version)
    for kind in ("fwd", "dx", "dw"):
        for size in (2, 4, 8):
            for two_level in (False, True):
                shipped = [configs._tile(kind, c) for c in configs.shipped_configs(kind, size, two_level)]
                assert shipped, (kind, size, two_level)
                dropped = configs.dropped_tiles(kind, size, version, two_level)
                assert not dropped & set(shipped), (kind, size, dropped)


def test_release_overrides_reach_the_launch_config():
    """A release's stack entries replace the 3.9 ones for that arch only."""
    c = configs.stack_config("stack_fwd", 64, "ieee", (9, 0), version=(3, 7))
    assert (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) == (64, 8, 3)
    c = configs.stack_config("stack_fwd", 64, "ieee", (9, 0), version=(3, 9))
    assert (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) == configs.STACK_FWD_TILES["ieee"][64]
    assert configs.stack_config("stack_reduce", 64, capability=(8, 0), version=(3, 7)).num_warps == 8
    assert configs.stack_config("stack_reduce", 64, capability=(9, 0), version=(3, 7)).num_warps == \
        configs.STACK_REDUCE_WARPS
    assert configs.dropped_tiles("dw", 4, (3, 9)) == set()
    assert (64, 64, 16, 4, 4) in configs.dropped_tiles("dw", 4, (3, 7))


def test_every_supported_release_ships_the_stack():
    """triton 3.6 ships the stack with its own entries (STACK_BY_TRITON[(3, 6)], compile gate):
    they reach the launch config there, and only there."""
    assert all(configs.stack_supported(v) for v in configs.SUPPORTED_TRITON)
    assert configs.STACK_MIN_TRITON == min(configs.SUPPORTED_TRITON)
    c = configs.stack_config("stack_fwd", 128, "16bit", (9, 0), version=(3, 6))
    assert (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) == (64, 8, 3)
    c = configs.stack_config("stack_fwd", 128, "16bit", (9, 0), version=(3, 7))
    assert (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) == configs.STACK_FWD_TILES["16bit"][128]
    # a release's "autocast" entry at the table arch wins over STACK_AUTOCAST; 16-bit is untouched
    bwd = configs.stack_config("stack_bwd", 128, "autocast", (9, 0), version=(3, 6))
    assert (bwd.kwargs["BLOCK_M"], bwd.kwargs["DW_COLS"]) == (64, 16)
    bwd = configs.stack_config("stack_bwd", 128, "autocast", (9, 0), version=(3, 7))
    assert (bwd.kwargs["BLOCK_M"], bwd.kwargs["DW_COLS"]) == configs.STACK_AUTOCAST[("stack_bwd", "sm_90")][128][::3]
    bwd = configs.stack_config("stack_bwd", 128, "16bit", (9, 0), version=(3, 6))
    assert (bwd.kwargs["BLOCK_M"], bwd.kwargs["DW_COLS"]) == configs.STACK_BWD_TILES["16bit"][128][::3]
    # the sm_80 key reaches every mma.sync part unless the part's own key restates it (sm_120)
    assert configs.stack_config("stack_bwd", 16, "16bit", (8, 0), version=(3, 6)).num_stages == 3
    assert configs.stack_config("stack_bwd", 16, "16bit", (12, 0), version=(3, 6)).num_stages == 2


def test_the_stack_is_refused_on_a_gpu_with_an_older_triton(monkeypatch):
    """A triton older than STACK_MIN_TRITON (none supported now) has no gated stack entries: on a
    GPU its launches raise a clear error instead; the interpreter, which has no such compiler,
    still runs it. The gate skips the stack there."""
    import torch

    from fusedres import aot
    from fusedres.kernels import residual_stack
    assert configs.stack_supported((3, 6)) and not configs.stack_supported((3, 5))
    monkeypatch.setattr(configs, "TRITON_VERSION", (3, 5))
    assert not [j for j in aot.gate_jobs(kinds=aot.STACK_KINDS, cover=True)]
    monkeypatch.setattr(residual_stack, "INTERPRET", False)
    with pytest.raises(RuntimeError, match=r"narrow stack \(FusedResidualStack\) needs triton >= 3\.6"):
        residual_stack._launch(None, "residual_stack_fwd", (1,), (torch.empty(1),), {},
                               configs.stack_config("stack_fwd", 16))


@pytest.mark.parametrize("version", configs.SUPPORTED_TRITON, ids=lambda v: "%d.%d" % v)
def test_each_release_ships_something_for_every_arch_and_variant(monkeypatch, version):
    """The per-release, per-arch and per-variant drops never leave a launch without a listed tile
    (the fallback, the smallest tile of any list, is not what the gate compiled)."""
    from fusedres.kernels import device
    monkeypatch.setattr(configs, "TRITON_VERSION", version)
    for limits in [None] + [d for d in device.RECORDED.values() if d.supported]:
        for kind in ("fwd", "dx", "dw"):
            for size, mixed in ((2, False), (4, False), (2, True)):
                sizes = {"fwd": (4, 2), "dx": (4, 2), "dw": (4, 4)}[kind] if mixed else None
                for proj in (False, True):
                    for row_scale in (False, True):
                        shipped = configs.shipped_configs(kind, size, False, sizes, proj, row_scale, limits)
                        tiles = [configs._tile(kind, c) for c in shipped]
                        listed = set(configs._TILES[size]) | {t for ts in configs._ROW_SCALE_TILES.values()
                                                              for t in ts} | {
                            t for by in configs._PROJ_TILES_BY_TRITON.values() for ts in by.values() for t in ts} | {
                            t for rel in configs._ADDED_ON_ARCH.values() for a in rel.values() for k in a.values()
                            for ts in k.values() for t in ts}
                        assert tiles and set(tiles) <= listed, (version, limits, kind, size, mixed, proj, row_scale)
