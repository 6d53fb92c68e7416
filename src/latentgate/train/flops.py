"""Model FLOPs of one training micro-step: what MFU (bench) and the calibration's cost ratio are counted on."""

from __future__ import annotations

import torch

from latentgate.config import StageConfig
from latentgate.model.contract import build_text_batch, encode_answers, text_prompt
from latentgate.model.latent import SelfEncoder


def _body_params(module) -> int:
    """Parameters of the transformer layers (what the 2N-FLOPs-per-token rule counts)."""
    return sum(p.numel() for n, p in module.named_parameters() if ".layers." in f".{n}" and "lora_" not in n)


def encoder_flops(ws, ids: torch.Tensor) -> tuple[float, int]:
    """FLOPs of one training pass of the encoder over `ids` [B, S], and the tokens it reads.
    - `lm_self`: the frozen LM body reads the text plus M memory tokens, forward and backward through its activations
      (4N per token; its weights get no gradient), plus 6 per token per parameter of the encoder-only LoRA.
    - a trainable body (`lm_copy`, `scratch`): 6N per token. A frozen body (`minilm`): 2N (it runs without grad)."""
    enc = ws.encoder
    if isinstance(enc, SelfEncoder):
        tokens = ids.numel() + ids.shape[0] * enc.num_latents
        lora = sum(p.numel() for p in enc.lora_a.values()) + sum(p.numel() for p in enc.lora_b.values())
        return float(4 * _body_params(ws.lm) * tokens + 6 * lora * tokens), tokens
    per_param = 2 if getattr(enc, "frozen_body", False) else 6
    return float(per_param * _body_params(enc) * ids.numel()), ids.numel()


def step_flops(ws, st: StageConfig, examples) -> tuple[float, int]:
    """Model FLOPs of one micro-step of the stage `st` (padded shapes): the encoder pass (`encoder_flops`), the
    student LM 4N (forward + activation gradients; its weights are frozen), the teacher 2N when `st.kd_weight` > 0,
    and the LM head on the kept answer positions. Returns (flops, tokens)."""
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in examples])
    ids, _ = ws.enc_tok(examples, ws.device)
    b, t_ans = len(examples), max(len(a) for a in answers)
    student = b * (ws.contract.prefix_len + t_ans - 1)
    teacher = 0
    if st.kd_weight > 0:
        with torch.no_grad():
            prompts = [text_prompt(e.context, e.question) for e in examples]
            teacher = build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers).attention_mask.numel()
    enc_flops, enc_tokens = encoder_flops(ws, ids)
    n_lm = _body_params(ws.lm)
    head = 2 * ws.embed.weight.shape[0] * ws.embed.weight.shape[1] * b * t_ans
    flops = enc_flops + 4 * n_lm * student + 2 * n_lm * teacher + 2 * head + (head if teacher else 0)
    return float(flops), enc_tokens + student + teacher
