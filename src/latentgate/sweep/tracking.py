"""MLflow glue for sweeps (Optuna's MLflowCallback is deprecated, so we own it).

One parent run per study (tags: study name, masked storage, sampler, pruner, seed). One child run per trial
(run name `trial-<n>`, param `trial_number`, the trial's params under their config keys, intermediate values as
step metrics `trial/intermediate`, the final state as tag `latentgate.trial_state` = COMPLETE / PRUNED / FAIL, and
the objective). Under it sit the trial's stage_b and eval runs.

MLflow status per state: COMPLETE -> FINISHED; PRUNED -> KILLED (a pruned trial is not a success, nor an error);
FAIL -> FAILED; KILLED (the worker was told to stop: SIGTERM, or its coordinator died) -> KILLED, with the reason
as the error tag (Optuna itself records such a trial as FAIL). A pruned trial's stage_b run is KILLED with the same
tag (the stage's own wrapper first ends it FAILED on the TrialPruned exception; it is corrected here).
"""

from __future__ import annotations

import time

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from optuna.storages import RetryHeartbeatStaleTrialCallback

from latentgate.schema import MlflowTag, Probe, Summary, SweepTag, Tag, TrialAttr
from latentgate.tracking.labels import trial_run_name
from latentgate.tracking.lineage import client
from latentgate.tracking.runs import provenance_tags

STATUS_OF = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "KILLED": "KILLED"}


def start_trial_run(parent_run_id: str | None, study: str, number: int, params: dict, retry_of: int | None):
    """Start the trial's run (fluent, so the stage runs nest under it)."""
    tags = {Tag.PHASE: "trial", SweepTag.STUDY: study, SweepTag.TRIAL_NUMBER: str(number),
            SweepTag.TRIAL_STATE: "RUNNING", **provenance_tags()}
    name = trial_run_name(number, params)  # what this trial tries: `trial-7 fte=6 lr=1e-4 cosine 350 steps`
    if mlflow.active_run() is not None:  # in-process worker: nests under the active sweep run
        run = mlflow.start_run(run_name=name, nested=True, tags=tags)
    else:
        if parent_run_id:
            tags[MlflowTag.PARENT_RUN] = parent_run_id
        run = mlflow.start_run(run_name=name, tags=tags)
    c = client()
    items = [Param("trial_number", str(number)), Param("study", study)]
    items += [Param(k, str(v)) for k, v in params.items()]
    if retry_of is not None:
        items.append(Param("retry_of", str(retry_of)))
    c.log_batch(run.info.run_id, params=items, synchronous=True)
    return run.info.run_id


def log_intermediate(run_id: str, step: int, value: float, probe: dict) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric("trial/intermediate", float(value), now, step),
               Metric(f"trial/{Probe.key(Probe.FIRST_ACC)}", float(probe[Probe.FIRST_ACC]), now, step)]
    if probe.get(Probe.F1) is not None:
        metrics.append(Metric(f"trial/{Probe.key(Probe.F1)}", float(probe[Probe.F1]), now, step))
    client().log_batch(run_id, metrics=metrics, synchronous=True)


def end_trial_run(run_id: str, state: str, metrics: dict | None = None, tags: dict | None = None) -> None:
    """Close the trial run with its final state tag and the matching MLflow status."""
    c = client()
    if metrics:
        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], synchronous=True)
    for k, v in {SweepTag.TRIAL_STATE: state, **(tags or {}), MlflowTag.NOTE: trial_note(state, metrics, tags)}.items():
        c.set_tag(run_id, k, str(v)[:5000])
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status=STATUS_OF[state])
    else:
        c.set_terminated(run_id, STATUS_OF[state])


def trial_note(state: str, metrics: dict | None, tags: dict | None) -> str:
    """The trial run's description in the UI: its outcome in one or two lines."""
    m, t = metrics or {}, tags or {}
    steps = int(m.get(Summary.OPTIMIZER_STEPS, 0))
    if state == "COMPLETE":
        return (f"**COMPLETE**: objective {m.get(Summary.OBJECTIVE, 0):.4f}; latent F1 "
                f"{m.get(Summary.LATENT_F1, 0):.3f} / EM {m.get(Summary.LATENT_EM, 0):.3f}, first-token top-1 "
                f"{m.get(Summary.LATENT_FIRST_TOP1, 0):.1%}; {steps} optimizer steps. Eval run "
                f"`{t.get(Tag.EVAL_RUN, '')}`.")
    if state == "PRUNED":
        return f"**PRUNED** after {steps} optimizer steps: {t.get(SweepTag.PRUNED, '')}."
    if state == "KILLED":
        return f"**KILLED** after {steps} optimizer steps: {t.get(Tag.ERROR, '')}"
    return f"**FAILED** after {steps} optimizer steps: {t.get(Tag.ERROR, '')}"


def mark_run(run_id: str, state: str, note: str = "") -> None:
    """Re-mark a finished stage run (e.g. the stage_b run of a pruned trial)."""
    c = client()
    try:
        c.set_tag(run_id, SweepTag.TRIAL_STATE, state)
        if state == "PRUNED":
            try:
                c.delete_tag(run_id, Tag.ERROR)  # pruning is a decision, not an error
            except MlflowException:
                pass
            c.set_tag(run_id, SweepTag.PRUNED, note)
        c.set_terminated(run_id, STATUS_OF[state])
    except MlflowException:
        pass


def fail_dead_runs(run_id: str, note: str) -> None:
    """A trial whose worker died: its run and any child run left RUNNING end FAILED (never stuck RUNNING)."""
    c = client()
    try:
        run = c.get_run(run_id)
    except MlflowException:
        return
    children = c.search_runs([run.info.experiment_id], filter_string=f"tags.`{MlflowTag.PARENT_RUN}` = '{run_id}'")
    for child in children:
        if child.info.status == "RUNNING":
            c.set_tag(child.info.run_id, SweepTag.TRIAL_STATE, "FAIL")
            c.set_tag(child.info.run_id, Tag.ERROR, note)
            c.set_terminated(child.info.run_id, "FAILED")
    c.set_tag(run_id, Tag.ERROR, note)
    if run.info.status == "RUNNING" or run.data.tags.get(SweepTag.TRIAL_STATE) == "RUNNING":
        c.set_tag(run_id, SweepTag.TRIAL_STATE, "FAIL")  # also when a later command closed the orphaned run first
        c.set_terminated(run_id, "FAILED")


class StaleTrialCallback:
    """Heartbeat-stale trial: retry it (Optuna's RetryHeartbeatStaleTrialCallback) and fail its MLflow runs."""

    def __init__(self, max_retry: int):
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study, trial) -> None:
        self.retry(study, trial)
        run_id = trial.user_attrs.get(TrialAttr.MLFLOW_RUN_ID)
        if run_id:
            try:
                fail_dead_runs(run_id, f"worker died (pid {trial.user_attrs.get(TrialAttr.WORKER_PID)}): "
                                       f"no heartbeat; trial {trial.number} failed and retried")
            except Exception:  # noqa: BLE001 - tracking must not stop the retry
                pass
