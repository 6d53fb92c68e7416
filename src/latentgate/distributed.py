"""Data-parallel training across processes (`torchrun` or `accelerate launch`: both set RANK / WORLD_SIZE).

Every rank holds the same modules and takes its shard of the same global batch. Gradients are averaged before
clipping, flattened into buckets (one all-reduce each, on the gradients' device), so every rank takes the same
step. Logged scalars are averaged across
ranks first. Checkpoints carry no per-rank state, so a checkpoint written by N processes resumes in M.

Only rank 0 writes: MLflow runs, metrics, artifacts, registry versions, checkpoints, output folders. The phases
run the same code on every rank; what only rank 0 may do goes through `main_only(fn)`, which runs fn on rank 0
alone and hands its result (or its error) to the others. Other ranks may read the store (download a checkpoint
or a base LM by URI), never write it.

Ranks agree: a rank that stops alone leaves the others blocked in their next collective. So the trainer meets the
other ranks at every optimizer step (`agree`, before the gradient all-reduce): an error on any rank (a non-finite
loss, a sweep's prune raised by rank 0's probe hook, anything else) and a stop signal received by any rank reach
every rank there, and all of them stop together with one exit code.

Each rank computes on its own GPU, cuda:LOCAL_RANK (`local_rank()`).
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

from latentgate.errors import LatentgateError, os_error_in_chain

TIMEOUT_ENV = "LATENTGATE_DIST_TIMEOUT_MIN"  # how long ranks wait for rank 0 (e.g. its base-LM training or eval)
_solo = 0  # > 0 while rank 0 runs a main_only section alone: nothing inside may call a collective
BUCKET_BYTES = 256 * 2**20  # gradients flattened per all-reduce; caps the extra memory of the flat copy


class RankFailed(LatentgateError):
    """Raised on the other ranks when one rank failed (rank 0 inside main_only, or any rank during training): they
    stop with that rank's exit code, and stay silent (the failed rank prints the one line)."""

    quiet = True

    def __init__(self, kind: str, message: str, exit_code: int, rank: int = 0):
        super().__init__(f"rank {rank} failed: {kind}: {message}")
        self.exit_code = exit_code
        self.rank = rank


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's index on its machine (LOCAL_RANK, set by torchrun / accelerate launch): its GPU is
    cuda:local_rank(). 0 when not launched."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def init_from_env() -> bool:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    if not launched():
        return False
    import torch  # lazy: torch-free checkpoint verify
    import torch.distributed as dist  # lazy: torch-free checkpoint verify

    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is imported (transformers
    # imports it through torch.distributed.fsdp while loading a tokenizer). Imported after the group exists, those
    # defaults keep it alive past destroy_process_group: its gloo threads then outlive the interpreter, and one that
    # frees a finished broadcast at exit aborts the process ("terminate called without an active exception").
    # Imported now, while WORLD is None, they hold nothing. tests/test_distributed.py checks the threads are gone.
    import torch.distributed.nn.functional  # noqa: F401 - lazy: torch-free checkpoint verify
    timeout = datetime.timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "120")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    atexit.register(_leave)
    return True


def _leave() -> None:
    import torch.distributed as dist  # lazy: torch-free checkpoint verify

    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed (torch is not even imported then)."""
    if not launched():
        return 0, 1
    import torch.distributed as dist  # lazy: torch-free checkpoint verify

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective() -> bool:
    """Several ranks take part in what runs now (False inside a main_only section: rank 0 is alone there)."""
    return world()[1] > 1 and _solo == 0


def active_world() -> tuple[int, int]:
    """(rank, size) of the ranks taking part in what runs now: (0, 1) inside a main_only section."""
    return world() if collective() else (0, 1)


def owns_store() -> bool:
    """Whether this process may write to the tracking store and the output folders now."""
    return active_world()[0] == 0


def broadcast(obj):
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not collective():
        return obj
    import torch.distributed as dist  # lazy: torch-free checkpoint verify

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_only(fn):
    """Run fn() on rank 0 alone and return its result on every rank. An error on rank 0 is raised there and, as
    RankFailed, on the others, so no rank waits forever for a result that will not come."""
    global _solo
    if not collective():
        return fn()
    if world()[0] != 0:
        outcome = broadcast(None)
        if outcome[0] == "error":
            raise RankFailed(*outcome[1:])
        return outcome[1]
    _solo += 1
    try:
        outcome = ("ok", fn())
    except BaseException as err:
        outcome = ("error", type(err).__name__, str(err), int(getattr(err, "exit_code", 1)))
        raise
    finally:
        _solo -= 1
        broadcast(outcome)
    return outcome[1]


def exit_code_of(err: BaseException) -> int:
    """The exit code the CLI gives `err`: its own, the mapped OSError's (disk full: 2), else 1."""
    code = getattr(err, "exit_code", None)
    if code is None:
        mapped = os_error_in_chain(err)
        code = mapped.exit_code if mapped is not None else 1
    return max(1, int(code))


