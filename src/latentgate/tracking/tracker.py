"""MLflow glue. Per-step metrics are buffered and written with `log_batch` (a synchronous `log_metric` costs ~25 ms
on this disk; a batch ~0.35 ms per metric) and flushed before anything reads them back. `NullTracker` stands in
when tracking is off, so training code never branches on "is logging on"."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from latentgate.errors import ConfigError
from latentgate.safety import swap_into_place
from latentgate.schema import Artifact, MlflowTag, Tag
from latentgate.tracking.secrets import mask_secrets

PARAM_BATCH = 100
METRIC_FLUSH = 1000
# 64 bits of sha256: shows whole in the gate's table and fits MLflow's 36-character dataset digest column
DIGEST_CHARS = 16
# a param longer than MLflow takes (6000 characters) is logged as this stub; the value goes whole into params_full.json
_STUB = re.compile(r"sha256:([0-9a-f]{64}) \((\d+) chars, whole in " + re.escape(Artifact.PARAMS_FULL) + r"\)")


def long_param_stub(value: str) -> str:
    """What the run's param holds for a value too long for MLflow: its hash and length (the value is an artifact)."""
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()
    return f"sha256:{digest} ({len(value)} chars, whole in {Artifact.PARAMS_FULL})"


def full_params(run) -> dict[str, str]:
    """A run's params as they were meant: each value too long for MLflow read back whole from the run's
    `params_full.json` and checked against the hash its param holds. Every place that rebuilds a Config from a
    run's params goes through here (`config.from_flat(full_params(run))`)."""
    params = dict(run.data.params)
    stubs = {k: v for k, v in params.items() if _STUB.fullmatch(v)}
    if not stubs:
        return params
    whole = _read_long_params(MlflowClient(), run.info.run_id)
    for key, stub in stubs.items():
        value = whole.get(key)
        if not isinstance(value, str) or long_param_stub(value) != stub:
            why = "lacks it" if value is None else "holds another value (its hash differs)"
            raise ConfigError(f"run {run.info.run_id}: param {key} is too long for MLflow and its artifact "
                              f"{Artifact.PARAMS_FULL} {why}", "the run's record is damaged; start the phase again")
        params[key] = value
    return params


def _read_long_params(client: MlflowClient, run_id: str) -> dict:
    """The run's params_full.json ({} when it has none)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, Artifact.PARAMS_FULL, tmp)
            return json.loads(Path(path).read_text(encoding="utf-8"))
    except (MlflowException, OSError, ValueError):
        return {}


def dataset_rows(examples) -> list[dict]:
    """A split as the flat records MLflow logs (answers as a JSON list)."""
    return [{"id": e.id, "context": e.context, "question": e.question, "answers": json.dumps(list(e.answers))}
            for e in examples]


def dataset_digest(examples) -> str:
    """sha256 over every record's own sha256, in order. MLflow's own pandas digest hashes only the first 10,000 rows
    (plus the row count), so it cannot see the tail of SQuAD dev (10,570 questions). Built from per-record hashes so
    the gate can recompute it from the scored rows of eval_detailed.jsonl (EvalRow.EXAMPLE_SHA256)."""
    return digest_of_hashes(record_sha256(row) for row in dataset_rows(examples))


def record_sha256(row: dict) -> str:
    """The sha256 of one dataset record (`dataset_rows`), as eval_detailed.jsonl rows carry it."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def example_sha256(example) -> str:
    return record_sha256(dataset_rows([example])[0])


def digest_of_hashes(hashes) -> str:
    h = hashlib.sha256()
    for one in hashes:
        h.update(one.encode("ascii") + b"\n")
    return h.hexdigest()[:DIGEST_CHARS]


