"""Residual scale (alpha, ReZero) and the projection shortcut: parity, gradcheck, modules."""
import pytest
import torch

from fusedres import FusedResidualBlock, ResidualBlock, fused_residual, kernels, residual_reference
from helpers import check_parity, make_params, make_x, small_tiles

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(x, w, b, alpha, p):
    return check_parity(x, w, b, alpha=alpha, proj=p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.0, -0.7, 0.25])
def test_alpha_parity(alpha, dtype, device, launches):
    x = make_x((3, 21, 40), dtype, device)
    w, b = make_params(40, dtype, device)
    fused = check(x, w, b, torch.tensor(alpha, dtype=dtype, device=device), None)
    assert launches() == {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}
    if alpha == 0.0:  # ReZero's start: the block is the identity, yet alpha gets a gradient
        assert torch.equal(fused[0], x) and fused[4] != 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out", [24, 70])
def test_projection_parity(out, dtype, device, launches):
    x = make_x((2, 13, 48), dtype, device)
    gen = torch.Generator().manual_seed(5)
    w = (torch.rand(out, 48, generator=gen) - 0.5).div(48 ** 0.5).to(device, dtype)
    p = (torch.rand(out, 48, generator=gen) - 0.5).div(48 ** 0.5).to(device, dtype)
    b = torch.randn(out, generator=gen).div(10).to(device, dtype)
    alpha = torch.tensor(0.5, dtype=dtype, device=device)
    y = check(x, w, b, alpha, p)[0]
    assert y.shape == (2, 13, out)
    assert launches() == {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}


def test_projection_small_tiles(device):
    """Several K tiles in both halves of the projection's concatenated reduction (explicit 16-wide
    tiles on a GPU as in the interpreter)."""
    x = make_x((37, 50), torch.float32, device)
    w, b = make_params(50, torch.float32, device)
    p = torch.randn(33, 50, device=device) / 7
    with small_tiles() as used:
        check(x, w[:33].contiguous(), b[:33].contiguous(), torch.tensor(1.5, device=device), p)
    assert {kind for kind, _ in used} == {"fwd", "dx", "dw"}


def test_gradcheck_alpha_and_projection(device):
    x = make_x((3, 16), torch.float64, device)
    x[x == 0] = 0.25  # away from relu's kink
    x.requires_grad_()
    gen = torch.Generator().manual_seed(0)
    w, p = (torch.randn(12, 16, generator=gen, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
    b = torch.randn(12, dtype=torch.float64, device=device).requires_grad_()
    alpha = torch.tensor(-0.6, dtype=torch.float64, device=device).requires_grad_()

    def f(x, w, b, alpha, p):
        return fused_residual(x, w, b, alpha=alpha, proj_weight=p)
    assert torch.autograd.gradcheck(f, (x, w, b, alpha, p), eps=1e-6, atol=1e-7, fast_mode=True)
    w2 = torch.randn(16, 16, dtype=torch.float64, device=device).requires_grad_()
    b2 = torch.randn(16, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b, a: fused_residual(x, w, b, alpha=a), (x, w2, b2, alpha),
                                    eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("need", ["alpha-only", "alpha-no-bias-grad", "weight-frozen"])
def test_alpha_grad_needs(need, device, launches):
    x = make_x((10, 32), torch.float32, device)
    w, b = make_params(32, torch.float32, device)
    alpha = torch.tensor(0.3, device=device, requires_grad=True)
    w.requires_grad_(need == "alpha-no-bias-grad")
    b.requires_grad_(need == "weight-frozen")
    y = fused_residual(x, w, b, alpha=alpha)
    y.backward(torch.ones_like(y))
    lin = torch.nn.functional.linear(torch.relu(x), w.detach(), b.detach())
    torch.testing.assert_close(alpha.grad, lin.sum())
    assert launches() == {"residual_fwd": 1, "residual_dw": 1}  # dalpha rides on the dW GEMM


def test_blocks_with_alpha_and_projection_interchange(device, launches):
    torch.manual_seed(0)
    eager = ResidualBlock(24, 40, alpha=0.0, learnable_alpha=True, device=device)
    assert isinstance(eager.alpha, torch.nn.Parameter) and eager.proj_weight.shape == (40, 24)
    assert list(eager.state_dict()) == ["weight", "bias", "proj_weight", "alpha"]
    fused = FusedResidualBlock(24, 40, alpha=0.5, learnable_alpha=True, device=device)
    fused.load_state_dict(eager.state_dict())
    x = make_x((5, 24), torch.float32, device)
    torch.testing.assert_close(fused(x), eager(x))
    torch.testing.assert_close(fused(x), x @ eager.proj_weight.T)  # alpha = 0: the shortcut alone
    fused(x).sum().backward()
    assert fused.alpha.grad is not None and fused.weight.grad is not None
    shared = FusedResidualBlock.from_block(eager)
    assert shared.alpha is eager.alpha and shared.proj_weight is eager.proj_weight
    fixed = ResidualBlock(8, alpha=0.5)
    assert "alpha" in dict(fixed.named_buffers()) and "alpha" not in dict(fixed.named_parameters())
    assert FusedResidualBlock(8, False).bias is None  # the (dim, bias) positional form still works


@pytest.mark.parametrize("bad, error, match", [
    (dict(alpha="1"), TypeError, "alpha must be"),
    (dict(alpha=torch.ones(2)), ValueError, "one element"),
    (dict(proj_weight=torch.randn(8, 16)), ValueError, "proj_weight must have weight's shape"),
])
def test_feature_bad_inputs(bad, error, match, device, launches):
    x = torch.randn(3, 16, device=device)
    w, b = make_params(16, torch.float32, device)
    with pytest.raises(error, match=match):
        fused_residual(x, w, b, **bad)
    with pytest.raises(ValueError, match="square"):
        fused_residual(x, torch.randn(8, 16, device=device))
    assert launches() == {}
