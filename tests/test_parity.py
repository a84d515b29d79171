"""Parity of the fused forward and backward against eager PyTorch, under the 2x rule, and proof
that the Triton kernels (not the eager fallback) produced every result."""
import pytest
import torch

from fusedres import kernels
from fusedres.kernels import configs
from helpers import LAYOUTS, check_parity, make_params, make_x, small_tiles

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_THREE = {"residual_fwd": 1, "residual_dx": 1, "residual_dw": 1}

# ragged shapes: M from 1, D from 16, neither a multiple of a tile; leading dims; M > a 128 tile
SHAPES = [(1, 16), (5, 17), (33, 48), (130, 100), (2, 7, 64), (3, 1, 5, 40), (257, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_shapes(shape, bias, dtype, device, launches):
    x = make_x(shape, dtype, device)
    w, b = make_params(shape[-1], dtype, device, bias=bias)
    check_parity(x, w, b)
    assert launches() == ALL_THREE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_x_layouts(layout, dtype, device, launches):
    x = make_x((6, 11, 48), dtype, device, layout=layout)
    w, b = make_params(48, dtype, device)
    check_parity(x, w, b)
    assert launches() == ALL_THREE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_layout", ["transposed", "sliced"])
def test_parity_noncontiguous_weight(weight_layout, dtype, device, launches):
    x = make_x((40, 32), dtype, device)
    w, b = make_params(32, dtype, device, weight_layout=weight_layout)
    assert not w.is_contiguous()
    check_parity(x, w, b)
    assert launches() == ALL_THREE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_noncontiguous_grad(dtype, device, launches):
    x = make_x((4, 9, 32), dtype, device)
    w, b = make_params(32, dtype, device)
    g = make_x((4, 9, 32), dtype, device, layout="transposed", seed=3)
    check_parity(x, w, b, g)
    assert launches() == ALL_THREE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_small_tiles(dtype, device, launches):
    """16x16x16 tiles, so every kernel runs several K-loop trips, several tiles per dimension,
    ragged edges on all of them, and the grouped tile order (GROUP 2 over 5 row tiles); the
    same explicit config on a GPU as in the interpreter."""
    x = make_x((70, 50), dtype, device)
    w, b = make_params(50, dtype, device)
    with small_tiles() as used:
        check_parity(x, w, b)
    assert launches() == ALL_THREE
    assert {kind for kind, _ in used} == {"fwd", "dx", "dw"}


def test_parity_tiny_width(device, launches):
    """D below the 16-wide minimum of tl.dot: the tiles are padded by masks."""
    x = make_x((9, 5), torch.float32, device)
    w, b = make_params(5, torch.float32, device)
    check_parity(x, w, b)
    assert launches() == ALL_THREE


def test_parity_fp64(device, launches):
    x = make_x((33, 40), torch.float64, device)
    w, b = make_params(40, torch.float64, device)
    check_parity(x, w, b)
    assert launches() == ALL_THREE


@pytest.mark.parametrize("precision, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_follows_matmul_precision(precision, expected):
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        assert configs.gemm_flags(torch.float32)["INPUT_PRECISION"] == expected
        assert configs.gemm_flags(torch.float16)["INPUT_PRECISION"] == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)


def test_empty_batch(device, launches):
    """M = 0 gives what eager gives: an empty y, zero dW and db, an empty dx."""
    x = torch.empty(0, 3, 32, device=device)
    w, b = make_params(32, torch.float32, device)
    fused = check_parity(x, w, b)
    y, dx, dw, db = fused[:4]
    assert y.shape == (0, 3, 32) and dx.shape == (0, 3, 32)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))
    assert launches() == {"residual_dw": 1}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN inputs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_matches_eager(dtype, device, launches):
    """NaN and +-Inf in x, NaN in the weight and in the incoming gradient: y, dx, dW and db put
    their NaNs and Infs exactly where eager does (relu(NaN) = NaN poisons the row; relu's
    backward passes the gradient at NaN)."""
    x = make_x((24, 32), dtype, device)
    x[1, 3] = float("nan")
    x[2, 4] = float("inf")
    x[3, 6] = float("-inf")
    x[4, 7] = float("nan")
    w, b = make_params(32, dtype, device)
    w[5, 9] = float("nan")
    g = torch.randn(24, 32).to(device, dtype)
    g[10, 11] = float("nan")
    g[12, 2] = float("inf")
    fused = check_parity(x, w, b, g)
    assert fused[0].isnan().any() and fused[1].isnan().any()
    assert launches() == ALL_THREE


def test_nonfinite_only_in_x_rows(device):
    """A NaN in x poisons exactly its own row of y (through relu and the GEMM), as in eager."""
    x = make_x((8, 32), torch.float32, device)
    x[3, 5] = float("nan")
    w, b = make_params(32, torch.float32, device)
    from fusedres import fused_residual
    y = fused_residual(x, w, b)
    rows_with_nan = y.isnan().any(dim=1).nonzero().flatten().tolist()
    assert rows_with_nan == [3]
    assert y[3].isnan().all()


def test_plan_rows_copies_only_when_needed():
    from fusedres._layout import plan_rows
    for layout, copied in [("contiguous", False), ("sliced", False), ("transposed", False),
                           ("feature-strided", True)]:
        x = make_x((4, 6, 32), torch.float32, "cpu", layout=layout)
        rows, (xs,), (xk,) = plan_rows(x)
        assert (xk is not x) == copied, layout
        assert rows.M == 24
        # the kernels' addressing reproduces every element
        m = torch.arange(rows.M)
        off = (m // rows.T) * xs.outer + (m % rows.T) * xs.inner if rows.two_level else m * xs.inner
        flat = xk.as_strided((xk.untyped_storage().nbytes() // 4,), (1,), 0)
        rebuilt = flat[xk.storage_offset() + off[:, None] + torch.arange(32)[None, :] * xs.feature]
        assert torch.equal(rebuilt, xk.reshape(24, 32)), layout
