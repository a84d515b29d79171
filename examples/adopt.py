"""Adopt a model nobody here wrote: rtdl-revisiting-models' ResNet, fused by ``fusedres.fuse``.

Trains rtdl's ``ResNet`` with its README settings (``n_blocks=2, d_block=192,
d_hidden_multiplier=2.0, dropout1=0.15, dropout2=0.0``) on scikit-learn's bundled diabetes
regression set (442 rows, 10 features; shipped inside the package, no download), twice from the
same initialisation and seed: the model as rtdl wrote it (eager) and ``fusedres.fuse(model)``.
Prints the fuse report, both loss curves side by side, and the bytes one fused training step
moves through its kernels (``fusedres.traffic.InterpreterTraffic``, measured under Triton's
interpreter on the CPU; skipped on a GPU).

    TRITON_INTERPRET=1 python examples/adopt.py                  # CPU, the kernels interpreted
    TRITON_INTERPRET=1 python examples/adopt.py --dropout1 0     # every block fused today
    python examples/adopt.py --device cuda

``dropout1 > 0`` fuses once ``fused_residual_mlp`` takes ``hidden_dropout=`` (the report says so
until then, and those blocks run as rtdl wrote them). Results: docs/integration.md.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dropout1", type=float, default=0.15)
    ap.add_argument("--d-block", type=int, default=192)
    ap.add_argument("--n-blocks", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import rtdl_revisiting_models as rtdl
    from sklearn.datasets import load_diabetes

    import fusedres

    X, y = load_diabetes(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32, device=args.device)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32, device=args.device)[:, None]
    torch.manual_seed(0)
    eager = rtdl.ResNet(d_in=X.shape[1], d_out=1, n_blocks=args.n_blocks, d_block=args.d_block,
                        d_hidden_multiplier=2.0, dropout1=args.dropout1, dropout2=0.0).to(args.device)
    fused, report = fusedres.fuse(copy.deepcopy(eager), report=True)
    print(report, "\n")

    runs = {}
    for name, model in (("eager", eager), ("fused", fused)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
        torch.manual_seed(1)
        losses, start = [], time.perf_counter()
        for _ in range(args.epochs):
            model.train()
            for idx in torch.randperm(len(X), device=args.device).split(args.batch):
                opt.zero_grad()
                F.mse_loss(model(X[idx]), y[idx]).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                losses.append(F.mse_loss(model(X), y).item())
        runs[name] = (losses, time.perf_counter() - start)
    print("epoch  eager MSE   fused MSE   |diff|")
    for i, (a, b) in enumerate(zip(runs["eager"][0], runs["fused"][0])):
        print(f"{i + 1:5d}  {a:9.6f}  {b:9.6f}  {abs(a - b):.2e}")
    print(f"time: eager {runs['eager'][1]:.1f} s, fused {runs['fused'][1]:.1f} s "
          f"({'interpreted kernels' if args.device == 'cpu' else args.device})")

    from fusedres import kernels
    if args.device == "cpu" and kernels.INTERPRET:
        from fusedres.traffic import InterpreterTraffic
        fused.train()
        with InterpreterTraffic(track_unique=False) as traffic:
            F.mse_loss(fused(X[:args.batch]), y[:args.batch]).backward()
        print(f"\none fused training step (batch {args.batch}): {traffic.bytes_read()} bytes read, "
              f"{traffic.bytes_written()} written by {len(traffic.select())} kernel launches")


if __name__ == "__main__":
    main()
