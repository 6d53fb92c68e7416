"""Score every path on the eval split and always write `eval_detailed.jsonl` and `metrics.json`.

Paths: latent (encoder -> adapter -> LoRA'd LM), text (the teacher: the LM with LoRA disabled reading the full
text), token_budget (the text cut to M tokens, question kept), and controls that show whether the latent carries
information about THIS input: zero_latent and shuffled_latent (latents of other examples). Nothing from the gold
answers reaches a model input or the length cap: references are only read to score.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentgate import heap
from latentgate.eval import controls, scoring
from latentgate.eval.generate import decode, greedy_generate
from latentgate.eval.probe import EvalMode
from latentgate.eval.squad_metric import load_squad_metric
from latentgate.eval_row import EvalRow
from latentgate.model.contract import answer_logits, build_latent_batch, build_text_batch, encode_answers, text_prompt
from latentgate.schema import Artifact, EvalKey, EvalPath
from latentgate.tracking import progress
from latentgate.tracking.tracker import example_sha256


@dataclass
class _Tally:
    """What one path accumulates over the batches besides its rows (first-token hits, teacher-forced NLL, prompt
    sizes, and the gold first tokens: scoring only, for the constant-guess control)."""

    hits: int = 0
    hits5: int = 0
    nll: float = 0.0
    tokens: float = 0.0
    prompt_tokens: int = 0
    prompt_bytes: int = 0
    gold_first: list[int] = field(default_factory=list)


def _prefix_for(ws, path: str, chunk, latents: torch.Tensor | None):
    """Model inputs for one path: (inputs_embeds, attention_mask, lm_context, scoring_batch_fn)."""
    if path in EvalPath.WITH_LATENTS:
        if path == EvalPath.ZERO_LATENT:
            lat = torch.zeros_like(latents)
        elif path == EvalPath.SHUFFLED_LATENT:  # a derangement: every row gets another example's latents
            lat = latents.roll(1, dims=0) if latents.shape[0] > 1 else torch.zeros_like(latents)
        else:
            lat = latents
        prefix = build_latent_batch(ws.contract, ws.embed, lat)
        return prefix, (lambda answers: build_latent_batch(ws.contract, ws.embed, lat, answer_targets=answers)), None
    budget = ws.contract.num_latents if path == EvalPath.TOKEN_BUDGET else None
    prompts = [text_prompt(e.context, e.question, budget, ws.tokenizer) for e in chunk]
    prefix = build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, left_pad=True)
    return prefix, (lambda answers: build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers)), prompts


@torch.no_grad()
def evaluate(ws, examples, out_dir: Path, paths=None, batch_size: int | None = None,
             progress_name: str | None = "eval") -> dict:
    """Score every path on `examples`; writes eval_detailed.jsonl and metrics.json into out_dir and returns the
    metrics. `progress_name`: what the progress display calls this eval (None: nothing shown)."""
    paths = list(paths or ws.cfg.eval.paths)
    batch_size = batch_size or ws.cfg.eval.batch_size
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[EvalRow] = []
    tallies = {p: _Tally() for p in paths}
    f1_sums = dict.fromkeys(paths, 0.0)  # progress only: the running F1 of each path
    with EvalMode(ws.encoder, ws.adapter, ws.lm), \
            progress.task(progress_name, total=len(examples) * len(paths), unit="answers") as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            latents = ws.latents(chunk) if any(p in EvalPath.WITH_LATENTS for p in paths) else None
            gold_first = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in chunk])  # scoring only
            for path in paths:
                teacher = path in EvalPath.TEACHER
                with (ws.teacher() if teacher else nullcontext()):
                    prefix, scoring_batch, prompts = _prefix_for(ws, path, chunk, latents)
                    gen = greedy_generate(ws.lm, prefix.inputs_embeds, prefix.attention_mask,
                                          ws.cfg.eval.max_new_tokens, ws.contract.stop_ids)
                    # Teacher-forced NLL of the gold answer: a score, computed after generation finished.
                    sb = scoring_batch(gold_first)
                    logits = answer_logits(ws.lm, sb).float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), sb.answer_targets, reduction="none")
                e = tallies[path]
                e.nll += float((nll * sb.answer_mask).sum())
                e.tokens += float(sb.answer_mask.sum())
                gold0 = sb.answer_targets[:, 0]
                top5 = gen.first_logits.topk(min(5, gen.first_logits.shape[-1]), -1).indices
                first_ok = (gen.first_logits.argmax(-1) == gold0).tolist()
                e.hits += sum(first_ok)
                e.hits5 += int((top5 == gold0[:, None]).any(-1).sum())
                e.gold_first += gold0.tolist()  # scoring only: the constant-guess control
                if prompts is not None:
                    e.prompt_tokens += int(prefix.attention_mask.sum())
                    e.prompt_bytes += sum(len(p.encode()) for p in prompts)
                preds = decode(ws.tokenizer, gen.token_ids)
                for ex, pred, ok, ids in zip(chunk, preds, first_ok, gen.token_ids):
                    refs = tuple(ex.answers)
                    rows.append(EvalRow(id=ex.id, path=path, question=ex.question, references=refs, prediction=pred,
                                        first_token=ids[0] if ids else None, em=scoring.exact_match(pred, refs),
                                        f1=scoring.f1(pred, refs), first_token_correct=bool(ok),
                                        error_mode=scoring.error_mode(pred, refs), example_sha256=example_sha256(ex)))
                f1_sums[path] += sum(r.f1 for r in rows[-len(chunk):])
                bar.update(advance=len(chunk), **{f"{p} F1": f1_sums[p] / min(start + len(chunk), len(examples))
                                                  for p in paths[: paths.index(path) + 1]})
            heap.release(ws.device)  # a batch's freed activations (their sizes change with prompt length)
    with (out_dir / Artifact.EVAL_DETAILED).open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r.to_json()) + "\n")
    metrics = aggregate(rows, tallies, ws, len(examples))
    (out_dir / Artifact.EVAL_METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def aggregate(rows: list[EvalRow], tallies: dict[str, _Tally], ws, n_examples: int) -> dict:
    """Aggregates per path, with EM/F1 from the shipped `evaluate` metric module (SQuAD v1.1, all references)."""
    metric = load_squad_metric()
    out: dict = {"n_examples": n_examples, "paths": {}}
    for path, e in tallies.items():
        prs = [r for r in rows if r.path == path]
        official = metric.compute(
            predictions=[{"id": r.id, "prediction_text": r.prediction} for r in prs],
            references=[{"id": r.id, "answers": {"text": list(r.references), "answer_start": []}} for r in prs])
        f1s = [r.f1 for r in prs]
        modes = Counter(r.error_mode for r in prs)
        n = len(prs)
        out["paths"][path] = {
            EvalKey.EM: official["exact_match"] / 100, EvalKey.F1: official["f1"] / 100, "n": n,
            EvalKey.FIRST_TOP1: e.hits / n, EvalKey.FIRST_TOP5: e.hits5 / n,
            EvalKey.FIRST_TOP1_CONST: controls.constant_guess_accuracy(e.gold_first),
            EvalKey.NLL_PER_TOKEN: e.nll / max(e.tokens, 1.0), EvalKey.F1_DISTRIBUTION: scoring.f1_buckets(f1s),
            EvalKey.FIRST_F1_NONZERO_IDX: scoring.first_nonzero_index(f1s),
            EvalKey.ERROR_MODES: {m: modes.get(m, 0) for m in scoring.ERROR_MODES},
            EvalKey.REPETITION_RATE: modes.get("repetition", 0) / n, EvalKey.EMPTY_RATE: modes.get("empty", 0) / n,
            EvalKey.TOP_PREDICTION_SHARE: controls.row_collapse(prs).top_prediction_share,
            EvalKey.DISTINCT_FIRST_TOKENS: len({r.first_token for r in prs}),
        }
        if e.prompt_tokens:
            out["paths"][path]["prompt_tokens_per_example"] = e.prompt_tokens / n
            out["paths"][path]["prompt_bytes_per_example"] = e.prompt_bytes / n
    elem = torch.finfo(ws.embed.weight.dtype).bits // 8
    hidden = ws.embed.weight.shape[1]
    out["latent_tokens"] = ws.contract.num_latents
    out["latent_bytes_per_example"] = ws.contract.num_latents * hidden * elem
    if EvalPath.TEXT in out["paths"]:
        out["prompt_bytes_per_example"] = out["paths"][EvalPath.TEXT]["prompt_bytes_per_example"]
        out["prompt_tokens_per_example"] = out["paths"][EvalPath.TEXT]["prompt_tokens_per_example"]
    return out

