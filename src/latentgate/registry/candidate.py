"""A candidate's recorded evidence, found and cached: its lineage of runs, their metric histories, its eval artifacts.

Starting from an eval run, the lineage is found through tags: the eval run's `latentgate.checkpoint`
(runs:/<stage_b>/checkpoints/...) and `latentgate.base_run`; Stage B's `latentgate.init_from` (a runs:/ URI, or a
local path, in which case the parent smoke run's `latentgate.children` names the Stage A run). What is not recorded
raises `Missing`, naming where it was looked for; the checks (registry/evidence.py) turn it into missing evidence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from latentgate.errors import DataError
from latentgate.eval_row import EvalRow
from latentgate.schema import Artifact, MlflowTag, Tag
from latentgate.tracking import lineage
from latentgate.tracking.runs import local_artifacts
from latentgate.tracking.uris import RunUri, run_in_uri

MAX_HOPS = 8


class Missing(Exception):
    """A piece of evidence that is not recorded; its message says which, and where it was looked for."""


def short_id(run_id: str) -> str:
    return run_id[:8]


class CandidateEvidence:
    """Cached access to the candidate's runs, metric histories and eval artifacts."""

    def __init__(self, eval_run_id: str, client=None):
        self.client = client or lineage.client()
        self.eval_run_id = eval_run_id
        self._runs: dict[str, Any] = {}
        self._why: dict[str, str] = {}  # phase -> why it is missing
        self._how: dict[str, str] = {}  # phase -> how it was found
        self._hist: dict[tuple[str, str], list] = {}
        self._artifacts: dict[str, Path] = {}
        self._rows: list[EvalRow] | None = None  # eval_detailed.jsonl, read once
        self._resolve()

    # ---- lineage ---------------------------------------------------------------------------------------------
    def _get(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def _resolve(self) -> None:
        ev = self._get(self.eval_run_id)
        if ev is None:
            self._why["eval"] = f"eval run {self.eval_run_id} does not exist in the tracking store"
            for phase in ("base", "stage_a", "stage_b"):
                self._why[phase] = "no eval run to start the lineage from"
            return
        self._set("eval", ev, "the candidate's eval run")
        tags = ev.data.tags
        base_id = tags.get(Tag.BASE_RUN)
        self._link("base", base_id, f"eval tag {Tag.BASE_RUN}", f"the eval run has no {Tag.BASE_RUN} tag")
        ckpt = tags.get(Tag.CHECKPOINT, "")
        sb_id = run_in_uri(ckpt, strict=True)
        self._link("stage_b", sb_id, f"eval tag {Tag.CHECKPOINT}={ckpt}",
                   f"the eval run's {Tag.CHECKPOINT} ({ckpt or 'absent'}) is not a runs:/<stage_b>/... URI")
        if "stage_b" not in self._runs:
            self._why.setdefault("stage_a", f"no Stage B run to follow {Tag.INIT_FROM} from")
            return
        run, seen = self._runs["stage_b"], set()
        for _ in range(MAX_HOPS):  # follow init_from through extend/fix stages until a stage_a run
            seen.add(run.info.run_id)
            init = run.data.tags.get(Tag.INIT_FROM, "") or run.data.tags.get(Tag.RESUME_FROM, "")
            nxt_id = run_in_uri(init, strict=True)
            how = f"{run.data.tags.get(Tag.PHASE)} {short_id(run.info.run_id)} tag {Tag.INIT_FROM}={init}"
            if nxt_id is None and init:  # a local path: the parent smoke run's children name the Stage A run
                nxt_id, how = self._sibling(run, "stage_a"), f"the stage_a run in the parent run's {Tag.CHILDREN}"
            if nxt_id is None or nxt_id in seen:
                self._why["stage_a"] = (f"Stage B run {short_id(self._runs['stage_b'].info.run_id)} does not lead to a "
                                        f"Stage A run ({Tag.INIT_FROM}={init or 'absent'})")
                return
            nxt = self._get(nxt_id)
            if nxt is None:
                self._why["stage_a"] = f"run {nxt_id} ({how}) does not exist"
                return
            if nxt.data.tags.get(Tag.PHASE) == "stage_a":
                self._set("stage_a", nxt, how)
                return
            run = nxt
        self._why["stage_a"] = f"no Stage A run within {MAX_HOPS} {Tag.INIT_FROM} hops of Stage B"

    def _sibling(self, run, phase: str) -> str | None:
        parent_id = run.data.tags.get(MlflowTag.PARENT_RUN)
        parent = self._get(parent_id) if parent_id else None
        if parent is None:
            return None
        found = []
        for cid in filter(None, parent.data.tags.get(Tag.CHILDREN, "").split(",")):
            child = self._get(cid.strip())
            if child is not None and child.data.tags.get(Tag.PHASE) == phase:
                found.append(child.info.run_id)
        return found[0] if len(found) == 1 else None

    def _link(self, phase: str, run_id: str | None, how: str, why_absent: str) -> None:
        if not run_id:
            self._why[phase] = why_absent
            return
        run = self._get(run_id)
        if run is None:
            self._why[phase] = f"{phase} run {run_id} ({how}) does not exist"
            return
        self._set(phase, run, how)

    def _set(self, phase: str, run, how: str) -> None:
        self._runs[phase] = run
        self._how[phase] = how

    def run(self, phase: str):
        if phase not in self._runs:
            raise Missing(f"{phase} run: {self._why.get(phase, 'not found')}")
        return self._runs[phase]

    def lineage(self) -> dict[str, str]:
        return {p: r.info.run_id for p, r in self._runs.items()}

    # ---- metric histories and artifacts ------------------------------------------------------------------------
    def history(self, phase: str, key: str) -> list:
        run = self.run(phase)
        ck = (run.info.run_id, key)
        if ck not in self._hist:
            self._hist[ck] = sorted(self.client.get_metric_history(run.info.run_id, key),
                                    key=lambda m: (m.step, m.timestamp))
        if not self._hist[ck]:
            raise Missing(f"{phase} run {short_id(run.info.run_id)}: no metric history {key}")
        return self._hist[ck]

    def artifact(self, name: str) -> Path:
        if name not in self._artifacts:
            run = self.run("eval")
            try:
                local = local_artifacts(str(RunUri(run.info.run_id, name)))  # no copy left in $TMPDIR
            except (MlflowException, OSError):
                raise Missing(f"eval run {short_id(run.info.run_id)}: no artifact {name}") from None
            self._artifacts[name] = Path(local)
        return self._artifacts[name]

    def metrics_json(self) -> dict:
        path = self.artifact(Artifact.EVAL_METRICS)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise Missing(f"eval run {short_id(self.eval_run_id)}: {Artifact.EVAL_METRICS} is unreadable "
                          f"({err})") from None

    def eval_path_metrics(self, path: str) -> dict:
        m = self.metrics_json().get("paths", {}).get(path)
        if not isinstance(m, dict):
            raise Missing(f"eval run {short_id(self.eval_run_id)}: {Artifact.EVAL_METRICS} has no path {path!r}")
        return m

    def detailed_rows(self, path: str) -> list[EvalRow]:
        """The eval's rows of one path, in eval order; an unreadable file is missing evidence, saying why."""
        if self._rows is None:
            try:
                self._rows = EvalRow.read(self.artifact(Artifact.EVAL_DETAILED))
            except (OSError, DataError) as err:
                raise Missing(f"eval run {short_id(self.eval_run_id)}: {Artifact.EVAL_DETAILED} is unreadable "
                              f"({err})") from None
        rows = [r for r in self._rows if r.path == path]
        if not rows:
            raise Missing(f"eval run {short_id(self.eval_run_id)}: {Artifact.EVAL_DETAILED} has no {path!r} rows")
        return rows

    def src(self, phase: str) -> str:
        return f"{phase} run {short_id(self.run(phase).info.run_id)}"
