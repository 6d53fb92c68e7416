"""The `base` stage: train the embedded tiny Llama on the text version of the task, then the text-teacher sanity
gate. The predecessor's text teacher scored 13.7 nats/token because its labels were shifted twice; a gate on
NLL/token and F1 stops latent training before it starts on a teacher that cannot answer from text."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from latentgate.config import Config
from latentgate.errors import GateRefused
from latentgate.eval.evaluate import evaluate
from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer
from latentgate.model.contract import PrefixContract, answer_logits, build_text_batch, encode_answers, text_prompt
from latentgate.schema import Artifact, EvalKey, EvalPath, Summary
from latentgate.tracking import progress
from latentgate.train.trainer import batch_indices
from latentgate.train.workspace import Workspace, load_splits, resolve_device, set_threads


def text_eval(ws: Workspace, examples, out_dir: Path, progress_name: str | None = "eval (text teacher)") -> dict:
    return evaluate(ws, examples, out_dir, paths=[EvalPath.TEXT], progress_name=progress_name)["paths"][EvalPath.TEXT]


def gate_record(cfg: Config, text_metrics: dict) -> dict:
    """What the sanity gate saw and required: logged as `sanity_gate.json` whether it passed or not."""
    f1, nll = text_metrics[EvalKey.F1], text_metrics[EvalKey.NLL_PER_TOKEN]
    passed = f1 >= cfg.base.gate_min_f1 and nll <= cfg.base.gate_max_nll
    return {"base": cfg.base.name, Summary.TEXT_F1: f1, Summary.TEXT_NLL_PER_TOKEN: nll, "min_f1": cfg.base.gate_min_f1,
            "max_nll": cfg.base.gate_max_nll, "passed": passed, "prompt_format": cfg.model.prompt_format,
            "answer_end": cfg.model.answer_end}


def sanity_gate(cfg: Config, text_metrics: dict) -> dict:
    """Raise GateRefused unless the text teacher answers from text. Returns the gate record (logged as evidence).
    The thresholds are per LM (`base.gate_*`): a 135M LM reading SQuAD is not a trained 8B."""
    record = gate_record(cfg, text_metrics)
    if not record["passed"]:
        if cfg.base.name == "builtin":
            fix = "train the base LM longer (base.steps) or check the tokenizer/labels before latent training"
        else:
            fix = ("a weak reader cannot teach the latent path: try model.prompt_format=chat or a stronger LM; if this "
                   "score is what this LM can do, set base.gate_min_f1 / base.gate_max_nll for it")
        raise GateRefused(f"text-teacher sanity gate failed for {cfg.base.name}: F1 {record[Summary.TEXT_F1]:.3f} "
                          f"(need >= {cfg.base.gate_min_f1}), NLL/token {record[Summary.TEXT_NLL_PER_TOKEN]:.2f} "
                          f"(need <= {cfg.base.gate_max_nll})", fix)
    return record


def train_builtin_base(cfg: Config, tracker, out_dir: Path, splits=None) -> tuple[Path, dict]:
    """Train the builtin LM on the text task; saves it (safetensors + tokenizer) under out_dir/base_lm."""
    set_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    splits = splits or load_splits(cfg)
    tok = builtin_tokenizer(cfg)
    lm = build_builtin_lm(cfg, len(tok), tok).to(device)
    contract = PrefixContract.for_config(cfg, tok)
    ws = Workspace(cfg, device, lm, tok, contract, splits)
    b = cfg.base
    opt = torch.optim.AdamW(lm.parameters(), lr=b.lr, weight_decay=b.weight_decay, betas=(b.beta1, b.beta2))
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, min(b.warmup_steps, b.steps - 1), b.steps,
                                                        min_lr=b.lr * b.min_lr_ratio)
    max_norm = b.clip_norm if b.clip_norm > 0 else float("inf")
    train = splits["train"]
    prompts = [text_prompt(e.context, e.question) for e in train]
    answers = encode_answers(contract, tok, [e.answer for e in train])
    torch.manual_seed(b.seed)
    t0 = time.perf_counter()
    lm.train()
    with progress.task("base LM", total=b.steps) as bar:
        for step in range(1, b.steps + 1):
            idx = batch_indices(len(train), b.batch_size, step - 1, b.seed)
            tb = build_text_batch(contract, tok, ws.embed, [prompts[i] for i in idx], [answers[i] for i in idx])
            logits = answer_logits(lm, tb).float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tb.answer_targets, reduction="none")
            loss = (nll * tb.answer_mask).sum() / tb.answer_mask.sum()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(lm.parameters(), max_norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            metrics = {"base/loss": float(loss.detach()), "base/lr": sched.get_last_lr()[0],
                       "base/grad_norm": grad_norm,
                       "base/first_acc": float((logits[:, 0].argmax(-1) == tb.answer_targets[:, 0]).float().mean()),
                       "base/elapsed": time.perf_counter() - t0}
            if b.eval_every and step % b.eval_every == 0 and step < b.steps:
                probe = text_eval(ws, splits["probe"], out_dir / "base_probe", progress_name=None)
                metrics.update({"base/probe_text_f1": probe[EvalKey.F1],
                                "base/probe_text_nll": probe[EvalKey.NLL_PER_TOKEN]})
                lm.train()
            tracker.log_metrics(metrics, step=step)
            bar.update(step, loss=metrics["base/loss"], **{"probe text F1": metrics.get("base/probe_text_f1")})
    lm.eval()
    model_dir = out_dir / Artifact.BASE_LM
    lm.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    tracker.flush()
    return model_dir, {"train_seconds": time.perf_counter() - t0, "steps": b.steps}
