"""Each stage as one tracked MLflow run: base LM, Stage A, Stage B, eval. Entry points and the smoke compose them.

Stages hand each other checkpoints by URI (`runs:/<id>/checkpoints/stage_a`), resolved to a local folder here.
"""

from __future__ import annotations

import time
from pathlib import Path

from latentgate.config import Config, config_hash, flatten
from latentgate.errors import CheckpointError
from latentgate.tracking import labels, progress
from latentgate.tracking.runs import local_artifacts, tracked_run
from latentgate.tracking.tracker import dataset_source, enable_system_metrics

BASE_HASH_TAG = "latentgate.base_config_hash"


def base_hash(cfg: Config) -> str:
    """What identifies a trained base LM: its data and base config (the sanity-gate thresholds do not)."""
    runtime = ("base.gate_", "base.gradient_checkpointing", "base.attn_implementation")  # same weights either way
    return config_hash(cfg, ("base", "data"), exclude=runtime)


def find_registered_base(cfg: Config) -> tuple[str, str] | None:
    """A FINISHED base run with the same config, registered under run.registry_base -> (run_id, local dir)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    h = base_hash(cfg)
    try:
        versions = client.search_model_versions(f"name='{cfg.run.registry_base}'")
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if v.tags.get(BASE_HASH_TAG) != h or not v.run_id:
            continue
        try:
            run = client.get_run(v.run_id)
        except MlflowException:
            continue
        if run.info.status != "FINISHED":
            continue
        try:
            return v.run_id, str(local_artifacts(f"runs:/{v.run_id}/base_lm"))
        except (MlflowException, OSError):  # its artifacts are gone (a deleted or lost artifact store): skip it
            continue
    return None


def register_base(cfg: Config, run_id: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_registered_model(cfg.run.registry_base)
    except MlflowException:
        client.create_registered_model(cfg.run.registry_base, description="latentgate base LMs (frozen LLM + teacher)")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/base_lm"
    v = client.create_model_version(cfg.run.registry_base, source=source, run_id=run_id,
                                    tags={BASE_HASH_TAG: base_hash(cfg)})
    return v.version


def run_base(cfg: Config, out_dir: Path, splits, run_id: str | None = None, tags: dict | None = None) -> dict:
    """Reuse the registered base LM when its config matches; otherwise train it. Then the sanity gate.
    Under torchrun rank 0 does all of it (it registers the base LM); the other ranks then read the base LM
    from the store by its run."""
    from latentgate import distributed as dist

    result = dist.main_only(lambda: _run_base(cfg, out_dir, splits, run_id, tags))
    if not dist.owns_store():
        result = {**result, "base_dir": base_from_run(result["run_id"])["base_dir"]}
    return result


def _run_base(cfg: Config, out_dir: Path, splits, run_id: str | None, tags: dict | None) -> dict:
    from latentgate.train.base import gate_record, sanity_gate, text_eval, train_builtin_base
    from latentgate.train.workspace import build_workspace

    enable_system_metrics()
    with tracked_run("base", run_id=run_id, tags=tags) as tr:
        tr.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("base.", "data."))})
        t0 = time.perf_counter()
        if cfg.base.name != "builtin":
            base_dir, source = cfg.base.name, "external"
        else:
            found = find_registered_base(cfg)
            if found:
                source_run, base_dir = found
                source = f"reused:{source_run}"
            else:
                tr.log_input(splits["train"], "train", "training", dataset_source(cfg.data, "train"))
                base_dir, info = train_builtin_base(cfg, tr, out_dir / "base", splits)
                progress.upload_dir(tr, base_dir, "base_lm", "base LM")
                source = f"trained:{tr.run_id}"
        tr.set_name(labels.base_run_name(cfg, source))
        ws = build_workspace(cfg, base_dir, splits, with_latent=False)
        text = text_eval(ws, splits["eval"], out_dir / "base_eval")
        tr.log_metrics({"text_f1": text["f1"], "text_em": text["em"], "text_nll_per_token": text["nll_per_token"],
                        "seconds": time.perf_counter() - t0}, step=0)
        tr.set_tags({"latentgate.base_source": source, BASE_HASH_TAG: base_hash(cfg)})
        tr.log_dict(gate_record(cfg, text), "sanity_gate.json")  # the evidence, whether the gate passes or not
        tr.set_description(labels.base_note(cfg, source, text, gate_record(cfg, text)))
        sanity_gate(cfg, text)
        if source.startswith("trained:"):
            tr.set_tags({"latentgate.base_version": register_base(cfg, tr.run_id)})
        return {"run_id": tr.run_id, "base_dir": str(base_dir), "source": source, "text": text,
                "seconds": time.perf_counter() - t0}


def resolve_checkpoint(uri: str) -> Path:
    """`runs:/<id>/<path>`, `models:/<name>@<alias>` or `models:/<name>/<version>`, or a local folder."""
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        from latentgate.tracking.runs import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())  # an existing, reachable store, or one line saying why not
        try:
            local = local_artifacts(uri)
        except (MlflowException, OSError) as err:
            raise CheckpointError(f"cannot resolve checkpoint {uri}: {str(err).splitlines()[0][:200]}",
                                  "check the run id (`mlflow runs list --experiment-id <id>`), or the model name "
                                  "and alias (the Models tab of `mlflow ui`)") from None
        if (local / "checkpoint" / "manifest.json").exists():  # a logged latentgate model
            local = local / "checkpoint"
        elif (local / "artifacts" / "checkpoint" / "manifest.json").exists():  # the registered pyfunc model
            local = local / "artifacts" / "checkpoint"
        return local
    path = Path(uri)
    if not (path / "manifest.json").exists():
        raise CheckpointError(f"checkpoint {uri} does not exist or has no manifest.json",
                              "pass a checkpoint folder, runs:/<id>/checkpoints/<stage>, or models:/<name>@<alias>")
    return path


def base_from_run(run_id: str) -> dict:
    """The base LM a recorded run used (a base run itself, or any run tagged `latentgate.base_run`):
    {"run_id", "base_dir", "source"}. A base run that reused a registered base points at the run that trained it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        tags = run.data.tags
        base_id = run_id if tags.get("latentgate.phase") == "base" else tags.get("latentgate.base_run")
        if not base_id:
            raise CheckpointError(f"run {run_id} records no base LM (tag latentgate.base_run)",
                                  "pass a checkpoint of a latentgate Stage A / Stage B run")
        base_run = client.get_run(base_id)
    except MlflowException as err:
        raise CheckpointError(f"cannot read run {run_id} or its base run: {str(err).splitlines()[0][:200]}",
                              "check MLFLOW_TRACKING_URI and the run id") from None
    source = base_run.data.tags.get("latentgate.base_source", "")
    if source == "external":
        return {"run_id": base_id, "base_dir": base_run.data.params["base.name"], "source": source}
    kind, _, trained_by = source.partition(":")
    if kind not in ("trained", "reused") or not trained_by:
        raise CheckpointError(f"base run {base_id} has no usable latentgate.base_source tag ({source!r})",
                              "it did not finish; rerun `latentgate base` and the stages after it")
    try:
        local = str(local_artifacts(f"runs:/{trained_by}/base_lm"))
    except (MlflowException, OSError) as err:
        raise CheckpointError(f"the base LM of run {base_id} (artifact base_lm of run {trained_by}) cannot be read: "
                              f"{str(err).splitlines()[0][:200]}", "rerun `latentgate base`") from None
    return {"run_id": base_id, "base_dir": local, "source": source}


