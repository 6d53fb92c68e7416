"""External LMs: a byte-level BPE tokenizer with a chat template (the kind real LMs ship), the lm_self encoder,
several end ids, stop strings, gradient checkpointing and the base-LM fingerprint in checkpoints."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from latentgate.errors import CheckpointError
from latentgate.model.contract import (
    PrefixContract,
    answer_logits,
    build_latent_batch,
    build_text_batch,
    encode_answers,
    text_prompt,
)
from latentgate.train.trainer import stage_step


def _examples(ws, n=6):
    ex = sorted(ws.splits["train"][:40], key=lambda e: (len(e.answer), len(e.context)))
    return [ex[0], ex[-1], ex[len(ex) // 2], ex[1], ex[-2], ex[5]][:n]


def test_external_lm_defaults_resolve_to_lm_self_and_no_forced_end(bpe_ws):
    c = bpe_ws.contract
    assert bpe_ws.cfg.model.encoder == "lm_self" and bpe_ws.cfg.model.answer_end == "none"
    assert c.end_id is None and c.head_ids == ()  # this tokenizer has no BOS
    tok = bpe_ws.tokenizer
    ends = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert ends <= set(c.stop_ids)  # the tokenizer's EOS and generation_config's second end id
    newline = {i for i in c.stop_ids if "\n" in tok.decode([i])}
    assert newline and set(c.stop_ids) == ends | newline


def test_bpe_answer_ids_are_the_ids_the_lm_sees_after_the_prompt(bpe_ws):
    ws, tok = bpe_ws, bpe_ws.tokenizer
    ex = _examples(ws)
    answers = encode_answers(ws.contract, tok, [e.answer for e in ex])
    for e, ids in zip(ex, answers):
        body = text_prompt(e.context, e.question)
        natural = tok(f"{body} answer : {e.answer}", add_special_tokens=False)["input_ids"]
        ours = tok(body, add_special_tokens=False)["input_ids"] + list(ws.contract.anchor_ids) + ids
        assert ours == natural  # prompt + answer exactly as one string tokenizes: no lone "Paris", no forced end
    alone = tok(ex[0].answer, add_special_tokens=False)["input_ids"]
    assert answers[0] != alone  # " paris" (after the prompt) is not "paris" (on its own)


def test_bpe_generation_prefix_equals_training_prefix(bpe_ws):
    from latentgate.eval.generate import greedy_generate

    ws, c = bpe_ws, bpe_ws.contract
    ex = _examples(ws)
    answers = encode_answers(c, ws.tokenizer, [e.answer for e in ex])
    with torch.no_grad():
        lat = ws.latents(ex)
        train = build_latent_batch(c, ws.embed, lat, answer_targets=answers)
        gen = build_latent_batch(c, ws.embed, lat)
        assert torch.equal(train.inputs_embeds[:, : c.prefix_len], gen.inputs_embeds)
        g = greedy_generate(ws.lm, gen.inputs_embeds, gen.attention_mask, 3, c.stop_ids)
        assert torch.allclose(g.first_logits, answer_logits(ws.lm, train)[:, 0].float(), atol=1e-5)


def test_chat_format_wraps_both_paths_in_the_template(bpe_lm_dir):
    from latentgate import config
    from latentgate.train.workspace import build_workspace, load_splits

    cfg = config.resolve("micro", {"base.name": str(bpe_lm_dir), "model.prompt_format": "chat"})
    ws = build_workspace(cfg, cfg.base.name, load_splits(cfg))
    c, tok = ws.contract, ws.tokenizer
    assert cfg.model.answer_end == "eos" and c.end_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(list(c.head_ids)) == "<|im_start|>user\n"
    assert tok.decode(list(c.anchor_ids)) == "<|im_end|>\n<|im_start|>assistant\n"
    e = ws.splits["train"][0]
    body = text_prompt(e.context, e.question)
    rendered = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    want = tok(rendered + e.answer, add_special_tokens=False)["input_ids"] + [c.end_id]
    answers = encode_answers(c, tok, [e.answer])
    tb = build_text_batch(c, tok, ws.embed, [body], answers)
    assert int(tb.attention_mask[0].sum()) == len(want)
    ids = list(c.head_ids) + tok(body, add_special_tokens=False)["input_ids"] + list(c.anchor_ids) + answers[0]
    assert ids == want
    assert torch.allclose(tb.inputs_embeds[0], ws.embed(torch.tensor(want)))


def test_generation_stops_at_any_stop_id(bpe_ws):
    from latentgate.eval.generate import greedy_generate

    ws = bpe_ws
    with torch.no_grad():
        gen = build_latent_batch(ws.contract, ws.embed, ws.latents(_examples(ws)))
        free = greedy_generate(ws.lm, gen.inputs_embeds, gen.attention_mask, 6, stop_ids=-1).token_ids
        stops = {free[0][2], free[1][1]}
        cut = greedy_generate(ws.lm, gen.inputs_embeds, gen.attention_mask, 6, stops).token_ids
    for row, got in zip(free, cut):
        k = next((i for i, t in enumerate(row) if t in stops), len(row))
        assert got == row[:k]


# ---- the lm_self encoder ---------------------------------------------------------------------------------------

def _grads(module) -> dict[str, float]:
    return {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for n, p in module.named_parameters()}


def _step(ws, st, ex):
    for m in (ws.encoder, ws.adapter, ws.lm):
        m.zero_grad(set_to_none=True)
    out = stage_step(ws, ex, st, 0, torch.Generator().manual_seed(0))
    out.total.backward()
    return out


def test_lm_self_copies_no_weights_and_checkpoints_only_what_trains(bpe_ws):
    enc = bpe_ws.encoder
    names = set(enc.state_dict())
    assert names == {"memory", "proj.weight", "proj.bias"} | {f"lora_a.{k}" for k in enc.lora_a} | {
        f"lora_b.{k}" for k in enc.lora_b}
    layers, targets = bpe_ws.cfg.base.layers, bpe_ws.cfg.model.lora_targets
    assert len(enc.lora_a) == len(bpe_ws.lm.model.layers) * len(targets) and layers
    lm_params = sum(p.numel() for p in bpe_ws.lm.parameters())
    assert not any(p.requires_grad for p in bpe_ws.lm.parameters())
    assert sum(p.numel() for p in enc.parameters()) < lm_params


def test_each_adapter_gets_gradients_exactly_where_it_should(bpe_ws):
    from latentgate.model.lora import attach_lora

    ws = bpe_ws
    ex = _examples(ws, 4)
    st = dataclasses.replace(ws.cfg.stage_a, kd_weight=0.5)
    with torch.no_grad():  # B starts at zero (so A's gradient would be zero): move it off zero
        for p in ws.encoder.lora_b.values():
            p.normal_(0, 0.02)
    # Stage A: the encoder LoRA, memory and projection train; the LM's own weights get nothing
    _step(ws, st, ex)
    g = _grads(ws.encoder)
    assert all(v > 0 for n, v in g.items()), [n for n, v in g.items() if v == 0]
    assert all(p.grad is None for p in ws.lm.parameters())
    # the encoder LoRA is off while decoding: changing it moves the latents, not the decoding of fixed latents
    with torch.no_grad():
        lat = ws.latents(ex)
        batch = build_latent_batch(ws.contract, ws.embed, lat, answer_targets=encode_answers(
            ws.contract, ws.tokenizer, [e.answer for e in ex]))
        before = answer_logits(ws.lm, batch)
        for p in ws.encoder.lora_b.values():
            p.add_(0.1)
        assert torch.equal(answer_logits(ws.lm, batch), before)
        assert not torch.allclose(ws.latents(ex), lat)
    # Stage B: peft's LoRA wraps the same Linear modules; both adapters train, neither silently frozen
    ws.lm, _ = attach_lora(ws.lm, ws.cfg)
    with torch.no_grad():
        for n, p in ws.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    assert all(p.requires_grad for p in ws.encoder.parameters())
    _step(ws, dataclasses.replace(ws.cfg.stage_b, kd_weight=0.5), ex)
    assert all(v > 0 for v in _grads(ws.encoder).values())
    lora = {n: float(p.grad.abs().sum()) for n, p in ws.lm.named_parameters() if "lora_" in n}
    assert lora and all(v > 0 for v in lora.values())
    assert all(p.grad is None for n, p in ws.lm.named_parameters() if "lora_" not in n)
    # the teacher reads with neither adapter
    prompts = [text_prompt(e.context, e.question) for e in ex]
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in ex])
    with torch.no_grad(), ws.teacher():
        teacher = answer_logits(ws.lm, build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers))
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(ws.cfg.base.name)
    with torch.no_grad():
        ref = answer_logits(plain, build_text_batch(ws.contract, ws.tokenizer, plain.get_input_embeddings(),
                                                    prompts, answers))
    assert torch.allclose(teacher, ref, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(bpe_lm_dir):
    from latentgate import config
    from latentgate.train.workspace import build_workspace, load_splits

    grads = []
    for ckpt in (False, True):
        cfg = config.resolve("micro", {"base.name": str(bpe_lm_dir), "base.gradient_checkpointing": str(ckpt)})
        ws = build_workspace(cfg, cfg.base.name, load_splits(cfg))
        with torch.no_grad():
            for p in ws.encoder.lora_b.values():
                p.copy_(torch.linspace(-0.02, 0.02, p.numel()).view_as(p))
        ws.lm.train(ckpt)
        assert ws.lm.is_gradient_checkpointing == ckpt
        _step(ws, ws.cfg.stage_a, _examples(ws, 4))
        grads.append({n: p.grad.clone() for n, p in list(ws.encoder.named_parameters())
                      + list(ws.adapter.named_parameters())})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n


def test_checkpoint_records_the_base_lm_and_refuses_another(bpe_ws, tiny_ws, tmp_path):
    from latentgate.train import checkpoint as ckpt
    from latentgate.train.trainer import checkpoint_modules

    ws = bpe_ws
    assert ws.base_ref["fingerprint"] and ws.base_ref["name"] == ws.cfg.base.name
    path = ckpt.save_checkpoint(tmp_path / "c", modules=checkpoint_modules(ws), base_lm=ws.base_ref)
    manifest = ckpt.load_checkpoint(path, modules=checkpoint_modules(ws), expect_base=ws.base_ref)
    assert manifest["base_lm"]["fingerprint"] == ws.base_ref["fingerprint"]
    other = {**ws.base_ref, "name": "another-lm", "fingerprint": "0" * 64}
    with pytest.raises(CheckpointError, match="trained on base LM .* this run loads 'another-lm'"):
        ckpt.load_checkpoint(path, modules=checkpoint_modules(ws), expect_base=other)


def test_contract_for_config_matches_from_tokenizer(bpe_ws):
    c = PrefixContract.for_config(bpe_ws.cfg, bpe_ws.tokenizer, bpe_ws.lm.generation_config)
    assert c == bpe_ws.contract and c.to_dict()["prompt_format"] == "plain"


def test_sanity_gate_is_per_lm_and_records_its_evidence(mlflow_store, bpe_lm_dir, tmp_path):
    """An external LM's teacher that scores below its gate stops before latent training, in one line that says
    what it scored and what to do; the base run keeps the figures as evidence."""
    import json

    from mlflow import MlflowClient

    from conftest import run_cli

    proc = run_cli("base", "--preset", "micro", "--set", f"base.name={bpe_lm_dir}", "--set", "base.gate_min_f1=0.9",
                   "--set", f"run.output_dir={tmp_path}",
                   env={"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})
    assert proc.returncode == 4, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("latentgate: error:")]
    assert len(line) == 1 and f"sanity gate failed for {bpe_lm_dir}: F1 " in line[0]
    assert "need >= 0.9" in line[0] and "base.gate_min_f1" in line[0] and "Traceback" not in proc.stderr
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"params.`base.name` = '{bpe_lm_dir}' and tags.`latentgate.phase` = 'base'")
    assert runs and runs[0].info.status != "RUNNING"
    local = client.download_artifacts(runs[0].info.run_id, "sanity_gate.json", str(tmp_path))
    gate = json.loads(Path(local).read_text())
    assert gate["passed"] is False and gate["min_f1"] == 0.9 and gate["text_f1"] == runs[0].data.metrics["text_f1"]
