"""Register a finished eval run's Stage-B model as a version of the `latentgate` registered model.

The model is an MLflow pyfunc logged from code (`pyfunc_model.py`), bundling: the Stage-B checkpoint
(manifest + safetensors + lora/), the base LM folder (config, safetensors, tokenizer) for the builtin base or a
reference to it (its hub id / path in the config) for an external one, the prefix contract and the resolved
config. Version tags link it to its evidence (eval, Stage B and base runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

import latentgate
from latentgate.config import flatten, from_flat
from latentgate.data.records import Example
from latentgate.errors import CheckpointError, DataError, StoreError
from latentgate.schema import Artifact, Tag
from latentgate.tracking.lineage import base_from_run, client, resolve_checkpoint
from latentgate.tracking.runs import tracked_run
from latentgate.tracking.tracker import full_params
from latentgate.tracking.uris import run_in_uri
from latentgate.train.manifest import write_manifest

BOUND = (Tag.EVAL_RUN, Tag.CHECKPOINT_SHA256)  # the register run's params that bind a version to its evidence


def manifest_sha256(checkpoint_dir: Path) -> str:
    """The sha256 of a checkpoint's manifest.json bytes (the manifest lists every file's sha256, so this pins them
    all)."""
    return hashlib.sha256((Path(checkpoint_dir) / Artifact.MANIFEST).read_bytes()).hexdigest()

MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
REQUIREMENTS = ("torch", "transformers", "peft", "tokenizers", "safetensors", "mlflow", "pandas", "pyyaml")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")


def _package_code(tmp: Path) -> str:
    """A copy of the latentgate package (sources and package data, no bytecode) for the model's `code_paths`: MLflow
    puts it on sys.path at load, so the model loads where latentgate is not installed (a serving image, a
    colleague's venv). Its own imports are covered by the pip requirements below."""
    dst = tmp / "code" / "latentgate"
    shutil.copytree(Path(latentgate.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dst)


def _pip_requirements() -> list[str]:
    out = []
    for pkg in REQUIREMENTS:
        try:
            out.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def _signature():
    return ModelSignature(inputs=Schema([ColSpec("string", "context"), ColSpec("string", "question")]),
                          outputs=Schema([ColSpec("string", "answer")]))


def version_for_eval_run(eval_run_id: str, name: str) -> str | None:
    """The newest version of `name` already registered from this eval run, if any."""
    try:
        versions = client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    mine = [v for v in versions if v.tags.get(Tag.EVAL_RUN) == eval_run_id]
    return str(max(mine, key=lambda v: int(v.version)).version) if mine else None


def register_candidate(eval_run_id: str, name: str) -> str:
    """Log the pyfunc model of a FINISHED eval run's checkpoint and register it under `name`; returns the version."""
    from latentgate.train.workspace import load_splits  # lazy: keeps latentgate verify/promote torch-free

    c = client()
    try:
        ev = c.get_run(eval_run_id)
    except MlflowException:
        raise StoreError(f"eval run {eval_run_id} does not exist in {mlflow.get_tracking_uri()}",
                         "pass the run id of a finished `latentgate eval` (or smoke's eval child)") from None
    tags = ev.data.tags
    if tags.get(Tag.PHASE) != "eval" or ev.info.status != "FINISHED":
        raise CheckpointError(f"run {eval_run_id} is a {tags.get(Tag.PHASE, 'non-latentgate')} run "
                              f"({ev.info.status}), not a FINISHED eval run", "pass a finished eval run id")
    ckpt_uri, base_run = tags.get(Tag.CHECKPOINT, ""), tags.get(Tag.BASE_RUN, "")
    if not ckpt_uri or not base_run:
        raise CheckpointError(f"eval run {eval_run_id} lacks the {Tag.CHECKPOINT} / {Tag.BASE_RUN} tags",
                              "evaluate through `latentgate eval` so the lineage is recorded")
    cfg = from_flat(full_params(ev))  # a param too long for MLflow is read whole from its artifact
    ckpt_dir = resolve_checkpoint(ckpt_uri)
    stage_b = run_in_uri(ckpt_uri) or ""
    examples = load_splits(cfg)["eval"][:2]
    example = pd.DataFrame({"context": [e.context for e in examples], "question": [e.question for e in examples]})
    version_tags = {Tag.EVAL_RUN: eval_run_id, Tag.STAGE_B_RUN: stage_b, Tag.BASE_RUN: base_run,
                    Tag.CHECKPOINT: ckpt_uri, Tag.GIT_COMMIT: tags.get(Tag.GIT_COMMIT, "unknown")}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = weights_only_copy(ckpt_dir, Path(tmp) / "checkpoint")
        version_tags[Tag.CHECKPOINT_SHA256] = manifest_sha256(ckpt_dir)
        (Path(tmp) / "config.json").write_text(json.dumps(flatten(cfg), indent=2, sort_keys=True, default=str))
        artifacts = {"checkpoint": str(ckpt_dir), "config": str(Path(tmp) / "config.json")}
        try:
            artifacts["contract"] = mlflow.artifacts.download_artifacts(run_id=eval_run_id,
                                                                        artifact_path=Artifact.CONTRACT,
                                                                        dst_path=tmp)
        except (MlflowException, OSError):
            raise CheckpointError(f"eval run {eval_run_id} has no {Artifact.CONTRACT}", "re-run the eval") from None
        if cfg.base.name == "builtin":  # bundle the base LM; an external one is referenced by cfg.base.name
            artifacts["base_lm"] = base_from_run(base_run).dir
        if mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID"):
            mlflow.set_experiment(experiment_id=ev.info.experiment_id)
        with tracked_run("register", tags={**version_tags, Tag.BASE_REFERENCE: cfg.base.name}) as tr:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_FILE), artifacts=artifacts, signature=_signature(),
                input_example=example, pip_requirements=_pip_requirements(), code_paths=[_package_code(Path(tmp))],
                metadata={Tag.EVAL_RUN: eval_run_id, Tag.CHECKPOINT: ckpt_uri, "latentgate.base": cfg.base.name})
            register_run = tr.run_id
            tr.set_tags({Tag.MODEL_URI: info.model_uri})
            # params are immutable in MLflow: the version's binding to its evidence cannot be edited afterwards
            tr.log_params({Tag.EVAL_RUN: eval_run_id, Tag.CHECKPOINT_SHA256: version_tags[Tag.CHECKPOINT_SHA256]})
    version_tags[Tag.REGISTER_RUN] = register_run
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, description="latentgate latent-prefix models; alias `hero` = gated by "
                                                        "registry/hero.yaml (latentgate promote)")
        except MlflowException:
            pass  # created concurrently
    mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
    return str(mv.version)


