"""Lineage: what a URI or a run points at. One MLflow client on the configured store, the one parser of
`runs:/` and `models:/` URIs, the base LM behind a run or a checkpoint (`BaseLM`), its registration, and the
resolution of a checkpoint URI to a local folder.

    runs:/<run_id>/<path>              RunUri(run_id, path)
    models:/<name>@<alias>             ModelUri(name, alias=alias)
    models:/<name>/<version>           ModelUri(name, version=version)

A base LM is recorded by its base run's tag `latentgate.base_source`: `trained:<run>` (that run trained it and
holds the `base_lm` artifact), `reused:<run>` (a registered base LM trained by <run>) or `external` (a hub id or
path, the param `base.name`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from latentgate.config import Config
from latentgate.errors import CheckpointError
from latentgate.safety import refuse_loop
from latentgate.schema import Artifact, Tag
from latentgate.tracking.reuse import BASE, config_key
from latentgate.tracking.runs import local_artifacts, tracking_uri
from latentgate.tracking.uris import ModelUri, RunUri, parse_uri


def client() -> MlflowClient:
    """An MlflowClient on the configured store (MLFLOW_TRACKING_URI, or ./mlflow.db): an existing, reachable
    one, or one line saying why not (`tracking_uri`). The fluent API is pointed at the same store."""
    return MlflowClient(tracking_uri=use_store())


def use_store() -> str:
    """Point MLflow at the configured store (never creating one) and return its URI."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()  # checks that a server or database answers (once per process)
    mlflow.set_tracking_uri(uri)
    return uri


# ---- URIs -----------------------------------------------------------------------------------------------------------

def run_id_of(uri: str) -> str | None:
    """The MLflow run behind a runs:/ or models:/ URI (a model version is looked up); None for a local path."""
    parsed = parse_uri(uri)
    if isinstance(parsed, RunUri):
        return parsed.run_id
    if isinstance(parsed, ModelUri):
        try:
            if parsed.alias:
                return client().get_model_version_by_alias(parsed.name, parsed.alias).run_id
            if not parsed.version:
                raise ValueError(f"{uri} names neither an alias nor a version")
            return client().get_model_version(parsed.name, parsed.version).run_id
        except (MlflowException, ValueError) as err:
            raise CheckpointError(f"cannot resolve {uri}: {str(err).splitlines()[0][:200]}",
                                  "check the model name and alias (the Models tab of `mlflow ui`; "
                                  "`latentgate verify` names the version holding hero)") from None
    return None


def resolve_checkpoint(uri: str) -> Path:
    """`runs:/<id>/<path>`, `models:/<name>@<alias>` or `models:/<name>/<version>`, or a local folder."""
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        use_store()
        try:
            local = local_artifacts(uri)
        except (MlflowException, OSError) as err:
            raise CheckpointError(f"cannot resolve checkpoint {uri}: {str(err).splitlines()[0][:200]}",
                                  "check the run id (`mlflow runs list --experiment-id <id>`), or the model name "
                                  "and alias (the Models tab of `mlflow ui`)") from None
        if (local / "checkpoint" / Artifact.MANIFEST).exists():  # a logged latentgate model
            local = local / "checkpoint"
        elif (local / "artifacts" / "checkpoint" / Artifact.MANIFEST).exists():  # the registered pyfunc model
            local = local / "artifacts" / "checkpoint"
        return local
    path = Path(uri)
    for place in (path, path / Artifact.MANIFEST):  # a symlink loop is not "does not exist"
        refuse_loop(place, "checkpoint path", CheckpointError)
    if not (path / Artifact.MANIFEST).exists():
        raise CheckpointError(f"checkpoint {uri} does not exist or has no manifest.json",
                              "pass a checkpoint folder, runs:/<id>/checkpoints/<stage>, or models:/<name>@<alias>")
    return path


# ---- the base LM ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseLM:
    """The frozen base LM a stage trains against, and where it is recorded."""

    dir: str
    """What `build_workspace` loads: the local folder of a builtin base LM, or an external one's hub id / path."""
    run_id: str
    """The base run that recorded it (the tag `latentgate.base_run` of the stages after it); "" when none."""
    source: str
    """`trained:<run>`, `reused:<run>` or `external` (the base run's tag latentgate.base_source)."""

    @property
    def kind(self) -> str:
        """trained, reused or external."""
        return base_source(self.source)[0]


