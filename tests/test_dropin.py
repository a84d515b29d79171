"""fusedres as a drop-in: torch.compile, autocast, model conversion, ResidualMLP."""
import pytest
import torch
from torch import nn

import fusedres
from fusedres import FusedResidualBlock, ResidualBlock, ResidualMLP, fuse, kernels
from fusedres.validate import parity
from helpers import make_x


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_stack(device, launches):
    """A stack of fused blocks compiles with fullgraph=True (so zero graph breaks) through
    Inductor, runs the Triton kernels inside the compiled graph, and gives eager's numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(*[FusedResidualBlock(32, device=device) for _ in range(3)])
    x = make_x((10, 32), torch.float32, device).requires_grad_()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    before = launches()
    y = compiled(x)
    y.backward(torch.ones_like(y))
    ran = {k: v - before.get(k, 0) for k, v in launches().items()}
    assert ran == {"residual_fwd": 3, "residual_dx": 3, "residual_dw": 3}
    gx = x.grad.clone()
    grads = [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    y_eager = model(x)
    y_eager.backward(torch.ones_like(y_eager))
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# autocast


def _spy_gemm_dtype(monkeypatch):
    seen = []
    for name, w_index in [("residual_fwd", 2), ("residual_dx", 4), ("residual_dw", 4)]:
        original = getattr(kernels, name)

        def spy(*args, _original=original, _i=w_index, _name=name, **kw):
            seen.append((_name, args[_i].dtype))
            return _original(*args, **kw)
        monkeypatch.setattr(kernels, name, spy)
    return seen


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_matches_eager(amp_dtype, x_dtype, device, monkeypatch):
    """Under autocast the GEMM runs in the autocast dtype, the output dtype follows eager's
    promotion, fp32 parameters get fp32 gradients, and the values obey the parity rule against
    an fp64 reference of the same block."""
    seen = _spy_gemm_dtype(monkeypatch)
    torch.manual_seed(0)
    eager = ResidualBlock(48, device=device)
    fused = FusedResidualBlock(48, device=device)
    fused.load_state_dict(eager.state_dict())
    x = make_x((3, 20, 48), x_dtype, device)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    with torch.autocast(device_type=device, dtype=amp_dtype):
        y_f = fused(xs[0])
        y_e = eager(xs[1])
    assert y_f.dtype == y_e.dtype
    g = torch.randn(y_e.shape, device=device).to(y_e.dtype)
    y_f.backward(g)
    y_e.backward(g)
    assert {d for _, d in seen} == {amp_dtype}
    assert [n for n, _ in seen] == ["residual_fwd", "residual_dx", "residual_dw"]
    assert fused.weight.grad.dtype == eager.weight.grad.dtype == torch.float32
    assert fused.bias.grad.dtype == torch.float32 and xs[0].grad.dtype == xs[1].grad.dtype == x_dtype

    ref = ResidualBlock(48, device=device, dtype=torch.float64)
    ref.load_state_dict(eager.state_dict())
    xr = x.detach().double().requires_grad_()
    y_r = ref(xr)
    y_r.backward(g.double())
    for f, e, r in [(y_f, y_e, y_r), (xs[0].grad, xs[1].grad, xr.grad),
                    (fused.weight.grad, eager.weight.grad, ref.weight.grad),
                    (fused.bias.grad, eager.bias.grad, ref.bias.grad)]:
        p = parity(f.detach(), e.detach(), r.detach())
        assert p.ok, p


# ---------------------------------------------------------------------------------------------
# conversion and ResidualMLP


def test_from_linear_shares_parameters(device, launches):
    lin = nn.Linear(32, 32, device=device)
    block = FusedResidualBlock.from_linear(lin)
    assert block.weight is lin.weight and block.bias is lin.bias
    x = make_x((5, 32), torch.float32, device)
    torch.testing.assert_close(block(x), x + lin(torch.relu(x)))
    assert launches() == {"residual_fwd": 1}
    with pytest.raises(ValueError, match="square"):
        FusedResidualBlock.from_linear(nn.Linear(32, 16))
    assert FusedResidualBlock.from_linear(nn.Linear(8, 8, bias=False)).bias is None


def test_fuse_replaces_blocks_in_place_sharing_parameters(device):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 16)
            self.body = nn.Sequential(ResidualBlock(16), nn.Sequential(ResidualBlock(16, bias=False)))
            self.head = ResidualBlock(16)

        def forward(self, x):
            return self.head(self.body(self.stem(x)))

    class Custom(ResidualBlock):  # a subclass may change forward: fuse must not guess
        pass

    net = Net().to(device)
    net.body.append(Custom(16))
    params = {n: p for n, p in net.named_parameters()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(7, 4, device=device)
    expected = net(x)
    assert fuse(net) is net
    assert type(net.body[0]) is FusedResidualBlock and type(net.body[1][0]) is FusedResidualBlock
    assert type(net.head) is FusedResidualBlock and type(net.body[2]) is Custom
    assert {n: p for n, p in net.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in net.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    torch.testing.assert_close(net(x), expected)
    with pytest.raises(TypeError, match="from_block"):
        fuse(ResidualBlock(4))


def test_residual_mlp_fused_and_eager_interchange(device, launches):
    torch.manual_seed(0)
    fused = ResidualMLP(6, 32, 3, 2, device=device)
    eager = ResidualMLP(6, 32, 3, 2, fused=False, device=device)
    assert isinstance(fused.input, nn.Linear) and isinstance(fused.output, nn.Linear)
    assert all(type(b) is FusedResidualBlock for b in fused.blocks)
    assert all(type(b) is ResidualBlock for b in eager.blocks) and len(eager.blocks) == 3
    eager.load_state_dict(fused.state_dict())
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 9, 6, device=device)
    torch.testing.assert_close(fused(x), eager(x))
    assert launches() == {"residual_fwd": 3}
    assert all(type(b) is FusedResidualBlock for b in fuse(eager).blocks)