def weights_only_copy(src: Path, dst: Path) -> Path:
    """The checkpoint without its pickled training state (optimizer.pt, scheduler.pt): the bundle then holds
    safetensors, JSON and the LoRA adapter only. The manifest drops those entries and says so."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / Artifact.MANIFEST).read_text())
    dropped = [rel for rel in list(manifest.get("files", {})) if rel.endswith(PICKLE_SUFFIXES)]
    for rel in dropped:
        manifest["files"].pop(rel)
        (manifest.get("sizes") or {}).pop(rel, None)
        (dst / rel).unlink(missing_ok=True)
    manifest["exported"] = {"weights_only": True, "dropped": dropped}
    write_manifest(dst, manifest)  # sealed with its new hash: `checkpoint verify` checks the manifest too
    leftovers = [p.name for p in dst.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if leftovers:
        raise CheckpointError(f"checkpoint {src} holds pickled files the manifest does not list: {leftovers}",
                              "re-save the checkpoint with latentgate")
    return dst


# ---- loading and prediction (used by pyfunc_model.py) ------------------------------------------------------------

def load_model_workspace(artifacts: dict):
    """The workspace of a logged model: config, base LM (bundled or referenced), checkpoint; contract checked."""
    from latentgate.train.load import load_trained  # lazy: keeps latentgate verify/promote torch-free

    cfg = from_flat(json.loads(Path(artifacts["config"]).read_text()))
    base = artifacts.get("base_lm") or cfg.base.name
    ws = load_trained(cfg, base, Path(artifacts["checkpoint"]), splits={})
    bundled = json.loads(Path(artifacts["contract"]).read_text())
    built = json.loads(json.dumps(ws.contract.to_dict()))
    if bundled != built:
        raise CheckpointError("the bundled prefix contract differs from the one the loaded tokenizer builds",
                              "re-register the model from its eval run")
    return ws


def predict_answers(ws, contexts: list[str], questions: list[str]) -> list[str]:
    """Greedy latent-path answers, composed exactly as `latentgate.eval.evaluate` composes its latent path."""
    import torch  # lazy: keeps latentgate verify/promote torch-free

    from latentgate.eval.generate import latent_answers  # lazy: keeps latentgate verify/promote torch-free
    from latentgate.eval.probe import EvalMode  # lazy: keeps latentgate verify/promote torch-free

    examples = [Example(str(i), c, q, ("",)) for i, (c, q) in enumerate(zip(contexts, questions, strict=True))]
    out: list[str] = []
    bs = ws.cfg.eval.batch_size
    with torch.no_grad(), EvalMode(ws.encoder, ws.adapter, ws.lm):
        for start in range(0, len(examples), bs):
            chunk = examples[start : start + bs]
            out += latent_answers(ws, ws.latents(chunk))[0]
    return out


def predict_frame(ws, frame):
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    missing = {"context", "question"} - set(frame.columns)
    if missing:
        raise DataError(f"model input lacks column(s) {sorted(missing)}", "pass a DataFrame with context and question")
    answers = predict_answers(ws, [str(x) for x in frame["context"]], [str(x) for x in frame["question"]])
    return pd.DataFrame({"answer": answers})
