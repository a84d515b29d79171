"""fp32 GEMMs follow torch's matmul precision whichever API set it (issue 20, item 1).

PyTorch has two switches: the legacy ``torch.set_float32_matmul_precision`` and the newer
``torch.backends.cuda.matmul.fp32_precision`` (falling back to the generic
``torch.backends.fp32_precision``). Once the newer one is used, the legacy getter raises ("mix of
the legacy and new APIs"): fusedres read it, so every call raised. These tests set each API, and
the two mixed, then run the single block (forward and backward), the MLP block and the stack, and
check the ``INPUT_PRECISION`` every launch received.
"""
from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres import FusedResidualMLPBlock, FusedResidualStack, fused_residual
from fusedres.kernels import configs

_NEW = getattr(torch._C, "_get_fp32_precision_getter", None) is not None
needs_new_api = pytest.mark.skipif(not _NEW, reason=f"torch {torch.__version__} has no fp32_precision switch")
#: the (backend, op) pairs of the newer switch a test may set
_PAIRS = (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("mkldnn", "all"), ("mkldnn", "matmul"))


@pytest.fixture
def precision_state():
    """Restore torch's precision state after a test: every newer switch back to "none", then the
    legacy setting the test found (which the legacy getter must then answer without raising)."""
    legacy = torch.get_float32_matmul_precision()
    yield
    if _NEW:
        for backend, op in _PAIRS:
            torch._C._set_fp32_precision_setter(backend, op, "none")
    if torch.get_float32_matmul_precision() != legacy:      # (the legacy setter sets the newer switch too)
        torch.set_float32_matmul_precision(legacy)
    assert torch.get_float32_matmul_precision() == legacy


def _legacy(value):
    return lambda: torch.set_float32_matmul_precision(value)


def _cuda_matmul(value):
    def set_():
        torch.backends.cuda.matmul.fp32_precision = value
    return set_


def _generic(value):
    def set_():
        torch.backends.fp32_precision = value
    return set_


#: name -> (the settings, applied in order; the precision an fp32 cuBLAS matmul would then use)
CASES = {
    "legacy-highest": ([_legacy("highest")], "ieee"),
    "legacy-high": ([_legacy("high")], "tf32"),
    "legacy-medium": ([_legacy("medium")], "tf32"),
    "cuda.matmul-tf32": ([_cuda_matmul("tf32")], "tf32"),
    "cuda.matmul-ieee": ([_cuda_matmul("ieee")], "ieee"),
    "generic-tf32": ([_generic("tf32")], "tf32"),
    "generic-ieee": ([_generic("ieee")], "ieee"),
    # mixed: the backend's own switch wins over the generic one, and over an earlier legacy call
    "generic-tf32+cuda.matmul-ieee": ([_generic("tf32"), _cuda_matmul("ieee")], "ieee"),
    "legacy-highest+cuda.matmul-tf32": ([_legacy("highest"), _cuda_matmul("tf32")], "tf32"),
    "legacy-high+generic-ieee": ([_legacy("high"), _generic("ieee")], "tf32"),
    "cuda.matmul-tf32+legacy-highest": ([_cuda_matmul("tf32"), _legacy("highest")], "ieee"),
    # "none" after a legacy 'high' inherits the generic switch ("none": IEEE), whatever the legacy getter says
    "legacy-high+cuda.matmul-none": ([_legacy("high"), _cuda_matmul("none")], "ieee"),
}
NEW_API = {name for name in CASES if "cuda.matmul" in name or "generic" in name}