def check_compatible(cfg: Config, checkpoint: Path, manifest: dict | None = None) -> dict:
    """Fail in one line, before anything is built or trained, if `checkpoint` was trained with a different
    M, d_z, encoder or base LM than `cfg` (trainer.COMPAT_KEYS). Returns the manifest."""
    from latentgate.train import checkpoint as ckpt
    from latentgate.train.trainer import COMPAT_KEYS

    manifest = manifest or ckpt.read_manifest(checkpoint)
    ckpt._check_compat(Path(checkpoint), manifest, flatten(cfg), COMPAT_KEYS)
    return manifest


def load_trained(cfg: Config, base_dir: str, checkpoint: Path, splits=None):
    """A workspace whose encoder, adapter and (if the checkpoint has one) LoRA come from `checkpoint`.
    A module missing from the checkpoint is an error, never a silent fresh init."""
    from latentgate.model.lora import attach_lora
    from latentgate.train import checkpoint as ckpt
    from latentgate.train.trainer import COMPAT_KEYS, checkpoint_modules
    from latentgate.train.workspace import build_workspace

    manifest = ckpt.read_manifest(checkpoint)
    ws = build_workspace(cfg, base_dir, splits)
    if manifest.get("lora"):
        ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
    ckpt.load_checkpoint(checkpoint, modules=checkpoint_modules(ws), lora_model=ws.lm if ws.is_peft else None,
                         expect_config=flatten(cfg), compat_keys=COMPAT_KEYS, expect_base=ws.base_ref)
    return ws


