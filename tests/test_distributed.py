"""Data-parallel training in 2 CPU processes (gloo) equals the single-process run with the same global batch;
only rank 0 logs; checkpoints from 2 processes resume in 1, and the reverse. Ranks agree: a NaN, a stop signal or a
prune on one rank stops both at the same step, with one exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_env, free_port

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
LEAVE_WORKER = str(Path(__file__).with_name("leave_worker.py"))


def _launcher(procs: int = 2) -> list[str]:
    """`torchrun --nproc_per_node procs` on loopback, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def _run(out: Path, steps: int, procs: int, resume: Path | None = None, run_id: str | None = None) -> dict:
    args = [str(out), str(steps)] + ([str(resume)] if resume else [])
    cmd = [sys.executable, WORKER, *args] if procs == 1 else [*_launcher(procs), WORKER, *args]
    env = cli_env({"LG_RUN_ID": run_id or "", "OMP_NUM_THREADS": "1"})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(out / "params.pt", weights_only=True)
    return {**json.loads((out / "result.json").read_text()), **saved}


def _update_error(a: dict, b: dict) -> float:
    """|| update_a - update_b || / || update_b ||: how far two runs' parameter updates differ."""
    return float((a["params"] - a["init"] - (b["params"] - b["init"])).norm() / (b["params"] - b["init"]).norm())


def test_two_processes_match_one_and_only_rank0_logs(tmp_path, mlflow_store):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name("latentgate").experiment_id)
    try:
        one = _run(tmp_path / "one", 4, 1)
        two = _run(tmp_path / "two", 4, 2, run_id=run.info.run_id)
    finally:  # the shared store never keeps a run RUNNING (the reliability catalogue checks it)
        client.set_terminated(run.info.run_id, "FINISHED")
    assert two["world"] == 2 and one["world"] == 1
    err = _update_error(two, one)
    print(f"final loss: 1 process {one['loss']:.6f}, 2 processes {two['loss']:.6f}; update error {err:.4f}")
    assert two["loss"] == pytest.approx(one["loss"], rel=2e-2)
    assert err < 0.05
    hist = MlflowClient().get_metric_history(run.info.run_id, "stage_a/loss")
    assert [m.step for m in hist] == [1, 2, 3, 4]  # rank 1 was handed the same tracker and logged nothing
    assert not (tmp_path / "two" / "checkpoints" / "stage_a").with_name("stage_a.tmp").exists()


@pytest.mark.parametrize("first,then", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])  # 30 s each
def test_checkpoints_resume_across_world_sizes(tmp_path, first, then):
    """2 steps in `first` processes, resumed to 4 in `then`, equals 4 uninterrupted single-process steps."""
    part = _run(tmp_path / "part", 2, first)
    resumed = _run(tmp_path / "resumed", 4, then, resume=Path(part["checkpoint"]))
    straight = _run(tmp_path / "straight", 4, 1)
    assert resumed["steps"] == 4
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=2e-2)
    assert _update_error(resumed, straight) < 0.05


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_leaving_the_group_joins_its_threads(tmp_path):
    """The exit hook frees the process group while Python is alive. Were anything (here: modules that transformers
    imports, which bind `group.WORLD` as a default argument) to keep it alive, its gloo threads would outlive the
    interpreter, and one freeing a finished broadcast at exit aborts the process (SIGABRT, seen in CI)."""
    cmd = [*_launcher(), LEAVE_WORKER, str(tmp_path)]
    env = cli_env({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("threads-*.json"))]
    assert sorted(c["rank"] for c in counts) == [0, 1]
    for c in counts:
        assert c["joined"] > c["before"], c  # the group's threads started ...
        assert c["after"] == c["before"], c  # ... and were joined when the process left it


# ---- ranks that agree: one rank's trouble stops every rank ------------------------------------------------------

