"""Evaluation reads nothing from the gold answer except to score it; trained modules are really loaded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from latentgate.errors import CheckpointError


def test_no_gold_leakage(tiny_ws, tmp_path):
    """Swapping every gold answer for a long wrong one changes the scores and nothing else: the latents (no
    answer-length input to the adapter), and on every path the generated text and first token (no generation cap
    taken from the gold length)."""
    from latentgate.eval import scoring
    from latentgate.eval.evaluate import evaluate

    ws = tiny_ws
    examples = ws.splits["eval"][:12]
    fake = [dataclasses.replace(e, answers=("zzz zzz zzz zzz zzz zzz",), answer_starts=()) for e in examples]
    assert all(len(e.answer.split()) < 6 for e in examples)  # a cap from the gold would cut the real answers shorter
    with torch.no_grad():
        assert torch.equal(ws.latents(examples), ws.latents(fake))
    real_m = evaluate(ws, examples, tmp_path / "real")
    evaluate(ws, fake, tmp_path / "fake")
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "eval_detailed.jsonl").read_text().splitlines()]  # noqa: E731
    real, swapped = read("real"), read("fake")
    model_side = lambda rows: [(r["id"], r["path"], r["prediction"], r["first_token"]) for r in rows]  # noqa: E731
    assert model_side(real) == model_side(swapped)
    assert {r["path"] for r in real} == set(real_m["paths"]) == set(ws.cfg.eval.paths)
    # the gold is read to score, and only there: the swapped rows are scored against the swapped answers
    assert all(r["references"] == ["zzz zzz zzz zzz zzz zzz"] for r in swapped)
    assert [r["f1"] for r in swapped] == [scoring.f1(r["prediction"], r["references"]) for r in swapped]
    assert [r["references"] for r in real] != [r["references"] for r in swapped]
    assert real_m["latent_bytes_per_example"] == ws.cfg.model.num_latents * ws.embed.weight.shape[1] * 4
    assert real_m["prompt_tokens_per_example"] > 0


def _perturb_trainables(ws, tmp_path, steps=2):
    """Perturb every trainable module so that a fresh init could never match."""
    with torch.no_grad():
        for m in (ws.encoder, ws.adapter):
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        for n, p in ws.lm.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)


def test_checkpoint_save_load_identical_logits_and_missing_module(tiny_ws, tmp_path):
    from latentgate.config import flatten
    from latentgate.model.contract import answer_logits, build_latent_batch
    from latentgate.model.lora import attach_lora
    from latentgate.train import checkpoint as ckpt
    from latentgate.train.load import load_trained
    from latentgate.train.trainer import checkpoint_modules

    ws = tiny_ws
    base_dir = tmp_path / "base"
    ws.lm.save_pretrained(base_dir)
    ws.tokenizer.save_pretrained(base_dir)
    ws.lm, _ = attach_lora(ws.lm, ws.cfg)
    _perturb_trainables(ws, tmp_path)
    path = ckpt.save_checkpoint(tmp_path / "ck", modules=checkpoint_modules(ws), lora_model=ws.lm,
                                config=flatten(ws.cfg), contract=ws.contract.to_dict())
    ex = ws.splits["probe"][:5]

    def logits(w):
        w.encoder.eval(), w.adapter.eval(), w.lm.eval()
        with torch.no_grad():
            return answer_logits(w.lm, build_latent_batch(w.contract, w.embed, w.latents(ex),
                                                          answer_targets=[[w.contract.end_id]] * len(ex)))

    loaded = load_trained(ws.cfg, str(base_dir), path, ws.splits)
    assert torch.equal(logits(ws), logits(loaded))
    # a missing module is an error, never a silent fresh init
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["modules"]["adapter"]
    from latentgate.train.manifest import MANIFEST_DIGEST, manifest_digest

    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)  # a consistent manifest that lacks the module
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="adapter"):
        load_trained(ws.cfg, str(base_dir), path, ws.splits)
