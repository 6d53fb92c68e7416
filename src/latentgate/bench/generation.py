"""Comparison 2: latentgate's batched KV-cached greedy decoding against HF `generate`, batched and per example
(identical outputs required)."""

from __future__ import annotations

from pathlib import Path

import torch

from latentgate.bench.fixtures import smoke_workspace
from latentgate.bench.report import FAIL, Row, interleave, median, ratio_row
from latentgate.config import Config
from latentgate.eval.generate import greedy_generate
from latentgate.eval.probe import EvalMode
from latentgate.model.contract import build_latent_batch

# ---- 2. generation --------------------------------------------------------------------------------------------

GENERATION = ("eval generation: batched KV-cached greedy decoding from inputs_embeds",
              "HF batched model.generate(inputs_embeds, attention_mask), same batches", ">= 1.0x, identical outputs")
GENERATION_LOOP = ("eval generation: batched KV-cached greedy decoding from inputs_embeds",
                   "per-example model.generate loop over the same inputs", ">= 10x, identical outputs")


def _cut(row: list[int], stops: set[int]) -> list[int]:
    return row[: next((i for i, t in enumerate(row) if t in stops), len(row))]


def hf_batched_generate(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                        stop_ids, pad_id: int, batch_size: int) -> list[list[int]]:
    """The peer a user would pick: HF `generate` on whole batches from `inputs_embeds` (rows left-padded, as
    latent prefixes and the eval's text prompts are), greedy, every stop id as an end token."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    rows: list[list[int]] = []
    for s in range(0, inputs_embeds.shape[0], batch_size):
        out = lm.generate(inputs_embeds=inputs_embeds[s : s + batch_size],
                          attention_mask=attention_mask[s : s + batch_size], max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=sorted(stops), pad_token_id=pad_id)
        rows += [_cut(r, stops) for r in out.tolist()]
    return rows


def per_example_generate(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                         stop_ids, pad_id: int) -> list[list[int]]:
    """The reference: `model.generate` one example at a time, cut at (and excluding) the first stop id."""
    rows, stops = [], {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    for i in range(inputs_embeds.shape[0]):
        out = lm.generate(inputs_embeds=inputs_embeds[i : i + 1], attention_mask=attention_mask[i : i + 1],
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stops),
                          pad_token_id=pad_id)
        rows.append(_cut(out[0].tolist(), stops))
    return rows


def batched_generate(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     stop_ids, batch_size: int) -> list[list[int]]:
    rows: list[list[int]] = []
    for s in range(0, inputs_embeds.shape[0], batch_size):
        rows += greedy_generate(lm, inputs_embeds[s : s + batch_size], attention_mask[s : s + batch_size],
                                max_new_tokens, stop_ids).token_ids
    return rows


def latent_prefixes(ws, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval latent path's generation inputs (encoder -> adapter -> prefix contract), in eval mode."""
    with torch.no_grad(), EvalMode(ws.encoder, ws.adapter, ws.lm):
        prefix = build_latent_batch(ws.contract, ws.embed, ws.latents(examples))
    return prefix.inputs_embeds, prefix.attention_mask


def bench_generation(cfg: Config, work: Path, reps: int = 3, n: int = 200, ws=None,
                     loop_reps: int = 1) -> list[Row]:
    """Two rows from one interleaved run: ours vs HF batched `generate` (same batches), and vs the per-example
    loop. Both peers must produce exactly our token ids."""
    ws = ws or smoke_workspace(cfg, work / "base")
    examples = (ws.splits["eval"] * (n // max(1, len(ws.splits["eval"])) + 1))[:n]
    emb, mask = latent_prefixes(ws, examples)
    t, eos, pad = cfg.eval.max_new_tokens, ws.contract.stop_ids, ws.contract.pad_id
    outputs: dict[str, list] = {}

    def side(name, fn):
        def go():
            with torch.no_grad(), EvalMode(ws.lm):
                outputs[name] = fn()
        return go

    bs = cfg.eval.batch_size
    times = interleave({"ours": side("ours", lambda: batched_generate(ws.lm, emb, mask, t, eos, bs)),
                        "hf_batched": side("hf_batched", lambda: hf_batched_generate(ws.lm, emb, mask, t, eos,
                                                                                      pad, bs)),
                        "per_example": side("per_example", lambda: per_example_generate(ws.lm, emb, mask, t, eos,
                                                                                         pad))},
                       reps, counts={"per_example": loop_reps})
    ours = median(times["ours"])
    lengths = [len(r) for r in outputs["ours"]]
    common = {"n": n, "max_new_tokens": t, "batch_size": bs, "ours_s": times["ours"],
              "ours_answers_per_s": n / ours, "mean_generated_tokens": sum(lengths) / max(1, len(lengths))}
    rows = []
    for key, peer, (what, compared, _), target in (("generation", "hf_batched", GENERATION, 1.0),
                                                  ("generation_loop", "per_example", GENERATION_LOOP, 10)):
        p = median(times[peer])
        mismatches = sum(x != y for x, y in zip(outputs["ours"], outputs[peer], strict=True))
        measured = (f"{p / ours:.2f}x ({n / ours:.0f} vs {n / p:.1f} answers/s, n={n}, batch {bs}); outputs "
                    + ("identical" if mismatches == 0 else f"DIFFER in {mismatches} of {n}"))
        row = ratio_row(key, what, compared, p / ours, ">=", target, measured,
                        details={**common, f"{peer}_s": times[peer], f"{peer}_answers_per_s": n / p,
                                 "mismatches": mismatches})
        if mismatches:
            row.status = FAIL
        rows.append(row)
    return rows