@pytest.fixture
def launch_precisions(monkeypatch):
    """The ``INPUT_PRECISION`` of every kernel launch since the fixture was made, by kernel."""
    seen: list = []
    run = configs.run_kernel

    def recording(kernel, grid, args, kwargs):
        if "INPUT_PRECISION" in kwargs:
            seen.append(kwargs["INPUT_PRECISION"])
        return run(kernel, grid, args, kwargs)

    monkeypatch.setattr(configs, "run_kernel", recording)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_every_fp32_path_follows_the_precision_switch(case, precision_state, launch_precisions, device, launches):
    if case in NEW_API and not _NEW:
        pytest.skip(f"torch {torch.__version__} has no fp32_precision switch")
    settings, expected = CASES[case]
    for apply in settings:
        apply()
    assert configs.fp32_matmul_precision() == expected
    assert configs.gemm_flags(torch.float32)["INPUT_PRECISION"] == expected
    assert configs.gemm_flags(torch.bfloat16)["INPUT_PRECISION"] == "ieee"       # 16-bit GEMMs: moot
    assert configs.stack_operand_class(torch.float32) == expected

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 32, generator=gen).to(device).requires_grad_()
    w = (torch.randn(32, 32, generator=gen) / 8).to(device).requires_grad_()
    b = torch.randn(32, generator=gen).to(device).requires_grad_()
    fused_residual(x, w, b).sum().backward()
    mlp = FusedResidualMLPBlock(32, 64, device=device)
    mlp(x.detach()).sum().backward()
    stack = FusedResidualStack(32, 2, device=device)
    stack(x.detach()).sum().backward()
    assert launches()["residual_fwd"] >= 1 and launches()["residual_stack_fwd"] == 1
    assert launch_precisions and set(launch_precisions) == {expected}, launch_precisions


@needs_new_api
def test_a_changed_switch_replans(precision_state, launch_precisions, device):
    """The launch plans are keyed on the precision: the same signature launches with tf32 after
    the switch changes, and back."""
    x = torch.randn(16, 32, device=device)
    w = torch.randn(32, 32, device=device)
    for value in ("ieee", "tf32", "ieee"):
        torch.backends.cuda.matmul.fp32_precision = value
        launch_precisions.clear()
        fused_residual(x, w)
        assert launch_precisions == [value]


def test_setting_the_precision_keeps_the_programs_api(precision_state):
    """``fp32_matmul_precision_set`` (the gate, the GPU check) sets the legacy switch while the
    program's legacy getter answers, so it keeps answering afterwards; and the newer one where the
    program already uses it."""
    with configs.fp32_matmul_precision_set("tf32"):
        assert configs.fp32_matmul_precision() == "tf32"
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "highest"
    if not _NEW:
        return
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with configs.fp32_matmul_precision_set("ieee"):
        assert configs.fp32_matmul_precision() == "ieee"
    assert configs.fp32_matmul_precision() == "tf32"
    # a program that set both keeps both: the legacy 'high', then the newer switch's "ieee"
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    with configs.fp32_matmul_precision_set("tf32"):
        assert configs.fp32_matmul_precision() == "tf32"
    assert configs.fp32_matmul_precision() == "ieee" and torch.get_float32_matmul_precision() == "high"
    # a program on the generic switch keeps it: the newer backend switch inherits again afterwards
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    with configs.fp32_matmul_precision_set("ieee"):
        assert configs.fp32_matmul_precision() == "ieee"
    torch.backends.fp32_precision = "ieee"
    assert configs.fp32_matmul_precision() == "ieee"
    with pytest.raises(ValueError, match="'tf32' or 'ieee'"):
        with configs.fp32_matmul_precision_set("high"):
            pass


def test_the_package_never_reads_the_legacy_getter_directly():
    """One reader of the setting: nothing else in the package calls the getter that raises."""
    import pathlib
    root = pathlib.Path(fusedres.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "get_float32_matmul_precision" in p.read_text() and p.name != "configs.py"]
    assert offenders == []


@needs_new_api
@pytest.mark.parametrize("switch", ["cuda.matmul", "generic"])
def test_the_issue_20_crash_public_api_only(switch, precision_state, device, launches):
    """What crashed before: the newer switch set, then every public entry point called; each runs
    on the Triton kernels (launch counts) without raising."""
    if switch == "cuda.matmul":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.fp32_precision = "tf32"
    x = torch.randn(24, 32, device=device, requires_grad=True)
    block = fusedres.FusedResidualBlock(32, device=device)
    block(x).sum().backward()
    fused_residual(x, block.weight, block.bias).sum().backward()
    FusedResidualMLPBlock(32, 64, device=device)(x).sum().backward()
    FusedResidualStack(32, 2, device=device)(x).sum().backward()
    got = launches()
    assert got["residual_fwd"] >= 2 and got["residual_dw"] >= 2 and got["residual_stack_bwd"] == 1
