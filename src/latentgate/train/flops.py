"""Model FLOPs of one Stage B micro-step: what MFU (bench) and the calibration's cost ratio are counted on."""

from __future__ import annotations

import torch

from latentgate.model.contract import build_text_batch, encode_answers, text_prompt
from latentgate.model.latent import encoder_text


def _body_params(module) -> int:
    """Parameters of the transformer layers (what the 2N-FLOPs-per-token rule counts)."""
    return sum(p.numel() for n, p in module.named_parameters() if ".layers." in f".{n}" and "lora_" not in n)


def step_flops(ws, examples) -> tuple[float, int]:
    """Model FLOPs of one Stage B micro-step (padded shapes): the trainable encoder 6N per token, the student LM
    4N (forward + activation gradients; its weights are frozen), the teacher 2N, and the LM head on the kept
    answer positions. Returns (flops, tokens)."""
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in examples])
    ids, _ = ws.enc_tok([encoder_text(e.context, e.question) for e in examples], ws.device)
    b, t_ans = len(examples), max(len(a) for a in answers)
    student = b * (ws.contract.prefix_len + t_ans - 1)
    teacher = 0
    if ws.cfg.stage_b.kd_weight > 0:
        with torch.no_grad():
            prompts = [text_prompt(e.context, e.question) for e in examples]
            teacher = build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers).attention_mask.numel()
    n_enc, n_lm = _body_params(ws.encoder), _body_params(ws.lm)
    head = 2 * ws.embed.weight.shape[0] * ws.embed.weight.shape[1] * b * t_ans
    flops = 6 * n_enc * ids.numel() + 4 * n_lm * student + 2 * n_lm * teacher + 2 * head + (head if teacher else 0)
    return float(flops), ids.numel() + student + teacher
