"""Each stage as one tracked MLflow run: base LM, Stage A, Stage B, eval. Entry points and the smoke compose them.

Stages hand each other checkpoints by URI (`runs:/<id>/checkpoints/stage_a`), resolved to a local folder here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from latentgate.config import Config, config_hash, flatten
from latentgate.errors import CheckpointError
from latentgate.tracking.runs import tracked_run

BASE_HASH_TAG = "latentgate.base_config_hash"


def base_hash(cfg: Config) -> str:
    keep = {k: v for k, v in flatten(cfg).items()
            if k.startswith("base.") and not k.startswith("base.gate_") or k.startswith("data.")}
    import hashlib

    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_registered_base(cfg: Config) -> tuple[str, str] | None:
    """A FINISHED base run with the same config, registered under run.registry_base -> (run_id, local dir)."""
    import mlflow
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
        local = mlflow.artifacts.download_artifacts(run_id=v.run_id, artifact_path="base_lm")
        return v.run_id, local
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


def run_base(cfg: Config, out_dir: Path, splits) -> dict:
    """Reuse the registered base LM when its config matches; otherwise train it. Then the sanity gate."""
    from latentgate.train.base import sanity_gate, text_eval, train_builtin_base
    from latentgate.train.workspace import build_workspace

    with tracked_run("base") as tr:
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
                tr.log_input(splits["train"], "train", "training")
                base_dir, info = train_builtin_base(cfg, tr, out_dir / "base", splits)
                tr.log_artifacts(base_dir, "base_lm")
                source = f"trained:{tr.run_id}"
        ws = build_workspace(cfg, base_dir, splits, with_latent=False)
        text = text_eval(ws, splits["eval"], out_dir / "base_eval")
        tr.log_metrics({"text_f1": text["f1"], "text_em": text["em"], "text_nll_per_token": text["nll_per_token"],
                        "seconds": time.perf_counter() - t0}, step=0)
        tr.set_tags({"latentgate.base_source": source, BASE_HASH_TAG: base_hash(cfg)})
        gate = sanity_gate(cfg, text)
        tr.log_dict(gate, "sanity_gate.json")
        if source.startswith("trained:"):
            tr.set_tags({"latentgate.base_version": register_base(cfg, tr.run_id)})
        return {"run_id": tr.run_id, "base_dir": str(base_dir), "source": source, "text": text,
                "seconds": time.perf_counter() - t0}


def resolve_checkpoint(uri: str) -> Path:
    """`runs:/<id>/<path>`, `models:/<name>@<alias>` or `models:/<name>/<version>`, or a local folder."""
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except (MlflowException, OSError) as err:
            raise CheckpointError(f"cannot resolve checkpoint {uri}: {str(err).splitlines()[0][:200]}",
                                  "check the run id / model name / alias (latentgate runs list)") from None
        if (local / "checkpoint" / "manifest.json").exists():  # a logged latentgate model
            local = local / "checkpoint"
        return local
    path = Path(uri)
    if not (path / "manifest.json").exists():
        raise CheckpointError(f"checkpoint {uri} does not exist or has no manifest.json",
                              "pass a checkpoint folder, runs:/<id>/checkpoints/<stage>, or models:/<name>@<alias>")
    return path


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
                         expect_config=flatten(cfg), compat_keys=COMPAT_KEYS)
    return ws


def _log_stage_common(tr, cfg: Config, splits, ws, stage: str) -> None:
    tr.log_params(flatten(cfg))
    tr.log_params({"stage": stage, "config_hash": config_hash(cfg)})
    for name, ctx in (("train", "training"), ("probe", "probe"), ("eval", "evaluation")):
        tr.log_input(splits[name], name, ctx)
    tr.log_dict(ws.contract.to_dict(), "contract.json")


def run_stage(cfg: Config, stage: str, base: dict, out_dir: Path, splits, init_from: Path | None = None,
              resume: Path | None = None, run_id: str | None = None, on_probe=None, tags: dict | None = None) -> dict:
    """Stage A (encoder+adapter, LM frozen) or Stage B (resumed from Stage A, plus LoRA)."""
    from latentgate.model.lora import attach_lora
    from latentgate.train import checkpoint as ckpt
    from latentgate.train.trainer import COMPAT_KEYS, checkpoint_modules, train_stage
    from latentgate.train.workspace import build_workspace

    with tracked_run(stage, run_id=run_id, tags={"latentgate.base_run": base["run_id"],
                                                 "latentgate.init_from": str(init_from or ""), **(tags or {})}) as tr:
        ws = build_workspace(cfg, base["base_dir"], splits)
        if init_from is not None:  # Stage B starts from Stage A's encoder + adapter
            ckpt.load_checkpoint(init_from, modules=checkpoint_modules(ws), expect_config=flatten(cfg),
                                 compat_keys=COMPAT_KEYS)
        if stage == "stage_b":
            ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
            tr.log_dict(ws.lora_counts, "lora_params.json")
            tr.log_params({"lora.trainable_params": ws.lora_counts["total"],
                           **{f"lora.layer_{k}": v for k, v in ws.lora_counts["per_layer"].items()}})
        if resume is None:
            _log_stage_common(tr, cfg, splits, ws, stage)
        stage_dir = out_dir / stage
        result = train_stage(ws, stage, tr, stage_dir, resume=resume, on_probe=on_probe)
        tr.log_artifact(stage_dir / "diagnostics.jsonl")
        tr.log_artifact(stage_dir / "diagnostics_epoch.jsonl")
        tr.log_artifacts(result["checkpoint"], f"checkpoints/{stage}")
        tr.log_metrics({f"{stage}/final_probe_{k}": v for k, v in (result["final_probe"] or {}).items()},
                       step=result["steps"])
        result.update(run_id=tr.run_id, checkpoint_uri=f"runs:/{tr.run_id}/checkpoints/{stage}")
        tr.log_dict({k: v for k, v in result.items() if k != "probes"}, "stage_summary.json")
        return result


def run_eval(cfg: Config, base: dict, checkpoint: Path, out_dir: Path, splits, source_uri: str = "") -> dict:
    from latentgate.eval.evaluate import evaluate

    with tracked_run("eval", tags={"latentgate.checkpoint": source_uri or str(checkpoint),
                                   "latentgate.base_run": base["run_id"]}) as tr:
        ws = load_trained(cfg, base["base_dir"], checkpoint, splits)
        tr.log_params(flatten(cfg))
        tr.log_input(splits["eval"], "eval", "evaluation")
        eval_dir = out_dir / "eval"
        metrics = evaluate(ws, splits["eval"], eval_dir)
        flat = {}
        for path, m in metrics["paths"].items():
            for k in ("em", "f1", "first_top1", "first_top5", "nll_per_token", "repetition_rate", "empty_rate",
                      "top_prediction_share", "distinct_first_tokens"):
                flat[f"eval/{path}/{k}"] = m[k]
        tr.log_metrics(flat, step=0)
        tr.log_artifact(eval_dir / "eval_detailed.jsonl")
        tr.log_artifact(eval_dir / "metrics.json")
        tr.log_dict(ws.contract.to_dict(), "contract.json")
        return {"run_id": tr.run_id, "metrics": metrics}
