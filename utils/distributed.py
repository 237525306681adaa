"""Data-parallel pretraining helpers: torchrun setup, a gather that keeps the gradient.

`torchrun --nproc_per_node=K pretrain_main.py ...` sets WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 `setup` joins the process group (NCCL
on CUDA, gloo on CPU). Everything here is a no-op for a single process.
"""
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from utils.errors import UserError


# how long a collective waits for the other processes: the other ranks wait in a barrier while
# rank 0 downloads a scene and computes its SLIC superpixels (rank0_first), longer than NCCL's
# default of 10 minutes on a slow connection
GROUP_TIMEOUT = timedelta(hours=1)


def world_from_env():
    """(rank, local rank, world size) from torchrun's variables; (0, 0, 1) without them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    return rank, local, max(world, 1)


def setup(device):
    """Join the process group when WORLD_SIZE > 1; returns (rank, world, device).

    device: the device picked for a single process; under torchrun a CUDA device becomes
    cuda:LOCAL_RANK (one GPU per process).
    """
    rank, local, world = world_from_env()
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=GROUP_TIMEOUT)
    return rank, world, device


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def rank0_first(world):
    """Rank 0 runs the block first (downloads, cache writes), then the others (cache hits)."""
    rank = dist.get_rank() if world > 1 else 0
    if rank > 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0; backward sums the gradients of every rank and keeps this rank's rows.

    Each rank's loss reads every rank's rows, so the gradient of the sum of all ranks'
    losses with respect to this rank's rows is the sum over ranks of the gradients of
    the gathered tensor (an all-reduce), restricted to those rows.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x, world):
    """(n, ...) of each rank -> (world * n, ...), rank 0's rows first, with gradient; x itself if world == 1."""
    return x if world == 1 else _GatherRows.apply(x)


def mean_over_ranks(values, world):
    """Average a list of floats over the ranks (one all-reduce); the list itself if world == 1."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / world).tolist()
