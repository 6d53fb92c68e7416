"""Read the tracked evidence of a run: MLflow metric histories, params, tags and artifacts (diagnostics.jsonl,
eval_detailed.jsonl, metrics.json). Nothing here parses logs.

A run id may name a smoke (or any) parent run, whose children are found through the `latentgate.children` tag and
the `mlflow.parentRunId` tag (recursively), a single stage run, or a single eval run. Runs are classified by the
metrics they carry: a *stage* logs `<stage>/first_acc` (and `<stage>/probe_first_acc` at probe steps); an *eval*
logs `eval/<path>/<k>`. The base LM run (`base/...`) is neither.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from latentgate.errors import DataError, StoreError
from latentgate.eval_row import EvalRow
from latentgate.schema import Artifact, EvalKey, MlflowTag, Probe, Stage, Tag
from latentgate.tracking.lineage import client
from latentgate.tracking.secrets import mask_secrets
from latentgate.tracking.uris import run_in_uri

TERMINAL = ("FINISHED", "FAILED", "KILLED")
NOT_STAGES = ("eval", "base")
PROBE_KEYS = tuple(map(Probe.key, Probe.KEYS))  # as a stage records them: probe_first_acc, ...
STAGE_MARKERS = (Stage.FIRST_ACC, Probe.key(Probe.FIRST_ACC), Stage.LOSS)  # what makes <prefix>/ a training stage
CHILD_DEPTH = 3


# ------------------------------------------------------------------------------------------------------------
# Data holders
# ------------------------------------------------------------------------------------------------------------


@dataclass
class StageHistory:
    """The per-step metrics of one training stage (`stage_a`, `stage_b`, ...) of one run."""

    stage: str
    run_id: str | None = None
    run_name: str = ""
    status: str = "FINISHED"
    start_time: int = 0
    end_time: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float, int]]] = field(default_factory=dict)  # key -> [(step, value, ts)]

    def values(self, key: str) -> list[tuple[int, float]]:
        """(step, value) sorted by step; the last value logged wins when a step was logged twice."""
        by_step: dict[int, tuple[int, float]] = {}
        for step, value, ts in self.series.get(key, []):
            if step not in by_step or ts >= by_step[step][0]:
                by_step[step] = (ts, value)
        return [(s, by_step[s][1]) for s in sorted(by_step)]

    def steps(self) -> list[int]:
        return sorted({s for pts in self.series.values() for s, _, _ in pts})

    def max_step(self) -> int:
        return max(self.steps(), default=0)

    def probes(self) -> list[dict[str, float]]:
        """One dict per probe step: step and the probe keys logged (first_acc, its interval, top-5, f1, nll, the
        controls), by their Probe names."""
        rows: dict[int, dict[str, float]] = {}
        for key in Probe.KEYS:
            for step, value in self.values(Probe.key(key)):
                rows.setdefault(step, {"step": step})[key] = value
        return [rows[s] for s in sorted(rows) if Probe.FIRST_ACC in rows[s]]

    def records(self) -> list[dict[str, Any]]:
        """Step records in the shape of diagnostics.jsonl (`global_step`, `stage`, metric keys)."""
        rows: dict[int, dict[str, Any]] = {}
        for key in self.series:
            for step, value in self.values(key):
                rows.setdefault(step, {Stage.GLOBAL_STEP: step, Stage.STAGE: self.stage})[key] = value
        return [rows[s] for s in sorted(rows)]


@dataclass
class EvalResult:
    """One eval run: latest metric per path, and (when read) its eval_detailed rows and metrics.json."""

    run_id: str | None
    run_name: str = ""
    status: str = "FINISHED"
    start_time: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> k -> value
    rows: list[EvalRow] | None = None  # eval_detailed.jsonl
    aggregates: dict | None = None
    checkpoint: str = ""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def stage_run_id(self) -> str | None:
        """The stage run whose checkpoint was evaluated (`latentgate.checkpoint` = runs:/<id>/...)."""
        return run_in_uri(self.checkpoint)

    def path_rows(self, path: str) -> list[EvalRow]:
        return [r for r in (self.rows or []) if r.path == path]


@dataclass
class RunBundle:
    """Everything analysis needs about one run id: the run itself, its stages (in start order) and evals."""

    run_id: str | None
    run_name: str = ""
    phase: str = ""
    status: str = "FINISHED"
    start_time: int = 0
    end_time: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    stages: list[StageHistory] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    source: str = "mlflow"  # or the path of a diagnostics.jsonl

    def evaluated_stage(self) -> StageHistory | None:
        """The stage whose checkpoint the (last) eval scored; else the last stage with probes; else the last."""
        if self.evals and self.evals[-1].stage_run_id:
            for stage_hist in reversed(self.stages):
                if stage_hist.run_id == self.evals[-1].stage_run_id:
                    return stage_hist
        with_probes = [s for s in self.stages if s.probes()]
        return (with_probes or self.stages or [None])[-1]

    def all_params(self) -> dict[str, str]:
        """The run's own params, completed by its children's (a parent smoke logs the full config itself)."""
        out: dict[str, str] = {}
        for src in [*(s.params for s in self.stages), *(e.params for e in self.evals), self.params]:
            out.update(src)
        return out

    def wall_seconds(self) -> float | None:
        if self.end_time and self.start_time:
            return (self.end_time - self.start_time) / 1000
        return None


# ------------------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------------------


def get_run(cl, run_id: str):
    try:
        return cl.get_run(run_id)
    except MlflowException as err:
        raise StoreError(f"run {run_id} not found in {mask_secrets(cl.tracking_uri)} "
                         f"({str(err).splitlines()[0][:160]})",
                         "check the run id (mlflow ui, or the smoke summary) and MLFLOW_TRACKING_URI") from None


def child_runs(cl, run) -> list:
    """Direct children: the `latentgate.children` tag plus every run tagged mlflow.parentRunId = run."""
    ids = [c for c in run.data.tags.get(Tag.CHILDREN, "").split(",") if c.strip()]
    found = {}
    try:
        for r in cl.search_runs([run.info.experiment_id],
                                filter_string=f"tags.`{MlflowTag.PARENT_RUN}` = '{run.info.run_id}'",
                                max_results=1000):
            found[r.info.run_id] = r
    except MlflowException:
        pass
    for cid in ids:
        if cid not in found:
            try:
                found[cid] = cl.get_run(cid)
            except MlflowException:
                continue
    found.pop(run.info.run_id, None)
    return sorted(found.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id))


def descendants(cl, run, depth: int = CHILD_DEPTH) -> list:
    out, frontier, seen = [], [run], {run.info.run_id}
    for _ in range(depth):
        nxt = []
        for r in frontier:
            for c in child_runs(cl, r):
                if c.info.run_id not in seen:
                    seen.add(c.info.run_id)
                    out.append(c)
                    nxt.append(c)
        frontier = nxt
        if not frontier:
            break
    return sorted(out, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def stage_prefixes(metric_keys) -> list[str]:
    """Training stages a run logged: prefixes of `<stage>/first_acc` or `<stage>/probe_first_acc`."""
    out = []
    for key in metric_keys:
        if "/" not in key:
            continue
        prefix, name = key.split("/", 1)
        if prefix not in NOT_STAGES and name in STAGE_MARKERS and prefix not in out:
            out.append(prefix)
    return out


def is_eval_run(metric_keys) -> bool:
    return any(k.startswith(EvalKey.PREFIX) and k.count("/") == 2 for k in metric_keys)


def load_stage(cl, run, prefix: str, keys=None) -> StageHistory:
    """The metric histories of one stage of a run (all its `<prefix>/...` keys, or only `keys`)."""
    names = [k.split("/", 1)[1] for k in run.data.metrics if k.startswith(prefix + "/")]
    if keys is not None:
        names = [k for k in names if k in keys]
    series = {}
    for name in names:
        hist = cl.get_metric_history(run.info.run_id, Stage.metric(prefix, name))
        series[name] = [(int(m.step), float(m.value), int(m.timestamp)) for m in hist]
    return StageHistory(stage=prefix, run_id=run.info.run_id, run_name=run.info.run_name or "",
                        status=run.info.status, start_time=run.info.start_time or 0, end_time=run.info.end_time,
                        params=dict(run.data.params), tags=dict(run.data.tags), series=series)


def eval_metrics(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and key.startswith(EvalKey.PREFIX):
            out.setdefault(parts[1], {})[parts[2]] = float(value)
    return out


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with Path(path).open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n} is not valid JSON ({err.msg})",
                                "the file is truncated or not a latentgate jsonl; re-log it from the run") from None
    return rows


def download(run_id: str, artifact_path: str, dst: Path) -> Path | None:
    """A run artifact as a local file, or None if the run has no such artifact."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst)))
    except (MlflowException, OSError):
        return None


