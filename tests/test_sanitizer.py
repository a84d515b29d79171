"""Memory sanitizer: every kernel's every active lane stays inside the tensor it was given.

Built on the interpreter instrumentation (``fusedres.traffic``): a load or store of an active
lane outside its tensor's storage raises before it happens, and one outside the tensor's view
(inside a larger storage, e.g. a slice) is recorded; both fail the test. tests/conftest.py puts
every test of the suite under it (``FUSEDRES_SANITIZE=0`` turns that off); the tests here also
check it explicitly on every kernel variant, dtype and row layout, and that it catches a
planted out-of-bounds access.
"""
import pytest
import torch

from fusedres import fused_residual, kernels, traffic
from fusedres._layout import plan_rows
from fusedres.kernels import configs
from fusedres.traffic import BoundsViolation, InterpreterTraffic
from helpers import check_parity, make_params, make_x

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="the sanitizer instruments Triton's interpreter"),
              pytest.mark.skipif(not torch.cuda.is_available() and not traffic.supported()[0],
                                 reason=traffic.supported()[1])]

CASES = [
    ((1, 16), torch.float32, "contiguous", True),
    ((33, 48), torch.float16, "sliced", True),
    ((5, 7, 40), torch.bfloat16, "transposed", False),
    ((130, 100), torch.float32, "feature-strided", True),
    ((2, 3, 24), torch.float32, "contiguous", False),
]


@pytest.fixture
def sanitizer():
    with InterpreterTraffic(track_unique=False, raise_on_violation=True) as t:
        yield t
    assert t.violations == [], "\n".join(map(str, t.violations))
    assert t.launches, "nothing ran under the sanitizer"


@pytest.mark.parametrize("shape, dtype, layout, bias", CASES, ids=str)
def test_parity_under_sanitizer(shape, dtype, layout, bias, sanitizer):
    x = make_x(shape, dtype, "cpu", layout=layout)
    w, b = make_params(shape[-1], dtype, "cpu", bias=bias)
    check_parity(x, w, b)


@pytest.mark.parametrize("proj", [False, True])
def test_alpha_and_projection_under_sanitizer(proj, sanitizer, monkeypatch):
    default = configs.interpreter_config
    monkeypatch.setattr(configs, "interpreter_config", lambda kind, M, D: type(default(kind, M, D))(
        {k: 16 if k.startswith("BLOCK_") else 2 for k in default(kind, M, D).kwargs}, num_warps=4, num_stages=1))
    x = make_x((4, 9, 40), torch.float32, "cpu", layout="transposed").requires_grad_()
    N = 24 if proj else 40
    w = (torch.randn(N, 40) / 7).requires_grad_()
    b = torch.randn(N).requires_grad_()
    p = (torch.randn(N, 40) / 7).requires_grad_() if proj else None
    alpha = torch.tensor(0.5, requires_grad=True)
    fused_residual(x, w, b, alpha=alpha, proj_weight=p).sum().backward()
    assert all(t.grad is not None for t in (x, w, b, alpha))


@pytest.mark.no_sanitizer
def test_sanitizer_catches_a_planted_out_of_bounds_read():
    """A launcher bug that claims more rows than x has: past the storage, the access is stopped
    before it happens; inside a larger storage (a slice), it is recorded as outside the view."""
    w, b = make_params(32, torch.float32, "cpu")
    x = torch.randn(20, 32)
    rows, (xs,), (xk,) = plan_rows(x)
    y = torch.empty(20 + 40, 32)
    with InterpreterTraffic(track_unique=False, raise_on_violation=True):
        with pytest.raises(BoundsViolation, match="x_ptr"):
            kernels.residual_fwd(xk, xs, w, b, y, rows._replace(M=60, T=60))

    storage = torch.randn(100, 32)
    view = storage[10:30]
    rows, (xs,), (xk,) = plan_rows(view)
    with InterpreterTraffic(track_unique=False, raise_on_violation=True) as t:
        kernels.residual_fwd(xk, xs, w, b, y, rows._replace(M=24, T=24))
    outside = [v for v in t.violations if v.arg == "x_ptr"]
    assert outside and all(v.scope == "view" for v in outside)