def _start_ranks(out: Path, steps: int, env: dict, procs: int = 2) -> list[subprocess.Popen]:
    """One ddp_worker process per rank, started directly (as torchrun would, without its agent), so that each rank's
    exit code is seen and a signal can reach one rank alone."""
    port = free_port()
    started = []
    for rank in range(procs):
        rank_env = cli_env({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                            "WORLD_SIZE": str(procs), "RANK": str(rank), "LOCAL_RANK": str(rank),
                            "LOCAL_WORLD_SIZE": str(procs), "LATENTGATE_DIST_TIMEOUT_MIN": "2", **env})
        started.append(subprocess.Popen([sys.executable, WORKER, str(out), str(steps)], env=rank_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return started


def _finish(started: list[subprocess.Popen], out: Path, timeout: float = 240) -> list[dict]:
    """Each rank's outcome (ddp_worker's outcome-<rank>.json) with its process's return code."""
    outcomes = []
    for rank, proc in enumerate(started):
        try:
            _, err = proc.communicate(timeout=timeout)
        except BaseException:
            for p in started:  # never leave a rank behind
                p.kill()
            raise
        assert (out / f"outcome-{rank}.json").exists(), err[-3000:]
        outcomes.append({**json.loads((out / f"outcome-{rank}.json").read_text()), "returncode": proc.returncode})
    return outcomes


def _diagnostic_steps(out: Path) -> list[int]:
    path = out / "diagnostics.jsonl"
    return [json.loads(ln)["global_step"] for ln in path.read_text().splitlines()] if path.exists() else []


def test_nan_on_one_rank_stops_both_with_one_exit_code_and_a_failed_run(tmp_path, mlflow_store):
    """Rank 1 alone sees a NaN loss at step 3: both ranks stop there, with exit code 3, at once (before, rank 0
    waited in the gradient all-reduce for the dist timeout); rank 0's run is FAILED and names rank 1's fault."""
    from mlflow import MlflowClient

    out = tmp_path / "nan"
    env = {"LG_FAULT": "nan:1:3", "LG_TRACKED": "1", "MLFLOW_EXPERIMENT_NAME": "latentgate", "LG_PROBE_EVERY": "100"}
    first, second = _finish(_start_ranks(out, 40, env), out)
    assert (first["returncode"], second["returncode"]) == (3, 3), (first, second)
    assert second["error"] == "TrainingFault" and "non-finite loss at optimizer step 3" in second["message"]
    assert first["error"] == "RankFailed" and first["quiet"]  # rank 1 prints the one line
    assert first["message"].startswith("rank 1 failed: TrainingFault: stage_a: non-finite loss at optimizer step 3")
    assert abs(first["ended"] - second["ended"]) < 30
    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["latentgate.error_type"] == "RankFailed" and "non-finite loss" in run.data.tags[
        "latentgate.error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "stage_a/loss")] == [1, 2]
    assert _diagnostic_steps(out) == [1, 2]


@pytest.mark.slow  # ~15 s of CPU, like the NaN test above (which keeps the agreement in the default suite)
def test_sigterm_to_one_rank_writes_one_final_checkpoint_and_stops_both(tmp_path):
    """SIGTERM to rank 1 (which writes nothing): both ranks stop after the same step with exit code 143; rank 0
    alone writes the final checkpoint, at that step, and says so in the one line printed."""
    out = tmp_path / "term"
    started = _start_ranks(out, 400, {"LG_PROBE_EVERY": "1000"})
    deadline = time.monotonic() + 180
    while len(_diagnostic_steps(out)) < 2 and time.monotonic() < deadline and started[0].poll() is None:
        time.sleep(0.2)
    os.kill(started[1].pid, signal.SIGTERM)
    first, second = _finish(started, out)
    assert (first["returncode"], second["returncode"]) == (143, 143), (first, second)
    assert first["error"] == second["error"] == "Interrupted"
    assert first["step"] == second["step"] < 400 and (first["quiet"], second["quiet"]) == (False, True)
    ckpt = out / "checkpoints" / "stage_a"
    assert f"final checkpoint saved to {ckpt}" in first["message"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["trainer_state"]["global_step"] == first["step"] == _diagnostic_steps(out)[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage_a"]  # no temp folder left
    assert not any((out / "rank1").iterdir())  # rank 1 wrote nothing


@pytest.mark.slow  # ~15 s of CPU
def test_a_prune_on_rank0_stops_both_ranks(tmp_path):
    """Rank 0's probe hook (a real Optuna trial, as the sweep's objective reports it) prunes at step 2: rank 0 raises
    optuna.TrialPruned, rank 1 stops at the same step with RankFailed naming it; no step after 2 is taken."""
    out = tmp_path / "prune"
    first, second = _finish(_start_ranks(out, 40, {"LG_FAULT": "prune", "LG_PROBE_EVERY": "2"}), out)
    assert first["error"] == "TrialPruned" and "pruned at optimizer step 2" in first["message"]
    assert second["error"] == "RankFailed" and second["message"].startswith("rank 0 failed: TrialPruned: pruned at")
    assert first["returncode"] == second["returncode"] == 1
    assert _diagnostic_steps(out) == [1, 2]
    assert not (out / "checkpoints").exists()  # a pruned stage leaves no final checkpoint


# ---- the phase entry points under torchrun: rank 0 owns the store -------------------------------------------------

def _torchrun(args: list[str], store: Path, procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [*_launcher(procs), "-m", "latentgate", *args] if procs > 1 else [sys.executable, "-m", "latentgate", *args]
    env = cli_env({"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "OMP_NUM_THREADS": "1"})
    return subprocess.run(cmd, cwd=store, env=env, capture_output=True, text=True, timeout=600)


def _runs(store: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow  # 45-70 s: two torchrun phases and a one-process reference
def test_phases_under_torchrun_write_once_and_match_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m latentgate smoke` then `stage-b`: one set of runs, one registered base LM,
    one output folder, one printed summary; every metric step logged once; the same losses as 1 process."""
    from mlflow import MlflowClient

    store = tmp_path / "store"
    store.mkdir()
    micro = ["--preset", "micro", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    two = _torchrun(["smoke", *micro], store)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("── latentgate smoke ──") == 1  # printed by rank 0 only
    runs = _runs(store)
    by_phase = {}
    for r in runs:
        by_phase.setdefault(r.data.tags.get("latentgate.phase"), []).append(r)
    assert sorted(by_phase) == ["base", "eval", "smoke", "stage_a", "stage_b"]
    assert all(len(v) == 1 for v in by_phase.values()) and all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert len(client.search_model_versions("name='latentgate-base'")) == 1
    assert len(list((tmp_path / "runs").iterdir())) == 1  # rank 0's folder, shared by both ranks
    a_run = by_phase["stage_a"][0].info.run_id
    for stage, run in (("stage_a", a_run), ("stage_b", by_phase["stage_b"][0].info.run_id)):
        steps = [m.step for m in client.get_metric_history(run, f"{stage}/loss")]
        assert steps == list(range(1, 7)), steps  # reduced across ranks, logged once

    one = _torchrun(["smoke", *micro], store, procs=1)  # reuses the registered base LM: same start point
    assert one.returncode == 0, one.stderr[-3000:]
    smokes = sorted((r for r in _runs(store) if r.data.tags.get("latentgate.phase") == "stage_b"),
                    key=lambda r: r.info.start_time)
    loss2, loss1 = (s.data.metrics["stage_b/loss"] for s in smokes)
    print(f"stage_b final loss: 2 processes {loss2:.6f}, 1 process {loss1:.6f}")
    assert loss2 == pytest.approx(loss1, rel=2e-2)

    b = _torchrun(["stage-b", *micro, "--resume-from", f"runs:/{a_run}/checkpoints/stage_a"], store)
    assert b.returncode == 0, b.stderr[-3000:]
    assert b.stdout.count("stage_b: run") == 1
    fresh = [r for r in _runs(store) if r.data.tags.get("latentgate.entry_point") == "stage_b"]
    assert len(fresh) == 1 and fresh[0].info.status == "FINISHED"
    assert fresh[0].data.tags["latentgate.init_from"] == f"runs:/{a_run}/checkpoints/stage_a"


def test_a_failed_check_under_torchrun_stops_every_rank(tmp_path):
    """A missing checkpoint fails on every rank in seconds, one line each, no traceback, nothing left RUNNING."""
    store = tmp_path / "store"
    store.mkdir()
    done = _torchrun(["stage-b", "--preset", "micro", "--resume-from", str(tmp_path / "nope")], store)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("latentgate: error:")]
    assert len(lines) == 2 and all("does not exist" in ln for ln in lines), done.stderr[-2000:]
    assert "latentgate/" not in done.stderr  # no frame of ours: torchrun's own report is all that follows
    assert all(r.info.status != "RUNNING" for r in _runs(store))