def check_memory(cfg: Config, stage: str, base_dir: str, splits) -> None:
    """The memory plan for this stage at the longest encoder input of the training data (the tokenizer alone is
    loaded): ConfigError with the figures and the fix when the device cannot hold it."""
    from transformers import AutoTokenizer

    from latentgate.model.latent import encoder_text
    from latentgate.model.memory_plan import check_fits
    from latentgate.train.workspace import resolve_device

    longest = sorted(splits["train"], key=lambda e: len(e.context) + len(e.question), reverse=True)[:32]
    texts = [encoder_text(e.context, e.question) for e in longest]
    tok = AutoTokenizer.from_pretrained(str(base_dir), revision=cfg.base.revision or None)
    seq_len = min(max(len(ids) for ids in tok(texts)["input_ids"]), cfg.data.max_context_words * 2)
    check_fits(cfg, resolve_device(cfg.run.device), seq_len=seq_len + cfg.model.num_latents, stages=(stage,))


def _log_stage_common(tr, cfg: Config, splits, ws, stage: str) -> None:
    tr.log_params(flatten(cfg))
    tr.log_params({"stage": stage, "config_hash": config_hash(cfg)})
    for name, ctx in (("train", "training"), ("probe", "probe"), ("eval", "evaluation")):
        tr.log_input(splits[name], name, ctx, dataset_source(cfg.data, name))
    tr.log_dict(ws.contract.to_dict(), "contract.json")


def run_stage(cfg: Config, stage: str, base: dict, out_dir: Path, splits, init_from: Path | None = None,
              resume: Path | None = None, run_id: str | None = None, on_probe=None, tags: dict | None = None) -> dict:
    """Stage A (encoder+adapter, LM frozen) or Stage B (resumed from Stage A, plus LoRA)."""
    from latentgate import distributed as dist
    from latentgate.model.lora import attach_lora
    from latentgate.train import checkpoint as ckpt
    from latentgate.train.trainer import COMPAT_KEYS, checkpoint_modules, train_stage
    from latentgate.train.workspace import build_workspace

    check_memory(cfg, stage, base["base_dir"], splits)  # a run that cannot fit is refused before anything loads
    enable_system_metrics()
    phase = (tags or {}).get("latentgate.phase", stage)  # extend / fix name their Stage B run
    # step_key and output_dir let `latentgate resume <run>` continue any stage run, the smoke's included
    with tracked_run(stage, run_id=run_id, tags={"latentgate.base_run": base["run_id"],
                                                 "latentgate.init_from": str(init_from or ""),
                                                 "latentgate.step_key": config_hash(cfg),
                                                 "latentgate.output_dir": str(Path(out_dir).resolve()),
                                                 **(tags or {})}) as tr:
        tr.set_name(labels.stage_run_name(phase, stage, cfg))
        ws = build_workspace(cfg, base["base_dir"], splits)
        if init_from is not None:  # Stage B starts from Stage A's encoder + adapter
            ckpt.load_checkpoint(init_from, modules=checkpoint_modules(ws), expect_config=flatten(cfg),
                                 compat_keys=COMPAT_KEYS, expect_base=ws.base_ref)
        if stage == "stage_b":
            ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
            tr.log_dict(ws.lora_counts, "lora_params.json")
            tr.log_params({"lora.trainable_params": ws.lora_counts["total"],
                           **{f"lora.layer_{k}": v for k, v in ws.lora_counts["per_layer"].items()}})
        if resume is None:
            _log_stage_common(tr, cfg, splits, ws, stage)
        stage_dir = out_dir / stage
        result = train_stage(ws, stage, tr, stage_dir, resume=resume, on_probe=on_probe)
        result.update(run_id=tr.run_id, checkpoint_uri=f"runs:/{tr.run_id}/checkpoints/{stage}")
        if not dist.owns_store():  # ranks > 0: rank 0 logs the artifacts and makes the plots
            return result
        tr.log_artifact(stage_dir / "diagnostics.jsonl")
        tr.log_artifact(stage_dir / "diagnostics_epoch.jsonl")
        _log_plots(tr, "stage", stage_dir / "diagnostics.jsonl", stage_dir / "plots")
        progress.upload_dir(tr, result["checkpoint"], f"checkpoints/{stage}", f"checkpoint {stage}")
        tr.log_metrics({f"{stage}/final_probe_{k}": v for k, v in (result["final_probe"] or {}).items()},
                       step=result["steps"])
        tr.log_dict({k: v for k, v in result.items() if k != "probes"}, "stage_summary.json")
        init_uri = (tags or {}).get("latentgate.init_from") or str(init_from or "")
        loss = _final_loss(stage_dir / "diagnostics.jsonl")
        tr.set_description(labels.stage_note(phase, stage, result, init_uri, loss))
        return result


