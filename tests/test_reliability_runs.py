"""Reliability, third catalogue (issue #27), the classes about runs and records: a tracking server that dies
mid-run (2), a sweep that does not stop when told (3), a resume under other code (4), params too long for MLflow
(6, first item) and a forged checkpoint that verifies (7, `checkpoint verify`). One test per class, named after it,
each failing on the code before its fix. Real stores, real processes, real signals; the slow ones are marked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli_env, free_port, run_cli

# ---- helpers ------------------------------------------------------------------------------------------------------


def _client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(("latentgate: progress:",
                                                                               "latentgate: warning:"))]
    assert len(lines) == 1 and lines[0].startswith("latentgate: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def stage_a_uri(micro_smoke) -> str:
    return f"runs:/{micro_smoke.children['stage_a']}/checkpoints/stage_a"


# ---- class 2: the tracking server dies mid-run ----------------------------------------------------------------------

# a cheap command that opens the store (and fails: there is no such run)
NEXT_COMMAND = ("checkpoint", "verify", "runs:/0123456789abcdef0123456789abcdef/checkpoints/stage_a")


def test_class2_open_runs_end_failed_on_the_next_command(mlflow_store, tmp_path):
    """A process killed with its run open (as when the server it logged to died) leaves the run RUNNING; the next
    latentgate command on the store ends it FAILED, naming why. A run whose process still lives is left alone."""
    from latentgate.schema import Tag
    from latentgate.tracking.runs import process_tags

    script = ("import os, sys\nfrom latentgate.tracking.runs import setup_experiment, tracked_run\n"
              "setup_experiment('latentgate')\n"
              "with tracked_run('orphan', nested=False) as tr:\n"
              "    print(tr.run_id, flush=True)\n"
              "    os._exit(9)\n")  # dies with the run open, as a process whose store stopped answering
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    orphan = proc.stdout.split()[0]
    c = _client()
    assert c.get_run(orphan).info.status == "RUNNING", proc.stderr[-2000:]
    exp = c.get_experiment_by_name("latentgate").experiment_id
    alive = c.create_run(exp, tags={**process_tags(), Tag.PHASE: "alive"}).info.run_id  # this process: alive
    try:
        nxt = run_cli(*NEXT_COMMAND, timeout=120)  # any command on the store
        _one_error_line(nxt)
        run = c.get_run(orphan)
        assert run.info.status == "FAILED"
        assert run.data.tags[Tag.ERROR_TYPE] == "OrphanedRun"
        assert f"pid {run.data.tags[Tag.PID]}" in run.data.tags[Tag.ERROR]
        assert c.get_run(alive).info.status == "RUNNING"
    finally:
        c.set_terminated(alive)


def _start_server(root: Path, port: int) -> subprocess.Popen:
    env = cli_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"), start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])


@pytest.mark.slow  # ~60-90 s: a real `mlflow server`, a micro smoke through it, the server killed and restarted
def test_class2_tracking_server_dies_mid_run(tmp_path):
    from mlflow import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    env = cli_env({"MLFLOW_TRACKING_URI": uri})
    smoke = subprocess.Popen([sys.executable, "-m", "latentgate", "smoke", "--preset", "micro", "--set",
                              "stage_a.steps=400", "--set", f"run.output_dir={tmp_path / 'runs'}"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = MlflowClient(uri)
        deadline = time.time() + 240
        while time.time() < deadline:  # Stage A trains: its run exists and is RUNNING
            exp = c.get_experiment_by_name("latentgate")
            if exp and c.search_runs([exp.experiment_id], "tags.`latentgate.phase` = 'stage_a' and "
                                                          "attributes.status = 'RUNNING'"):
                break
            assert smoke.poll() is None, smoke.stderr.read()[-3000:]
            time.sleep(0.5)
        time.sleep(1.0)
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.wait()
        out, err = smoke.communicate(timeout=300)
    finally:
        if smoke.poll() is None:
            smoke.kill()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    proc = subprocess.CompletedProcess(smoke.args, smoke.returncode, out, err)
    assert proc.returncode == 2, err[-3000:]
    line = _one_error_line(proc)
    assert f"tracking server {uri} stopped answering" in line and "(fix: restart it" in line

    server = _start_server(tmp_path, port)  # back, on the same store
    try:
        open_runs = [r for r in c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")]
        assert {r.data.tags.get("latentgate.phase") for r in open_runs} >= {"smoke", "stage_a"}
        nxt = run_cli(*NEXT_COMMAND, env={"MLFLOW_TRACKING_URI": uri}, timeout=120)
        _one_error_line(nxt)
        for r in open_runs:
            after = c.get_run(r.info.run_id)
            assert after.info.status == "FAILED", r.data.tags.get("latentgate.phase")
            assert after.data.tags["latentgate.error_type"] == "OrphanedRun"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# ---- class 3: a sweep does not stop when told -----------------------------------------------------------------------

def test_class3_workers_die_with_their_coordinator_fast(tmp_path):
    """The parent-death signal: a process that called die_with_parent gets SIGTERM when its parent is SIGKILLed."""
    marker = tmp_path / "terminated"
    child = (f"import signal, sys, time\nfrom latentgate.sweep.stopping import die_with_parent\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('x'), sys.exit(0)))\n"
             f"assert die_with_parent({{ppid}})\nprint('ready', flush=True)\ntime.sleep(120)\n")
    parent = ("import os, subprocess, sys, time\n"
              f"src = {child!r}.replace('{{ppid}}', str(os.getpid()))\n"
              "p = subprocess.Popen([sys.executable, '-c', src], stdout=sys.stdout)\nprint(p.pid, flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            text=True)
    worker = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and not marker.exists():
        time.sleep(0.1)
    assert marker.exists(), "the worker did not get SIGTERM when its parent died"
    deadline = time.time() + 10
    while time.time() < deadline and _running(worker):
        time.sleep(0.1)
    if _running(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} outlived its parent")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a worker's parent, the coordinator, is gone, so nobody may have reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _write_study(directory: Path, name: str, resume_from: str) -> Path:
    from latentgate.sweep.study import load_study

    raw = load_study("micro").to_dict()
    raw.update(study_name=name, resume_from=resume_from, artifact_dir=str(directory / "artifacts"),
               pruner={"name": "none"},
               search_space={"stage_b.steps": {"type": "int", "low": 200, "high": 200},
                             "stage_b.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}})
    raw["overrides"] = {"run.output_dir": str(directory / "runs"), "stage_b.probe_every": 400}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sweep_until_trials_run(tmp_path: Path, stage_a_uri: str, name: str):
    """`latentgate sweep --workers 2` on a journal; returns (process, journal) once two trials train."""
    import optuna

    from latentgate.sweep.storage import open_storage

    path = _write_study(tmp_path, name, stage_a_uri)
    journal = tmp_path / f"{name}.journal"
    log = open(tmp_path / "sweep.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "latentgate", "sweep", "--study", str(path), "--n-trials", "6",
                             "--workers", "2", "--storage", str(journal), "--no-register"], cwd=tmp_path,
                            env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name=name, storage=open_storage(str(journal)))
        except (KeyError, Exception):  # noqa: BLE001 - not created yet
            continue
        running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
                   and "latentgate.mlflow_run_id" in t.user_attrs]
        if len(running) >= 2:
            time.sleep(2.0)  # both train
            return proc, journal, study
    pytest.fail("no two trials ran: " + (tmp_path / "sweep.log").read_text()[-3000:])


def _sweep_state(journal: Path, name: str):
    import optuna

    from latentgate.sweep.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(str(journal)))
    c = _client()
    parent = c.get_run(study.user_attrs["latentgate.mlflow_parent_run"])
    runs = {t.number: c.get_run(t.user_attrs["latentgate.mlflow_run_id"]) for t in study.trials
            if "latentgate.mlflow_run_id" in t.user_attrs}
    return study, parent, runs


@pytest.mark.slow  # ~60-120 s: a micro Stage A, then two worker processes training until the SIGTERM
def test_class3_sweep_stops_when_told(tmp_path, stage_a_uri, mlflow_store):
    proc, journal, _ = _sweep_until_trials_run(tmp_path, stage_a_uri, "sigterm")
    told = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "sweep.log").read_text()
    assert rc == 143, output[-3000:]
    study, parent, runs = _sweep_state(journal, "sigterm")
    late = [t.number for t in study.trials if t.datetime_start.timestamp() > told + 1.0]
    assert not late, f"trials started after SIGTERM: {late}\n{output[-3000:]}"
    assert parent.info.status == "KILLED"
    assert {r.info.status for r in runs.values()} == {"KILLED"}, output[-3000:]  # the trials that ran, stopped
    assert all(r.data.tags["latentgate.trial_state"] == "KILLED" for r in runs.values())


@pytest.mark.slow  # ~60-120 s: as above, the coordinator SIGKILLed
def test_class3_orphaned_workers_stop_and_end_their_runs_killed(tmp_path, stage_a_uri, mlflow_store):
    proc, journal, study = _sweep_until_trials_run(tmp_path, stage_a_uri, "orphans")
    workers = {t.user_attrs["latentgate.worker_pid"] for t in study.get_trials(deepcopy=False)
               if "latentgate.worker_pid" in t.user_attrs}
    proc.kill()
    proc.wait()
    deadline = time.time() + 120  # each worker checkpoints at its next optimizer step, then exits
    alive = set(workers)
    while alive and time.time() < deadline:
        for pid in list(alive):
            if not _running(pid):
                alive.discard(pid)
        time.sleep(0.2)
    for pid in alive:  # never leave them running the study (the failure below names them)
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their coordinator"
    study, parent, runs = _sweep_state(journal, "orphans")
    assert len(study.trials) == 2, [t.state.name for t in study.trials]  # nobody ran the rest of the study
    assert {r.info.status for r in runs.values()} == {"KILLED"}
    assert parent.info.status == "KILLED" and "coordinator" in parent.data.tags["latentgate.error"]


# ---- class 4: a resume under other code ------------------------------------------------------------------------------

def _interrupted_copy(micro_smoke, tmp_path: Path, commit: str) -> str:
    """A FAILED copy of the micro smoke's Stage A run, recorded at `commit`, with its own copy of the output."""
    from mlflow.entities import Param

    c = _client()
    src = c.get_run(micro_smoke.children["stage_a"])
    out = Path(src.data.tags["latentgate.output_dir"])
    shutil.copytree(out, tmp_path / "out")
    tags = {k: v for k, v in src.data.tags.items() if k.startswith("latentgate.")}
    tags.update({"latentgate.git_commit": commit, "latentgate.output_dir": str(tmp_path / "out")})
    run = c.create_run(src.info.experiment_id, tags={**tags, "mlflow.source.git.commit": commit})
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in src.data.params.items()])
    c.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def test_class4_resume_under_other_code(micro_smoke, tmp_path):
    from latentgate.errors import ConfigError
    from latentgate.phases.entry import resume
    from latentgate.registry.candidate import CandidateEvidence
    from latentgate.registry.checklist import load_checklist
    from latentgate.registry.evidence import check_lineage
    from latentgate.tracking.runs import git_commit

    old = "0" * 40
    run_id = _interrupted_copy(micro_smoke, tmp_path, old)
    with pytest.raises(ConfigError) as refused:  # `latentgate resume <run>`: this line, exit 2
        resume(run_id)
    assert f"recorded at git commit {old[:12]}" in str(refused.value) and "--allow-other-commit" in str(refused.value)
    assert _client().get_run(run_id).info.status == "FAILED"  # nothing ran

    resume(run_id, allow_other_commit=True)
    run = _client().get_run(run_id)
    now = git_commit()[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["latentgate.resumed_commits"] == f"{old} -> {now}"
    assert run.data.tags["latentgate.git_commit"] == run.data.tags["mlflow.source.git.commit"] == now

    # the registry's lineage criterion sees a run resumed across commits (the smoke's own lineage, one tag added)
    cl = load_checklist()
    criterion = cl.criterion("lineage")
    ev = CandidateEvidence(micro_smoke.children["eval"])
    c = _client()
    stage_a = micro_smoke.children["stage_a"]
    assert check_lineage(ev, criterion, cl).observed == 0
    c.set_tag(stage_a, "latentgate.resumed_commits", f"{old} -> {now}")
    try:
        obs = check_lineage(CandidateEvidence(micro_smoke.children["eval"]), criterion, cl)
        assert obs.observed == 1 and f"resumed across commits {old[:10]} -> {now[:10]}" in obs.detail
    finally:
        c.delete_tag(stage_a, "latentgate.resumed_commits")


# ---- class 6: params too long for MLflow ---------------------------------------------------------------------------

def test_class6_params_too_long_for_mlflow_round_trip_through_resume(mlflow_store, micro_cfg):
    import dataclasses

    from latentgate.config import config_hash, flatten
    from latentgate.errors import ConfigError
    from latentgate.phases.entry import config_of_run
    from latentgate.schema import Artifact, Tag
    from latentgate.tracking.runs import setup_experiment, tracked_run

    # every single string is bounded (4096 characters, issue 27 class 1), but a long list is not one value: 900 stop
    # strings log as a param of ~20 KB, over MLflow's 6000
    stops = [f"<stop-{i:04d}-of-the-long-list>" for i in range(900)]
    cfg = dataclasses.replace(micro_cfg, model=dataclasses.replace(micro_cfg.model, stop_strings=stops))
    assert len(str(flatten(cfg)["model.stop_strings"])) > 20_000
    setup_experiment("latentgate")
    with tracked_run("long_params", nested=False, tags={Tag.STEP_KEY: config_hash(cfg)}) as tr:
        tr.log_params(flatten(cfg))
        run_id = tr.run_id
    c = _client()
    run = c.get_run(run_id)
    whole = str(flatten(cfg)["model.stop_strings"])
    stub = run.data.params["model.stop_strings"]
    assert len(stub) < 6000 and hashlib.sha256(whole.encode()).hexdigest() in stub
    assert config_of_run(run) == cfg and config_of_run(run).model.stop_strings == stops  # exact, via the artifact
    # a params_full.json that does not hold what the hash says is refused, not used
    tracker_dir = Path(c.download_artifacts(run_id, Artifact.PARAMS_FULL, str(mlflow_store / "dl")))
    assert json.loads(tracker_dir.read_text())["model.stop_strings"] == whole
    c.log_dict(run_id, {"model.stop_strings": whole[:-2] + "X]"}, Artifact.PARAMS_FULL)
    with pytest.raises(ConfigError, match="holds another value"):
        config_of_run(c.get_run(run_id))


# ---- class 7: a forged checkpoint verifies ---------------------------------------------------------------------------

def _tiny_checkpoint(d: Path) -> None:
    import numpy as np
    from safetensors.numpy import save

    from latentgate.train.manifest import write_manifest

    d.mkdir(parents=True)
    data = save({"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)},
                metadata={"format": "pt", "module": "encoder"})
    (d / "encoder.safetensors").write_bytes(data)
    write_manifest(d, {"format": 1, "lora": None, "files": {}, "sizes": {}, "modules": {
        "encoder": {"file": "encoder.safetensors", "sha256": hashlib.sha256(data).hexdigest(), "params": 9}}})


FORGERIES = {b'"shape":[2,3]': b'"shape":[2,4]', b'"dtype":"F32","shape":[3]': b'"dtype":"F16","shape":[3]',
             b'"module":"encoder"': b'"module":"adapter"', b'"data_offsets":[0,12]': b'"data_offsets":[4,16]'}


def _forge(d: Path, forgery: bytes) -> Path:
    """Rewrite one piece of the header (same length) and reseal the manifest with the new file hash."""
    from latentgate.train.manifest import read_manifest, write_manifest

    f = d / "encoder.safetensors"
    data = f.read_bytes()
    assert forgery in data and len(FORGERIES[forgery]) == len(forgery)
    f.write_bytes(data.replace(forgery, FORGERIES[forgery]))
    manifest = read_manifest(d)
    manifest["modules"]["encoder"]["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    write_manifest(d, manifest)  # resealed: the manifest's own hash matches again
    return f


def test_class7_forged_checkpoint_fails_verify(tmp_path):
    """Rewrite a safetensors header (a shape, a dtype, the module name, an offset) and reseal the manifest: the
    manifest's own hash holds, every file hash holds, and `checkpoint verify` still refuses it, naming the file.
    What a promoted version pins (`manifest_sha256`: the manifest file's bytes) changes."""
    from latentgate.errors import CheckpointError
    from latentgate.train.manifest import manifest_sha256, verify_checkpoint

    for i, forgery in enumerate(FORGERIES):
        d = tmp_path / f"ckpt{i}"
        _tiny_checkpoint(d)
        verify_checkpoint(d)
        pinned = manifest_sha256(d)
        assert pinned == hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
        f = _forge(d, forgery)
        assert manifest_sha256(d) != pinned
        if i:
            with pytest.raises(CheckpointError, match="has a corrupted safetensors header"):
                verify_checkpoint(d)
            continue
        bad = run_cli("checkpoint", "verify", str(d), timeout=60)  # the command, once: one line, exit 2
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert f"{f} has a corrupted safetensors header" in _one_error_line(bad)
