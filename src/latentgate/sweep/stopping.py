"""How far a study is (`progress`) and when it stops before its trial budget: the study file's `stop` rule, checked
before every new trial.

    stop: {rule: patience, trials: 8, min_delta: 0.002}
        stop once `trials` finished trials in a row (complete, pruned or failed) have not raised the best value by
        at least `min_delta` (a smaller gain does not count, and does not move the reference best)
    stop: {rule: terminator, min_n_trials: 8, threshold: 0.002}
        Optuna's `optuna.terminator.Terminator`: stop once the upper bound of the regret that more trials could
        still remove (`RegretBoundEvaluator`, a Gaussian process over the complete trials) is below `threshold`
        (`StaticErrorEvaluator`), after at least `min_n_trials` complete trials. Deprecated by Optuna 5 (removal
        in 6.0), so prefer `patience`.
    stop: {rule: none}   (the default, also when the key is absent)

The reason is stored in the study (user attribute `latentgate.stopped`, so every worker stops, and a continued
study says why it stopped), printed, and recorded on the sweep's MLflow run. A stop rule may be added to or
changed on a continued study: it decides when to stop asking, not what a trial means.

Workers also stop when told to (sweep/runner.py), and die with their coordinator (`die_with_parent`); the one that
finds its coordinator gone ends the sweep run KILLED (`end_orphaned_sweep`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import warnings
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from optuna.study import StudyDirection
from optuna.terminator import RegretBoundEvaluator, StaticErrorEvaluator, Terminator
from optuna.trial import TrialState
from optuna.trial import TrialState as S

from latentgate.errors import ConfigError, StoreError
from latentgate.schema import StudyAttr, Tag
from latentgate.tracking import lineage

COORDINATOR_ENV = "LATENTGATE_SWEEP_COORDINATOR"  # set for the workers it starts: the coordinator's pid
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RULES = {"none": {}, "patience": {"trials": int, "min_delta": float},
         "terminator": {"min_n_trials": int, "threshold": float}}
REQUIRED = {"patience": ("trials",), "terminator": ("threshold",)}
NONE = {"rule": "none"}


@dataclass
class Progress:
    done: int
    running: int
    waiting: int
    complete: int
    pruned: int
    failed: int
    total: int


def progress(study) -> Progress:
    trials = study.get_trials(deepcopy=False)
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}  # replaced by a retry
    fail_outcomes = [t for t in trials if t.state == S.FAIL and t.number not in superseded]
    count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
    return Progress(done=count(S.COMPLETE) + count(S.PRUNED) + len(fail_outcomes), running=count(S.RUNNING),
                    waiting=count(S.WAITING), complete=count(S.COMPLETE), pruned=count(S.PRUNED),
                    failed=count(S.FAIL), total=len(trials))


def check_stop(raw, where: str) -> dict:
    """The validated `stop` mapping of a study file (absent: no rule)."""
    if raw is None:
        return dict(NONE)
    if not isinstance(raw, dict) or raw.get("rule") not in RULES:
        raise ConfigError(f"{where}: stop must be a mapping with rule: {' | '.join(RULES)}",
                          "write stop: {rule: patience, trials: 8, min_delta: 0.002}")
    rule = raw["rule"]
    bad = [k for k in raw if k != "rule" and k not in RULES[rule]]
    if bad:
        raise ConfigError(f"{where}: stop rule {rule} takes no key {bad[0]!r}",
                          f"use {sorted(RULES[rule]) or 'no other key'}")
    missing = [k for k in REQUIRED.get(rule, ()) if k not in raw]
    if missing:
        raise ConfigError(f"{where}: stop rule {rule} needs {missing[0]}", f"add {missing[0]} to stop")
    out = {"rule": rule}
    for key, typ in RULES[rule].items():
        if key not in raw:
            continue
        value = raw[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (typ is float or
                                                                               isinstance(value, int))
        if not ok or value < (1 if typ is int else 0):
            kind = "a positive integer" if typ is int else "a non-negative number"
            raise ConfigError(f"{where}: stop.{key}={value!r} must be {kind}", f"fix stop.{key}")
        out[key] = typ(value)
    if rule == "patience":
        out.setdefault("min_delta", 0.0)
    if rule == "terminator":
        out.setdefault("min_n_trials", 8)
    return out


def finished_trials(study) -> list:
    """Trials with an outcome, in the order they ended; a failed trial replaced by its retry is left out."""
    trials = study.get_trials(deepcopy=False)
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    done = [t for t in trials if t.state in (S.COMPLETE, S.PRUNED, S.FAIL) and t.number not in superseded]
    return sorted(done, key=lambda t: (t.datetime_complete or t.datetime_start, t.number))


def patience_reason(trials: list, patience: int, min_delta: float, maximize: bool = True) -> str | None:
    """Why to stop under the patience rule (None: go on)."""
    best, best_trial, since = None, None, 0
    for t in trials:
        value = t.value if t.state == S.COMPLETE else None
        gain = None if value is None or best is None else (value - best if maximize else best - value)
        if value is not None and (best is None or gain >= min_delta):
            best, best_trial, since = value, t.number, 0
        else:
            since += 1
    if since < patience:
        return None
    if best is None:
        return f"none of the last {since} finished trials completed (patience {patience})"
    return (f"the last {since} finished trials did not raise the best value {best:.4f} (trial {best_trial}) by "
            f">= {min_delta:g} (patience {patience})")


def terminator_reason(study, min_n_trials: int, threshold: float) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FutureWarning: the terminator module is deprecated (removal in 6.0)
        terminator = Terminator(improvement_evaluator=RegretBoundEvaluator(),
                                error_evaluator=StaticErrorEvaluator(constant=threshold), min_n_trials=min_n_trials)
        if not terminator.should_terminate(study):
            return None
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return (f"Optuna's Terminator: after {n} complete trials, the regret bound of the best value is below "
            f"{threshold:g} (more trials are not expected to gain that much)")


def stop_reason(stop: dict, study) -> str | None:
    """Why the study should not start another trial (None: go on). A reason found earlier (by any worker) holds."""
    if study.user_attrs.get(StudyAttr.STOPPED):
        return study.user_attrs[StudyAttr.STOPPED]
    rule = stop.get("rule", "none")
    if rule == "none":
        return None
    if rule == "patience":
        reason = patience_reason(finished_trials(study), stop["trials"], stop["min_delta"],
                                 study.direction == StudyDirection.MAXIMIZE)
    else:
        reason = terminator_reason(study, stop["min_n_trials"], stop["threshold"])
    if reason:
        done = len(finished_trials(study))
        reason = f"stopped after {done} finished trials: {reason}"
        study.set_user_attr(StudyAttr.STOPPED, reason)
    return reason


# ---- workers that stop: told to, or their coordinator died ---------------------------------------------------

def die_with_parent(parent_pid: int) -> bool:
    """Linux: have the kernel send this process SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), so a
    worker never outlives its coordinator; SIGTERM now if the parent is already gone. False where unsupported
    (the worker loop then checks its parent between trials)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # it died before the prctl call
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def end_orphaned_sweep(parent_run_id: str | None, coordinator: int) -> None:
    """The coordinator died (its sweep run cannot end itself): the worker that sees it ends the run KILLED."""
    if not parent_run_id:
        return
    try:
        c = lineage.client()
        if c.get_run(parent_run_id).info.status == "RUNNING":
            c.set_tag(parent_run_id, Tag.ERROR, f"the sweep coordinator (pid {coordinator}) died; its workers "
                      "stopped (rerun the same `latentgate sweep` command to continue the study)")
            c.set_tag(parent_run_id, Tag.ERROR_TYPE, "CoordinatorDied")
            c.set_terminated(parent_run_id, "KILLED")
    except (MlflowException, StoreError):
        pass
