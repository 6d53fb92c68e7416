"""`latentgate sweep` (coordinator) and `latentgate sweep-worker` (one worker; also started by hand on other
machines against the same storage). Top-level imports: click and cli_common only."""

from __future__ import annotations

import click

from latentgate.cli_common import config_options, guarded


@click.command()
@click.option("--study", "study_name", default="phase2", show_default=True,
              help="study name in sweeps/ (defaults.yaml + <study>.yaml) or a YAML path")
@click.option("--name", "name", default="", help="Optuna study name (empty: the study file's study_name)")
@click.option("--resume-from", default="", help="Stage A checkpoint every trial starts from (empty: the study "
              "file's resume_from): runs:/<id>/checkpoints/stage_a, a folder, or auto")
@click.option("--n-trials", default="", help="trials to finish (empty: the study file's n_trials)")
@click.option("--workers", default="1", show_default=True, help="worker processes on this machine")
@click.option("--storage", default="", help="Optuna storage: empty = optuna/<study>.db (1 worker) or "
              "optuna/<study>.journal (several); a .journal path; or an RDB URL (postgresql://user:pw@host/db)")
@click.option("--threads", default="", help="torch threads per worker (empty: cores / workers)")
@click.option("--check", is_flag=True, help="only validate the study file(s) and print the resolved study")
@click.option("--no-register", is_flag=True, help="do not register the best model / evaluate the checklist")
@config_options
@guarded
def sweep(study_name, name, resume_from, n_trials, workers, storage, threads, check, no_register, preset, sets,
          overrides):
    """Phase 2: an Optuna search over Stage B (objective: latent F1), one MLflow parent run per study.
    --preset replaces the study file's preset; --set / --overrides add to its overrides."""
    import json
    import os

    from latentgate import config
    from latentgate.errors import ConfigError
    from latentgate.sweep.study import load_study

    spec = load_study(study_name)
    extra = config.cli_overrides(sets, overrides)
    changes = {k: v for k, v in (("study_name", name), ("resume_from", resume_from), ("preset", preset)) if v}
    if extra:
        changes["overrides"] = {**spec.overrides, **extra}
    if changes:
        spec = spec.with_changes(f"study {spec.name} with {sorted(changes)} from the command line", **changes)
    ints = {}  # checked before --check prints anything: --check validates the whole command line
    for name, raw, low in (("--n-trials", n_trials, 1), ("--workers", workers, 1), ("--threads", threads, 1)):
        if str(raw).strip() == "":
            ints[name] = None
            continue
        try:
            ints[name] = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer", f"pass {name} <n>") from None
        if ints[name] < low:
            raise ConfigError(f"{name}={raw} must be >= {low}", f"pass {name} >= {low}")
    most = 4 * (os.cpu_count() or 1)  # each worker is a process with >= 1 torch thread
    for name in ("--workers", "--threads"):
        if (ints[name] or 0) > most:
            raise ConfigError(f"{name}={ints[name]} exceeds 4 x the {os.cpu_count()} CPU cores of this machine",
                              f"pass {name} <= {most} (more workers on other machines: `latentgate sweep-worker`)")
    if check:
        click.echo(json.dumps(spec.to_dict(), indent=2, sort_keys=True, default=str))
        return
    from latentgate.sweep.finalize import format_summary
    from latentgate.sweep.runner import run_sweep

    summary = run_sweep(spec, ints["--n-trials"], ints["--workers"] or 1, storage, ints["--threads"],
                        echo=click.echo, register=not no_register)
    click.echo(format_summary(summary))


@click.command("sweep-worker")
@click.option("--study", "study_name", required=True, help="the study's name (as created by `latentgate sweep`)")
@click.option("--storage", required=True, help="the study's Optuna storage URL or journal path")
@click.option("--worker-index", default=0, type=int, help="offsets the sampler seed (distinct proposals per worker)")
@click.option("--threads", default=0, type=int, help="torch threads (0: the study's config)")
@guarded
def sweep_worker(study_name, storage, worker_index, threads):
    """Run trials of an existing study until its budget is spent (start more on other machines by hand)."""
    from latentgate.sweep.runner import run_worker
    from latentgate.sweep.storage import is_journal, journal_path

    url = str(journal_path(storage).resolve()) if is_journal(storage) else storage
    n = run_worker(study_name, url, worker_index, threads or None, echo=click.echo)
    click.echo(f"worker {worker_index}: ran {n} trial(s)")


COMMANDS = [sweep, sweep_worker]
