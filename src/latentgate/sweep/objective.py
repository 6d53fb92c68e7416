"""One trial: Stage B resumed from the study's Stage A checkpoint with the trial's params as config overrides, then
eval. Objective = latent F1 + tie_weight * latent first-token top-1 (maximised). Intermediate value at every probe:
probe F1 + tie_weight * probe first-token accuracy, reported to the pruner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import optuna
from optuna.artifacts import upload_artifact

from latentgate.errors import Interrupted
from latentgate.eval_row import EvalRow
from latentgate.phases.stages import run_eval, run_stage
from latentgate.schema import Artifact, EvalKey, EvalPath, Summary, SweepTag, Tag, TrialAttr
from latentgate.sweep import tracking as trial_runs
from latentgate.sweep.study import StudySpec, suggest
from latentgate.tracking import lineage
from latentgate.tracking.lineage import BaseLM
from latentgate.train.workspace import load_splits

SAMPLE_ROWS = 20
SAMPLE_FIELDS = (EvalRow.ID, EvalRow.QUESTION, EvalRow.REFERENCES, EvalRow.PREDICTION, EvalRow.F1, EvalRow.EM,
                 EvalRow.FIRST_TOKEN_CORRECT, EvalRow.ERROR_MODE)  # what sample_predictions.jsonl shows of a row


def trial_base(uri: str, cfg) -> BaseLM:
    """The base LM of the study's Stage A checkpoint: an external one is named by the config; a builtin one is
    followed through the stage run's lineage, else the registered base LM of the same config."""
    if cfg.base.name != "builtin":
        return BaseLM(cfg.base.name, "", "external")
    return lineage.base_for_checkpoint(uri, cfg, strict=False)


class TrialContext:
    """What every trial of a worker shares: the spec, the Stage A checkpoint, the base LM, the data splits."""

    def __init__(self, spec: StudySpec, resume_from: str, parent_run_id: str | None, threads: int | None = None,
                 artifact_store=None):
        self.spec = spec
        self.extra = {"run.threads": threads} if threads else {}
        self.cfg0 = spec.trial_config({}, self.extra)
        self.resume_from = resume_from
        self.stage_a_dir = lineage.resolve_checkpoint(resume_from)
        self.base = trial_base(resume_from, self.cfg0)
        self.splits = load_splits(self.cfg0)
        self.parent_run_id = parent_run_id
        self.artifact_store = artifact_store
        self.lock = None  # an AskLock, released as soon as the trial exists
        self.stopped: BaseException | None = None  # the stop (SIGTERM, SIGINT, ...) that ended a trial: no more


def _retry_of(trial) -> int | None:
    frozen = getattr(trial, "_cached_frozen_trial", trial)  # optuna.Trial no longer exposes system_attrs
    return getattr(frozen, "system_attrs", {}).get("failed_trial")


