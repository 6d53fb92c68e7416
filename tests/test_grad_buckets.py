"""`average_gradients` all-reduces flattened buckets of gradients instead of one parameter at a time: in 2 real
gloo processes the result equals the per-parameter average bit for bit, and `mean_scalars` reduces on the device
the backend needs (CPU for gloo here; CUDA for nccl in 2 processes on 2 GPUs, under the gpu marker). `agree` hands
every rank's signal and failure to all ranks."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from latentgate import distributed as D

SHAPES = [(3, 4), (5,), (2, 2, 2), (7,), (1,)]


def _params(rank: int) -> list[torch.nn.Parameter]:
    """Float32 and float64 parameters with rank-specific gradients, and one without a gradient."""
    gen = torch.Generator().manual_seed(100 + rank)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    params += [torch.nn.Parameter(torch.zeros(6, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(4))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return params + [torch.nn.Parameter(torch.zeros(3))]  # no grad: left alone


def _worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        reference, bucketed = _params(rank), _params(rank)
        for p in reference:  # what average_gradients did before: one all-reduce per parameter
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(2)
        D.average_gradients(bucketed, 2, cap_bytes=64)  # a small cap: several buckets, one of a single gradient
        scalars = D.mean_scalars({"loss": 1.0 + rank, "acc": 0.25 * rank}, 2)
        torch.save({"reference": [p.grad for p in reference], "bucketed": [p.grad for p in bucketed],
                    "scalars": scalars, "device": str(D.collective_device())}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bucketed_average_equals_per_parameter_average_in_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    mine = [_params(r) for r in (0, 1)]
    for res in ranks:
        assert len(res["bucketed"]) == len(res["reference"]) == len(SHAPES) + 3
        for i, (got, want) in enumerate(zip(res["bucketed"][:-1], res["reference"][:-1])):
            assert torch.equal(got, want), i
            assert got.dtype == want.dtype and torch.allclose(got, (mine[0][i].grad + mine[1][i].grad) / 2)
        assert res["bucketed"][-1] is None
        assert res["scalars"] == {"acc": 0.125, "loss": 1.5}
        assert res["device"] == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["bucketed"][:-1], ranks[1]["bucketed"][:-1]))


def test_buckets_keep_order_split_by_dtype_and_respect_the_cap():
    grads = [p.grad for p in _params(0) if p.grad is not None]
    buckets = D.grad_buckets(grads, cap_bytes=64)
    assert [g for b in buckets for g in b] == grads  # same tensors, same order
    assert [[tuple(g.shape) for g in b] for b in buckets] == [[(3, 4)], [(5,), (2, 2, 2)], [(7,), (1,)], [(6,)], [(4,)]]
    for b in buckets:
        assert len({(g.dtype, g.device) for g in b}) == 1
        assert len(b) == 1 or sum(g.numel() * g.element_size() for g in b) <= 64
    assert [len(b) for b in D.grad_buckets(grads)] == [5, 1, 1]  # default cap: only dtype changes split
    assert D.grad_buckets([]) == []


def test_flatten_unflatten_round_trip_restores_every_gradient():
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [torch.randn(s) for s in SHAPES]
    flat = _flatten_dense_tensors(grads)
    assert flat.shape == (sum(g.numel() for g in grads),)
    assert all(torch.equal(a, b) for a, b in zip(_unflatten_dense_tensors(flat, grads), grads))


def _agree_worker(rank: int, init: str, out: str, backend: str) -> None:
    """`agree` at three step boundaries: nothing to report; a signal on rank 1; a failure on rank 1 (a non-finite
    loss) while rank 0 is fine. What each rank got back is saved for the test."""
    import os

    import torch.distributed as dist

    from latentgate.errors import TrainingFault

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))  # what torchrun sets
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=2)
    try:
        got = {"quiet": D.agree(D.News()), "signal": D.agree(D.News(signum=15 if rank == 1 else 0))}
        fault = TrainingFault("stage_a: non-finite loss at optimizer step 3", "lower the learning rate")
        try:
            D.agree(D.News(failure=fault if rank == 1 else None))
        except Exception as err:  # noqa: BLE001 - what each rank raised is the result
            got["raised"] = {"kind": type(err).__name__, "message": str(err), "exit_code": D.exit_code_of(err),
                             "quiet": bool(getattr(err, "quiet", False))}
        got["device"] = str(D.collective_device())
        torch.save(got, f"{out}/agree{rank}.pt")
    finally:
        dist.destroy_process_group()


def _check_agreement(tmp_path, backend: str) -> None:
    got = [torch.load(tmp_path / f"agree{r}.pt", weights_only=True) for r in (0, 1)]
    for rank, g in enumerate(got):
        assert (g["quiet"], g["signal"]) == (0, 15)  # rank 1's signal reached rank 0 too
        assert g["raised"]["exit_code"] == 3  # one exit code on both ranks
        assert g["device"] == ("cpu" if backend == "gloo" else f"cuda:{rank}")
    assert got[1]["raised"]["kind"] == "TrainingFault" and not got[1]["raised"]["quiet"]
    assert got[0]["raised"] == {"kind": "RankFailed", "quiet": True, "exit_code": 3,
                                "message": "rank 1 failed: TrainingFault: stage_a: non-finite loss at optimizer step 3 "
                                           "(fix: lower the learning rate)"}


def test_ranks_agree_on_signals_and_failures_in_two_gloo_processes(tmp_path):
    mp.spawn(_agree_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path), "gloo"), nprocs=2, join=True)
    _check_agreement(tmp_path, "gloo")


def _nccl_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(p.detach().cuda()) for p in _params(rank)]
        for p, cpu in zip(params, _params(rank)):
            p.grad = None if cpu.grad is None else cpu.grad.cuda()
        D.average_gradients(params, 2, cap_bytes=64)  # several buckets, float32 and float64, on the GPU
        scalars = D.mean_scalars({"loss": 1.0 + rank, "acc": 0.25 * rank}, 2)
        on = [str(p.grad.device) for p in params if p.grad is not None]
        torch.save({"grads": [None if p.grad is None else p.grad.cpu() for p in params], "scalars": scalars,
                    "device": str(D.collective_device()), "on": on}, f"{out}/nccl{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a 2-process nccl group needs 2 CUDA devices")
def test_nccl_group_reduces_cuda_gradients_and_scalars(tmp_path):
    """Two processes, one GPU each: gradients and scalars are averaged across them on the GPU (the old
    mean_scalars put a CPU tensor in an nccl all-reduce and raised), and `agree` works there too."""
    mp.spawn(_nccl_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"nccl{r}.pt", weights_only=True) for r in (0, 1)]
    mine = [_params(r) for r in (0, 1)]
    for rank, res in enumerate(ranks):
        assert res["device"] == f"cuda:{rank}" and set(res["on"]) == {f"cuda:{rank}"}
        assert res["scalars"] == {"acc": 0.125, "loss": 1.5}
        for i, got in enumerate(res["grads"][:-1]):
            want = (mine[0][i].grad + mine[1][i].grad) / 2
            assert got.dtype == want.dtype and torch.allclose(got, want), i
        assert res["grads"][-1] is None
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["grads"][:-1], ranks[1]["grads"][:-1]))
    mp.spawn(_agree_worker, args=(f"file://{tmp_path / 'rendezvous2'}", str(tmp_path), "nccl"), nprocs=2, join=True)
    _check_agreement(tmp_path, "nccl")
