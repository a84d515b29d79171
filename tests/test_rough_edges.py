"""Two rough edges a new user hits (issue 24): shape inference on meta tensors, and a file that is
not a tuning file."""
import json

import pytest
import torch

import fusedres


@pytest.mark.parametrize("make,width,out", [
    (lambda: fusedres.FusedResidualBlock(16, device="meta"), 16, 16),
    (lambda: fusedres.FusedResidualBlock(16, 24, learnable_alpha=True, device="meta"), 16, 24),
    (lambda: fusedres.FusedResidualBlock(16, norm="batch", act="gelu", device="meta"), 16, 16),
    (lambda: fusedres.FusedResidualMLPBlock(16, 32, norm="layer", hidden_norm="batch", device="meta"), 16, 16),
    (lambda: fusedres.ResidualMLP(8, 16, 2, 3, hidden_features=32, device="meta"), 8, 3),
    (lambda: fusedres.FusedResidualStack(16, 3, device="meta"), 16, 16),
], ids=["block", "projection", "norm", "mlp-norms", "network", "stack"])
def test_meta_tensors_give_shapes_as_nn_linear_does(make, width, out, launches):
    """A forward (and backward) on meta tensors, as model-summary tools and deferred initialisation
    run it: the output's shape and dtype from the custom ops' fake kernels, nothing launched."""
    model = make()
    x = torch.empty(4, 5, width, device="meta", requires_grad=True)
    y = model(x)
    assert y.device.type == "meta" and y.dtype == torch.float32 and y.shape == (4, 5, out)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert launches() == {}


def test_load_tuning_names_a_file_that_is_not_a_tuning_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"other\.json is not a fusedres tuning file: it has no 'device', 'triton', "
                                         r"'kernels'"):
        fusedres.load_tuning(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match=r"other\.json is not JSON"):
        fusedres.load_tuning(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a fusedres tuning file"):
        fusedres.load_tuning(path)
