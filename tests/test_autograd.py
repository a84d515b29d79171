"""Autograd contract: gradcheck, needs_input_grad, what is saved, no-grad, double backward."""
import itertools

import pytest
import torch

from fusedres import fused_residual
from helpers import make_params, make_x


def test_gradcheck_fp64(device, launches):
    x = make_x((3, 16), torch.float64, device).requires_grad_()
    w, b = make_params(16, torch.float64, device)
    w.requires_grad_()
    b.requires_grad_()
    x.data[0, 1] = 0.3  # keep every x away from the relu kink at 0, where finite differences lie
    x.data[x.data == 0] = 0.25
    assert torch.autograd.gradcheck(fused_residual, (x, w, b), eps=1e-6, atol=1e-7)
    assert launches()["residual_dw"] > 0 and launches()["residual_dx"] > 0


COMBOS = [c for c in itertools.product([False, True], repeat=3) if any(c)]


@pytest.mark.parametrize("need_x, need_w, need_b", COMBOS)
def test_needs_input_grad(need_x, need_w, need_b, device, launches):
    """Only the kernels a requested gradient needs run: a frozen weight launches no dW kernel,
    an x without grad no dx kernel; the bias alone is a column sum with no GEMM."""
    x = make_x((20, 32), torch.float32, device).requires_grad_(need_x)
    w, b = make_params(32, torch.float32, device)
    w.requires_grad_(need_w)
    b.requires_grad_(need_b)
    y = fused_residual(x, w, b)
    y.backward(torch.ones_like(y))
    expected = {"residual_fwd": 1}
    if need_x:
        expected["residual_dx"] = 1
    if need_w:
        expected["residual_dw"] = 1
    assert launches() == expected
    assert (x.grad is not None) == need_x
    assert (w.grad is not None) == need_w
    assert (b.grad is not None) == need_b
    xr, wr, br = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b))
    yr = xr + torch.nn.functional.linear(torch.relu(xr), wr, br)
    yr.backward(torch.ones_like(yr))
    for got, want in [(x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)]:
        if want is not None:
            torch.testing.assert_close(got, want)


def test_saves_only_x_and_weight(device):
    """The backward keeps the input and the weight, nothing new: no relu(x), no M x D temporary."""
    x = make_x((20, 32), torch.float32, device).requires_grad_()
    w, b = make_params(32, torch.float32, device)
    w.requires_grad_()
    b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_residual(x, w, b)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), w.data_ptr()}


def test_no_grad_saves_nothing(device, launches):
    x = make_x((20, 32), torch.float32, device).requires_grad_()
    w, b = make_params(32, torch.float32, device)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused_residual(x, w, b)
    assert y.grad_fn is None and not y.requires_grad and saved == []
    with torch.inference_mode():
        y = fused_residual(x, w, b)
    assert launches() == {"residual_fwd": 2}


def test_double_backward_is_a_clear_error(device):
    x = make_x((4, 16), torch.float32, device).requires_grad_()
    w, b = make_params(16, torch.float32, device)
    w.requires_grad_()
    y = fused_residual(x, w, b)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("variant", ["plain", "alpha", "proj"])
def test_opcheck_forward_and_backward(variant, device):
    """torch.library.opcheck on both ops: schema, fake tensors, autograd registration, and the
    aot_dispatch tests that torch.compile relies on."""
    x = make_x((6, 32), torch.float32, device)
    N = 24 if variant == "proj" else 32
    w = torch.randn(N, 32, device=device) / 8
    b = torch.randn(N, device=device)
    alpha = torch.tensor(0.5, device=device) if variant != "plain" else None
    p = torch.randn(N, 32, device=device) / 8 if variant == "proj" else None
    g = torch.randn(6, N, device=device)
    leaf = [t.requires_grad_() if t is not None else None for t in (x.clone(), w, b, alpha, p)]
    torch.library.opcheck(torch.ops.fusedres.residual_forward, tuple(leaf))
    plain = [t.detach() if t is not None else None for t in leaf]
    for needs in [(True, True, True, alpha is not None, p is not None), (False, True, False, False, False)]:
        torch.library.opcheck(torch.ops.fusedres.residual_backward, (g, *plain, *needs))


@pytest.mark.parametrize("alpha", [1.0, 0.5, "tensor"])
def test_lean_eager_path_matches_the_custom_ops(device, launches, alpha):
    """Eager calls take the lean path (a torch.autograd.Function, checks once per signature, a
    cached launch plan under the interpreter): the same kernels, launched as often, with bitwise
    the custom ops' results, call after call (torch.compile keeps the custom ops: test_dropin)."""
    from fusedres import op
    x = make_x((24, 32), torch.float32, device)
    w, b = make_params(32, torch.float32, device)
    g = torch.randn(24, 32, generator=torch.Generator().manual_seed(1)).to(device)
    a = torch.tensor(0.7, device=device) if alpha == "tensor" else alpha

    def run(fn):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, ws, bs)
        return (y.detach(), *torch.autograd.grad(y, (xs, ws, bs), g)), type(y.grad_fn).__name__

    lean, node = run(lambda *t: fused_residual(*t, alpha=a))
    assert node == "_FusedResidualBackward"
    assert launches() == {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}
    through_op, node = run(lambda *t: op._through_custom_op(*t, a, None))
    assert node != "_FusedResidualBackward"
    assert launches() == {"residual_fwd": 2, "residual_dx": 2, "residual_dw": 2}
    again, _ = run(lambda *t: fused_residual(*t, alpha=a))           # the cached plan and signature
    assert launches() == {"residual_fwd": 3, "residual_dx": 3, "residual_dw": 3}
    with torch.no_grad():
        y = fused_residual(x, w, b, alpha=a)
    assert launches()["residual_fwd"] == 4
    for p, q, r in zip(lean, through_op, again):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert torch.equal(y, lean[0])