def base_source(tag: str) -> tuple[str, str]:
    """The tag latentgate.base_source -> (trained | reused | external, the run holding the base_lm artifact)."""
    kind, _, holder = (tag or "").partition(":")
    return kind, holder


def base_hash(cfg: Config) -> str:
    """What identifies a trained base LM: its data and base config (the reuse key's scope `base`)."""
    return config_key(BASE, cfg)


def find_registered_base(cfg: Config) -> BaseLM | None:
    """A FINISHED base run with the same config, registered under run.registry_base (source `reused:<run>`)."""
    c = client()
    h = base_hash(cfg)
    try:
        versions = c.search_model_versions(f"name='{cfg.run.registry_base}'")
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if v.tags.get(Tag.BASE_CONFIG_HASH) != h or not v.run_id:
            continue
        try:
            run = c.get_run(v.run_id)
        except MlflowException:
            continue
        if run.info.status != "FINISHED":
            continue
        try:
            return BaseLM(str(local_artifacts(str(RunUri(v.run_id, Artifact.BASE_LM)))), v.run_id, f"reused:{v.run_id}")
        except (MlflowException, OSError):  # its artifacts are gone (a deleted or lost artifact store): skip it
            continue
    return None


def register_base(cfg: Config, run_id: str) -> str:
    """Register the base LM trained by `run_id` under run.registry_base, tagged with its config hash."""
    c = client()
    try:
        c.get_registered_model(cfg.run.registry_base)
    except MlflowException:
        c.create_registered_model(cfg.run.registry_base, description="latentgate base LMs (frozen LLM + teacher)")
    source = c.get_run(run_id).info.artifact_uri.rstrip("/") + f"/{Artifact.BASE_LM}"
    v = c.create_model_version(cfg.run.registry_base, source=source, run_id=run_id,
                               tags={Tag.BASE_CONFIG_HASH: base_hash(cfg)})
    return v.version


def base_from_run(run_id: str) -> BaseLM:
    """The base LM a recorded run used (a base run itself, or any run tagged `latentgate.base_run`). A base run
    that reused a registered base points at the run that trained it."""
    c = client()
    try:
        tags = c.get_run(run_id).data.tags
        base_id = run_id if tags.get(Tag.PHASE) == "base" else tags.get(Tag.BASE_RUN)
        if not base_id:
            raise CheckpointError(f"run {run_id} records no base LM (tag {Tag.BASE_RUN})",
                                  "pass a checkpoint of a latentgate Stage A / Stage B run")
        base_run = c.get_run(base_id)
    except MlflowException as err:
        raise CheckpointError(f"cannot read run {run_id} or its base run: {str(err).splitlines()[0][:200]}",
                              "check MLFLOW_TRACKING_URI and the run id") from None
    source = base_run.data.tags.get(Tag.BASE_SOURCE, "")
    if source == "external":
        return BaseLM(base_run.data.params["base.name"], base_id, source)
    kind, trained_by = base_source(source)
    if kind not in ("trained", "reused") or not trained_by:
        raise CheckpointError(f"base run {base_id} has no usable {Tag.BASE_SOURCE} tag ({source!r})",
                              "it did not finish; rerun `latentgate base` and the stages after it")
    try:
        local = str(local_artifacts(str(RunUri(trained_by, Artifact.BASE_LM))))
    except (MlflowException, OSError) as err:
        raise CheckpointError(f"the base LM of run {base_id} (artifact {Artifact.BASE_LM} of run {trained_by}) cannot "
                              f"be read: {str(err).splitlines()[0][:200]}", "rerun `latentgate base`") from None
    return BaseLM(local, base_id, source)


def base_for_checkpoint(uri: str, trained_with: Config, strict: bool = True) -> BaseLM:
    """The base LM a checkpoint was trained against: the base run recorded by the checkpoint's run (runs:/ or
    models:/ URI); for a plain folder, the registered base LM of `trained_with` (the config it was trained with).
    Not `strict`: a run whose base LM cannot be read falls back to the registered one as well."""
    try:
        run_id = run_id_of(uri)
        if run_id:
            return base_from_run(run_id)
    except CheckpointError:
        if strict:
            raise
    found = find_registered_base(trained_with)
    if not found:
        raise CheckpointError(f"no registered base LM ({trained_with.run.registry_base}) matches the config of "
                              f"checkpoint {uri}", "pass the checkpoint as runs:/<run_id>/checkpoints/<stage>, or run "
                              "`latentgate base` with the preset it was trained with")
    return found
