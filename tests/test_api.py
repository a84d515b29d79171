"""The public surface: bad input, dispatch, the validation mode, and the modules."""
import pytest
import torch
from torch import nn

import fusedres
from fusedres import FusedResidualBlock, ParityError, ResidualBlock, fused_residual, kernels
from helpers import check_parity, make_params, make_x


def _inputs(device, D=16):
    x = torch.randn(4, D, device=device)
    w, b = make_params(D, torch.float32, device)
    return x, w, b


BAD_INPUTS = {
    "wrong last dim": (lambda x, w, b: (x[:, :15], w, b), ValueError, "last dim 15"),
    "non-square weight": (lambda x, w, b: (x, w[:8], b), ValueError, "square"),
    "bias shape": (lambda x, w, b: (x, w, b[:8]), ValueError, "bias must have shape"),
    "dtype mismatch": (lambda x, w, b: (x.double(), w, b), TypeError, "dtypes differ"),
    "bias dtype mismatch": (lambda x, w, b: (x, w, b.half()), TypeError, "dtypes differ"),
    "device mismatch": (lambda x, w, b: (x, w.to("meta"), b), ValueError, "one device"),
    "integer x": (lambda x, w, b: (x.long(), w, b), TypeError, "floating-point"),
    "integer weight": (lambda x, w, b: (x, w.int(), b), TypeError, "floating-point"),
    "complex x": (lambda x, w, b: (x.to(torch.complex64), w, b), TypeError, "floating-point"),
    "0-dim x": (lambda x, w, b: (x[0, 0], w, b), ValueError, "0-dim"),
    "fp8 x": (lambda x, w, b: (x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), b), TypeError, "supported"),
    "not a tensor": (lambda x, w, b: (x.tolist(), w, b), TypeError, "torch.Tensor"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_before_any_launch(case, device, launches):
    make, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        fused_residual(*make(*_inputs(device)))
    assert launches() == {}


def test_set_backend(device, launches):
    x, w, b = _inputs(device)
    assert fusedres.set_backend("eager") is None
    assert fusedres.backend_for(device) == "eager" and fusedres.get_backend() == "eager"
    y = fused_residual(x, w, b)
    assert launches() == {}
    torch.testing.assert_close(y, fusedres.residual_reference(x, w, b), rtol=0, atol=0)
    assert fusedres.set_backend("triton") == "eager"
    fused_residual(x, w, b)
    assert launches() == {"residual_fwd": 1}
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedres.set_backend("cuda-please")
    assert fusedres.get_backend() == "triton"          # a bad value changes nothing
    fusedres.set_backend("auto")
    assert fusedres.get_backend() is None


def test_backend_env_is_read_at_import(device, launches, monkeypatch):
    """FUSEDRES_BACKEND and FUSEDRES_VALIDATE are read once, at import (fusedres.op.read_environment):
    setting them later changes nothing until they are read again; no call reads the environment."""
    from fusedres import op, validate
    x, w, b = _inputs(device)
    monkeypatch.setenv("FUSEDRES_BACKEND", "eager")
    monkeypatch.setenv("FUSEDRES_VALIDATE", "1")
    assert fusedres.backend_for(device) == "triton" and not validate.enabled()    # not read per call
    op.read_environment()                                                          # what import does
    assert fusedres.backend_for(device) == "eager" and validate.enabled()
    fused_residual(x, w, b)
    assert launches() == {}
    monkeypatch.setenv("FUSEDRES_BACKEND", "cuda-please")
    op.read_environment()
    with pytest.raises(ValueError, match="FUSEDRES_BACKEND"):
        fused_residual(x, w, b)


def test_default_dispatch_rule(monkeypatch):
    assert fusedres.backend_for("cpu") == ("triton" if kernels.INTERPRET else "eager")
    assert fusedres.backend_for("cuda") == "triton"
    monkeypatch.setattr(kernels, "INTERPRET", False)
    assert fusedres.backend_for("cpu") == "eager"
    fusedres.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fusedres.backend_for("cpu")


def test_validate_mode_passes_correct_kernels(device, monkeypatch, launches):
    fusedres.set_validate(True)
    x = make_x((30, 40), torch.bfloat16, device)
    w, b = make_params(40, torch.bfloat16, device)
    check_parity(x, w, b)
    assert launches() == {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}


def _corrupt(launcher, output_index):
    def wrong(*args, **kwargs):
        prepared = launcher(*args, **kwargs)
        args[output_index].view(-1)[3] += 1.0
        return prepared
    return wrong


@pytest.mark.parametrize("which, index, name", [("residual_fwd", 4, "y"), ("residual_dx", 5, "dx"),
                                                ("residual_dw", 4, "dweight")])
def test_validate_mode_catches_a_wrong_kernel(which, index, name, device, monkeypatch):
    monkeypatch.setattr(kernels, which, _corrupt(getattr(kernels, which), index))
    x = make_x((30, 40), torch.float32, device).requires_grad_()
    w, b = make_params(40, torch.float32, device)
    w.requires_grad_()
    fused_residual(x, w, b).sum().backward()  # off by default: the corruption passes silently
    fusedres.set_validate(True)
    with pytest.raises(ParityError, match=rf"residual_\w+ broke the parity rule for {name}: .*\[30, 40\].*float32"):
        fused_residual(x, w, b).sum().backward()


def test_block_initialises_like_nn_linear():
    for bias in (True, False):
        torch.manual_seed(0)
        lin = nn.Linear(24, 24, bias=bias)
        torch.manual_seed(0)
        fused = FusedResidualBlock(24, bias=bias)
        torch.manual_seed(0)
        eager = ResidualBlock(24, bias=bias)
        # nn.Linear's parameters, then the residual scale (a buffer, 1 by default)
        assert list(fused.state_dict()) == list(eager.state_dict()) == [*lin.state_dict(), "alpha"]
        for k, v in lin.state_dict().items():
            assert torch.equal(fused.state_dict()[k], v) and torch.equal(eager.state_dict()[k], v)
        assert fused.alpha.item() == eager.alpha.item() == 1.0


def test_state_dict_moves_both_ways(device):
    fused = FusedResidualBlock(32, device=device)
    eager = ResidualBlock(32, device=device)
    eager.load_state_dict(fused.state_dict())
    x = make_x((10, 32), torch.float32, device)
    check_parity(x, fused.weight.detach(), fused.bias.detach())
    torch.testing.assert_close(fused(x), eager(x))
    fused2 = FusedResidualBlock(32, device=device)
    fused2.load_state_dict(eager.state_dict())
    assert torch.equal(fused2.weight, fused.weight)
    with pytest.raises(RuntimeError):
        FusedResidualBlock(32, bias=False).load_state_dict(eager.state_dict())


@pytest.mark.parametrize("cls", [FusedResidualBlock, ResidualBlock])
@pytest.mark.parametrize("learnable", [False, True])
def test_state_dict_without_alpha_keeps_the_modules_alpha(cls, learnable):
    """A {weight, bias} checkpoint (an nn.Linear's) loads, strict, and keeps the module's own alpha,
    as BatchNorm keeps num_batches_tracked; any other missing or unexpected key still fails."""
    lin = nn.Linear(40, 40)
    block = cls(40, alpha=0.25, learnable_alpha=learnable)
    alpha_before = block.alpha
    result = block.load_state_dict(lin.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(block.weight, lin.weight) and torch.equal(block.bias, lin.bias)
    assert block.alpha is alpha_before and block.alpha.item() == 0.25
    assert isinstance(block.alpha, nn.Parameter) == learnable
    sd = lin.state_dict()
    assert list(sd) == ["weight", "bias"]                  # the caller's dict is left as it was
    # a checkpoint with alpha still sets it
    block.load_state_dict({**sd, "alpha": torch.tensor(3.0)})
    assert block.alpha.item() == 3.0
    # strict still catches every other missing or unexpected key
    with pytest.raises(RuntimeError, match='Missing key.*"bias"'):
        cls(40).load_state_dict({"weight": lin.weight.detach()})
    with pytest.raises(RuntimeError, match='Unexpected key.*"extra"'):
        cls(40).load_state_dict({**sd, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match='Missing key.*"proj_weight"'):
        cls(40, 24).load_state_dict(nn.Linear(40, 24).state_dict())
    # strict=False reports only what is really missing
    result = cls(40).load_state_dict({"weight": lin.weight.detach()}, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == []
    # on the meta device, assign=True materialises the constructor's alpha
    meta = cls(40, alpha=0.5, learnable_alpha=learnable, device="meta")
    meta.load_state_dict(sd, assign=True)
    assert meta.alpha.device.type == "cpu" and meta.alpha.item() == 0.5
    assert isinstance(meta.alpha, nn.Parameter) == learnable


@pytest.mark.parametrize("fused", [True, False])
def test_mlp_state_dict_without_alpha_keys(fused):
    src = fusedres.ResidualMLP(8, 16, 3, 4, fused=fused)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith(".alpha")}
    dst = fusedres.ResidualMLP(8, 16, 3, 4, fused=fused, alpha=0.5)
    assert dst.load_state_dict(sd).missing_keys == []
    assert all(b.alpha.item() == 0.5 for b in dst.blocks)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())
    del sd["blocks.1.weight"]
    with pytest.raises(RuntimeError, match='Missing key.*"blocks.1.weight"'):
        dst.load_state_dict(sd)


def test_block_dtype_device_and_repr(device, launches):
    block = FusedResidualBlock(16, bias=False, device=device, dtype=torch.float16)
    assert block.weight.dtype == torch.float16 and block.bias is None
    assert "dim=16, bias=False, alpha=1" in repr(block)
    y = block(torch.randn(2, 3, 16, device=device, dtype=torch.float16))
    assert y.shape == (2, 3, 16) and y.dtype == torch.float16
    assert launches() == {"residual_fwd": 1}
    with pytest.raises(ValueError, match="dim"):
        FusedResidualBlock(0)


def test_public_api():
    assert set(fusedres.__all__) <= set(dir(fusedres))
    assert fusedres.__version__


def error_table_rows(device="cpu"):
    """The error table of docs/correctness.md, row by row, from the real errors of BAD_INPUTS."""
    rows = []
    for case, (make, error, _) in BAD_INPUTS.items():
        try:
            fused_residual(*make(*_inputs(device)))
        except error as e:
            rows.append(f"| {case} | `{error.__name__}` | {str(e).replace('|', '/')} |")
    return rows


def test_docs_error_table_is_current():
    """Each bad input's row in the error table of docs/correctness.md is exactly what the library
    raises."""
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "correctness.md").read_text()
    missing = [row for row in error_table_rows() if row not in page]
    assert not missing, ("docs/correctness.md's error table is stale; the current rows are:\n"
                         + "\n".join(error_table_rows()))


def test_a_strided_bias_is_read_as_its_values(device, launches):
    """The kernels read ``bias[n]`` at ``n``: a bias that is a strided view (``b[::2]``) is made
    contiguous first, forward and backward (its gradient, and dalpha's ``<g.sum(0), b>``)."""
    from fusedres.validate import parity
    torch.manual_seed(0)
    x = torch.randn(6, 5, 16, device=device, requires_grad=True)
    w = (torch.randn(16, 16, device=device) * 0.25).requires_grad_()
    storage = torch.randn(32, device=device, requires_grad=True)
    alpha = torch.tensor(0.7, device=device, requires_grad=True)
    outs = {}
    for impl, fn in (("fused", fused_residual), ("eager", fusedres.residual_reference)):
        for dtype in ((torch.float32, torch.float64) if impl == "eager" else (torch.float32,)):
            args = [t.detach().to(dtype).requires_grad_() for t in (x, w, storage, alpha)]
            y = fn(args[0], args[1], args[2][::2], alpha=args[3])
            outs[impl, dtype] = (y, *torch.autograd.grad(y, args, torch.ones_like(y)))
    assert launches()["residual_fwd"] == 1 and launches()["residual_dw"] == 1
    for f, e, r in zip(outs["fused", torch.float32], outs["eager", torch.float32], outs["eager", torch.float64]):
        assert parity(f, e, r).ok
