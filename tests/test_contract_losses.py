"""The prefix contract and the losses: the checks that prevent lessons 1-4 (labels shifted twice, train/eval
layouts drifting, disagreeing token targets, misaligned KD)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentgate.model.contract import (
    IGNORE,
    answer_logits,
    build_latent_batch,
    build_text_batch,
    encode_answers,
    text_prompt,
)
from latentgate.train.losses import compute_losses


def _mixed(ws, n=6):
    """Examples with different answer lengths and context lengths."""
    ex = sorted(ws.splits["train"][:40], key=lambda e: (len(e.answer.split()), len(e.context)))
    picked = [ex[0], ex[-1], ex[len(ex) // 2], ex[1], ex[-2], ex[5]][:n]
    assert len({len(e.answer.split()) for e in picked}) > 1 and len({len(e.context) for e in picked}) > 1
    return picked


def _stage(ws, **kw):
    return dataclasses.replace(ws.cfg.stage_a, **kw)


def test_answers_have_no_bos_and_end_with_eos(tiny_ws):
    tok = tiny_ws.tokenizer
    ids = encode_answers(tiny_ws.contract, tok, ["paris", "37 years"])
    assert ids[0] == tok("paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all(tok.bos_token_id not in a for a in ids) and all(a[-1] == tok.eos_token_id for a in ids)


# word-level builtin, a byte-level BPE LM, and a SentencePiece one (BOS added by its tokenizer)
@pytest.mark.parametrize("ws_fixture", ["tiny_ws", "bpe_ws", "sp_ws"])
def test_tf_loss_equals_hf_labels_loss_latent_and_text(ws_fixture, request):
    ws = request.getfixturevalue(ws_fixture)
    ex = _mixed(ws)
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in ex])
    with torch.no_grad():
        lat = ws.latents(ex)
        for batch in (build_latent_batch(ws.contract, ws.embed, lat, answer_targets=answers),
                      build_text_batch(ws.contract, ws.tokenizer, ws.embed,
                                       [text_prompt(e.context, e.question) for e in ex], answers)):
            ours = compute_losses(answer_logits(ws.lm, batch), batch.answer_targets, batch.answer_mask,
                                  _stage(ws)).raw["tf"]
            hf = ws.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, labels=batch.labels).loss
            assert torch.allclose(ours, hf, atol=1e-5), (float(ours), float(hf))
            # every supervised label is an answer token (no prefix / pad / BOS position is supervised)
            assert int((batch.labels != IGNORE).sum()) == int(batch.answer_mask.sum())


def test_golden_layout_training_equals_generation(tiny_ws):
    ws = tiny_ws
    c = ws.contract
    m = ws.cfg.model.num_latents
    assert c.layout() == [("head", 1), ("latent", m), ("anchor", 2), ("answer", -1)]
    assert ws.tokenizer.decode(list(c.anchor_ids)) == "answer :"
    assert text_prompt("ctx .", "q ?") == "context : ctx . question : q ?"
    ex = _mixed(ws)
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in ex])
    with torch.no_grad():
        lat = ws.latents(ex)
        train = build_latent_batch(c, ws.embed, lat, answer_targets=answers)
        gen = build_latent_batch(c, ws.embed, lat)
        p = c.prefix_len
        assert gen.inputs_embeds.shape[1] == p == 1 + m + 2
        assert train.segments[:3] == gen.segments == [("head", 1), ("latent", m), ("anchor", 2)]
        assert torch.equal(train.inputs_embeds[:, :p], gen.inputs_embeds)
        assert (train.answer_pos[:, 0] == p - 1).all()
        # the first answer logits at training time are exactly the first generation step's logits
        from latentgate.eval.generate import greedy_generate

        g = greedy_generate(ws.lm, gen.inputs_embeds, gen.attention_mask, 3, c.stop_ids)
        t = answer_logits(ws.lm, train)[:, 0]
        assert torch.allclose(g.first_logits, t.float(), atol=1e-5)


def test_first_k_and_tf_targets_agree(tiny_ws):
    ws = tiny_ws
    ex = _mixed(ws)
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in ex])
    with torch.no_grad():
        batch = build_latent_batch(ws.contract, ws.embed, ws.latents(ex), answer_targets=answers)
        logits = answer_logits(ws.lm, batch)
    t_max = batch.answer_targets.shape[1]
    k1 = compute_losses(logits, batch.answer_targets, batch.answer_mask, _stage(ws, k=1))
    kall = compute_losses(logits, batch.answer_targets, batch.answer_mask, _stage(ws, k=t_max))
    assert torch.allclose(k1.raw["kce"], k1.raw["first"])  # K=1 is exactly the first-token loss
    assert torch.allclose(kall.raw["kce"], kall.raw["tf"])  # K>=T is exactly the teacher-forced loss
    first_words = [ws.tokenizer(e.answer, add_special_tokens=False)["input_ids"][0] for e in ex]
    assert batch.answer_targets[:, 0].tolist() == first_words  # the first target is the first answer WORD
    nll0 = torch.nn.functional.cross_entropy(logits[:, 0].float(), torch.tensor(first_words))
    assert torch.allclose(k1.raw["first"], nll0, atol=1e-6)


def test_kd_alignment_on_mixed_lengths(tiny_ws):
    """Teacher logits read through the index map on a right-padded batch equal each example run alone."""
    ws = tiny_ws
    ex = _mixed(ws)
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in ex])
    prompts = [text_prompt(e.context, e.question) for e in ex]
    with torch.no_grad():
        tb = build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers)
        batched = answer_logits(ws.lm, tb)
        for i in range(len(ex)):
            one = build_text_batch(ws.contract, ws.tokenizer, ws.embed, [prompts[i]], [answers[i]])
            alone = answer_logits(ws.lm, one)[0]
            n = len(answers[i])
            assert torch.allclose(batched[i, :n], alone[:n], atol=1e-4)
        # KD of the teacher against itself is zero; against a different student it is positive
        st = _stage(ws, kd_weight=1.0)
        same = compute_losses(batched, tb.answer_targets, tb.answer_mask, st, teacher_logits=batched)
        assert float(same.raw["kd"]) == pytest.approx(0.0, abs=1e-6)
        other = compute_losses(batched.roll(1, 0), tb.answer_targets, tb.answer_mask, st, teacher_logits=batched)
        assert float(other.raw["kd"]) > 0


def test_teacher_pass_runs_without_lora(tiny_ws):
    from latentgate.model.lora import attach_lora

    ws = tiny_ws
    ex = _mixed(ws, 3)
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in ex])
    prompts = [text_prompt(e.context, e.question) for e in ex]
    with torch.no_grad():
        tb = build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers)
        before = answer_logits(ws.lm, tb)
        ws.lm, counts = attach_lora(ws.lm, ws.cfg)
        for n, p in ws.lm.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
        student = answer_logits(ws.lm, tb)
        with ws.teacher():
            teacher = answer_logits(ws.lm, tb)
    assert counts["total"] > 0 and set(counts["per_layer"]) == set(range(ws.cfg.base.layers))
    assert torch.allclose(teacher, before, atol=1e-6)
    assert not torch.allclose(student, before, atol=1e-3)


def test_scheduled_sampling_mixes_predictions_by_schedule():
    from latentgate.train.losses import p_gold_at, scheduled_inputs

    assert p_gold_at(0, 100, 0.5) == 1.0 and p_gold_at(50, 100, 0.5) == 0.75 and p_gold_at(100, 100, 0.5) == 0.5
    gold = torch.arange(1, 401).reshape(20, 20)
    preds = -gold
    mask = torch.ones_like(gold, dtype=torch.bool)
    mask[:, 15:] = False
    g = torch.Generator().manual_seed(0)
    assert torch.equal(scheduled_inputs(preds, gold, mask, 1.0, g), gold)
    all_pred = scheduled_inputs(preds, gold, mask, 0.0, g)
    assert torch.equal(all_pred[:, :15], preds[:, :15]) and torch.equal(all_pred[:, 15:], gold[:, 15:])
    half = scheduled_inputs(preds, gold, mask, 0.5, g)[:, :15]
    share = float((half == gold[:, :15]).float().mean())
    assert 0.35 < share < 0.65


def test_scheduled_sampling_stage_trains(tiny_ws, tmp_path):
    """A Stage run with scheduled sampling: every loss term finite, p_gold annealed in the diagnostics, and the
    trainable modules really updated (the frozen LM not)."""
    import json
    import math

    from latentgate.tracking.tracker import NullTracker
    from latentgate.train.trainer import train_stage

    ws = tiny_ws
    ws.cfg.stage_a = dataclasses.replace(ws.cfg.stage_a, scheduled_sampling=True, p_gold_floor=0.5, steps=4,
                                         probe_every=4, warmup_steps=0)
    modules = {"encoder": ws.encoder, "adapter": ws.adapter, "lm": ws.lm}
    params = lambda: {(m, n): p for m, mod in modules.items() for n, p in mod.named_parameters()}  # noqa: E731
    before = {key: p.detach().clone() for key, p in params().items()}
    trainable = {key for key, p in params().items() if p.requires_grad}
    result = train_stage(ws, ws.cfg.stage_a, NullTracker(), tmp_path, name="stage_a")
    rows = [json.loads(x) for x in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["p_gold"] for r in rows] == [1.0, 0.875, 0.75, 0.625]
    assert result["steps"] == 4
    losses = [r[k] for r in rows for k in ("loss", "tf_raw", "first_raw", "kce_raw", "kd_raw", "grad_norm")]
    assert all(math.isfinite(v) for v in losses), losses
    after = params()
    assert {m for m, _ in trainable} == {"encoder", "adapter"}  # Stage A: the LM is frozen
    assert {key for key in trainable if not torch.equal(before[key], after[key])} == trainable
    assert all(torch.equal(before[key], p) for key, p in after.items() if key not in trainable)
    # the sampled tokens reach the LM: the same run with p_gold held at 1.0 (the same draws, every gold kept) matches
    # at step 0 (p_gold 1.0 in both) and differs once p_gold < 1
    with torch.no_grad():
        for key, p in params().items():
            p.copy_(before[key])
    ws.cfg.stage_a = dataclasses.replace(ws.cfg.stage_a, p_gold_floor=1.0)
    train_stage(ws, ws.cfg.stage_a, NullTracker(), tmp_path / "gold", name="stage_a")
    gold = [json.loads(x) for x in (tmp_path / "gold" / "diagnostics.jsonl").read_text().splitlines()]
    assert gold[0]["tf_raw"] == rows[0]["tf_raw"]
    assert [r["tf_raw"] for r in gold[1:]] != [r["tf_raw"] for r in rows[1:]]


def test_external_hf_model_by_path(tiny_ws, tmp_path):
    """Any HF causal LM folder works as the base: loaded with AutoModelForCausalLM, contract built from its
    tokenizer, no remote code."""
    from latentgate.config import resolve
    from latentgate.train.workspace import build_workspace

    ws = tiny_ws
    ws.lm.save_pretrained(tmp_path / "lm")
    ws.tokenizer.save_pretrained(tmp_path / "lm")
    cfg = resolve("micro", {"base.name": str(tmp_path / "lm"), "model.answer_end": "eos"})
    other = build_workspace(cfg, cfg.base.name, ws.splits)
    # same contract, except BOS: only the builtin LM is trained on BOS-led text; an external LM's prompts start the
    # way its own tokenizer starts text (this word-level tokenizer adds no BOS itself)
    assert other.contract == dataclasses.replace(ws.contract, head_ids=())
    assert not any(p.requires_grad for p in other.lm.parameters())
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(other.lm(ids).logits, ws.lm(ids).logits)
