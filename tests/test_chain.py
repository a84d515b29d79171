"""Chains of normalized blocks (issue 22, :mod:`fusedres.chain`): block k+1's norm statistics come
from block k's forward epilogue, with no statistics pass over the activations between blocks."""
import copy
import pickle

import pytest
import torch
from torch import nn

import fusedres
from fusedres import FusedResidualBlock, FusedResidualMLPBlock, ResidualBlock, ResidualMLP, ResidualMLPBlock
from fusedres.chain import CONFLICT, link_blocks, next_norm, set_next_norm
from fusedres.validate import parity
from test_norm import KINDS, assert_parity, gradcheck_module, make_norm, sgd_steps

STATS = ("norm_col_stats", "norm_row_stats")
D, H, DEPTH = 24, 48, 3


def stats_passes(counts: dict) -> int:
    return sum(counts.get(k, 0) for k in STATS)


def chain(kind, block, fused, dtype=torch.float32, device="cpu", depth=DEPTH, **kwargs):
    """``depth`` blocks with their own norm of ``kind`` (non-trivial affine and running statistics),
    in an nn.Sequential, not linked."""
    blocks = []
    for i in range(depth):
        norm = make_norm(kind, D, seed=10 + i)
        if block == "single":
            cls = FusedResidualBlock if fused else ResidualBlock
            blocks.append(cls(D, norm=norm, act="gelu", alpha=0.8, **kwargs))
        else:
            cls = FusedResidualMLPBlock if fused else ResidualMLPBlock
            blocks.append(cls(D, H, norm=norm, pre_act=None, act="gelu", **kwargs))
    return nn.Sequential(*blocks).to(device, dtype)


def models(kind, block, dtype, device, **kwargs):
    """(fused, eager, fp64 reference) from one init; the fused one linked (its first call chained)."""
    torch.manual_seed(0)
    fused = chain(kind, block, True, dtype, device, **kwargs)
    eager = chain(kind, block, False, dtype, device, **kwargs)
    eager.load_state_dict(fused.state_dict())
    ref = copy.deepcopy(eager).double()
    link_blocks(fused)
    return fused, eager, ref


def step(model, x, g, autocast=None):
    """One forward and backward: [y, dx, every parameter's gradient]."""
    xx = x.detach().clone().requires_grad_()
    if autocast is not None:
        with torch.autocast(x.device.type, dtype=autocast):
            y = model(xx)
    else:
        y = model(xx)
    y.backward(g.to(y.dtype))
    return [y.detach(), xx.grad] + [p.grad for p in model.parameters()]


def inputs(device, dtype, rows=(3, 13)):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(*rows, D, generator=gen) * 1.5 + 0.75).to(device)
    g = torch.randn(*rows, D, generator=gen).to(device)
    return x.to(dtype), g


def check_chain_parity(kind, block, dtype, device, launches, autocast=None):
    fused, eager, ref = models(kind, block, torch.float32 if autocast else dtype, device)
    x, g = inputs(device, torch.float32 if autocast else dtype)
    before = launches()
    outs = [step(m, x if m is not ref else x.double(), g, autocast if m is not ref else None)
            for m in (fused, eager, ref)]
    counts = {k: launches().get(k, 0) - before.get(k, 0) for k in launches()}
    names = ["y", "dx"] + [n for n, _ in fused.named_parameters()]
    assert_parity(names, *outs, (fused[-1].norm, eager[-1].norm, ref[-1].norm), f"[{kind} {block} {dtype}]")
    for i in range(DEPTH - 1):        # every block's running statistics
        assert_parity([], [], [], [], (fused[i].norm, eager[i].norm, ref[i].norm), f"block {i}")
    # the Triton path ran, and only the first block's input had a statistics pass
    assert counts.get("residual_fwd", 0) == DEPTH * (1 if block == "single" else 2)
    assert stats_passes(counts) == 1, counts


#: Each norm in each block kind, each 16-bit dtype twice (the sinks' code is the same per dtype).
PARITY_CASES = [("batch", "single", torch.float32), ("batch", "single", torch.float16),
                ("layer", "mlp", torch.float32), ("layer", "mlp", torch.bfloat16),
                ("rms", "single", torch.float32), ("rms", "single", torch.bfloat16),
                ("batch", "mlp", torch.float32), ("batch", "mlp", torch.float16)]


@pytest.mark.parametrize("kind,block,dtype", PARITY_CASES, ids=str)
def test_chain_parity(kind, block, dtype, device, launches):
    """A chain of three blocks against the same chain on torch's modules: y, dx and every gradient
    under the parity rule, BatchNorm's running statistics, one statistics pass."""
    check_chain_parity(kind, block, dtype, device, launches)