class NullTracker:
    """Logs nothing: tracking off, and ranks > 0 of a multi-process run (run_id: rank 0's run)."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def flush(self) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_input(self, examples, name: str, context: str, source=None) -> None: ...
    def log_table(self, rows: list[dict], name: str) -> None: ...
    def set_description(self, text: str) -> None: ...
    def set_name(self, name: str) -> None: ...
    def max_logged_step(self, key: str) -> int:
        return -1

    def skip_logged_steps(self, keys) -> None: ...


class MlflowTracker(NullTracker):
    """Writes to one MLflow run (already started by the caller)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()
        self._buffer: list = []
        self._skip_until: dict[str, int] = {}

    def log_params(self, params: dict) -> None:
        """Params, secrets masked. A value longer than MLflow takes is never cut: it goes whole into the run's
        `params_full.json` (merged with what the run holds there already), and its param holds `long_param_stub`
        (hash and length), which `full_params` checks when it reads the value back."""
        values = {k: mask_secrets(str(v)) for k, v in params.items()}
        long = {k: v for k, v in values.items() if len(v) > MAX_PARAM_VAL_LENGTH}
        if long:
            self.log_dict({**_read_long_params(self.client, self.run_id), **long}, Artifact.PARAMS_FULL)
        items = [Param(k, long_param_stub(v) if k in long else v) for k, v in values.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH], synchronous=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None or step <= self._skip_until.get(k, -1):
                continue  # a resumed run never logs a step twice
            v = float(v)
            if math.isnan(v) or math.isinf(v):
                v = float("nan")
            self._buffer.append(Metric(k, v, now, step))
        if len(self._buffer) >= METRIC_FLUSH:
            self.flush()

    def flush(self) -> None:
        while self._buffer:  # a chunk leaves the buffer only once it is stored (a locked store may refuse it)
            chunk = self._buffer[:1000]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            del self._buffer[: len(chunk)]

    def skip_logged_steps(self, keys) -> None:
        """After a resume: steps already in the store are not logged again."""
        for k in keys:
            self._skip_until[k] = self.max_logged_step(k)

    def max_logged_step(self, key: str) -> int:
        hist = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in hist), default=-1)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, mask_secrets(str(v))[:5000])

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path, artifact_path: str | None = None) -> None:
        """A folder of artifacts. Into a local artifact store it is copied whole or not at all (a full disk leaves
        no half-copied checkpoint behind, and the error names the file that could not be written)."""
        local = self._local_artifact_root()
        if local is None or not artifact_path:
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
            return
        copy_tree_atomic(Path(path), local / artifact_path)

    def _local_artifact_root(self) -> Path | None:
        if not hasattr(self, "_artifact_root"):
            uri = self.client.get_run(self.run_id).info.artifact_uri
            self._artifact_root = Path(local_file_uri_to_path(uri)) if uri.startswith("file:") else None
        return self._artifact_root

    def log_dict(self, obj: Any, name: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), name)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_text(text)
            parent = str(Path(name).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def log_input(self, examples, name: str, context: str, source=None) -> None:
        """Record a split as an MLflow dataset input (the public `mlflow.log_input` when this tracker's run is the
        active run, as in every phase; `MlflowClient.log_inputs` otherwise), so its digest (`dataset_digest`: all
        rows) and its source (`dataset_source`) are tracked with the run, and as the tag `dataset.<name>.digest`
        the readiness gate compares with its pin."""
        rows = dataset_rows(examples)
        ds = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=name,
                                    digest=digest_of_hashes(record_sha256(r) for r in rows))
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.log_input(ds, context=context)
        else:  # a run that is not the active one: the client, with the dataset entity built from its public dict
            d = ds.to_dict()
            entity = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                             schema=d.get("schema"), profile=d.get("profile"))
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context",
                                                                                         context)])])
        self.set_tags({Tag.dataset_digest(name): ds.digest})

    def log_table(self, rows: list[dict], name: str) -> None:
        """A table artifact (`mlflow.log_table`: the UI shows it as a table, and compares it across runs)."""
        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=name)

    def set_description(self, text: str) -> None:
        """The run's Description in the UI (markdown)."""
        self.set_tags({MlflowTag.NOTE: text})

    def set_name(self, name: str) -> None:
        """Rename the run (what the UI lists)."""
        self.set_tags({MlflowTag.RUN_NAME: name})


def dataset_source(data, split: str):
    """Where a split comes from (the rules of `workspace.load_splits`), as an MLflow dataset source: the generator
    and its settings (synthetic), a local file or folder, or a hub dataset and its split. Secrets masked."""
    if data.source == "synthetic":
        return CodeDatasetSource({"generator": "latentgate.data.synthetic", "split": split, "seed": str(data.seed),
                                  **{k: str(getattr(data, k)) for k in ("facts_per_context", "num_entities",
                                                                        "values_per_attribute", "answer_length")}})
    held = split != "train"
    source = data.eval_source if held and data.eval_source else data.source
    if Path(source).exists():
        # built here, not from the bare path: MLflow registers two local sources (schemes "" and "file") and warns
        # on every path that it "can be interpreted in multiple ways"; the logged source is the same
        return LocalArtifactDatasetSource(str(Path(source).resolve()))
    return HuggingFaceDatasetSource(path=mask_secrets(source), split=data.eval_split if held else "train")


def enable_system_metrics() -> None:
    """CPU, memory, disk, network (and, with pynvml and CUDA, GPU) figures as `system/*` metrics of every run
    started from now on in this process and its children; `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false` opts out."""
    if importlib.util.find_spec("psutil") is not None:
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")


def copy_tree_atomic(src: Path, dest: Path) -> None:
    """Copy folder `src` to `dest` (replacing it) through a sibling temp folder renamed into place when complete:
    `dest` is the old folder or the new one, never a part. On an error the temp folder is removed and the OSError
    names the destination file that could not be written (shutil names the source)."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = dest.with_name(f"{dest.name}.tmp-{tag}")
    try:
        tmp.mkdir(parents=True)
        for item in sorted(src.rglob("*")):
            target = tmp / item.relative_to(src)
            if item.is_dir():
                target.mkdir(exist_ok=True)
                continue
            try:
                shutil.copy2(item, target)
            except OSError as err:
                shown = dest / item.relative_to(src)
                raise OSError(err.errno, err.strerror or str(err), str(shown)) from err
        swap_into_place(tmp, dest, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
