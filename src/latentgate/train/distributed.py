"""Data-parallel training across processes (`torchrun` or `accelerate launch`: both set RANK / WORLD_SIZE).

Every rank holds the same modules and takes its shard of the same global batch. Gradients are averaged with one
all-reduce per parameter before clipping, so every rank takes the same step. Only rank 0 talks to MLflow and writes
checkpoints and diagnostics; the other ranks never touch a store. Logged scalars are averaged across ranks first.
Checkpoints carry no per-rank state, so a checkpoint written by N processes resumes in M.
"""

from __future__ import annotations

import os

import torch


def init_from_env() -> bool:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: list[int], rank: int, size: int) -> list[int]:
    return indices[rank::size]


def average_gradients(params, size: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(size)


def mean_scalars(values: dict[str, float], size: int) -> dict[str, float]:
    """Average a dict of floats across ranks (same keys on every rank)."""
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / size for k, v in zip(keys, t.tolist())}


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