def load_eval(cl, run, with_artifacts: bool = True) -> EvalResult:
    ev = EvalResult(run_id=run.info.run_id, run_name=run.info.run_name or "", status=run.info.status,
                    start_time=run.info.start_time or 0, metrics=eval_metrics(run.data.metrics),
                    checkpoint=run.data.tags.get(Tag.CHECKPOINT, ""), params=dict(run.data.params),
                    tags=dict(run.data.tags))
    if with_artifacts:
        with tempfile.TemporaryDirectory(prefix="latentgate-eval-") as tmp:
            detailed = download(run.info.run_id, Artifact.EVAL_DETAILED, Path(tmp))
            if detailed is not None:
                ev.rows = EvalRow.read(detailed)
            agg = download(run.info.run_id, Artifact.EVAL_METRICS, Path(tmp))
            if agg is not None:
                ev.aggregates = json.loads(agg.read_text())
    return ev


def load_run_bundle(run_id: str, cl=None, with_artifacts: bool = True) -> RunBundle:
    """The run and everything under it, read from the tracking store."""
    cl = cl or client()
    run = get_run(cl, run_id)
    bundle = RunBundle(run_id=run.info.run_id, run_name=run.info.run_name or "",
                       phase=run.data.tags.get(Tag.PHASE, ""), status=run.info.status,
                       start_time=run.info.start_time or 0, end_time=run.info.end_time,
                       params=dict(run.data.params), tags=dict(run.data.tags))
    for r in [run, *descendants(cl, run)]:
        keys = list(r.data.metrics)
        for prefix in stage_prefixes(keys):
            bundle.stages.append(load_stage(cl, r, prefix))
        if is_eval_run(keys):
            bundle.evals.append(load_eval(cl, r, with_artifacts))
    # An eval run analysed on its own: follow its checkpoint tag to the stage run it scored (read-only).
    loaded = {s.run_id for s in bundle.stages}
    for ev in bundle.evals:
        sid = ev.stage_run_id
        if sid and sid not in loaded:
            try:
                r = cl.get_run(sid)
            except MlflowException:
                continue
            loaded.add(sid)
            bundle.stages += [load_stage(cl, r, prefix) for prefix in stage_prefixes(list(r.data.metrics))]
    bundle.stages.sort(key=lambda s: (s.start_time, s.stage))
    bundle.evals.sort(key=lambda e: e.start_time)
    return bundle


def bundle_from_diagnostics(path: Path) -> RunBundle:
    """A bundle read from a local diagnostics.jsonl (the plan's `analyze_breakthrough.py diagnostics.jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist", "pass a run id, or the path of a diagnostics.jsonl")
    bundle = RunBundle(run_id=None, run_name=path.name, source=str(path))
    for stage, records in split_stages(read_jsonl(path)):
        series: dict[str, list[tuple[int, float, int]]] = {}
        for i, rec in enumerate(records):
            step = int(rec.get(Stage.GLOBAL_STEP, i + 1))
            for k, v in rec.items():
                if k in (Stage.GLOBAL_STEP, Stage.STAGE) or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                series.setdefault(k, []).append((step, float(v), i))
        bundle.stages.append(StageHistory(stage=stage, series=series))
    return bundle


def split_stages(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Consecutive records grouped by their `stage` field, in file order."""
    groups: list[tuple[str, list[dict]]] = []
    for rec in records:
        stage = str(rec.get(Stage.STAGE, "stage"))
        if not groups or groups[-1][0] != stage:
            groups.append((stage, []))
        groups[-1][1].append(rec)
    return groups