def run_trial(ctx: TrialContext, trial) -> float:
    """The Optuna objective (a closure over ctx is passed to study.optimize)."""
    if ctx.lock is not None:
        ctx.lock.release()
    spec = ctx.spec
    params = suggest(trial, spec.search_space)
    retry_of = _retry_of(trial)
    trial.set_user_attr(TrialAttr.WORKER_PID, os.getpid())
    run_id = trial_runs.start_trial_run(ctx.parent_run_id, spec.name, trial.number, params, retry_of)
    trial.set_user_attr(TrialAttr.MLFLOW_RUN_ID, run_id)
    state = {"stage_run": None, "step": 0}

    def on_probe(step: int, probe: dict) -> None:
        value = spec.probe_value(probe)
        state["step"] = step
        active = mlflow.active_run()
        state["stage_run"] = active.info.run_id if active else None
        trial_runs.log_intermediate(run_id, step, value, probe)
        trial.report(value, step)
        if trial.should_prune():  # decided on rank 0 (the hook runs there): the trainer stops every rank with it
            raise optuna.TrialPruned(f"pruned at optimizer step {step} (intermediate value {value:.4f})")

    stage_b = None
    try:
        cfg = spec.trial_config(params, {**ctx.extra, "run.output_dir": ctx.cfg0.run.output_dir})
        out = Path(cfg.run.output_dir) / f"sweep-{spec.name}" / f"trial-{trial.number:04d}-{os.getpid()}"
        tags = {SweepTag.STUDY: spec.name, SweepTag.TRIAL_NUMBER: str(trial.number), Tag.RESUME_FROM: ctx.resume_from,
                Tag.INIT_FROM: ctx.resume_from}  # the URI (registry lineage), not the local download
        stage_b = run_stage(cfg, "stage_b", ctx.base, out, ctx.splits, init_from=ctx.stage_a_dir,
                            on_probe=on_probe, tags=tags)
        lineage.client().set_tag(stage_b.run_id, SweepTag.TRIAL_STATE, "COMPLETE")
        trial.set_user_attr(TrialAttr.STAGE_B_RUN_ID, stage_b.run_id)
        trial.set_user_attr(TrialAttr.CHECKPOINT_URI, stage_b.checkpoint_uri)
        trial.set_user_attr(TrialAttr.OPTIMIZER_STEPS, int(stage_b.steps))
        ev = run_eval(cfg, ctx.base, Path(stage_b.checkpoint), out, ctx.splits,
                      source_uri=stage_b.checkpoint_uri)
        paths = ev.paths
        value, main, tie = spec.score(paths)
        latent = paths[EvalPath.LATENT]
        trial.set_user_attr(TrialAttr.EVAL_RUN_ID, ev.run_id)
        trial.set_user_attr(TrialAttr.LATENT_F1, latent[EvalKey.F1])
        trial.set_user_attr(TrialAttr.LATENT_FIRST_TOP1, latent[EvalKey.FIRST_TOP1])
        _upload_artifacts(ctx, trial, run_id, out / "eval", ev.metrics)
        trial_runs.end_trial_run(run_id, "COMPLETE", metrics={
            Summary.OBJECTIVE: value, Summary.LATENT_F1: latent[EvalKey.F1], Summary.LATENT_EM: latent[EvalKey.EM],
            Summary.LATENT_FIRST_TOP1: latent[EvalKey.FIRST_TOP1], Summary.OPTIMIZER_STEPS: stage_b.steps},
            tags={Tag.EVAL_RUN: ev.run_id, Tag.STAGE_B_RUN: stage_b.run_id})
        return value
    except optuna.TrialPruned as err:
        trial.set_user_attr(TrialAttr.OPTIMIZER_STEPS, int(state["step"]))
        if state["stage_run"]:
            trial_runs.mark_run(state["stage_run"], "PRUNED", str(err))
        trial_runs.end_trial_run(run_id, "PRUNED", metrics={Summary.OPTIMIZER_STEPS: state["step"]},
                         tags={SweepTag.PRUNED: str(err)})
        raise
    except (Interrupted, KeyboardInterrupt) as err:  # told to stop: Optuna catches it, so the worker is told here
        ctx.stopped = err
        steps = int(stage_b.steps) if stage_b else int(state["step"])
        trial.set_user_attr(TrialAttr.OPTIMIZER_STEPS, steps)
        trial_runs.end_trial_run(run_id, "KILLED", metrics={Summary.OPTIMIZER_STEPS: steps},
                         tags={Tag.ERROR: " ".join(f"{type(err).__name__}: {err}".split())[:500]})
        raise
    except BaseException as err:
        steps = int(stage_b.steps) if stage_b else int(state["step"])
        trial.set_user_attr(TrialAttr.OPTIMIZER_STEPS, steps)
        trial_runs.end_trial_run(run_id, "FAIL", metrics={Summary.OPTIMIZER_STEPS: steps},
                         tags={Tag.ERROR: f"{type(err).__name__}: {str(err)[:500]}"})
        raise


def _upload_artifacts(ctx: TrialContext, trial, run_id: str, eval_dir: Path, metrics: dict) -> None:
    """Sample predictions and the F1 breakdown: to the Optuna artifact store (the dashboard shows them) and to
    the trial's MLflow run."""
    rows = EvalRow.read(eval_dir / Artifact.EVAL_DETAILED)
    latent = [r for r in rows if r.path == EvalPath.LATENT][:SAMPLE_ROWS]
    samples = eval_dir / "sample_predictions.jsonl"
    samples.write_text("".join(json.dumps({k: r.value(k) for k in SAMPLE_FIELDS}) + "\n" for r in latent))
    lp = metrics["paths"][EvalPath.LATENT]
    breakdown = {EvalPath.LATENT: {k: lp[k] for k in (
                     EvalKey.F1, EvalKey.EM, EvalKey.FIRST_TOP1, EvalKey.FIRST_TOP5, EvalKey.F1_DISTRIBUTION,
                     EvalKey.FIRST_F1_NONZERO_IDX, EvalKey.ERROR_MODES, EvalKey.TOP_PREDICTION_SHARE,
                     EvalKey.DISTINCT_FIRST_TOKENS)},
                 "controls_f1": {p: m[EvalKey.F1] for p, m in metrics["paths"].items() if p != EvalPath.LATENT},
                 "n_examples": metrics["n_examples"]}
    bd = eval_dir / "f1_breakdown.json"
    bd.write_text(json.dumps(breakdown, indent=2, sort_keys=True))
    c = lineage.client()
    c.log_artifact(run_id, str(samples))
    c.log_artifact(run_id, str(bd))
    if ctx.artifact_store is not None:
        for path, mime in ((samples, "application/jsonl"), (bd, "application/json")):
            aid = upload_artifact(artifact_store=ctx.artifact_store, file_path=str(path), study_or_trial=trial,
                                  mimetype=mime)
            trial.set_user_attr(TrialAttr.ARTIFACT_PREFIX + path.name, aid)
