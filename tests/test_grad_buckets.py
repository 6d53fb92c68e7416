"""`average_gradients` all-reduces flattened buckets of gradients instead of one parameter at a time: in 2 real
gloo processes the result equals the per-parameter average bit for bit, and `mean_scalars` reduces on the device
the backend needs (CPU for gloo here; CUDA for nccl, checked under the gpu marker)."""

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for an nccl group")
def test_nccl_group_reduces_cuda_gradients_and_scalars(tmp_path):
    """A one-process nccl group: the old mean_scalars (a CPU tensor) raised here."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert D.collective_device() == torch.device("cuda", 0)
        params = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in SHAPES]
        for p in params:
            p.grad = torch.ones_like(p)
        D.average_gradients(params, 1)
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
        assert D.mean_scalars({"loss": 2.0, "acc": 0.5}, 1) == {"acc": 0.5, "loss": 2.0}
    finally:
        dist.destroy_process_group()
