"""Phase 2 sweeps: study files, real Optuna storages (journal file, SQLite, PostgreSQL), worker processes, a worker
killed mid-trial, pruning marks in MLflow, and optuna-dashboard serving the study. Micro preset: numbers are
meaningless, the mechanics are real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, run_cli
from latentgate.errors import ConfigError
from pg import pg_url  # noqa: F401  (fixture)

# ---- helpers ---------------------------------------------------------------------------------------------------

def write_study(directory: Path, name: str, resume_from: str, **changes) -> Path:
    from latentgate.sweep.study import load_study

    raw = load_study("micro").to_dict()
    raw.update(study_name=name, resume_from=resume_from, artifact_dir=str(directory / "artifacts"))
    raw["overrides"] = {"run.output_dir": str(directory / "runs")}
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict) and k not in ("pruner", "sampler"):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def load(storage: str, name: str):
    import optuna

    from latentgate.sweep.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage))


def trial_runs(parent_run_id: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient()
    exp = c.get_run(parent_run_id).info.experiment_id
    return c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                               "tags.`latentgate.phase` = 'trial'", max_results=1000)


def children(run_id: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient()
    exp = c.get_run(run_id).info.experiment_id
    return c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")


@pytest.fixture(scope="module")
def stage_a_uri(micro_smoke) -> str:
    return f"runs:/{micro_smoke.children['stage_a']}/checkpoints/stage_a"


# ---- study files -----------------------------------------------------------------------------------------------

def test_every_study_file_validates():
    from latentgate.config import fields_table
    from latentgate.sweep.study import study_names, validate_all

    specs = validate_all()
    assert set(specs) == set(study_names()) >= {"phase2", "micro"}
    table = fields_table()
    for spec in specs.values():
        assert all(k in table for k in spec.search_space)
    need = {"stage_b.first_token_ce_weight", "stage_b.steps", "stage_b.lr", "stage_b.schedule", "stage_b.min_lr",
            "stage_b.kd_weight", "stage_b.kd_temperature", "stage_b.k", "model.lora_r"}
    assert need <= set(specs["phase2"].search_space)
    assert specs["phase2"].search_space["stage_b.first_token_ce_weight"].log
    assert specs["phase2"].pruner["name"] == "median"


@pytest.mark.parametrize("change, message", [
    ({"search_space": {"stage_b.first_token_weight": {"type": "float", "low": 1, "high": 2}}},
     "did you mean stage_b.first_token_ce_weight"),
    ({"search_space": {"stage_a.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}, "cannot vary across trials"),
    ({"search_space": {"stage_b.k": {"type": "categorical", "choices": [2, 99]}}}, "stage_b.k=99"),
    ({"search_space": {"stage_b.lr": {"type": "int", "low": 1, "high": 2}}}, "is int but stage_b.lr is float"),
    ({"sampler": {"name": "tpe", "seeed": 1}}, "takes no argument 'seeed'"),
    ({"pruner": {"name": "medain"}}, "did you mean median"),
    ({"n_trails": 3}, "did you mean n_trials"),
    ({"heartbeat": {"interval": 5, "grace_period": 5, "max_retry": 1}}, "must exceed the interval"),
])
def test_bad_study_files_are_rejected(tmp_path, change, message):
    from latentgate.sweep.study import load_study

    path = write_study(tmp_path, "bad", "auto", **change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_study(str(path))


def test_storage_defaults_and_refusals(tmp_path, monkeypatch):
    from latentgate.sweep.storage import resolve_storage

    monkeypatch.chdir(tmp_path)
    assert resolve_storage("s", "", 1) == f"sqlite:///{tmp_path / 'optuna' / 's.db'}"
    assert resolve_storage("s", "", 2) == str(tmp_path / "optuna" / "s.journal")
    with pytest.raises(ConfigError, match="database is locked"):
        resolve_storage("s", "sqlite:///x.db", 2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match="MLflow's own database"):
        resolve_storage("s", f"sqlite:///{tmp_path / 'mlflow.db'}", 1)


def test_objective_and_intermediate_formula():
    from latentgate.sweep.study import load_study

    spec = load_study("phase2")
    value, f1, tie = spec.score({"latent": {"f1": 0.25, "first_top1": 0.5}})
    assert (f1, tie) == (0.25, 0.5) and value == pytest.approx(0.25 + 0.001 * 0.5)
    assert spec.probe_value({"f1": 0.1, "first_acc": 0.2}) == pytest.approx(0.1 + 0.0002)
    # the tie-break never outweighs a real F1 difference of 0.001 or more
    assert spec.score({"latent": {"f1": 0.011, "first_top1": 0.0}})[0] > spec.score(
        {"latent": {"f1": 0.010, "first_top1": 0.99}})[0]


def test_bench_trials_are_fixed_in_space_and_longest_first():
    """The worker benchmark runs the same trials with 1 and 2 workers: drawn once, reproducibly, from the space."""
    from latentgate.bench.sweeps import draw_trials
    from latentgate.sweep.study import load_study

    spec = load_study("phase2")
    draws = draw_trials(spec, 8, seed=0)
    assert draws == draw_trials(spec, 8, seed=0) and draws != draw_trials(spec, 8, seed=1)
    steps = [d["stage_b.steps"] for d in draws]
    assert steps == sorted(steps, reverse=True) and len({json.dumps(d, sort_keys=True) for d in draws}) == 8
    for d in draws:
        assert set(d) <= set(spec.search_space)
        assert ("stage_b.min_lr" in d) == (d["stage_b.schedule"] == "cosine")  # the `when` condition holds
        p = spec.search_space["stage_b.first_token_ce_weight"]
        assert p.low <= d["stage_b.first_token_ce_weight"] <= p.high


# ---- pruning: in-process, SQLite storage -----------------------------------------------------------------------

def test_pruned_trials_never_look_like_successes(tmp_path, stage_a_uri, mlflow_store):
    from mlflow import MlflowClient

    from latentgate.sweep.runner import run_sweep
    from latentgate.sweep.study import load_study

    # a threshold no probe can reach: every trial is pruned at its first probe (optimizer step 3)
    path = write_study(tmp_path, "prune", stage_a_uri, pruner={"name": "threshold", "lower": 2.0,
                                                               "n_warmup_steps": 1},
                       search_space={"stage_b.steps": {"type": "int", "low": 6, "high": 9, "step": 3}})
    spec = load_study(str(path))
    storage = f"sqlite:///{tmp_path / 'prune.db'}"
    summary = run_sweep(spec, n_trials=2, workers=1, storage=storage, echo=lambda *_: None)
    study = load(storage, "prune")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert summary["best"] is None and summary["optimizer_steps"] == 6
    assert all(t.intermediate_values == {3: pytest.approx(t.intermediate_values[3])} for t in study.trials)
    c = MlflowClient()
    runs = trial_runs(summary["parent_run_id"])
    assert sorted(int(r.data.params["trial_number"]) for r in runs) == [0, 1]
    for r in runs:
        assert r.info.status == "KILLED" and r.data.tags["latentgate.trial_state"] == "PRUNED"
        assert "latentgate.error" not in r.data.tags
        assert [m.step for m in c.get_metric_history(r.info.run_id, "trial/intermediate")] == [3]
        (stage_b,) = children(r.info.run_id)
        assert stage_b.data.tags["latentgate.phase"] == "stage_b"
        assert stage_b.info.status == "KILLED" and stage_b.data.tags["latentgate.trial_state"] == "PRUNED"
        assert "latentgate.error" not in stage_b.data.tags
    parent = c.get_run(summary["parent_run_id"])
    assert parent.data.params["pruner"] == "threshold" and parent.data.params["study"] == "prune"
    assert parent.data.tags["latentgate.best_trial"] == "none"


# ---- two worker processes on a journal file, one SIGKILLed mid-trial ------------------------------------------

@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory, stage_a_uri, mlflow_store):
    """`latentgate sweep --workers 2` on a journal storage; the worker of the first running trial is SIGKILLed."""
    tmp = tmp_path_factory.mktemp("killed")
    path = write_study(tmp, "kill", stage_a_uri, pruner={"name": "none"},
                       search_space={"stage_b.steps": {"type": "int", "low": 24, "high": 24},
                                     "stage_b.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}})
    journal = tmp / "kill.journal"
    log = (tmp / "sweep.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "latentgate", "sweep", "--study", str(path), "--n-trials", "3",
                             "--workers", "2", "--storage", str(journal), "--no-register"], cwd=tmp, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    killed = None
    deadline = time.time() + 150
    try:
        while killed is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            if not journal.exists():
                continue
            try:
                study = load(str(journal), "kill")
            except KeyError:
                continue
            for t in study.get_trials(deepcopy=False):
                if t.state.name == "RUNNING" and "latentgate.mlflow_run_id" in t.user_attrs:
                    os.kill(t.user_attrs["latentgate.worker_pid"], signal.SIGKILL)
                    killed = t.number
                    break
        rc = proc.wait(timeout=max(10, deadline - time.time() + 60))
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp / "sweep.log").read_text()
    assert killed is not None, output[-3000:]
    assert rc == 0, output[-3000:]
    parent = next(line.split()[-1] for line in output.splitlines() if line.startswith("parent run"))
    return {"journal": str(journal), "killed": killed, "parent": parent, "output": output, "tmp": tmp}


def test_killed_worker_trial_fails_and_is_retried(killed_sweep):
    from latentgate.sweep.stopping import progress

    study = load(killed_sweep["journal"], "kill")
    k = killed_sweep["killed"]
    dead = study.trials[k]
    assert dead.state.name == "FAIL"
    retries = [t for t in study.trials if k in t.system_attrs.get("retry_history", [])]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == dead.params  # the same configuration was run again
    p = progress(study)
    assert (p.done, p.complete, p.failed, p.running, p.waiting) == (3, 3, 1, 0, 0)


def test_two_workers_no_lost_or_duplicated_trials(killed_sweep):
    study = load(killed_sweep["journal"], "kill")
    trials = study.trials
    assert [t.number for t in trials] == list(range(4))  # 3 outcomes + 1 retry, nothing extra
    runs = trial_runs(killed_sweep["parent"])
    numbers = sorted(int(r.data.params["trial_number"]) for r in runs)
    assert numbers == list(range(4))  # exactly one MLflow run per trial
    by_number = {int(r.data.params["trial_number"]): r for r in runs}
    for t in trials:
        r = by_number[t.number]
        assert r.data.tags["latentgate.trial_state"] == t.state.name
        assert r.info.status == {"COMPLETE": "FINISHED", "FAIL": "FAILED"}[t.state.name]
        assert float(r.data.params["stage_b.lr"]) == pytest.approx(t.params["stage_b.lr"])
        if t.state.name == "COMPLETE":
            assert r.data.metrics["objective"] == pytest.approx(t.value)
    # two worker processes really ran trials at the same time
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len({t.user_attrs["latentgate.worker_pid"] for t in trials}) >= 2
    overlaps = [(a.number, b.number) for a in trials for b in trials if a.number < b.number
                and a.user_attrs["latentgate.worker_pid"] != b.user_attrs["latentgate.worker_pid"]
                and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    assert overlaps, [(t.number, t.datetime_start, t.datetime_complete) for t in trials]
    assert done


def test_killed_trial_runs_end_failed_in_mlflow(killed_sweep):
    runs = {int(r.data.params["trial_number"]): r for r in trial_runs(killed_sweep["parent"])}
    dead = runs[killed_sweep["killed"]]
    assert dead.info.status == "FAILED" and "no heartbeat" in dead.data.tags["latentgate.error"]
    assert all(c.info.status != "RUNNING" for c in children(dead.info.run_id))


def test_parent_run_records_best_trial_plots_and_artifacts(killed_sweep):
    from mlflow import MlflowClient
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

    c = MlflowClient()
    parent = c.get_run(killed_sweep["parent"])
    study = load(killed_sweep["journal"], "kill")
    assert parent.data.tags["latentgate.best_trial"] == str(study.best_trial.number)
    assert parent.data.params["storage"] == killed_sweep["journal"]
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["seed"] == "0"
    plots = {Path(a.path).name for a in c.list_artifacts(parent.info.run_id, "optuna_plots")}
    assert {"optimization_history.png", "intermediate_values.png"} <= plots
    best = study.best_trial
    metas = get_all_artifact_meta(best, storage=study._storage)
    assert sorted(m.filename for m in metas) == ["f1_breakdown.json", "sample_predictions.jsonl"]
    store = FileSystemArtifactStore(str(killed_sweep["tmp"] / "artifacts" / "kill"))
    bd = json.loads(store.open_reader(best.user_attrs["latentgate.artifact.f1_breakdown.json"]).read())
    assert bd["latent"]["f1"] == pytest.approx(best.user_attrs["latentgate.latent_f1"])


def _get_json(url: str, timeout: float = 60):
    """GET `url` as JSON, retrying while the server starts; None if it never answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            time.sleep(0.5)
    return None


