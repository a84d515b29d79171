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
#: torch release -> the triton its Linux CUDA wheel pins (read from PyPI's metadata)
TORCH_PINS = {"2.12.0": "3.7.0", "2.13.0": "3.7.1", "2.14.1": "3.8.0"}


def _triton_range() -> SpecifierSet:
    text = (ROOT / "setup.py").read_text()
    return SpecifierSet(re.search(r'"triton([^"]*)"', text).group(1))


def _pins() -> dict:
    return dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))


def test_setup_range_keeps_the_triton_each_supported_torch_pins():
    spec = _triton_range()
    for torch_version, pinned in TORCH_PINS.items():
        major, minor = map(int, torch_version.split(".")[:2])
        if (major, minor) >= (2, 13):
            assert pinned in spec, f"torch {torch_version} pins triton {pinned}, outside setup.py's {spec}"
    for v in configs.SUPPORTED_TRITON:
        assert f"{v[0]}.{v[1]}.0" in spec or f"{v[0]}.{v[1]}.1" in spec
    assert "3.6.0" not in spec and "3.10.0" not in spec


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
