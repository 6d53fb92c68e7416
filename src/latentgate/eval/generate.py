"""Batched greedy decoding from `inputs_embeds` with a KV cache: the prefix is encoded once, then one token per
step for the whole batch. The length cap comes from config, never from the gold answer."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from latentgate.model.contract import build_latent_batch


@dataclass
class Generation:
    token_ids: list[list[int]]  # per example, cut at (and excluding) the first stop id
    first_logits: torch.Tensor  # [B, V] logits of the first generated token (first-token top-1/top-5)


@torch.no_grad()
def greedy_generate(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: int | Collection[int]) -> Generation:
    """Rows may be left-padded (text prompts); latent prefixes all have the same length. A row ends at the first
    of `stop_ids` (end tokens, and tokens containing a stop string: the contract's `stop_ids`)."""
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else sorted(stop_ids), dtype=torch.long,
                         device=inputs_embeds.device)
    stop_set = set(stops.tolist())
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
             use_cache=True, logits_to_keep=1)
    first_logits = out.logits[:, -1].float()
    next_tok = first_logits.argmax(-1)
    b = next_tok.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=next_tok.device)
    steps = []
    pos = position_ids[:, -1:]
    for t in range(max_new_tokens):
        steps.append(next_tok)
        done |= torch.isin(next_tok, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((b, 1))], dim=1)
        pos = pos + 1
        out = lm(input_ids=next_tok.unsqueeze(1), attention_mask=attention_mask, position_ids=pos,
                 past_key_values=out.past_key_values, use_cache=True)
        next_tok = out.logits[:, -1].argmax(-1)
    ids = torch.stack(steps, dim=1).tolist()
    cut = [row[: next((i for i, t in enumerate(row) if t in stop_set), len(row))] for row in ids]
    return Generation(cut, first_logits)


def decode(tokenizer, token_ids: list[list[int]]) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in token_ids]


def latent_answers(ws, latents: torch.Tensor) -> tuple[list[str], Generation]:
    """Greedy answers of the latent path for a batch of latents (the probe's F1, its epoch samples, the registered
    model's predictions): one composition of the prefix, as training and eval compose it."""
    prefix = build_latent_batch(ws.contract, ws.embed, latents)
    gen = greedy_generate(ws.lm, prefix.inputs_embeds, prefix.attention_mask, ws.cfg.eval.max_new_tokens,
                          ws.contract.stop_ids)
    return decode(ws.tokenizer, gen.token_ids), gen
