"""The sweep: a coordinator (`latentgate sweep`) and its workers (`latentgate sweep-worker`).

The coordinator creates the MLflow store, the study (before any worker starts: fresh SQLite/journal files race)
and the sweep's parent run, resolves the Stage A checkpoint (`resume_from: auto` runs or reuses base + Stage A
once), starts the workers, restarts one that died while trials remain, and at the end records the best trial,
the Optuna plots, and registers the best model and evaluates the readiness checklist on it.

A worker needs only the storage URL and the study name (the study file is stored in the study's user attributes),
so workers can also be started by hand on other machines against the same RDB storage.

Stopping: a worker told to stop (SIGTERM / SIGINT / SIGHUP) checkpoints its trial at the next optimizer step, ends
the trial's runs KILLED and starts no other trial. A worker the coordinator started dies with it: the kernel sends it
SIGTERM when the coordinator dies (Linux parent-death signal; elsewhere the worker checks its parent between
trials), and the worker that sees its coordinator gone ends the sweep run KILLED.

Budget: the study ends when `n_trials` trials have an outcome (COMPLETE, PRUNED or FAIL). A trial failed by the
heartbeat (its worker died) is retried, and its retry replaces it in the count. Workers on one machine count and
ask under a file lock, so they never start more trials than the budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import optuna
from mlflow.exceptions import MlflowException
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState

from latentgate.config import flatten
from latentgate.errors import CheckpointError, ConfigError, Interrupted, StoreError
from latentgate.phases.smoke import run_output_dir
from latentgate.phases.stages import run_base, run_stage
from latentgate.schema import Artifact, StudyAttr, Summary, SweepTag, Tag, TrialAttr
from latentgate.sweep import tracking as trial_runs
from latentgate.sweep.finalize import finalize
from latentgate.sweep.objective import TrialContext, run_trial
from latentgate.sweep.stopping import COORDINATOR_ENV, die_with_parent, end_orphaned_sweep, progress, stop_reason
from latentgate.sweep.storage import AskLock, dashboard_command, open_storage, resolve_storage
from latentgate.sweep.study import StudySpec, build_pruner, build_sampler, spec_from_dict
from latentgate.tracking import lineage
from latentgate.tracking.progress import task
from latentgate.tracking.reuse import SWEEP_STAGE_A, reuse_key
from latentgate.tracking.runs import adopt_project_run, setup_experiment, tracked_run, tracking_uri
from latentgate.tracking.secrets import mask_secrets
from latentgate.tracking.uris import RunUri
from latentgate.train.manifest import COMPAT_KEYS, check_compat, read_manifest
from latentgate.train.workspace import load_splits

POLL_S = 1.0


def _fail_stale(study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def artifact_store(spec: StudySpec):
    path = Path(spec.artifact_dir) / spec.name
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path.resolve()))


# ---- worker --------------------------------------------------------------------------------------------------------

def run_worker(study_name: str, storage_url: str, worker_index: int = 0, threads: int | None = None,
               echo=print) -> int:
    """Run trials of an existing study until its budget is spent. Returns the number of trials this worker ran."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        study0 = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    except KeyError:
        raise StoreError(f"study {study_name!r} does not exist in {mask_secrets(storage_url)}",
                         "create it with `latentgate sweep --study <name> --storage <url>` first") from None
    if StudyAttr.SPEC not in study0.user_attrs or StudyAttr.RESUME_FROM not in study0.user_attrs:
        raise StoreError(f"study {study_name!r} was not created by `latentgate sweep`",
                         "start the sweep with `latentgate sweep` before starting workers by hand")
    spec = spec_from_dict(study0.user_attrs[StudyAttr.SPEC], f"study {study_name} (stored)")
    n_trials = int(study0.user_attrs[StudyAttr.N_TRIALS])
    parent = study0.user_attrs.get(StudyAttr.PARENT_RUN)
    storage = open_storage(storage_url, spec.heartbeat, trial_runs.StaleTrialCallback(spec.heartbeat["max_retry"]))
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=build_sampler(spec, worker_index),
                              pruner=build_pruner(spec))
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.active_run() is None and parent:
        mlflow.set_experiment(experiment_id=mlflow.get_run(parent).info.experiment_id)
    ctx = TrialContext(spec, study.user_attrs[StudyAttr.RESUME_FROM], parent, threads, artifact_store(spec))
    coordinator = int(os.environ.get(COORDINATOR_ENV) or 0) or None
    if coordinator:
        die_with_parent(coordinator)
    lock = AskLock(storage_url, study_name)
    ran = 0
    bar = _trials_bar(study, study_name, n_trials)
    try:
        while True:
            if coordinator and os.getppid() != coordinator:  # the parent-death signal's fallback
                raise Interrupted(signal.SIGTERM)
            lock.acquire()
            try:
                _fail_stale(study)
                p = progress(study)
                if p.done >= n_trials:
                    break
                if reason := stop_reason(spec.stop, study):  # the study file's stop rule (sweep/stopping.py)
                    echo(f"[worker {worker_index}] {reason}")
                    break
                if p.waiting == 0 and p.done + p.running >= n_trials:  # the last trials run elsewhere: watch them
                    lock.release()
                    time.sleep(POLL_S)
                    continue
                ctx.lock = lock
                study.optimize(lambda trial: run_trial(ctx, trial), n_trials=1, catch=(Exception,),
                               gc_after_trial=False)
                if ctx.stopped is not None:  # Optuna caught the stop as the trial's failure: stop here
                    raise ctx.stopped
                ran += 1
                echo(f"[worker {worker_index}] {_describe_last(study)}")
                _show_trials(bar, study)
            finally:
                lock.release()
    except (Interrupted, KeyboardInterrupt):
        if coordinator and os.getppid() != coordinator:
            end_orphaned_sweep(parent, coordinator)
        raise
    bar.close()
    return ran


