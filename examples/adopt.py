"""Adopt a model nobody here wrote: rtdl-revisiting-models' ResNet, fused by ``fusedres.fuse``.

Trains rtdl's ``ResNet`` with its README settings (``n_blocks=2, d_block=192,
d_hidden_multiplier=2.0, dropout1=0.15, dropout2=0.0``) on scikit-learn's bundled diabetes
regression set (442 rows, 10 features; shipped inside the package, no download), twice from the
same initialisation and seed: the model as rtdl wrote it (eager) and ``fusedres.fuse(model)``.
Prints the fuse report, both loss curves side by side, and the bytes one training step moves:
the fused step's through its kernels (each launch's distinct bytes, ``fusedres.traffic.InterpreterTraffic``,
measured under Triton's interpreter on the CPU) against the eager step's aten ops (``bench.counters``' dispatch
counter); skipped on a GPU.

    TRITON_INTERPRET=1 python examples/adopt.py                  # CPU, the kernels interpreted
    TRITON_INTERPRET=1 python examples/adopt.py --dropout1 0     # no dropout: the curves agree to rounding
    python examples/adopt.py --device cuda

With ``dropout1 > 0`` the fused blocks draw their own keep masks in the kernels (eager draws
torch's), so the two curves agree as two runs with different dropout masks do, not to rounding.
Results: docs/integration.md.
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
        from bench.counters import DispatchTraffic
        from fusedres.traffic import InterpreterTraffic
        # the fused step: its Triton kernels' bytes, plus every other aten op's (the input layer, the
        # head, the loss, the vector ops between launches), the fused blocks' custom ops excepted
        fused.train()
        with DispatchTraffic() as ops, InterpreterTraffic() as traffic:
            F.mse_loss(fused(X[:args.batch]), y[:args.batch]).backward()
        rest = [o for o in ops.ops if not o.op.startswith(("residual_", "norm_residual"))]
        # each launch's distinct bytes (a tile re-reading W hits in cache), as an aten op's tensors count once
        kernel_bytes = sum(lc.unique_bytes for lc in traffic.launches)
        print(f"\none training step, batch {args.batch}, bytes measured on this CPU:")
        print(f"  fused: {kernel_bytes + sum(o.bytes for o in rest):,} B ({kernel_bytes:,} B in "
              f"{len(traffic.launches)} kernel launches, the rest in {len(rest)} aten ops)")
        eager.train()
        with DispatchTraffic() as ops:
            F.mse_loss(eager(X[:args.batch]), y[:args.batch]).backward()
        print(f"  eager: {sum(o.bytes for o in ops.ops):,} B in {len(ops.ops)} aten ops")


if __name__ == "__main__":
    main()
