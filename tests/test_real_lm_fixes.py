"""Fixes for real LMs (issue #25, "Correctness on real LMs"): the lm_self encoder's FLOPs are counted, fp16 is
refused, encoder truncation keeps the question, the chat template's end-of-turn token ends answers, and a
SentencePiece tokenizer (Llama-2 / Mistral / Gemma style, built here with `tokenizers`) passes the contract and loss
checks the byte-level BPE one passes."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import test_contract_losses as contract_tests  # their checks, run here on the SentencePiece LM
import test_real_lm as real_lm_tests
from conftest import CHATML, GEMMA
from latentgate import config
from latentgate.data.records import Example
from latentgate.errors import ConfigError
from latentgate.model.contract import (
    PrefixContract,
    encode_answers,
    end_of_turn_id,
    text_prompt,
)
from latentgate.model.latent import EncoderTokenizer
from latentgate.train.flops import _body_params, step_flops

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
          "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
NO_END = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}" \
         "assistant: {% endif %}"


def _ws(folder, **overrides):
    from latentgate.train.workspace import build_workspace, load_splits

    cfg = config.resolve("micro", {"base.name": str(folder), **overrides})
    return build_workspace(cfg, cfg.base.name, load_splits(cfg))


def _mixed(ws, n=6):
    ex = sorted(ws.splits["train"][:40], key=lambda e: (len(e.answer.split()), len(e.context)))
    return [ex[0], ex[-1], ex[len(ex) // 2], ex[1], ex[-2], ex[5]][:n]


# ---- FLOPs ---------------------------------------------------------------------------------------------------

def test_step_flops_count_the_lm_self_encoder_pass_and_take_the_stage(bpe_ws):
    ws = bpe_ws
    assert ws.cfg.model.encoder == "lm_self"
    ex = _mixed(ws)
    no_kd = dataclasses.replace(ws.cfg.stage_b, kd_weight=0.0)
    flops, tokens = step_flops(ws, no_kd, ex)
    # hand count: the LM body reads text + M memory tokens as the encoder (4N: forward and activation gradients),
    # plus 6 per token per encoder-LoRA parameter; the student 4N over prefix + answer; the LM head on the answer
    ids, _ = ws.enc_tok(ex, ws.device)
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in ex])
    b, t_ans, m = len(ex), max(len(a) for a in answers), ws.contract.num_latents
    n_lm = sum(p.numel() for n, p in ws.lm.named_parameters() if ".layers." in n and "lora_" not in n)
    enc_lora = sum(p.numel() for n, p in ws.encoder.named_parameters() if n.startswith("lora_"))
    enc_tokens = ids.numel() + b * m
    student = b * (ws.contract.prefix_len + t_ans - 1)
    head = 2 * ws.embed.weight.numel() * b * t_ans
    encoder = 4 * n_lm * enc_tokens + 6 * enc_lora * enc_tokens
    assert encoder > 0 and n_lm > 0 and _body_params(ws.encoder) == 0  # the old count: the encoder has no body
    assert flops == pytest.approx(encoder + 4 * n_lm * student + 2 * head)
    assert tokens == enc_tokens + student
    # the stage passed in decides the KD teacher term, whatever ws.cfg.stage_b says
    ws.cfg.stage_b.kd_weight = 0.0
    assert step_flops(ws, dataclasses.replace(no_kd, kd_weight=0.5), ex)[0] > flops


# ---- fp16 ----------------------------------------------------------------------------------------------------

def test_fp16_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        config.resolve("micro", {"base.dtype": "float16"})
    assert "\n" not in str(err.value) and "gradient scaler" in str(err.value) and "bfloat16" in str(err.value)
    assert config.resolve("micro", {"base.dtype": "bfloat16"}).base.dtype == "bfloat16"


# ---- truncation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ws_fixture", ["tiny_ws", "sp_ws"])  # word-level (right-padded) and SentencePiece (left)
def test_encoder_truncation_keeps_the_question_whole(ws_fixture, request):
    ws = request.getfixturevalue(ws_fixture)
    tok, base = ws.tokenizer, ws.splits["train"][0]
    long = Example("long", " ".join([base.context] * 20), base.question, base.answers, base.answer_starts)
    enc = EncoderTokenizer(tok, max_len=40, padding_side=ws.enc_tok.padding_side)
    ids, mask = enc([long, base], "cpu")
    row = ids[0][mask[0].bool()].tolist()
    question = tok(" question : " + long.question, add_special_tokens=False)["input_ids"]
    assert len(row) == 40 and row[-len(question):] == question  # the question and its label, whole, at the end
    head = tok("context : " + base.context, add_special_tokens=True)["input_ids"][:8]
    assert row[:8] == head  # BOS (when the tokenizer adds one), the label and the context's first words are kept
    tok.model_max_length, before = 32, tok.model_max_length  # an encoder's own limit (MiniLM: 512) caps max_len
    try:
        assert EncoderTokenizer(tok, max_len=40).max_len == 32
    finally:
        tok.model_max_length = before
    short = ids[1][mask[1].bool()].tolist()
    from latentgate.model.latent import encoder_text

    assert short == tok(encoder_text(base.context, base.question), add_special_tokens=True)["input_ids"]


# ---- chat end of turn ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "end"), [(GEMMA, "<end_of_turn>"), (LLAMA3, "<|eot_id|>"),
                                              (CHATML, "<|im_end|>"), (LLAMA2, "</s>"), (NO_END, "</s>")])
def test_end_of_turn_token_comes_from_the_chat_template(sp_lm_dir, template, end):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sp_lm_dir)
    tok.chat_template = template
    c = PrefixContract.from_tokenizer(tok, 4, "answer :", "chat", "eos")
    want = tok.convert_tokens_to_ids(end)
    assert c.end_id == want and want in c.stop_ids
    assert end_of_turn_id(tok) == (None if template == NO_END else want)  # no special token after a reply: EOS
    if template != NO_END:  # its header ends in a space that merges with the answer (the fallback, warned of)
        assert encode_answers(c, tok, ["paris"])[0][-1] == want


def test_chat_answers_end_with_the_turn_end_not_eos(sp_lm_dir):
    ws = _ws(sp_lm_dir, **{"model.prompt_format": "chat"})
    c, tok = ws.contract, ws.tokenizer
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot != tok.eos_token_id and c.end_id == eot and eot in c.stop_ids
    assert tok.decode(list(c.anchor_ids)) == "<end_of_turn>\n<start_of_turn>model\n"
    e = ws.splits["train"][0]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": e.answer}],
                                       tokenize=False)
    after = tok(rendered.split(e.answer, 1)[1], add_special_tokens=False)["input_ids"]
    assert encode_answers(c, tok, [e.answer])[0][-1] == after[0] == eot


# ---- SentencePiece --------------------------------------------------------------------------------------------

CONTRACT_TESTS = [contract_tests.test_golden_layout_training_equals_generation,
                  contract_tests.test_first_k_and_tf_targets_agree, contract_tests.test_kd_alignment_on_mixed_lengths,
                  contract_tests.test_teacher_pass_runs_without_lora,
                  real_lm_tests.test_bpe_generation_prefix_equals_training_prefix,
                  real_lm_tests.test_generation_stops_at_any_stop_id,
                  real_lm_tests.test_each_adapter_gets_gradients_exactly_where_it_should]


@pytest.mark.parametrize("check", CONTRACT_TESTS, ids=lambda f: f.__name__)
def test_sentencepiece_passes_the_contract_and_loss_tests(sp_lm_dir, check):
    """The word-level and byte-level BPE LMs' own contract, loss, generation and gradient tests, on the
    SentencePiece LM (a fresh workspace each: some attach LoRA)."""
    check(_ws(sp_lm_dir))


def test_sentencepiece_contract_matches_how_the_lm_reads_text(sp_ws):
    ws, tok, c = sp_ws, sp_ws.tokenizer, sp_ws.contract
    assert tok.convert_ids_to_tokens(tok("paris")["input_ids"])[:1] == ["<s>"]
    assert c.head_ids == (tok.bos_token_id,)  # the tokenizer adds BOS, so the prefix starts with it
    assert c.end_id is None  # plain prompt on an external LM: no forced end token
    for e, ids in zip(_mixed(ws), encode_answers(c, tok, [e.answer for e in _mixed(ws)])):
        body = text_prompt(e.context, e.question)
        natural = tok(f"{body} answer : {e.answer}")["input_ids"]
        assert list(c.head_ids) + tok(body, add_special_tokens=False)["input_ids"] + list(c.anchor_ids) + ids \
            == natural
        assert tok.convert_ids_to_tokens(ids)[0].startswith("▁")  # " paris" after the anchor, a word start


def test_anchor_answer_merge_fallback_warns(sp_ws):
    ws, tok = sp_ws, sp_ws.tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_answers(ws.contract, tok, [e.answer for e in _mixed(ws)])  # the normal case: silent
    # an anchor that ends inside a word ("answ|er"): tokenized with the answer, the boundary token differs
    anchor = " answ"
    c = dataclasses.replace(ws.contract, anchor_text=anchor, answer_sep="",
                            anchor_ids=tuple(tok(anchor, add_special_tokens=False)["input_ids"]))
    with pytest.warns(UserWarning, match="merges with the anchor"):
        encode_answers(c, tok, ["er : paris"])


# ---- the GPU check ---------------------------------------------------------------------------------------------

def test_gpu_check_runs_end_to_end_tiny(mlflow_store, tmp_path):
    """`python -m latentgate.bench.gpu_check --tiny`: all three rows measured on this machine with tiny shapes, one
    table printed, the figures in gpu_check.json."""
    import json

    from click.testing import CliRunner

    from latentgate.bench.gpu_check import gpu_check

    result = CliRunner().invoke(gpu_check, ["--tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert list(rows) == ["smollm2_smoke", "llama8b_step", "generation"]
    assert all(r["status"] == "info" and r["measured"].startswith("tiny") for r in rows.values()), rows
    assert 0.0 <= rows["smollm2_smoke"]["value"] <= 1.0 and rows["smollm2_smoke"]["details"]["wall_seconds"] > 0
    step = rows["llama8b_step"]["details"]
    assert step["tokens_per_s"] > 0 and step["plan_bytes"] > 0 and step["steps"] == 2
    gen = rows["generation"]["details"]
    assert gen["identical"] == gen["n"] == 8  # the same model and batches: HF generate gives our tokens
    table = result.output[result.output.index("what"):]
    assert table.count("tiny") == 3 and "ERROR" not in table


def test_gpu_check_says_not_measured_without_cuda(tmp_path):
    from latentgate.bench.gpu_check import CheckOptions, run_gpu_check
    from latentgate.bench.report import NOT_MEASURED

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the rows are measured")
    rows = run_gpu_check(CheckOptions(tiny=False, smollm2=tmp_path / "smollm2", out_dir=tmp_path))
    assert [r.status for r in rows] == [NOT_MEASURED] * 3 and all("no CUDA" in r.measured for r in rows)
