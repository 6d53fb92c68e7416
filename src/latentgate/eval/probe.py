"""The fixed held-out probe: first-token accuracy with a 95% interval (a single batch of 24 is noise: 8.33% was
2 of 24), top-5, answer NLL/token, and optionally greedy F1. Read-only: restores train/eval modes.

Every probe also measures what first-token accuracy scores without information about the input
(`latentgate.eval.controls`): the constant guess (the probe set's most frequent gold first token) and the shuffled
latent (each example fed the previous example's latents, the last one's for the first: a derangement of the whole
set), and reports the lift over the better of them, with the share of the most frequent predicted first token and
the number of distinct ones. A model that says the same thing to everyone has a lift <= 0, whatever its raw accuracy.
"""

from __future__ import annotations

from collections import Counter

import torch

from latentgate.eval import controls
from latentgate.eval.generate import latent_answers
from latentgate.eval.scoring import f1 as f1_score
from latentgate.eval.scoring import wilson_interval
from latentgate.model.contract import answer_logits, build_latent_batch, encode_answers
from latentgate.schema import Probe


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


def _first_logits(ws, latents: torch.Tensor, answers: list[list[int]]) -> torch.Tensor:
    """Teacher-forced logits of the first answer token only (the answers cut to one token: same logits, less work)."""
    batch = build_latent_batch(ws.contract, ws.embed, latents, answer_targets=[a[:1] for a in answers])
    return answer_logits(ws.lm, batch)[:, 0].float()


@torch.no_grad()
def run_probe(ws, examples, with_f1: bool = False, batch_size: int = 256) -> dict:
    hits = hits5 = shuffled_hits = 0
    nll_sum = tok_count = 0.0
    f1s: list[float] = []
    gold_first: list[int] = []
    pred_first: list[int] = []
    with EvalMode(ws.encoder, ws.adapter, ws.lm):
        previous = ws.latents(examples[-1:]) if len(examples) > 1 else None  # what the first row is shuffled to
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            latents = ws.latents(chunk)
            answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in chunk])
            batch = build_latent_batch(ws.contract, ws.embed, latents, answer_targets=answers)
            logits = answer_logits(ws.lm, batch).float()
            first = logits[:, 0]
            gold = batch.answer_targets[:, 0]
            hits += int((first.argmax(-1) == gold).sum())
            gold_first += gold.tolist()
            pred_first += first.argmax(-1).tolist()
            if previous is None:  # one example: no other example's latents to feed it (as eval: zeros)
                shuffled = torch.zeros_like(latents)
            else:
                shuffled = torch.cat([previous.to(latents.dtype), latents[:-1]])
                previous = latents[-1:]
            shuffled_hits += int((_first_logits(ws, shuffled, answers).argmax(-1) == gold).sum())
            hits5 += int((first.topk(min(5, first.shape[-1]), -1).indices == gold[:, None]).any(-1).sum())
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.answer_targets, reduction="none")
            nll_sum += float((nll * batch.answer_mask).sum())
            tok_count += float(batch.answer_mask.sum())
            if with_f1:
                preds, _ = latent_answers(ws, latents)
                f1s += [f1_score(p, list(e.answers)) for p, e in zip(preds, chunk)]
    n = len(examples)
    lo, hi = wilson_interval(hits, n)
    out = {Probe.FIRST_ACC: hits / n, Probe.FIRST_ACC_LO: lo, Probe.FIRST_ACC_HI: hi, Probe.FIRST_ACC_TOP5: hits5 / n,
           Probe.NLL: nll_sum / max(tok_count, 1.0), **controls.control_stats(gold_first, pred_first, shuffled_hits)}
    if with_f1:
        out[Probe.F1] = sum(f1s) / n
    return out


@torch.no_grad()
def epoch_samples(ws, examples, n_samples: int = 5) -> dict:
    """Sample predictions and the histogram of predicted first tokens on the probe set (collapse shows here)."""
    with EvalMode(ws.encoder, ws.adapter, ws.lm):
        preds, gen = latent_answers(ws, ws.latents(examples))
    firsts = Counter(ws.tokenizer.decode([row[0]]) if row else "<eos>" for row in gen.token_ids)
    return {"sample_predictions": [{"question": e.question, "prediction": p, "gold": list(e.answers)}
                                   for e, p in zip(examples[:n_samples], preds[:n_samples])],
            "first_token_histogram": dict(firsts.most_common())}
