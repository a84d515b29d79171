"""The depth experiment: why residual blocks train and plain deep MLPs do not.

Trains plain MLPs and residual MLPs (fusedres.ResidualMLP) at depths 4, 16 and 64 on
scikit-learn's bundled digits (8x8 images, 10 classes; shipped inside the package, no download),
with and without residual scaling, and reports:

- training-loss curves;
- per-layer gradient norms at initialisation (vanishing/exploding with depth);
- forward activation variance per block at initialisation (growing with depth unless scaled);
- the autocorrelation of input gradients along a path between two inputs: plain deep networks
  "shatter" their gradients into white noise, residual networks keep them correlated;
- a results table (markdown and JSON);
- a stochastic-depth run (``--kinds stochastic-depth``: the scaled residual network trained with
  ``ResidualMLP(..., drop_path=--drop-path)``, rates rising linearly over depth);
- He et al.'s full pre-activation (``--kinds full-preact-bn``: BN -> ReLU -> Linear in every block,
  ``ResidualMLP(..., norm="batch")``, alpha 1), whose activation variance is measured with the
  batch statistics it trains with;
- a lesion study of every trained network (Veit et al., "Residual networks behave like ensembles
  of relatively shallow networks"): at test time, delete single blocks (replace block i by the
  identity) and report the test-accuracy change per deleted block; then delete k random blocks,
  k = 1 .. depth/2, averaged over --lesion-draws random draws, and plot accuracy against k.

    python examples/depth.py                   # eager blocks on the CPU, a few minutes
    python examples/depth.py --fused           # fused kernels (use on a GPU)
    python examples/depth.py --smoke           # seconds: a tiny run for the tests
    python examples/depth.py --depths 16 64 --kinds plain residual-scaled stochastic-depth   # a part

Plots are PNG files in --out (default examples/results/); the lesion plot is
--out/lesion/depth_lesion.png. The numbers are in --out/depth.md and depth.json ("lesion").
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn


class PlainBlock(nn.Module):
    """``y = relu(x) @ W.T + b``: the residual block without its skip connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear(torch.relu(x))


KINDS = ("plain", "residual", "residual-scaled", "rezero", "stochastic-depth", "full-preact-bn")


