"""Each stage as one tracked MLflow run: base LM, Stage A, Stage B, eval. Entry points and the smoke compose them.

Stages hand each other checkpoints by URI (`runs:/<id>/checkpoints/stage_a`), resolved to a local folder by
`tracking.lineage`; the base LM they train against is a `lineage.BaseLM`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from transformers import AutoTokenizer

from latentgate import distributed as dist
from latentgate.analysis.plots import make_eval_plots, make_stage_plots
from latentgate.config import Config, config_hash, flatten
from latentgate.eval.evaluate import evaluate
from latentgate.eval_row import EvalRow
from latentgate.model.latent import encoder_text
from latentgate.model.lora import attach_lora
from latentgate.model.memory_fit import check_fits
from latentgate.phases.results import BaseResult, EvalResult, StageResult
from latentgate.schema import Artifact, EvalKey, Stage, Summary, Tag
from latentgate.tracking import labels, lineage, progress
from latentgate.tracking.lineage import BaseLM
from latentgate.tracking.runs import tracked_run
from latentgate.tracking.tracker import dataset_source, enable_system_metrics
from latentgate.tracking.uris import RunUri
from latentgate.train import checkpoint as ckpt
from latentgate.train.base import gate_record, sanity_gate, text_eval, train_builtin_base
from latentgate.train.load import load_trained
from latentgate.train.manifest import COMPAT_KEYS
from latentgate.train.trainer import checkpoint_modules, train_stage
from latentgate.train.workspace import build_workspace, resolve_device


def run_base(cfg: Config, out_dir: Path, splits, run_id: str | None = None,
             tags: dict | None = None) -> BaseResult:
    """Reuse the registered base LM when its config matches; otherwise train it. Then the sanity gate.
    Under torchrun rank 0 does all of it (it registers the base LM); the other ranks then read the base LM
    from the store by its run."""

    result = dist.main_only(lambda: _run_base(cfg, out_dir, splits, run_id, tags))
    if not dist.owns_store():
        result = replace(result, base=lineage.base_from_run(result.run_id))
    return result


def _run_base(cfg: Config, out_dir: Path, splits, run_id: str | None, tags: dict | None) -> BaseResult:

    enable_system_metrics()
    with tracked_run("base", run_id=run_id, tags=tags) as tr:
        tr.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("base.", "data."))})
        t0 = time.perf_counter()
        if cfg.base.name != "builtin":
            base = BaseLM(cfg.base.name, tr.run_id, "external")
        elif found := lineage.find_registered_base(cfg):
            base = BaseLM(found.dir, tr.run_id, found.source)
        else:
            tr.log_input(splits["train"], "train", "training", dataset_source(cfg.data, "train"))
            base_dir, _ = train_builtin_base(cfg, tr, out_dir / "base", splits)
            progress.upload_dir(tr, base_dir, Artifact.BASE_LM, "base LM")
            base = BaseLM(str(base_dir), tr.run_id, f"trained:{tr.run_id}")
        source = base.source
        tr.set_name(labels.base_run_name(cfg, source))
        ws = build_workspace(cfg, base.dir, splits, with_latent=False)
        text = text_eval(ws, splits["eval"], out_dir / "base_eval")
        tr.log_metrics({Summary.TEXT_F1: text[EvalKey.F1], Summary.TEXT_EM: text[EvalKey.EM],
                        Summary.TEXT_NLL_PER_TOKEN: text[EvalKey.NLL_PER_TOKEN], "seconds": time.perf_counter() - t0},
                       step=0)
        tr.set_tags({Tag.BASE_SOURCE: source, Tag.BASE_CONFIG_HASH: lineage.base_hash(cfg)})
        tr.log_dict(gate_record(cfg, text), Artifact.SANITY_GATE)  # the evidence, whether the gate passes or not
        tr.set_description(labels.base_note(cfg, source, text, gate_record(cfg, text)))
        sanity_gate(cfg, text)
        if base.kind == "trained":
            tr.set_tags({Tag.BASE_VERSION: lineage.register_base(cfg, tr.run_id)})
        return BaseResult(run_id=tr.run_id, base=base, source=source, text=text, seconds=time.perf_counter() - t0)


def check_memory(cfg: Config, stage: str, base_dir: str, splits) -> None:
    """The memory plan for this stage (a training stage with its probe, or eval) at the longest encoder input of the
    data it reads (the tokenizer alone is loaded): ConfigError naming the stage, the moment of its peak, the figures
    and the fix when the device cannot hold it."""

    examples = splits["eval"] if stage == "eval" else [*splits["train"], *splits["probe"]]
    longest = sorted(examples, key=lambda e: len(e.context) + len(e.question), reverse=True)[:32]
    texts = [encoder_text(e.context, e.question) for e in longest]
    tok = AutoTokenizer.from_pretrained(str(base_dir), revision=cfg.base.revision or None)
    seq_len = min(max(len(ids) for ids in tok(texts)["input_ids"]), cfg.data.max_context_words * 2)
    check_fits(cfg, resolve_device(cfg.run.device), seq_len=seq_len + cfg.model.num_latents, stages=(stage,))


def _log_stage_common(tr, cfg: Config, splits, ws, stage: str) -> None:
    tr.log_params(flatten(cfg))
    tr.log_params({"stage": stage, "config_hash": config_hash(cfg)})
    for name, ctx in (("train", "training"), ("probe", "probe"), ("eval", "evaluation")):
        tr.log_input(splits[name], name, ctx, dataset_source(cfg.data, name))
    tr.log_dict(ws.contract.to_dict(), Artifact.CONTRACT)


def run_stage(cfg: Config, stage: str, base: BaseLM, out_dir: Path, splits, init_from: Path | None = None,
              resume: Path | None = None, run_id: str | None = None, on_probe=None,
              tags: dict | None = None) -> StageResult:
    """Stage A (encoder+adapter, LM frozen) or Stage B (resumed from Stage A, plus LoRA)."""

    check_memory(cfg, stage, base.dir, splits)  # a run that cannot fit is refused before anything loads
    enable_system_metrics()
    phase = (tags or {}).get(Tag.PHASE, stage)  # extend / fix name their Stage B run
    # step_key and output_dir let `latentgate resume <run>` continue any stage run, the smoke's included
    with tracked_run(stage, run_id=run_id, tags={Tag.BASE_RUN: base.run_id, Tag.INIT_FROM: str(init_from or ""),
                                                 Tag.STEP_KEY: config_hash(cfg),
                                                 Tag.OUTPUT_DIR: str(Path(out_dir).resolve()),
                                                 **(tags or {})}) as tr:
        tr.set_name(labels.stage_run_name(phase, stage, cfg))
        ws = build_workspace(cfg, base.dir, splits)
        if init_from is not None:  # Stage B starts from Stage A's encoder + adapter
            ckpt.load_checkpoint(init_from, modules=checkpoint_modules(ws), expect_config=flatten(cfg),
                                 compat_keys=COMPAT_KEYS, expect_base=ws.base_ref)
        if stage == "stage_b":
            ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
            tr.log_dict(ws.lora_counts, Artifact.LORA_PARAMS)
            tr.log_params({"lora.trainable_params": ws.lora_counts["total"],
                           **{f"lora.layer_{k}": v for k, v in ws.lora_counts["per_layer"].items()}})
        if resume is None:
            _log_stage_common(tr, cfg, splits, ws, stage)
        stage_dir = out_dir / stage
        summary = train_stage(ws, getattr(cfg, stage), tr, stage_dir, name=stage, resume=resume, on_probe=on_probe)
        result = StageResult.from_summary(summary, tr.run_id, str(RunUri(tr.run_id, Artifact.checkpoint(stage))))
        if not dist.owns_store():  # ranks > 0: rank 0 logs the artifacts and makes the plots
            return result
        tr.log_artifact(stage_dir / Artifact.DIAGNOSTICS)
        tr.log_artifact(stage_dir / Artifact.DIAGNOSTICS_EPOCH)
        _log_plots(tr, "stage", stage_dir / Artifact.DIAGNOSTICS, stage_dir / "plots")
        progress.upload_dir(tr, result.checkpoint, Artifact.checkpoint(stage), f"checkpoint {stage}")
        tr.log_metrics({Stage.metric(stage, Stage.FINAL_PROBE_PREFIX + k): v
                        for k, v in (result.final_probe or {}).items()}, step=result.steps)
        tr.log_dict(result.as_record(), Artifact.STAGE_SUMMARY)
        init_uri = (tags or {}).get(Tag.INIT_FROM) or str(init_from or "")
        loss = _final_loss(stage_dir / Artifact.DIAGNOSTICS)
        tr.set_description(labels.stage_note(phase, stage, asdict(result), init_uri, loss))
        return result


def run_eval(cfg: Config, base: BaseLM, checkpoint: Path, out_dir: Path, splits, source_uri: str = "",
             run_id: str | None = None, tags: dict | None = None) -> EvalResult:
    """Every eval path on `checkpoint`. Under torchrun rank 0 evaluates and the others receive its metrics."""

    return dist.main_only(lambda: _run_eval(cfg, base, checkpoint, out_dir, splits, source_uri, run_id, tags))


def _run_eval(cfg: Config, base: BaseLM, checkpoint: Path, out_dir: Path, splits, source_uri: str,
              run_id: str | None, tags: dict | None) -> EvalResult:

    enable_system_metrics()
    check_memory(cfg, "eval", base.dir, splits)  # before the checkpoint loads
    with tracked_run("eval", run_id=run_id, tags={Tag.CHECKPOINT: source_uri or str(checkpoint),
                                                  Tag.BASE_RUN: base.run_id, **(tags or {})}) as tr:
        ws = load_trained(cfg, base.dir, checkpoint, splits)
        tr.log_params(flatten(cfg))
        tr.set_name(labels.eval_run_name(source_uri))
        tr.log_input(splits["eval"], "eval", "evaluation", dataset_source(cfg.data, "eval"))
        eval_dir = out_dir / "eval"
        metrics = evaluate(ws, splits["eval"], eval_dir)
        record_eval(tr, ws, metrics, eval_dir)
        tr.set_description(labels.eval_note(metrics, source_uri or str(checkpoint)))
        return EvalResult(run_id=tr.run_id, metrics=metrics)


def record_eval(tr, ws, metrics: dict, eval_dir: Path) -> None:
    """What an eval run records: per-path metrics (eval/<path>/<key>), eval_detailed.jsonl, metrics.json, the
    plots and the prefix contract."""
    flat = {EvalKey.metric(path, k): m[k] for path, m in metrics["paths"].items() for k in EvalKey.LOGGED}
    tr.log_metrics(flat, step=0)
    tr.log_artifact(eval_dir / Artifact.EVAL_DETAILED)
    tr.log_table(eval_table(eval_dir / Artifact.EVAL_DETAILED), Artifact.EVAL_TABLE)
    tr.log_artifact(eval_dir / Artifact.EVAL_METRICS)
    _log_plots(tr, "eval", eval_dir, eval_dir / "plots")
    tr.log_dict(ws.contract.to_dict(), Artifact.CONTRACT)


TABLE_COLUMNS = (EvalRow.ID, EvalRow.PATH, EvalRow.QUESTION, EvalRow.PREDICTION, EvalRow.REFERENCES, EvalRow.F1,
                 EvalRow.EM, EvalRow.ERROR_MODE, EvalRow.FIRST_TOKEN_CORRECT)


def eval_table(detailed: Path) -> list[dict]:
    """One row per question and path, for `mlflow.log_table` (references joined with ' | ')."""
    return [{k: " | ".join(r.references) if k == EvalRow.REFERENCES else r.value(k) for k in TABLE_COLUMNS}
            for r in EvalRow.read(detailed)]


def _final_loss(diagnostics: Path) -> float | None:
    """The loss of the last optimizer step in a stage's diagnostics.jsonl (None if there is none)."""
    lines = [ln for ln in diagnostics.read_text().splitlines() if ln.strip()] if diagnostics.exists() else []
    return json.loads(lines[-1]).get(Stage.LOSS) if lines else None


def _log_plots(tr, kind: str, source: Path, out_dir: Path) -> None:
    """The run's plots (first_acc with stage boundaries, losses, grad norm; F1 histogram, error modes), made at
    the end of every stage and eval run. Plotting never fails a run: errors become warnings inside."""
    made = make_stage_plots(source, out_dir) if kind == "stage" else make_eval_plots(source, out_dir)
    if made:
        tr.log_artifacts(out_dir, "plots")