def run_eval(cfg: Config, base: dict, checkpoint: Path, out_dir: Path, splits, source_uri: str = "",
             run_id: str | None = None, tags: dict | None = None) -> dict:
    """Every eval path on `checkpoint`. Under torchrun rank 0 evaluates and the others receive its metrics."""
    from latentgate.distributed import main_only

    return main_only(lambda: _run_eval(cfg, base, checkpoint, out_dir, splits, source_uri, run_id, tags))


def _run_eval(cfg: Config, base: dict, checkpoint: Path, out_dir: Path, splits, source_uri: str,
              run_id: str | None, tags: dict | None) -> dict:
    from latentgate.eval.evaluate import evaluate

    enable_system_metrics()
    with tracked_run("eval", run_id=run_id, tags={"latentgate.checkpoint": source_uri or str(checkpoint),
                                                  "latentgate.base_run": base["run_id"], **(tags or {})}) as tr:
        ws = load_trained(cfg, base["base_dir"], checkpoint, splits)
        tr.log_params(flatten(cfg))
        tr.set_name(labels.eval_run_name(source_uri))
        tr.log_input(splits["eval"], "eval", "evaluation", dataset_source(cfg.data, "eval"))
        eval_dir = out_dir / "eval"
        metrics = evaluate(ws, splits["eval"], eval_dir)
        record_eval(tr, ws, metrics, eval_dir)
        tr.set_description(labels.eval_note(metrics, source_uri or str(checkpoint)))
        return {"run_id": tr.run_id, "metrics": metrics}


def record_eval(tr, ws, metrics: dict, eval_dir: Path) -> None:
    """What an eval run records: per-path metrics (eval/<path>/<key>), eval_detailed.jsonl, metrics.json, the
    plots and the prefix contract."""
    flat = {}
    for path, m in metrics["paths"].items():
        for k in ("em", "f1", "first_top1", "first_top5", "first_top1_const", "nll_per_token", "repetition_rate",
                  "empty_rate", "top_prediction_share", "distinct_first_tokens"):
            flat[f"eval/{path}/{k}"] = m[k]
    tr.log_metrics(flat, step=0)
    tr.log_artifact(eval_dir / "eval_detailed.jsonl")
    tr.log_table(eval_table(eval_dir / "eval_detailed.jsonl"), EVAL_TABLE)
    tr.log_artifact(eval_dir / "metrics.json")
    _log_plots(tr, "eval", eval_dir, eval_dir / "plots")
    tr.log_dict(ws.contract.to_dict(), "contract.json")


EVAL_TABLE = "eval_table.json"
TABLE_COLUMNS = ("id", "path", "question", "prediction", "references", "f1", "em", "error_mode", "first_token_correct")


def eval_table(detailed: Path) -> list[dict]:
    """One row per question and path, for `mlflow.log_table` (references joined with ' | ')."""
    import json

    rows = [json.loads(line) for line in detailed.read_text().splitlines() if line.strip()]
    return [{k: (" | ".join(r[k]) if k == "references" else r[k]) for k in TABLE_COLUMNS} for r in rows]


def _final_loss(diagnostics: Path) -> float | None:
    """The loss of the last optimizer step in a stage's diagnostics.jsonl (None if there is none)."""
    import json

    lines = [ln for ln in diagnostics.read_text().splitlines() if ln.strip()] if diagnostics.exists() else []
    return json.loads(lines[-1]).get("loss") if lines else None


def _log_plots(tr, kind: str, source: Path, out_dir: Path) -> None:
    """The run's plots (first_acc with stage boundaries, losses, grad norm; F1 histogram, error modes), made at
    the end of every stage and eval run. Plotting never fails a run: errors become warnings inside."""
    from latentgate.analysis.plots import make_eval_plots, make_stage_plots

    made = make_stage_plots(source, out_dir) if kind == "stage" else make_eval_plots(source, out_dir)
    if made:
        tr.log_artifacts(out_dir, "plots")