def build(kind: str, depth: int, dim: int, fused: bool, drop_path: float = 0.5) -> nn.Module:
    """``stochastic-depth`` is ``residual-scaled`` (same init: the drop rates draw no random
    numbers at construction) trained with drop_path rising linearly to ``drop_path``."""
    import fusedres

    if kind == "plain":
        model = fusedres.ResidualMLP(64, dim, 0, 10, fused=False)
        model.blocks = nn.Sequential(*[PlainBlock(dim) for _ in range(depth)])
        return model
    alpha = {"residual": 1.0, "residual-scaled": 1.0 / math.sqrt(depth), "rezero": 0.0,
             "stochastic-depth": 1.0 / math.sqrt(depth), "full-preact-bn": 1.0}[kind]
    extra = {"drop_path": drop_path} if kind == "stochastic-depth" else {}
    if kind == "full-preact-bn":
        extra = {"norm": "batch"}
    return fusedres.ResidualMLP(64, dim, depth, 10, fused=fused, alpha=alpha, learnable_alpha=kind == "rezero",
                                **extra)


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming-normal, fan-in, ReLU gain) init of every block's weight, biases zero: the
    variance-preserving init for ReLU layers under which plain deep nets shatter their gradients
    and unscaled residual nets grow their activations (PyTorch's default Linear init is smaller)."""
    for block in model.blocks:
        w = block.linear.weight if isinstance(block, PlainBlock) else block.weight
        b = block.linear.bias if isinstance(block, PlainBlock) else block.bias
        with torch.no_grad():
            nn.init.kaiming_normal_(w, nonlinearity="relu")
            if b is not None:
                b.zero_()
    return model


def load_digits(device):
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    split = int(0.8 * len(x))
    tr, te = perm[:split], perm[split:]
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


def block_of(model, i):
    return model.blocks[i]


def layer_grad_norms(model, x, y):
    """|dL/dW| of every block's weight at initialisation, input layer first."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    norms = []
    for block in model.blocks:
        w = block.linear.weight if isinstance(block, PlainBlock) else block.weight
        norms.append(w.grad.norm().item())
    model.zero_grad()
    return norms


def activation_variance(model, x):
    import fusedres.diagnostics as diag

    types = diag.BLOCK_TYPES + (PlainBlock,)
    with torch.no_grad(), diag.record(model, types) as rec:
        model(x)
    return rec.output_variance


def gradient_autocorrelation(model, xa, xb, points=256, max_lag=32):
    """Mean cosine similarity of d(logit sum)/dx between inputs ``lag`` steps apart on the segment
    from ``xa`` to ``xb``: 1 means smooth gradients, near 0 means shattered."""
    t = torch.linspace(0, 1, points, device=xa.device)[:, None]
    path = (xa[None] + t * (xb - xa)[None]).requires_grad_()
    out = model(path)
    (g,) = torch.autograd.grad(out[:, 0].sum(), path)
    g = g - g.mean(0, keepdim=True)
    g = g / (g.norm(dim=1, keepdim=True) + 1e-12)
    return [1.0] + [(g[:-lag] * g[lag:]).sum(1).mean().item() for lag in range(1, max_lag + 1)]


def train(model, data, steps, lr):
    xtr, ytr, xte, yte = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (128,), generator=gen).to(xtr.device)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() if math.isfinite(loss.item()) else float("nan"))
    return losses, accuracy(model, xte, yte)


def accuracy(model, x, y) -> float:
    """Test accuracy in eval mode (stochastic depth off); the model is left in training mode."""
    model.eval()
    try:
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()
    finally:
        model.train()


def accuracy_without(model, deleted, x, y) -> float:
    """Test accuracy with the blocks whose indices are in ``deleted`` replaced by the identity."""
    blocks = model.blocks
    model.blocks = nn.Sequential(*[nn.Identity() if i in deleted else b for i, b in enumerate(blocks)])
    try:
        return accuracy(model, x, y)
    finally:
        model.blocks = blocks


def lesion_study(model, x, y, draws: int, seed: int = 2) -> dict:
    """Delete blocks of a trained network at test time. ``single_delta[i]``: the change in test
    accuracy when block i alone is deleted. ``acc_vs_k[k-1]``: the mean test accuracy (and
    ``std_vs_k``, over ``draws`` random draws of k distinct blocks) with k blocks deleted,
    k = 1 .. depth // 2. ``k = 0`` is ``base_acc``."""
    depth = len(model.blocks)
    base = accuracy(model, x, y)
    single = [accuracy_without(model, {i}, x, y) - base for i in range(depth)]
    gen = torch.Generator().manual_seed(seed)
    ks = list(range(1, depth // 2 + 1))
    mean, std = [], []
    for k in ks:
        accs = torch.tensor([accuracy_without(model, set(torch.randperm(depth, generator=gen)[:k].tolist()), x, y)
                             for _ in range(draws)])
        mean.append(accs.mean().item())
        std.append(accs.std().item() if draws > 1 else 0.0)
    return {"base_acc": base, "single_delta": single, "k": ks, "acc_vs_k": mean, "std_vs_k": std}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fused", action="store_true", help="fused kernels instead of eager blocks")
    p.add_argument("--init", choices=["he", "default"], default="he",
                   help="block weight init: He (variance preserving, default) or nn.Linear's default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).with_name("results")))
    p.add_argument("--points", type=int, default=256, help="inputs on the path for the autocorrelation")
    p.add_argument("--drop-path", type=float, default=0.5,
                   help="stochastic-depth kind: the last block's drop rate (linear from 0 over depth)")
    p.add_argument("--lesion-draws", type=int, default=10, help="random draws per k in the lesion study")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: depths 2 and 4, 5 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.depths, args.steps, args.dim, args.points, args.lesion_draws = [2, 4], 5, 16, 64, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_digits(args.device)
    xtr, ytr = data[0], data[1]
    rows, curves, grads, variances, autocorr, lesion = [], {}, {}, {}, {}, {}
    start = time.time()
    for depth in args.depths:
        for kind in args.kinds:
            torch.manual_seed(0)
            model = build(kind, depth, args.dim, args.fused, args.drop_path).to(args.device)
            if args.init == "he":
                he_init(model)
            name = f"{kind} L={depth}"
            # the diagnostics at initialisation in eval mode: stochastic depth's random drops
            # would make each point of the autocorrelation path a different sub-network. BatchNorm
            # is measured as it trains, on batch statistics, on a copy (its running statistics stay
            # untouched); its autocorrelation path in eval mode (two inputs are no batch).
            model.eval()
            probe = model
            if kind == "full-preact-bn":
                import copy
                probe = copy.deepcopy(model).train()
            grads[name] = layer_grad_norms(probe, xtr[:512], ytr[:512])
            variances[name] = activation_variance(probe, xtr[:512])
            autocorr[name] = gradient_autocorrelation(model, xtr[0], xtr[1], points=args.points)
            model.train()
            losses, acc = train(model, data, args.steps, args.lr)
            curves[name] = losses
            lesion[name] = lesion_study(model, data[2], data[3], args.lesion_draws)
            tail = [v for v in losses[-20:] if math.isfinite(v)]
            rows.append({
                "model": kind, "depth": depth,
                "final_loss": sum(tail) / len(tail) if tail else float("nan"),
                "test_acc": acc,
                "grad_norm_first_over_last": (grads[name][0] / grads[name][-1]) if grads[name][-1] > 0 else float("nan"),
                "last_block_variance": variances[name][-1],
                "grad_autocorr_lag1": autocorr[name][1],
                "grad_autocorr_mean_lag1_16": sum(autocorr[name][1:17]) / 16,
            })
            les = lesion[name]
            print(f"{name:26s} loss {rows[-1]['final_loss']:.4f}  acc {acc:.3f}  "
                  f"var[last] {variances[name][-1]:.3g}  autocorr[1..16] {rows[-1]['grad_autocorr_mean_lag1_16']:.3f}  "
                  f"lesion: mean single {sum(les['single_delta']) / depth:+.3f}, "
                  f"k={les['k'][-1]} {les['acc_vs_k'][-1]:.3f}  ({time.time() - start:.0f}s)", flush=True)
    print(f"total {time.time() - start:.1f}s")

    table = ["| model | depth | final loss | test acc | grad norm first/last | last-block variance | "
             "grad autocorr (lag 1) | grad autocorr (mean, lags 1-16) |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['depth']} | {r['final_loss']:.4f} | {r['test_acc']:.3f} | "
              f"{r['grad_norm_first_over_last']:.3g} | {r['last_block_variance']:.3g} | "
              f"{r['grad_autocorr_lag1']:.3f} | {r['grad_autocorr_mean_lag1_16']:.3f} |" for r in rows]
    lesion_md = lesion_tables(args.depths, lesion)
    (out / "depth.md").write_text("\n".join(table) + "\n\n" + lesion_md)
    (out / "depth.json").write_text(json.dumps({"rows": rows, "curves": curves, "grad_norms": grads,
                                                "variances": variances, "autocorr": autocorr, "lesion": lesion,
                                                "args": vars(args), "wall_s": time.time() - start}, indent=1))
    print("\n".join(table))
    print(lesion_md)
    plot(out, args.depths, curves, grads, variances, autocorr)
    plot_lesion(out / "lesion", args.depths, lesion)
    return rows


def lesion_tables(depths, lesion) -> str:
    """Markdown: a summary per network, then per depth the accuracy change per deleted block and
    the accuracy with k random blocks deleted."""
    lines = ["Lesion study: test accuracy of the trained networks with blocks deleted (replaced by the identity).",
             "",
             "| model | depth | test acc | mean change, one block deleted | worst change, one block deleted | "
             "acc, depth/4 random deleted | acc, depth/2 random deleted |",
             "|---|---|---|---|---|---|---|"]
    for name, les in lesion.items():
        kind, depth = name.split(" L=")
        depth = int(depth)
        single = les["single_delta"]
        quarter = les["acc_vs_k"][max(depth // 4, 1) - 1] if les["k"] else float("nan")
        half = les["acc_vs_k"][-1] if les["k"] else float("nan")
        lines.append(f"| {kind} | {depth} | {les['base_acc']:.3f} | {sum(single) / len(single):+.3f} | "
                     f"{min(single):+.3f} | {quarter:.3f} | {half:.3f} |")
    for depth in depths:
        names = [n for n in lesion if n.endswith(f" L={depth}")]
        if not names:
            continue
        kinds = [n.split(" L=")[0] for n in names]
        lines += ["", f"Depth {depth}: test-accuracy change when block i alone is deleted.", "",
                  "| block | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        lines += [f"| {i} | " + " | ".join(f"{lesion[n]['single_delta'][i]:+.3f}" for n in names) + " |"
                  for i in range(depth)]
        lines += ["", f"Depth {depth}: test accuracy with k random blocks deleted (mean over draws; k = 0 is the "
                      "intact network).", "",
                  "| k | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|",
                  "| 0 | " + " | ".join(f"{lesion[n]['base_acc']:.3f}" for n in names) + " |"]
        lines += [f"| {k} | " + " | ".join(f"{lesion[n]['acc_vs_k'][k - 1]:.3f}" for n in names) + " |"
                  for k in lesion[names[0]]["k"]]
    return "\n".join(lines) + "\n"


def plot_lesion(out, depths, lesion):
    """One PNG: per depth, the accuracy change per deleted block (top) and the accuracy against
    the number of random blocks deleted (bottom), one line per network kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, len(depths), figsize=(5 * len(depths), 8), squeeze=False)
    for col, depth in enumerate(depths):
        top, bottom = axes[0][col], axes[1][col]
        for name, les in lesion.items():
            if not name.endswith(f" L={depth}"):
                continue
            label = name.split(" ")[0]
            top.plot(range(depth), les["single_delta"], marker=".", label=label)
            ks = [0] + les["k"]
            mean = [les["base_acc"]] + les["acc_vs_k"]
            std = [0.0] + les["std_vs_k"]
            line, = bottom.plot(ks, mean, marker=".", label=label)
            bottom.fill_between(ks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15)
        top.axhline(0.0, color="grey", lw=0.5)
        top.set_title(f"one block deleted, depth {depth}")
        top.set_xlabel("deleted block")
        top.set_ylabel("test accuracy change")
        top.legend(fontsize=8)
        bottom.set_title(f"k random blocks deleted, depth {depth}")
        bottom.set_xlabel("k")
        bottom.set_ylabel("test accuracy (mean +- std over draws)")
        bottom.set_ylim(0, 1)
        bottom.legend(fontsize=8)
        for ax in (top, bottom):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "depth_lesion.png", dpi=90)
    plt.close(fig)


def plot(out, depths, curves, grads, variances, autocorr):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss curves", "step", "training loss", curves, True),
              ("gradient norm per block at init", "block", "|dL/dW|", grads, True),
              ("activation variance per block at init", "block", "variance", variances, True),
              ("input-gradient autocorrelation at init", "lag", "mean cosine", autocorr, False)]
    for title, xlabel, ylabel, series, logy in panels:
        fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 4), squeeze=False)
        for ax, depth in zip(axes[0], depths):
            for name, values in series.items():
                if name.endswith(f"L={depth}"):
                    ax.plot(values, label=name.split(" ")[0])
            ax.set_title(f"{title}, depth {depth}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if logy:
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"depth_{title.split(' ')[0].replace('-', '_')}_{xlabel}.png", dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    main()
