"""The smollm2 preset's memory settings (issue #25: a 30 + 30-step SmolLM2 smoke on SQuAD-length contexts under 4 GiB
of RSS on a CPU, its text-teacher eval under 2 GiB). The figures behind them: docs/results.md, SmolLM2 section."""

from __future__ import annotations

from latentgate.config import resolve


def test_smollm2_trains_checkpointed_micro_batches_of_4_two_per_update():
    """Checkpointing alone left one Stage B step on the longest SQuAD-length batch of 8 at 4.46 GiB of RSS; micro-
    batches of 4 held 2.66 GiB. Each optimizer step still sees 8 examples, so the recipe's compute is unchanged."""
    cfg = resolve("smollm2")
    assert cfg.base.gradient_checkpointing
    for stage in (cfg.stage_a, cfg.stage_b):
        assert (stage.batch_size, stage.grad_accum) == (4, 2)
        assert stage.batch_size * stage.grad_accum == 8  # examples per optimizer update, as before the change


def test_smollm2_evaluates_in_batches_of_8():
    """Batch 8 held the text-teacher eval on 100 SQuAD-length questions at 1.6 GiB (batch 50: 3.4-4.8 GiB)."""
    assert resolve("smollm2").eval.batch_size == 8