def _trials_bar(study, name: str, n_trials: int):
    """Progress of a study (started; closed by the caller): trials with an outcome of the budget."""
    return task(f"sweep {name}", total=n_trials, unit="trials", start=progress(study).done).__enter__()


def _show_trials(bar, study, force: bool = True) -> None:
    """Trials complete / pruned / failed and the best value so far (a plain line now with `force`)."""
    p = progress(study)
    best = max((t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))), default=None)
    bar.update(p.done, force=force, complete=p.complete, pruned=p.pruned, failed=p.failed, best=best)


def _describe_last(study) -> str:
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(TrialAttr.WORKER_PID) == os.getpid()
            and t.state != optuna.trial.TrialState.RUNNING]
    if not mine:
        return "no trial"
    t = mine[-1]
    value = f" value {t.value:.4f}" if t.value is not None else ""
    return f"trial {t.number}: {t.state.name}{value} ({t.user_attrs.get(TrialAttr.OPTIMIZER_STEPS, 0)} steps)"


# ---- coordinator -----------------------------------------------------------------------------------------------

def ensure_stage_a(spec: StudySpec, cfg, echo=print) -> str:
    """`resume_from: auto`: reuse a FINISHED Stage A run with the same reuse key (tracking/reuse.py, scope
    SWEEP_STAGE_A: the config's data, base, model but LoRA, and stage_a; git commit; data digests), or run
    base + Stage A once (as children of the active run). Returns its checkpoint URI."""
    splits = load_splits(cfg)
    key = reuse_key(SWEEP_STAGE_A, cfg, splits=splits).digest()
    exp = mlflow.get_experiment_by_name(cfg.run.experiment)
    ids = [exp.experiment_id] if exp else []
    active = mlflow.active_run()
    if active is not None:
        ids = sorted(set(ids) | {active.info.experiment_id})
    if ids:
        runs = mlflow.search_runs(ids, filter_string=f"tags.`{SweepTag.STAGE_A_KEY}` = '{key}' and "
                                                    "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
        if runs:
            echo(f"resume_from: reusing Stage A run {runs[0].info.run_id}")
            return str(RunUri(runs[0].info.run_id, Artifact.checkpoint("stage_a")))
    echo("resume_from: auto -> training the base LM (or reusing a registered one) and Stage A once")
    out = run_output_dir(cfg, f"sweep-{spec.name}-stage_a")
    base = run_base(cfg, out, splits).base
    a = run_stage(cfg, "stage_a", base, out, splits, tags={SweepTag.STAGE_A_KEY: key, SweepTag.STUDY: spec.name})
    return a.checkpoint_uri


def _check_resume(spec: StudySpec, cfg, uri: str) -> None:
    """Fail before any trial if the Stage A checkpoint does not fit the study's config (the trainer's own check)."""
    folder = lineage.resolve_checkpoint(uri)
    try:
        check_compat(folder, read_manifest(folder), flatten(cfg), COMPAT_KEYS)
    except CheckpointError as err:
        raise ConfigError(f"study {spec.name}: {err.problem}",
                          "resume from a matching checkpoint, or use resume_from: auto") from None


def worker_command(study: str, url: str, index: int, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "latentgate", "sweep-worker", "--study", study, "--storage", url,
           "--worker-index", str(index)]
    return cmd + (["--threads", str(threads)] if threads else [])


def create_study(spec: StudySpec, url: str, n_trials: int):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=spec.name, storage=open_storage(url), direction="maximize",
                                sampler=build_sampler(spec), pruner=build_pruner(spec), load_if_exists=True)
    stored = study.user_attrs.get(StudyAttr.SPEC)
    trial_spec = lambda d: json.dumps({k: v for k, v in d.items() if k != "stop"}, sort_keys=True)  # noqa: E731
    if stored is not None and trial_spec(stored) != trial_spec(spec.to_dict()):  # a stop rule may change
        raise ConfigError(f"study {spec.name!r} in {mask_secrets(url)} was created from a different study file",
                          "continue it with the same file, or use another study_name or storage")
    study.set_user_attr(StudyAttr.SPEC, spec.to_dict())
    study.set_user_attr(StudyAttr.N_TRIALS, int(n_trials))
    study.set_user_attr(StudyAttr.STOPPED, "")  # a continued study checks its stop rule afresh
    return study


