"""Worker for tests/test_distributed.py: trains a small ResidualMLP under DDP or FSDP2 on the
CPU (gloo), once with eager blocks and once with fused ones, from the same initial weights."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def train(model, rank, steps=6):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
    x = torch.randn(24, 8, generator=gen)
    target = torch.randn(24, 4, generator=gen)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        losses.append(reduced.item() / dist.get_world_size())
    return losses


def _as_on_a_gpu_machine():
    """Report CUDA as the accelerator, as a GPU machine does, so that anything relying on a
    default device (FSDP2's default mesh is the accelerator's) fails here as it would there."""
    if not torch.cuda.is_available():
        torch._C._get_accelerator = lambda: torch.device("cuda")


def main(rank, world, port, wrapper, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if os.environ.get("FUSEDRES_TEST_ACCELERATOR") == "cuda":
        _as_on_a_gpu_machine()
    try:
        import fusedres
        from fusedres import kernels

        assert fusedres.backend_for("cpu") == "triton", "workers must run the Triton kernels (interpreter)"
        results = {}
        for fused in (False, True):
            torch.manual_seed(0)
            model = fusedres.ResidualMLP(8, 32, 2, 4, fused=fused)
            if wrapper == "ddp":
                model = nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                # FSDP2's default mesh is the accelerator's (CUDA on a GPU machine): these ranks train on the CPU
                mesh = init_device_mesh("cpu", (world,))
                for block in model.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            results["fused" if fused else "eager"] = train(model, rank)
        results["launches"] = kernels.launch_counts()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        # Both ranks finish their collectives before either tears gloo down: a rank destroying the
        # group while the other still had work in flight aborted once in CI ("terminate called
        # without an active exception"), on a loaded 2-core machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    # Leave without running C++ static destructors: a gloo/torch background thread still joinable
    # at interpreter exit aborted a rank after its work was done and checked ("terminate called
    # without an active exception", twice in CI on a loaded 2-core machine, once after the barrier
    # above). An error in main() still exits non-zero through the traceback, before this line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