@pytest.mark.parametrize("kind,block", [("layer", "single"), ("batch", "mlp")])
def test_chain_parity_autocast(kind, block, device, launches):
    check_chain_parity(kind, block, torch.float32, device, launches,
                       autocast=torch.bfloat16 if device == "cpu" else torch.float16)


@pytest.mark.parametrize("kind", ["batch", "layer"])      # (RMSNorm's row statistics: LayerNorm's path)
def test_chain_gradcheck(kind, device):
    """fp64 gradcheck through a linked chain of two blocks: the second block's statistics come from
    the first one's epilogue, and its backward still corrects dx for them (they are functions of
    x)."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*[FusedResidualBlock(6, norm=kind, act="gelu", device=device, dtype=torch.float64)
                             for _ in range(2)])
    link_blocks(blocks)
    blocks.dim = 6
    gradcheck_module(blocks, 5, {"0.weight", "1.norm.weight"}, device)


def test_a_sequential_links_itself_on_its_first_step(device, launches):
    """An nn.Sequential of fused BatchNorm blocks, not linked: the first training step runs a
    statistics pass per block and links them; from the second on only the first block's input has
    one. Three SGD steps give torch's running statistics in every block."""
    torch.manual_seed(0)
    fused = chain("batch", "single", True, device=device)
    eager = chain("batch", "single", False, device=device)
    eager.load_state_dict(fused.state_dict())
    ref = copy.deepcopy(eager).double()
    seen = []
    for _ in range(3):
        before = launches()
        sgd_steps((fused,), (37, D), device, steps=1)
        seen.append(stats_passes({k: v - before.get(k, 0) for k, v in launches().items()}))
    assert seen == [DEPTH, 1, 1]
    assert [next_norm(b) for b in fused] == ["batch", "batch", None]
    for _ in range(3):          # (the same batches: sgd_steps draws from one seed per call)
        sgd_steps((eager, ref), (37, D), device, steps=1)
    for i in range(DEPTH):
        assert_parity([], [], [], [], (fused[i].norm, eager[i].norm, ref[i].norm), f"block {i}")
        assert int(fused[i].norm.num_batches_tracked) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_the_handed_over_statistics_are_the_outputs(kind, device):
    """What block k hands over is the statistics of its output as stored, under the parity rule
    against fp64 statistics of that output (eager's: torch's mean and biased variance in fp32)."""
    block = FusedResidualBlock(D, act="gelu", device=device, dtype=torch.float16)
    set_next_norm(block, kind)
    x = (torch.randn(37, D, device=device) * 2 + 3).half()
    y = block(x)
    mean, var = fusedres.chain.handed_over(y, kind)
    y64, y32 = y.double(), y.float()
    axis = 0 if kind == "batch" else 1
    if kind == "rms":
        assert mean is None
        assert parity(var, y32.square().mean(axis), y64.square().mean(axis)).ok
    else:
        assert parity(mean, y32.mean(axis), y64.mean(axis)).ok
        assert parity(var, y32.var(axis, unbiased=False), y64.var(axis, unbiased=False)).ok
    assert mean is None or mean.dtype == torch.float32


def _change_in_place(y):
    y.mul_(2)


def _change_through_a_view(y):
    y[1:3].zero_()          # (a view shares the version counter)


def _change_under_autograd(y):
    y.detach().add_(1)      # (detach shares it too)


@pytest.mark.parametrize("change", [None, _change_in_place, _change_through_a_view, _change_under_autograd])
def test_a_modified_output_is_not_trusted(change, device, launches):
    """Statistics are taken only for the tensor they describe at the version they describe: an
    in-place change of the output (directly, through a view, through a detached alias) runs the
    statistics pass, and the result is eager's; unchanged (None), none runs."""
    torch.manual_seed(0)
    fused, eager, _ = models("layer", "single", torch.float32, device)
    x = torch.randn(8, D, device=device)
    with torch.no_grad():
        yf, ye = fused[0](x), eager[0](x)
        if change is not None:
            change(yf), change(ye)
        before = launches().get("norm_row_stats", 0)
        out = fused[1](yf)
        assert launches().get("norm_row_stats", 0) == before + (change is not None)
        assert torch.allclose(out, eager[1](ye), atol=1e-5, rtol=1e-5)


