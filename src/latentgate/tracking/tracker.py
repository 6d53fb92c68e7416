"""MLflow glue. Per-step metrics are buffered and written with `log_batch` (a synchronous `log_metric` costs ~25 ms
on this disk; a batch ~0.35 ms per metric) and flushed before anything reads them back. `NullTracker` stands in
when tracking is off, so training code never branches on "is logging on"."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from latentgate.tracking.secrets import mask_secrets

PARAM_BATCH = 100
METRIC_FLUSH = 1000
# 64 bits of sha256: shows whole in the gate's table and fits MLflow's 36-character dataset digest column
DIGEST_CHARS = 16


def dataset_rows(examples) -> list[dict]:
    """A split as the flat records MLflow logs (answers as a JSON list)."""
    return [{"id": e.id, "context": e.context, "question": e.question, "answers": json.dumps(list(e.answers))}
            for e in examples]


def dataset_digest(examples) -> str:
    """sha256 over every record, in order. MLflow's own pandas digest hashes only the first 10,000 rows (plus the
    row count), so it cannot see the tail of SQuAD dev (10,570 questions)."""
    return _rows_digest(dataset_rows(examples))


def _rows_digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
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
    def log_input(self, examples, name: str, context: str) -> None: ...
    def max_logged_step(self, key: str) -> int:
        return -1

    def skip_logged_steps(self, keys) -> None: ...


class MlflowTracker(NullTracker):
    """Writes to one MLflow run (already started by the caller)."""

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self._buffer: list = []
        self._skip_until: dict[str, int] = {}

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, mask_secrets(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH], synchronous=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

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
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

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
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), name)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_text(text)
            parent = str(Path(name).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def log_input(self, examples, name: str, context: str) -> None:
        """Record a split as an MLflow dataset input, so its digest (`dataset_digest`: all rows) is tracked with
        the run, and as the tag `dataset.<name>.digest` the readiness gate compares with its pin."""
        import mlflow
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        rows = dataset_rows(examples)
        ds = mlflow.data.from_pandas(pd.DataFrame(rows), name=name, digest=_rows_digest(rows))
        entry = DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self.client.log_inputs(self.run_id, datasets=[entry])
        self.set_tags({f"dataset.{name}.digest": ds.digest})

