"""The depth experiment: why residual blocks train and plain deep MLPs do not.

Trains plain MLPs and residual MLPs (fusedres.ResidualMLP) at depths 4, 16 and 64 on
scikit-learn's bundled digits (8x8 images, 10 classes; shipped inside the package, no download),
with and without residual scaling, and reports:

- training-loss curves;
- per-layer gradient norms at initialisation (vanishing/exploding with depth);
- forward activation variance per block at initialisation (growing with depth unless scaled);
- the autocorrelation of input gradients along a path between two inputs: plain deep networks
  "shatter" their gradients into white noise, residual networks keep them correlated;
- a results table (markdown and JSON).

    python examples/depth.py                   # eager blocks on the CPU, a few minutes
    python examples/depth.py --fused           # fused kernels (use on a GPU)
    python examples/depth.py --smoke           # seconds: a tiny run for the tests

Plots are PNG files in --out (default examples/results/).
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


def build(kind: str, depth: int, dim: int, fused: bool) -> nn.Module:
    import fusedres

    if kind == "plain":
        model = fusedres.ResidualMLP(64, dim, 0, 10, fused=False)
        model.blocks = nn.Sequential(*[PlainBlock(dim) for _ in range(depth)])
        return model
    alpha = {"residual": 1.0, "residual-scaled": 1.0 / math.sqrt(depth), "rezero": 0.0}[kind]
    return fusedres.ResidualMLP(64, dim, depth, 10, fused=fused, alpha=alpha, learnable_alpha=kind == "rezero")


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
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return losses, acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--kinds", nargs="+", default=["plain", "residual", "residual-scaled", "rezero"])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fused", action="store_true", help="fused kernels instead of eager blocks")
    p.add_argument("--init", choices=["he", "default"], default="he",
                   help="block weight init: He (variance preserving, default) or nn.Linear's default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).with_name("results")))
    p.add_argument("--points", type=int, default=256, help="inputs on the path for the autocorrelation")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: depths 2 and 4, 5 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.depths, args.steps, args.dim, args.points = [2, 4], 5, 16, 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_digits(args.device)
    xtr, ytr = data[0], data[1]
    rows, curves, grads, variances, autocorr = [], {}, {}, {}, {}
    start = time.time()
    for depth in args.depths:
        for kind in args.kinds:
            torch.manual_seed(0)
            model = build(kind, depth, args.dim, args.fused).to(args.device)
            if args.init == "he":
                he_init(model)
            name = f"{kind} L={depth}"
            grads[name] = layer_grad_norms(model, xtr[:512], ytr[:512])
            variances[name] = activation_variance(model, xtr[:512])
            autocorr[name] = gradient_autocorrelation(model, xtr[0], xtr[1], points=args.points)
            losses, acc = train(model, data, args.steps, args.lr)
            curves[name] = losses
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
            print(f"{name:26s} loss {rows[-1]['final_loss']:.4f}  acc {acc:.3f}  "
                  f"var[last] {variances[name][-1]:.3g}  autocorr[1..16] {rows[-1]['grad_autocorr_mean_lag1_16']:.3f}",
                  flush=True)
    print(f"total {time.time() - start:.1f}s")

    table = ["| model | depth | final loss | test acc | grad norm first/last | last-block variance | "
             "grad autocorr (lag 1) | grad autocorr (mean, lags 1-16) |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['depth']} | {r['final_loss']:.4f} | {r['test_acc']:.3f} | "
              f"{r['grad_norm_first_over_last']:.3g} | {r['last_block_variance']:.3g} | "
              f"{r['grad_autocorr_lag1']:.3f} | {r['grad_autocorr_mean_lag1_16']:.3f} |" for r in rows]
    (out / "depth.md").write_text("\n".join(table) + "\n")
    (out / "depth.json").write_text(json.dumps({"rows": rows, "curves": curves, "grad_norms": grads,
                                                "variances": variances, "autocorr": autocorr}, indent=1))
    print("\n".join(table))
    plot(out, args.depths, curves, grads, variances, autocorr)
    return rows


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