def run_sweep(spec: StudySpec, n_trials: int | None = None, workers: int = 1, storage: str = "",
              threads: int | None = None, echo=print, register: bool = True, processes: bool | None = None) -> dict:
    """Run (or continue) a study to `n_trials` outcomes. `processes`: run workers as subprocesses (default: when
    workers > 1; the single worker otherwise runs in this process)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    n_trials = int(n_trials or spec.n_trials)
    if n_trials < 1 or workers < 1:
        raise ConfigError(f"n_trials={n_trials} and workers={workers} must be positive",
                          "pass --n-trials/--workers >= 1")
    cfg = spec.trial_config({})
    setup_experiment(cfg.run.experiment)  # creates the MLflow database before any worker starts
    url = resolve_storage(spec.name, storage, workers)
    study = create_study(spec, url, n_trials)
    if workers > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    # inside `mlflow run` the project's run is the study's parent; nested trial runs must not re-attach to it
    parent_id = adopt_project_run() or _existing_run(study.user_attrs.get(StudyAttr.PARENT_RUN))
    t0 = time.perf_counter()
    with tracked_run("sweep", nested=False, run_id=parent_id, tags={SweepTag.STUDY: spec.name}) as tr:
        study.set_user_attr(StudyAttr.PARENT_RUN, tr.run_id)
        _log_parent(tr, spec, url, n_trials, workers)
        resume = study.user_attrs.get(StudyAttr.RESUME_FROM)
        if not resume:
            resume = ensure_stage_a(spec, cfg, echo) if spec.resume_from == "auto" else spec.resume_from
            _check_resume(spec, cfg, resume)
            study.set_user_attr(StudyAttr.RESUME_FROM, resume)
        tr.set_tags({Tag.RESUME_FROM: resume})
        echo(f"study {spec.name}: {n_trials} trials, {workers} worker(s), storage {mask_secrets(url)}")
        echo(f"dashboard: {dashboard_command(url, str(Path(spec.artifact_dir) / spec.name))}")
        t_workers = time.perf_counter()
        if not (processes if processes is not None else workers > 1):
            run_worker(spec.name, url, 0, threads, echo)
        else:
            _run_worker_processes(spec, url, workers, threads, n_trials, echo)
        worker_seconds = time.perf_counter() - t_workers
        summary = finalize(study, spec, tr, echo, register=register)
        summary.update(storage=url, parent_run_id=tr.run_id, worker_seconds=worker_seconds,
                       wall_seconds=time.perf_counter() - t0, workers=workers, n_trials=n_trials,
                       dashboard=dashboard_command(url, str(Path(spec.artifact_dir) / spec.name)))
        tr.log_metrics({"sweep/worker_seconds": worker_seconds,
                        "sweep/trials_per_hour": summary["finished"] * 3600 / max(worker_seconds, 1e-9)}, step=0)
        tr.log_dict(summary, "sweep_summary.json")
        tr.set_description(sweep_note(summary))
    return summary


def sweep_note(s: dict) -> str:
    """The sweep run's description in the UI: the budget's outcome, the best trial, its registry check."""
    lines = [f"**Study {s['study']}**: {s['finished']}/{s['n_trials']} trials ({s['complete']} complete, "
             f"{s['pruned']} pruned, {s['failed']} failed), {s['optimizer_steps']} optimizer steps, "
             f"{s['worker_seconds']:.0f} s with {s['workers']} worker(s)."]
    if s.get("stopped"):
        lines.append(f"Stopped early: {s['stopped']}")
    b = s.get("best")
    if b:
        lines.append(f"Best trial #{b['number']}: value {b['value']:.4f}, latent F1 {b[Summary.LATENT_F1] or 0:.4f}; "
                     f"params `{b['params']}`.")
    reg = s.get("registry") or {}
    if reg.get("version"):
        lines.append(f"Model version {reg['version']}: readiness checklist "
                     f"{'PASSED' if reg.get('gate_passed') else 'not passed'} (tags `hero.check.*` on the version).")
    return "\n\n".join(lines)


def _existing_run(run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        lineage.client().get_run(run_id)
        return run_id
    except MlflowException:
        return None


def _log_parent(tr, spec: StudySpec, url: str, n_trials: int, workers: int) -> None:
    params = {"study": spec.name, "storage": mask_secrets(url), "sampler": spec.sampler["name"],
              "sampler_args": json.dumps({k: v for k, v in spec.sampler.items() if k != "name"}, sort_keys=True),
              "pruner": spec.pruner["name"],
              "pruner_args": json.dumps({k: v for k, v in spec.pruner.items() if k != "name"}, sort_keys=True),
              "seed": spec.sampler.get("seed"), "study_digest": spec.digest(), "preset": spec.preset,
              "objective": f"{spec.objective['metric']} + {spec.objective['tie_weight']} * "
                           f"{spec.objective['tie_break']}"}
    try:
        tr.log_params(params)
    except MlflowException:  # a resumed study's parent run: params are immutable, so these go to tags
        pass
    tr.set_tags({SweepTag.N_TRIALS: n_trials, SweepTag.WORKERS: workers, SweepTag.STORAGE: mask_secrets(url),
                 SweepTag.SAMPLER: spec.sampler["name"], SweepTag.PRUNER: spec.pruner["name"],
                 SweepTag.SEED: spec.sampler.get("seed")})
    tr.log_dict(spec.to_dict(), "study.json")
    tr.set_name(f"sweep {spec.name} ({spec.sampler['name']}, {spec.pruner['name']} pruner, {n_trials} trials)")


def _run_worker_processes(spec: StudySpec, url: str, workers: int, threads: int | None, n_trials: int,
                          echo=print) -> None:
    """Start `workers` processes; restart one that died while trials remain (its trial is failed by the heartbeat
    and retried by the others or by its replacement)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # workers attach to the parent by tag
    env[COORDINATOR_ENV] = str(os.getpid())  # they die with this process (`die_with_parent`)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log_dir = Path(spec.artifact_dir).parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[int, subprocess.Popen] = {}

    def start(i: int) -> None:
        log = open(log_dir / f"{spec.name}.worker{i}.log", "a")  # noqa: SIM115 - owned by the process
        procs[i] = subprocess.Popen(worker_command(spec.name, url, i, threads), env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        echo(f"worker {i} started (pid {procs[i].pid}, log {log.name})")

    try:
        for i in range(min(workers, n_trials)):  # a worker past the trial budget would have nothing to do
            start(i)
        study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
        _supervise(procs, start, study, workers, n_trials, echo)
    finally:  # the coordinator is stopping (SIGTERM, Ctrl-C, an error): its workers stop with it
        _stop_workers(procs)
    if progress(study).done < n_trials and not study.user_attrs.get(StudyAttr.STOPPED):
        raise StoreError(f"study {spec.name}: workers stopped with {progress(study).done}/{n_trials} trials done",
                         f"see the worker logs in {log_dir}; rerun the same command to continue the study")


def _supervise(procs: dict, start, study, workers: int, n_trials: int, echo=print) -> None:
    """Wait for the workers (a progress line when a trial ends); restart one that died while trials remain."""
    restarts = 0
    bar, shown = _trials_bar(study, study.study_name, n_trials), progress(study).done
    while procs:
        time.sleep(POLL_S)
        done = progress(study).done
        _show_trials(bar, study, force=done != shown)  # a line when a trial ends (each worker logs its own)
        shown = done
        for i, p in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del procs[i]
            if rc != 0:
                echo(f"worker {i} (pid {p.pid}) exited with {rc}")
                if _unfinished(study, n_trials) and restarts < 2 * workers:
                    restarts += 1
                    start(workers + restarts - 1)
        if not procs and _unfinished(study, n_trials) and restarts < 2 * workers:
            restarts += 1
            start(workers + restarts - 1)
    bar.close()


def _unfinished(study, n_trials: int) -> bool:
    """Trials remain: the budget is not spent and the stop rule has not stopped the study."""
    return progress(study).done < n_trials and not study.user_attrs.get(StudyAttr.STOPPED)


def _stop_workers(procs: dict, grace_s: float = 60) -> None:
    """SIGTERM every live worker (each checkpoints its trial at the next optimizer step and marks its runs
    KILLED), wait up to `grace_s` for all of them, then SIGKILL what is left."""
    live = [p for p in procs.values() if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


