"""Tracking-server mode: a real `mlflow server` on 127.0.0.1 (its own SQLite backend and artifact root in a temp
dir). The micro smoke, the gate, the monitor and the pyfunc load all go over HTTP; the server is stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import cli_env, run_cli
from test_registry import LENIENT, eval_digest, write_checklist

# ~40 s: a server start plus a micro smoke through it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = cli_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.mark.slow  # 40-55 s: a real `mlflow server`, a smoke, the gate, the monitor and the pyfunc over HTTP
def test_smoke_gate_monitor_and_pyfunc_over_http(server, tmp_path, micro_cfg):
    env = {"MLFLOW_TRACKING_URI": server}
    smoke = run_cli("smoke", "--preset", "micro", "--set", f"run.output_dir={tmp_path / 'runs'}", env=env)
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    assert f"--backend-store-uri {server}" in smoke.stdout

    import mlflow
    from mlflow import MlflowClient

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server)  # also sets MLFLOW_TRACKING_URI in os.environ: restored below
    try:
        c = MlflowClient(server)
        exp = c.get_experiment_by_name("latentgate")
        (parent,) = c.search_runs([exp.experiment_id], "tags.`latentgate.phase` = 'smoke'")
        kids = {r.data.tags["latentgate.phase"]: r for r in
                c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
        assert set(kids) == {"base", "stage_a", "stage_b", "eval"}
        assert all(r.info.status == "FINISHED" for r in kids.values())
        assert c.get_metric_history(kids["stage_b"].info.run_id, "stage_b/loss")
        # artifacts travel through the server's proxy
        arts = {f.path for f in c.list_artifacts(kids["eval"].info.run_id)}
        assert {"metrics.json", "eval_detailed.jsonl"} <= arts

        # the gate over HTTP: a lenient checklist (micro numbers are meaningless) promotes
        h, digest = eval_digest(micro_cfg)
        lenient = write_checklist(tmp_path / "lenient.yaml", {h: digest}, LENIENT)
        promote = run_cli("promote", kids["eval"].info.run_id, "--checklist", str(lenient), env=env)
        assert promote.returncode == 0, promote.stdout[-2000:] + promote.stderr[-2000:]
        alias = c.get_model_version_by_alias("latentgate", "hero")
        assert alias.tags["hero.check.generation_quality"].startswith("pass")

        # the monitor reads the same run over HTTP (no --follow: one pass over the finished run)
        mon = run_cli("monitor", parent.info.run_id, "--checklist", str(lenient), env=env)
        assert mon.returncode in (0, 3), mon.stderr[-2000:]
        assert "probe" in mon.stdout.lower() or "step" in mon.stdout.lower()

        # the pyfunc model loads from the registry over HTTP and answers
        import pandas as pd

        model = mlflow.pyfunc.load_model("models:/latentgate@hero")
        rows = [json.loads(x) for x in Path(mlflow.artifacts.download_artifacts(
            run_id=kids["eval"].info.run_id, artifact_path="eval_detailed.jsonl")).read_text().splitlines()]
        latent = [r for r in rows if r["path"] == "latent"][:4]
        from latentgate.train.workspace import load_splits

        by_id = {e.id: e for e in load_splits(micro_cfg)["eval"]}
        df = pd.DataFrame([{"context": by_id[r["id"]].context, "question": by_id[r["id"]].question} for r in latent])
        assert list(model.predict(df)["answer"]) == [r["prediction"] for r in latent]
    finally:
        mlflow.set_tracking_uri(previous)
        os.environ["MLFLOW_TRACKING_URI"] = previous


def test_unreachable_server_fails_in_seconds(tmp_path):
    t0 = time.time()
    out = run_cli("smoke", "--preset", "micro", "--set", f"run.output_dir={tmp_path}",
                  env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"})
    assert out.returncode == 2 and time.time() - t0 < 30
    errors = [ln for ln in out.stderr.strip().splitlines() if not ln.startswith("latentgate: progress:")]
    assert "unreachable" in out.stderr and len(errors) == 1, out.stderr
    assert not (tmp_path / "runs").exists() and not list(tmp_path.iterdir())
