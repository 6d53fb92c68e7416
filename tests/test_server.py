"""Tracking-server mode: a real `mlflow server` on 127.0.0.1 (its own SQLite backend and artifact root in a temp
dir; the `mlflow_server` fixture of conftest.py). The micro smoke, the gate, the monitor and the pyfunc load all go
over HTTP."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import free_port, run_cli
from latentgate.analysis.monitor import EXIT_FOR_SEVERITY
from latentgate.schema import Tag
from test_registry import LENIENT, eval_digest, write_checklist


@pytest.mark.slow  # 40-55 s: a real `mlflow server`, a smoke, the gate, the monitor and the pyfunc over HTTP
def test_smoke_gate_monitor_and_pyfunc_over_http(mlflow_server, tmp_path, micro_cfg):
    server = mlflow_server
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

        # the monitor reads the same runs over HTTP (no --follow: one pass over the finished run): one line per
        # probe of each stage, and each alert it prints is tagged on the smoke's run through the server; its exit
        # code is the worst severity printed (micro numbers decide which alerts there are, not this test)
        mon = run_cli("monitor", parent.info.run_id, "--checklist", str(lenient), env=env)
        probes = {(stage, int(step)) for stage, step in re.findall(r"^(stage_[ab])\s+step\s+(\d+)", mon.stdout, re.M)}
        stages = {stage: getattr(micro_cfg, stage) for stage in ("stage_a", "stage_b")}
        assert probes == {(stage, s) for stage, sc in stages.items()
                          for s in {*range(sc.probe_every, sc.steps + 1, sc.probe_every), sc.steps}}, mon.stdout[-2000:]
        alerts = re.findall(r"^ALERT (\w+) \[(\w+)\]", mon.stdout, re.M)
        assert mon.returncode == max((EXIT_FOR_SEVERITY[sev] for _, sev in alerts), default=0), mon.stdout[-2000:]
        tagged = {k.removeprefix(Tag.ALERT_PREFIX) for k in c.get_run(parent.info.run_id).data.tags
                  if k.startswith(Tag.ALERT_PREFIX)}
        assert tagged == {kind for kind, _ in alerts}

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
                  env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert out.returncode == 2 and time.time() - t0 < 30
    errors = [ln for ln in out.stderr.strip().splitlines() if not ln.startswith("latentgate: progress:")]
    assert "unreachable" in out.stderr and len(errors) == 1, out.stderr
    assert not (tmp_path / "runs").exists() and not list(tmp_path.iterdir())
