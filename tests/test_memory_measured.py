"""The memory plan of the no-grad phases against live tensor bytes measured on CPU: the in-training probe and eval
(latent and text-teacher paths, generation included) of a tiny Llama whose working set outweighs its weights, on
right-padded batches of mixed prompt lengths. And the LM head sees only the answer rows."""

from __future__ import annotations

import copy

import pytest
import torch

from latentgate import config
from latentgate.data.records import Example
from latentgate.eval.evaluate import evaluate
from latentgate.eval.probe import run_probe
from latentgate.model import memory_plan as mp
from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer
from latentgate.model.contract import answer_logits, build_text_batch, encode_answers, text_prompt
from latentgate.model.latent import encoder_text
from latentgate.model.memory_arch import arch_from_hf_config
from latentgate.schema import EvalPath
from latentgate.train.workspace import load_splits, workspace_from_lm
from test_memory_plan import LiveBytes

VOCAB = 8192  # LM head rows beyond the word-level tokenizer's: the answer logits weigh as they do on a real LM
BATCH = 16
PATHS = [EvalPath.LATENT, EvalPath.TEXT]


@pytest.fixture(scope="module")
def measured_ws():
    cfg = config.resolve("micro", config.parse_set_args([
        "base.layers=2", "base.hidden=64", "base.heads=2", "base.intermediate=128", "model.d_z=32",
        "model.num_latents=8", "model.encoder=lm_self", "run.device=cpu", "eval.max_new_tokens=4",
        f"eval.batch_size={BATCH}", f"data.n_probe={BATCH}", f"eval.paths={','.join(PATHS)}"]))
    torch.manual_seed(0)
    tok = builtin_tokenizer(cfg)
    splits = load_splits(cfg)
    ws = workspace_from_lm(cfg, build_builtin_lm(cfg, VOCAB, tok), tok, splits)
    stream = " ".join(e.context for e in splits["train"]).split()
    # contexts of 40 to 115 words: right-padded text batches whose answers start at different positions
    examples = [Example(f"m{i}", " ".join(stream[7 * i : 7 * i + 40 + 5 * i]), e.question, e.answers)
                for i, e in enumerate(splits["train"][:BATCH])]
    return ws, examples


def _plan(ws, examples, stage: str):
    """The plan for exactly these examples: the longest encoder input, head + anchor, the longest answer."""
    cfg = copy.deepcopy(ws.cfg)
    texts = [encoder_text(e.context, e.question) for e in examples]
    seq_len = max(len(ids) for ids in ws.tokenizer(texts)["input_ids"])
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in examples])
    plan = mp.plan_memory(cfg, seq_len, device="cpu", arch=arch_from_hf_config(ws.lm.config),
                          prefix_tokens=ws.contract.prefix_len - cfg.model.num_latents,
                          answer_tokens=max(len(a) for a in answers), stages=(stage,), world_size=1)
    return plan.stage(stage)


def _measure(ws, fn) -> tuple[int, int]:
    """(bytes of the weights, peak live bytes) while fn runs."""
    tracker = LiveBytes().track(ws.lm, ws.encoder, ws.adapter)
    with tracker:
        start = tracker.current
        fn()
    return start, tracker.peak


def _report(capsys, what: str, planned: int, measured: int, weights: int) -> None:
    with capsys.disabled():
        print(f"\n[memory plan] {what}: planned {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB "
              f"({planned / measured - 1:+.1%}; weights {weights / 2**20:.2f} MiB)")


def test_probe_peak_is_the_plans_within_10_percent(measured_ws, capsys):
    """run_probe with greedy F1, as the trainer calls it, on the whole probe set in one batch. The plan's probe
    moments sit on the weights (frozen + trainable; AdamW states are not built here)."""
    ws, examples = measured_ws
    weights, peak = _measure(ws, lambda: run_probe(ws, examples, with_f1=True))
    sp = _plan(ws, examples, "stage_a")
    probe = {k: v for k, v in sp.phases.items() if k.startswith("probe")}
    assert probe, "the stage plan has no probe"
    planned = sp.parts["frozen"] + sp.parts["trainable"] + max(probe.values())
    _report(capsys, "probe", planned, peak, weights)
    assert peak - weights > weights  # the working set, not the weights, decides the figure
    assert planned == pytest.approx(peak, rel=0.10)


def test_eval_peak_is_the_plans_within_10_percent(measured_ws, tmp_path, capsys):
    """evaluate() on the latent and text-teacher paths: generation (KV cache) and the scoring pass of each."""
    ws, examples = measured_ws
    weights, peak = _measure(ws, lambda: evaluate(ws, examples, tmp_path, paths=PATHS, batch_size=BATCH,
                                                  progress_name=None))
    sp = _plan(ws, examples, "eval")
    assert {"latent scoring", "text generation", "text scoring"} <= set(sp.phases)
    _report(capsys, f"eval (peak at {sp.at})", sp.peak, peak, weights)
    assert peak - weights > weights
    assert sp.peak == pytest.approx(peak, rel=0.10)


def test_lm_head_runs_on_the_answer_rows_only(measured_ws):
    """On a right-padded text batch of mixed prompt lengths the LM head reads B x T hidden states (T = the longest
    answer), never the rows from the earliest answer position to the end."""
    ws, examples = measured_ws
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in examples])
    batch = build_text_batch(ws.contract, ws.tokenizer, ws.embed, [text_prompt(e.context, e.question)
                                                                   for e in examples], answers)
    assert int(batch.answer_pos[:, 0].max() - batch.answer_pos[:, 0].min()) > 50  # prompts of mixed lengths
    rows = []
    hook = ws.lm.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    try:
        with torch.no_grad():
            logits = answer_logits(ws.lm, batch)
    finally:
        hook.remove()
    assert rows == [batch.answer_pos.shape] and logits.shape == (*batch.answer_pos.shape, VOCAB)