@dataclass(frozen=True)
class News:
    """What one rank brings to an agreement: the error it stopped on (None: none), the stop signal it received
    (0: none)."""

    failure: BaseException | None = None
    signum: int = 0


def agree(news: News) -> int:
    """Meet every other rank: each rank's failure and stop signal reach all ranks, in one all-reduce of a small
    [world, 2] tensor (each rank fills its own row: its failure's exit code, its signal; a SUM gathers them).

    When any rank failed, it raises on EVERY rank: a failed rank re-raises its own error; the others raise a quiet
    RankFailed with the kind, message and exit code of the first failed rank (its own line says the rest). Otherwise
    it returns the stop signal any rank received (0: none), so that every rank stops at the same step.

    Every rank of the group must call it at the same point. Alone (one process, or inside main_only), it raises
    this process's failure or returns its signal."""
    if not collective():
        if news.failure is not None:
            raise news.failure
        return news.signum
    import torch  # lazy: torch-free checkpoint verify
    import torch.distributed as dist  # lazy: torch-free checkpoint verify

    rank, size = world()
    rows = torch.zeros(size, 2, dtype=torch.int64, device=collective_device())
    rows[rank, 0] = exit_code_of(news.failure) if news.failure is not None else 0
    rows[rank, 1] = news.signum
    dist.all_reduce(rows, op=dist.ReduceOp.SUM)
    codes, signals = rows[:, 0].tolist(), rows[:, 1].tolist()
    failed = [r for r, code in enumerate(codes) if code]
    if not failed:
        return max(signals)
    src = failed[0]
    box = [(type(news.failure).__name__, str(news.failure)) if rank == src else None]
    dist.broadcast_object_list(box, src=src)
    if news.failure is not None:
        raise news.failure
    kind, message = box[0]
    raise RankFailed(kind, message, codes[src], rank=src)


def shard(indices: list[int], rank: int, size: int) -> list[int]:
    return indices[rank::size]


def grad_buckets(grads, cap_bytes: int = BUCKET_BYTES) -> list[list]:
    """Consecutive gradients grouped for one all-reduce each: same device and dtype (a flat buffer has one of each),
    at most `cap_bytes` per bucket (the flat copy costs that much memory) unless one gradient alone is larger."""
    buckets: list[list] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        last = buckets[-1] if buckets else None
        if last is None or (last[0].device, last[0].dtype) != (g.device, g.dtype) or size + nbytes > cap_bytes:
            buckets.append([g])
            size = nbytes
        else:
            last.append(g)
            size += nbytes
    return buckets


def average_gradients(params, size: int, cap_bytes: int = BUCKET_BYTES) -> None:
    """Average gradients across ranks, one all-reduce per bucket of flattened gradients on their own device (as
    DDP does): a per-parameter all-reduce costs one round trip each. Every rank must hold the same gradients (same
    parameters with a grad, same shapes), as with the per-parameter loop."""
    import torch.distributed as dist  # lazy: torch-free checkpoint verify
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors  # lazy: torch-free checkpoint verify

    for bucket in grad_buckets([p.grad for p in params if p.grad is not None], cap_bytes):
        if len(bucket) == 1:  # nothing to flatten: reduce in place, no copy
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM)
            bucket[0].div_(size)
            continue
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(size)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


def collective_device():
    """Where a tensor must live to be reduced by this process group: nccl reduces CUDA tensors only (a CPU tensor
    raises), gloo CPU ones."""
    import torch  # lazy: torch-free checkpoint verify
    import torch.distributed as dist  # lazy: torch-free checkpoint verify

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_scalars(values: dict[str, float], size: int) -> dict[str, float]:
    """Average a dict of floats across ranks (same keys on every rank)."""
    import torch  # lazy: torch-free checkpoint verify
    import torch.distributed as dist  # lazy: torch-free checkpoint verify

    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device())  # nccl has fp64
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / size for k, v in zip(keys, t.tolist())}


def barrier() -> None:
    import torch.distributed as dist  # lazy: torch-free checkpoint verify

    if collective():
        dist.barrier()