def test_what_the_chain_cannot_see_and_its_switch(device, launches):
    """Inference mode (no version counter): no chain, and no error. An output saves and pickles as
    any tensor (nothing is stored on it). A write past the version counter (``.data``) is not
    seen, so fusedres.chain.set_enabled(False) (or FUSEDRES_CHAIN=0) turns chains off: then every
    block runs its statistics pass and the result is eager's."""
    import io
    fused, eager, _ = models("layer", "single", torch.float32, device)
    x = torch.randn(8, D, device=device)
    for _ in range(2):
        with torch.inference_mode():
            out = fused(x)
    assert torch.allclose(out, eager(x), atol=1e-5, rtol=1e-5)
    y = fused[0](x)
    buf = io.BytesIO()
    torch.save(y, buf)
    pickle.dumps(y)
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), y)
    previous = fusedres.chain.set_enabled(False)
    try:
        with torch.no_grad():
            yf, ye = fused[0](x), eager[0](x)
            yf.data.mul_(2), ye.mul_(2)
            before = launches().get("norm_row_stats", 0)
            out = fused[1](yf)
        assert launches().get("norm_row_stats", 0) == before + 1
        assert torch.allclose(out, eager[1](ye), atol=1e-5, rtol=1e-5)
    finally:
        fusedres.chain.set_enabled(previous)


def test_two_kinds_of_consumer_stop_the_producer(device, launches):
    """One block's output read by a LayerNorm block and a BatchNorm block: the link is marked
    conflicting, the producer emits nothing, both consumers compute their own statistics."""
    torch.manual_seed(0)
    producer = FusedResidualBlock(D, device=device)
    ln, bn = FusedResidualBlock(D, norm="layer", device=device), FusedResidualBlock(D, norm="batch", device=device)
    x = torch.randn(8, D, device=device)
    for _ in range(2):
        y = producer(x)
        ln(y), bn(y)
    assert next_norm(producer) == CONFLICT
    before = launches()
    y = producer(x)
    out = ln(y)
    counts = {k: v - before.get(k, 0) for k, v in launches().items()}
    assert counts.get("norm_row_stats") == 1
    assert torch.allclose(out, ln(y.clone()), atol=1e-6)


def test_eval_chains(device, launches):
    """Eval mode: a BatchNorm chain uses the running statistics and emits nothing (the launches'
    recipes have no statistics sink); a LayerNorm chain still hands its statistics over."""
    for kind, passes in (("batch", 0), ("layer", 1)):
        fused, eager, _ = models(kind, "single", torch.float32, device)
        fused.eval(), eager.eval()
        x = torch.randn(8, D, device=device)
        before = launches()
        with torch.no_grad():
            out = fused(x)
        counts = {k: v - before.get(k, 0) for k, v in launches().items()}
        assert stats_passes(counts) == passes and counts["residual_fwd"] == DEPTH, (kind, counts)
        assert torch.allclose(out, eager(x), atol=1e-5, rtol=1e-5)


def test_a_linked_model_copies_and_pickles(device):
    """Links live in fusedres.chain's weak dictionary, the producer's reference on its output
    only: a deep copy or a pickle of a linked model works; a copy is unlinked until its first
    step links it, and its outputs name the copy."""
    model = ResidualMLP(8, D, 3, 4, norm="batch", device=device)
    assert [next_norm(b) for b in model.blocks] == ["batch", "batch", None]
    clone = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    assert [next_norm(b) for b in clone.blocks] == [None, None, None]
    x = torch.randn(5, 8, device=device)
    clone(x)
    assert [next_norm(b) for b in clone.blocks] == ["batch", "batch", None]
    y = clone.blocks[0](clone.input(x))
    assert fusedres.chain._PRODUCER[y]() is clone.blocks[0]
    assert fusedres.chain.handed_over(y, "batch") is not None


