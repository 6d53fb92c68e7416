"""The fixed held-out probe: first-token accuracy with a 95% interval (a single batch of 24 is noise: 8.33% was
2 of 24), top-5, answer NLL/token, and optionally greedy F1. Read-only: restores train/eval modes."""

from __future__ import annotations

import torch

from latentgate.eval.generate import decode, greedy_generate
from latentgate.eval.scoring import f1 as f1_score
from latentgate.eval.scoring import wilson_interval
from latentgate.model.contract import build_latent_batch, encode_answers
from latentgate.train.losses import answer_logits


class EvalMode:
    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.flags = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, f in zip(self.modules, self.flags):
            m.train(f)


@torch.no_grad()
def run_probe(ws, examples, with_f1: bool = False, batch_size: int = 256) -> dict:
    hits = hits5 = 0
    nll_sum = tok_count = 0.0
    f1s: list[float] = []
    with EvalMode(ws.encoder, ws.adapter, ws.lm):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            latents = ws.latents(chunk)
            answers = encode_answers(ws.tokenizer, [e.answer for e in chunk])
            batch = build_latent_batch(ws.contract, ws.embed, latents, answer_targets=answers)
            logits = answer_logits(ws.lm, batch).float()
            first = logits[:, 0]
            gold = batch.answer_targets[:, 0]
            hits += int((first.argmax(-1) == gold).sum())
            hits5 += int((first.topk(min(5, first.shape[-1]), -1).indices == gold[:, None]).any(-1).sum())
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.answer_targets, reduction="none")
            nll_sum += float((nll * batch.answer_mask).sum())
            tok_count += float(batch.answer_mask.sum())
            if with_f1:
                prefix = build_latent_batch(ws.contract, ws.embed, latents)
                gen = greedy_generate(ws.lm, prefix.inputs_embeds, prefix.attention_mask,
                                      ws.cfg.eval.max_new_tokens, ws.contract.eos_id)
                preds = decode(ws.tokenizer, gen.token_ids)
                f1s += [f1_score(p, list(e.answers)) for p, e in zip(preds, chunk)]
    n = len(examples)
    lo, hi = wilson_interval(hits, n)
    out = {"first_acc": hits / n, "first_acc_lo": lo, "first_acc_hi": hi, "first_acc_top5": hits5 / n,
           "nll": nll_sum / max(tok_count, 1.0)}
    if with_f1:
        out["f1"] = sum(f1s) / n
    return out


@torch.no_grad()
def epoch_samples(ws, examples, n_samples: int = 5) -> dict:
    """Sample predictions and the histogram of predicted first tokens on the probe set (collapse shows here)."""
    from collections import Counter

    with EvalMode(ws.encoder, ws.adapter, ws.lm):
        prefix = build_latent_batch(ws.contract, ws.embed, ws.latents(examples))
        gen = greedy_generate(ws.lm, prefix.inputs_embeds, prefix.attention_mask, ws.cfg.eval.max_new_tokens,
                              ws.contract.eos_id)
    preds = decode(ws.tokenizer, gen.token_ids)
    firsts = Counter(ws.tokenizer.decode([row[0]]) if row else "<eos>" for row in gen.token_ids)
    return {"sample_predictions": [{"question": e.question, "prediction": p, "gold": list(e.answers)}
                                   for e, p in zip(examples[:n_samples], preds[:n_samples])],
            "first_token_histogram": dict(firsts.most_common())}
