"""Bytes of the no-grad passes: the in-training probe, eval (latent and text paths) and generation (KV cache).

Each function returns the bytes above the weights at the peak of one moment; `memory_plan` adds them as phases of
the stage plans. What the code does, and so what is counted (checked against live tensor bytes on CPU in
tests/test_memory_measured.py):

* a scoring pass (`contract.answer_logits`, then `.float()` and cross-entropy): the body's no-grad working set over
  batch x seq tokens, then the LM head on the B x T gathered answer states only: its output, the fp32 copy and
  cross-entropy's fp32 log-softmax (8 bytes per answer logit at most: 4 + 4, or 2 + 4 then 4 + 4);
* generation (`eval.generate.greedy_generate`): the KV cache over prompt + new tokens, the prefill's working set,
  the first token's logits (the LM's dtype and their fp32 copy);
* the inputs each holds: the prompt embeddings (the LM's dtype).
"""

from __future__ import annotations

from latentgate.model.memory_arch import Arch
from latentgate.model.memory_layers import nograd_bytes_per_token

SCORE_LOGIT_BYTES = 8  # per answer logit in a no-grad scoring pass: the head's output (or its fp32 copy) + log-softmax


def kv_cache_bytes(a: Arch, batch: int, tokens: int, act: int) -> int:
    """Keys and values of every layer for batch x tokens (transformers' DynamicCache, the LM's dtype)."""
    return 2 * a.layers * a.kv_dim * act * batch * tokens


def inputs_bytes(a: Arch, batch: int, tokens: int, act: int) -> int:
    """The prompt embeddings a pass is fed (`inputs_embeds`, the LM's dtype)."""
    return batch * tokens * a.hidden * act


def scoring_bytes(a: Arch, batch: int, seq: int, answer: int, act: int, attn: str) -> int:
    """A teacher-forced no-grad pass over batch x seq tokens read at `answer` positions per row: the inputs, then the
    larger of the body's working set and (last hidden states + the answer logits' 8 bytes each)."""
    body = batch * seq * nograd_bytes_per_token(a, seq, act, attn)
    head = batch * seq * a.hidden * act + batch * answer * a.vocab * SCORE_LOGIT_BYTES
    return inputs_bytes(a, batch, seq, act) + max(body, head)


def generation_bytes(a: Arch, batch: int, prompt: int, new_tokens: int, act: int, attn: str) -> int:
    """Greedy decoding of `new_tokens` after a batch x prompt prefill: the inputs, the KV cache at its longest, the
    prefill's working set and the first token's logits (LM dtype + fp32)."""
    prefill = batch * prompt * nograd_bytes_per_token(a, prompt, act, attn)
    return (inputs_bytes(a, batch, prompt, act) + kv_cache_bytes(a, batch, prompt + new_tokens, act) + prefill
            + batch * a.vocab * (act + 4))


def probe_phases(a: Arch, batch: int, prefix: int, answer: int, new_tokens: int, act: int, attn: str,
                 encoder_pass: int) -> dict[str, int]:
    """`eval.probe.run_probe` on `batch` probe examples (the whole probe set in one batch): the encoder's no-grad
    pass, the scoring pass over the latent prefix + answer, then the shuffled-latent first-token pass and greedy F1
    while the scoring pass's fp32 answer logits are still held. `prefix` counts head + latents + anchor."""
    held = batch * answer * a.vocab * 4
    first = scoring_bytes(a, batch, prefix + 1, 1, act, attn)
    return {"probe encoder": encoder_pass,
            "probe scoring": scoring_bytes(a, batch, prefix + answer, answer, act, attn),
            "probe generation": held + max(first, generation_bytes(a, batch, prefix, new_tokens, act, attn))}


def eval_phases(a: Arch, batch: int, prefix: int, text_tokens: int, answer: int, new_tokens: int, act: int,
                attn: str, encoder_pass: int, text: bool) -> dict[str, int]:
    """`eval.evaluate.evaluate` on one batch: per path, generation then the scoring pass (the generation's fp32 first
    logits still held). The latent paths read head + latents + anchor (`prefix`), the text paths (`text`) head +
    prompt + anchor (`text_tokens`, the longest prompt)."""
    held = batch * a.vocab * 4
    phases = {"eval encoder": encoder_pass,
              "latent generation": generation_bytes(a, batch, prefix, new_tokens, act, attn),
              "latent scoring": held + scoring_bytes(a, batch, prefix + answer, answer, act, attn)}
    if text:
        phases["text generation"] = generation_bytes(a, batch, text_tokens, new_tokens, act, attn)
        phases["text scoring"] = held + scoring_bytes(a, batch, text_tokens + answer, answer, act, attn)
    return phases