def test_residual_mlp_chains_with_dropout(device, launches):
    """rtdl's ResNet blocks (BatchNorm, dropout in both places) in a ResidualMLP: one statistics
    pass, and the same numbers as the same model unlinked (the same seeds, so the same masks)."""
    torch.manual_seed(0)
    model = ResidualMLP(8, D, 3, 4, hidden_features=H, norm="batch", pre_act=None, dropout=0.2,
                        hidden_dropout=0.1, device=device)
    unlinked = copy.deepcopy(model)
    for b in unlinked.blocks:
        set_next_norm(b, CONFLICT)     # (never emits)
    x = torch.randn(37, 8, device=device)
    outs = []
    for m in (model, unlinked):
        torch.manual_seed(1)
        before = launches()
        y = m(x)
        y.square().mean().backward()
        outs.append([y.detach()] + [p.grad for p in m.parameters()])
        outs[-1].append(stats_passes({k: v - before.get(k, 0) for k, v in launches().items()}))
    assert outs[0][-1] == 1 and outs[1][-1] == DEPTH
    for a, b in zip(outs[0][:-1], outs[1][:-1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_chain_forward_bytes(device):
    """A linked BatchNorm chain's forward, measured: one statistics pass (over the first block's
    input), each block writes one tensor of x's size (y) and reads its input once in the GEMM."""
    from fusedres.traffic import InterpreterTraffic
    fused, _, _ = models("batch", "single", torch.float32, device)
    x = torch.randn(96, D, device=device)
    with torch.no_grad(), InterpreterTraffic() as t:
        fused(x)
    kernels = [lc.kernel for lc in t.launches]
    assert kernels == ["col_stats_kernel"] + ["residual_fwd_kernel"] * DEPTH, kernels
    for lc in t.launches[1:]:
        assert lc.args["x_ptr"].unique_read == x.numel() * 4
        assert lc.args["y_ptr"].unique_written == x.numel() * 4
        small = {k: a.unique_written for k, a in lc.args.items() if k != "y_ptr" and a.unique_written}
        assert all(v < x.numel() for v in small.values()), small


def test_chain_compiles_fullgraph(device):
    """Under torch.compile the chain is off (nothing noted inside a graph): fullgraph traces a
    linked model with no break, and gives eager's numbers."""
    torch._dynamo.reset()
    fused, eager, _ = models("layer", "single", torch.float32, device)
    x = torch.randn(12, D, device=device)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
    assert fusedres.chain._PRODUCER.get(compiled(x)) is None


def test_a_third_party_resnet_fused_by_structure_chains(device, launches):
    """rtdl's ResNet (BatchNorm -> Linear -> ReLU -> Dropout -> Linear -> Dropout, ``x = x +
    block(x)`` in its forward), fused by structure: its first training step links the blocks (each
    known by its first Linear), the second runs one statistics pass for four blocks; both steps
    equal the eager model's (one SGD step apart), running statistics included."""
    import rtdl_revisiting_models as rtdl
    torch.manual_seed(0)
    model = rtdl.ResNet(d_in=8, d_out=None, n_blocks=4, d_block=D, d_hidden_multiplier=2.0, dropout1=0.0,
                        dropout2=0.0).to(device)
    eager = copy.deepcopy(model)
    fusedres.fuse(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, eager)]
    gen = torch.Generator().manual_seed(3)
    passes = []
    for _ in range(2):
        x = torch.randn(37, 8, generator=gen).to(device)
        before = launches()
        outs = []
        for m, opt in zip((model, eager), opts):
            opt.zero_grad()
            y = m(x)
            y.square().mean().backward()
            opt.step()
            outs.append(y.detach())
        passes.append(stats_passes({k: v - before.get(k, 0) for k, v in launches().items()}))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    assert passes == [4, 1]
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_chain_deterministic(device, launches):
    """Bitwise the same outputs and gradients twice through a linked chain (the partials combined
    in tile order)."""
    fused, _, _ = models("layer", "mlp", torch.float32, device)
    x, g = inputs(device, torch.float32)
    runs = []
    for _ in range(2):
        fused.zero_grad()
        before = launches()
        runs.append(step(fused, x, g))
        assert stats_passes({k: v - before.get(k, 0) for k, v in launches().items()}) == 1      # (chained)
    assert all(torch.equal(a, c) for a, c in zip(*runs))


def test_chain_ops_opcheck(device):
    """The custom ops with a chain's arguments (statistics handed over, the next norm's emitted):
    schema, autograd registration and fake kernels (shapes and dtypes of the emitted statistics)."""
    x = torch.randn(10, 16, device=device, dtype=torch.float64)
    w, b = (torch.randn(16, 16, device=device, dtype=torch.float64) / 4, torch.randn(16, device=device,
                                                                                    dtype=torch.float64))
    rows = torch.rand(10, device=device, dtype=torch.float64) + 0.5
    cols = torch.rand(16, device=device, dtype=torch.float64) + 0.5
    for kind, given, nxt in (("batch", (x.mean(0), cols), "layer"), ("layer", (x.mean(1), rows), "batch"),
                             ("rms", (None, rows), "rms"), ("none", (None, None), "batch")):
        leaf = [t.clone().requires_grad_() for t in (x, w, b)]
        args = (*leaf, None, 0.5, None, "relu", 0.0, kind, None, None, 1e-5, None, None, 0.0, None, *given, nxt)
        torch.library.opcheck(torch.ops.fusedres.norm_residual_forward.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        w1, w2 = torch.randn(32, 16, device=device, dtype=torch.float64) / 4, torch.randn(16, 32, device=device,
                                                                                          dtype=torch.float64) / 6
        mlp = (leaf[0], w1.requires_grad_(), None, w2.requires_grad_(), None, None, 1.0, None, False, "none", 0.0,
               "relu", 0.0, kind, None, None, 1e-5, None, None, "none", None, None, 0.0, None, None, 0.0, 0.0, None,
               *given, nxt)
        torch.library.opcheck(torch.ops.fusedres.residual_mlp_forward.default, mlp,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
