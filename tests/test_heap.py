"""The CPU heap's freed pages go back to the OS (issue #25: a SmolLM2 smoke on SQuAD-length prompts under 4 GiB)."""

import dataclasses

import psutil
import pytest
import torch

from latentgate import heap

MiB = 2**20

pytestmark = pytest.mark.skipif(not heap.enabled("cpu"), reason="no glibc malloc_trim on this machine")


def test_release_hands_freed_heap_pages_back():
    """Blocks freed in the middle of the heap stay resident (glibc trims only the top) until `release`."""
    proc = psutil.Process()
    big = torch.ones(30 * MiB, dtype=torch.uint8)  # freed, it raises glibc's mmap threshold: 1 MiB blocks use the heap
    del big
    blocks = [torch.ones(MiB // 4) for _ in range(400)]  # 400 x 1 MiB from the heap
    kept = blocks[1::2]  # every other block stays: the freed ones are holes free() cannot trim from the top
    del blocks
    before = proc.memory_info().rss
    assert heap.release("cpu") is True
    after = proc.memory_info().rss
    assert before - after > 150 * MiB, (before / MiB, after / MiB)
    assert sum(int(b.sum()) for b in kept) == 200 * MiB // 4


def test_release_is_a_no_op_off_the_cpu():
    assert heap.enabled("cpu") and heap.enabled(torch.device("cpu"))
    assert not heap.enabled("cuda") and not heap.enabled(torch.device("cuda", 1)) and not heap.enabled("meta")
    assert heap.release("cuda:0") is False


def test_the_trainer_and_eval_release_after_each_micro_batch_probe_and_eval_batch(tiny_ws, tmp_path, monkeypatch):
    """Counted through the real `release` (a spy, not a stub): one call per micro-batch, one after each step's
    bookkeeping, one per eval batch."""
    from latentgate.eval.evaluate import evaluate  # lazy: conftest sets the environment before anything heavy
    from latentgate.tracking.tracker import NullTracker  # lazy: as above
    from latentgate.train.trainer import train_stage  # lazy: as above

    calls = []
    real = heap.release
    monkeypatch.setattr(heap, "release", lambda device: calls.append(str(device)) or real(device))
    ws = tiny_ws
    st = dataclasses.replace(ws.cfg.stage_a, steps=3, grad_accum=2, probe_every=2, warmup_steps=0)
    train_stage(ws, st, NullTracker(), tmp_path / "a", name="stage_a")
    assert calls == ["cpu"] * (3 * 2 + 3)
    calls.clear()
    examples = ws.splits["eval"][:5]
    evaluate(ws, examples, tmp_path / "eval", paths=["latent"], batch_size=2, progress_name=None)
    assert calls == ["cpu"] * 3  # batches of 2, 2 and 1