def test_dashboard_serves_the_study(killed_sweep):
    """`optuna-dashboard <journal>` (the command a sweep prints) lists the study and serves its trials as the
    journal holds them: numbers, states, params."""
    journal, port = killed_sweep["journal"], free_port()
    exe = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(exe), journal, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        listing = _get_json(f"http://127.0.0.1:{port}/api/studies")
        assert listing is not None, "optuna-dashboard did not answer"
        studies = {s["study_name"]: s for s in listing["study_summaries"]}
        assert set(studies) == {"kill"} and studies["kill"]["directions"] == ["maximize"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{studies['kill']['study_id']}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    trials = load(journal, "kill").trials
    served = [(t["number"], t["state"].upper(), {p["name"]: p["param_external_value"] for p in t["params"]})
              for t in detail["trials"]]
    assert served == [(t.number, t.state.name, {k: str(v) for k, v in t.params.items()}) for t in trials]
    assert [state for _, state, _ in served].count("FAIL") == 1  # the killed worker's trial


# ---- PostgreSQL, two workers -----------------------------------------------------------------------------------

# ~30-70 s: server start-up + 2 worker processes; .ci/run installs Debian's postgresql first
@pytest.mark.slow  # 40-60 s (and installing PostgreSQL where it is missing); journal workers run by default
def test_postgresql_two_workers(tmp_path, stage_a_uri, pg_url):  # noqa: F811
    path = write_study(tmp_path, "pg", stage_a_uri, pruner={"name": "none"},
                       search_space={"stage_b.steps": {"type": "int", "low": 3, "high": 6, "step": 3}})
    r = run_cli("sweep", "--study", str(path), "--n-trials", "3", "--workers", "2", "--storage", pg_url,
                "--no-register", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    study = load(pg_url, "pg")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.user_attrs["latentgate.worker_pid"] for t in study.trials}) == 2
    parent = next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("parent run"))
    assert sorted(int(x.data.params["trial_number"]) for x in trial_runs(parent)) == [0, 1, 2]


def test_cli_help_does_not_import_heavy_modules():
    r = subprocess.run([sys.executable, "-c", "import sys, latentgate.sweep.cli; "
                        "print(sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules))"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "[]", r.stderr


@pytest.mark.slow
def test_sweep_bench_quick_measures_both_comparisons(tmp_path, mlflow_store):
    """`latentgate bench --sweep --quick`: each row's numbers are what its studies (read back from their journals)
    spent, and its verdict follows its stated rule (micro numbers mean nothing, so which verdict is not asserted).
    The micro study with a pruner that stops every trial at its first probe (step 3 of 6 or 9): the two sides of
    the pruning comparison then differ, so a ratio taken the wrong way round shows."""
    import optuna

    from latentgate.bench.sweeps import F1_GAP, bench_sweep
    from latentgate.sweep.storage import open_storage

    study = write_study(tmp_path, "micro-prune", "auto", pruner={"name": "threshold", "lower": 2.0},
                        search_space={"stage_b.steps": {"type": "int", "low": 6, "high": 9, "step": 3}})
    rows = bench_sweep(out_dir=tmp_path, quick=True, study=str(study), echo=lambda *_: None)
    assert [r.key for r in rows] == ["sweep_workers", "sweep_pruning"]
    workers, pruning = rows
    studies = {}
    for journal in (tmp_path / "sweep").glob("*.journal"):
        (summary,) = optuna.get_all_study_summaries(open_storage(str(journal)))
        studies[summary.study_name.rsplit("-", 1)[1]] = load(str(journal), summary.study_name).trials
    assert sorted(studies) == ["pruned", "unpruned", "w1", "w2"]
    full = lambda trials: sum(t.params["stage_b.steps"] for t in trials)  # noqa: E731
    # workers: the same 4 trials on 1 and on 2 workers, every one run to its full budget
    assert [t.params for t in studies["w1"]] == [t.params for t in studies["w2"]]
    for w in ("1", "2"):
        assert all(t.state.name == "COMPLETE" for t in studies[f"w{w}"])
        assert workers.details[w]["trials"] == len(studies[f"w{w}"]) == 4
        assert workers.details[w]["optimizer_steps"] == full(studies[f"w{w}"])
    per_hour = {w: workers.details[w]["trials_per_hour"] for w in ("1", "2")}
    assert workers.value == pytest.approx(per_hour["2"] / per_hour["1"])
    # pruning: the unpruned study runs every trial to its budget; the ratio and the F1 gap come from both sides
    res = pruning.details
    assert not [t for t in studies["unpruned"] if t.state.name != "COMPLETE"]
    assert res["unpruned"]["optimizer_steps"] == full(studies["unpruned"]) and res["unpruned"]["pruned_trials"] == 0
    assert res["pruned"]["pruned_trials"] == sum(t.state.name == "PRUNED" for t in studies["pruned"]) == 4
    assert res["pruned"]["optimizer_steps"] == 3 * 4 < res["unpruned"]["optimizer_steps"]  # each stopped at step 3
    assert pruning.value == pytest.approx(res["pruned"]["optimizer_steps"] / res["unpruned"]["optimizer_steps"])
    assert res["f1_gap"] == pytest.approx(res["unpruned"]["best_latent_f1"] - res["pruned"]["best_latent_f1"])
    assert pruning.status == ("PASS" if pruning.value <= 0.5 and res["f1_gap"] <= F1_GAP else "FAIL")
    assert json.loads((tmp_path / "sweep" / "sweep_bench.json").read_text())[0]["key"] == "sweep_workers"


def test_sweep_command_line_changes_the_study(tmp_path):
    """--name / --resume-from / --preset / --set (what the pipeline passes) change the study, validated again."""
    r = run_cli("sweep", "--study", "micro", "--name", "micro-abc", "--resume-from", "runs:/abc/checkpoints/stage_a",
                "--set", "run.output_dir=/tmp/x", "--set", "stage_b.batch_size=4", "--check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["study_name"] == "micro-abc" and shown["resume_from"] == "runs:/abc/checkpoints/stage_a"
    assert shown["overrides"] == {"run.output_dir": "/tmp/x", "stage_b.batch_size": "4"} and shown["preset"] == "micro"
    bad = run_cli("sweep", "--study", "micro", "--set", "stage_b.lrr=1", "--check", cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean stage_b.lr?" in bad.stderr and bad.stdout == ""


def test_a_stage_a_checkpoint_of_another_model_shape_is_refused_before_any_trial(tmp_path, micro_cfg):
    import dataclasses

    import torch

    from latentgate.config import flatten
    from latentgate.sweep.runner import _check_resume
    from latentgate.sweep.study import load_study
    from latentgate.train.checkpoint import save_checkpoint

    folder = save_checkpoint(tmp_path / "stage_a", modules={"adapter": torch.nn.Linear(2, 2)},
                             config=flatten(micro_cfg))
    spec = load_study("phase2")
    _check_resume(spec, micro_cfg, str(folder))  # same config: accepted
    other = dataclasses.replace(micro_cfg, model=dataclasses.replace(micro_cfg.model,
                                                                     num_latents=micro_cfg.model.num_latents + 1))
    with pytest.raises(ConfigError, match="model.num_latents") as err:
        _check_resume(spec, other, str(folder))
    assert "resume_from: auto" in str(err.value)
