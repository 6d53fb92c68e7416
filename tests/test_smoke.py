"""End to end: the micro smoke's run tree, params, step metrics, datasets, artifacts and output-folder contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentgate.config import flatten
from latentgate.tracking.lineage import base_source

CHILDREN = ("base", "stage_a", "stage_b", "eval")


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_run_tree_params_and_status(micro_smoke, micro_cfg):
    c = _client()
    parent = c.get_run(micro_smoke.run_id)
    assert parent.info.status == "FINISHED"
    kids = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(k.data.tags["latentgate.phase"] for k in kids) == sorted(CHILDREN)
    assert all(k.info.status == "FINISHED" for k in kids)
    expected = {k: str(v) for k, v in flatten(micro_smoke_cfg(micro_smoke, micro_cfg)).items()}
    for k in kids:
        tags = k.data.tags
        assert tags["latentgate.git_commit"] and tags["latentgate.version.torch"]
        if tags["latentgate.phase"] in ("stage_a", "stage_b", "eval"):
            logged = {key: val for key, val in k.data.params.items() if key in expected}
            assert logged == expected  # the resolved config, in full


def micro_smoke_cfg(summary, micro_cfg):
    """The config the fixture ran: micro with its output_dir changed."""
    import dataclasses

    cfg = dataclasses.replace(micro_cfg)
    cfg.run = dataclasses.replace(micro_cfg.run, output_dir=str(Path(summary.output_dir).parent))
    return cfg


PER_STEP = ("loss", "first_raw", "kce_raw", "kd_raw", "tf_raw", "first_weighted", "grad_norm", "grad_norm_adapter",
            "lr", "first_acc_top5", "answer_length_avg", "token_diversity")
PER_PROBE = ("probe_first_acc", "probe_first_acc_lo")


def test_step_metrics_count_optimizer_steps(micro_smoke, micro_cfg, tiny_ws, tmp_path):
    """Every step metric has exactly one point per OPTIMIZER step (1..steps), probes at every probe_every-th step
    and the last; micro_step counts micro-batches (steps x grad_accum). The smoke runs grad_accum 1, where a metric
    logged at its micro-step would look the same, so a tracked Stage A with grad_accum 2 is read back as well."""
    import dataclasses

    from latentgate.tracking.runs import tracked_run
    from latentgate.train.trainer import train_stage

    c = _client()
    for stage in ("stage_a", "stage_b"):
        run_id = micro_smoke.children[stage]
        stage_cfg = getattr(micro_cfg, stage)
        steps = list(range(1, stage_cfg.steps + 1))
        for key in PER_STEP:
            assert [m.step for m in c.get_metric_history(run_id, f"{stage}/{key}")] == steps, key
        micro = c.get_metric_history(run_id, f"{stage}/micro_step")
        assert [(m.step, int(m.value)) for m in micro] == [(s, s * stage_cfg.grad_accum) for s in steps]
        probes = sorted({*range(stage_cfg.probe_every, stage_cfg.steps + 1, stage_cfg.probe_every), stage_cfg.steps})
        for key in PER_PROBE:
            assert [m.step for m in c.get_metric_history(run_id, f"{stage}/{key}")] == probes, key
    lora = c.get_metric_history(micro_smoke.children["stage_b"], "stage_b/grad_norm_lora")
    assert [m.step for m in lora] == list(range(1, micro_cfg.stage_b.steps + 1)) and all(m.value > 0 for m in lora)

    ws = tiny_ws
    ws.cfg.stage_a = dataclasses.replace(ws.cfg.stage_a, steps=3, grad_accum=2, batch_size=4, warmup_steps=0,
                                         probe_every=3)
    with tracked_run("grad_accum", nested=False) as tr:
        train_stage(ws, ws.cfg.stage_a, tr, tmp_path, name="stage_a")
    for key in PER_STEP:
        assert [m.step for m in c.get_metric_history(tr.run_id, f"stage_a/{key}")] == [1, 2, 3], key
    micro = c.get_metric_history(tr.run_id, "stage_a/micro_step")
    assert [(m.step, int(m.value)) for m in micro] == [(1, 2), (2, 4), (3, 6)]


def test_grad_accum_counts_optimizer_steps_apart_from_micro_steps(tiny_ws, tmp_path):
    """With grad_accum=3 a budget of 4 steps is 4 optimizer updates over 12 micro-batches: the step records, the
    scheduler (one LR per update) and the result all count updates; micro_step counts the batches."""
    import dataclasses

    from latentgate.tracking.tracker import NullTracker
    from latentgate.train.trainer import train_stage

    ws = tiny_ws
    ws.cfg.stage_a = dataclasses.replace(ws.cfg.stage_a, steps=4, grad_accum=3, batch_size=4, warmup_steps=2,
                                         probe_every=2, schedule="constant")
    result = train_stage(ws, ws.cfg.stage_a, NullTracker(), tmp_path, name="stage_a")
    rows = [json.loads(x) for x in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [(r["global_step"], r["micro_step"]) for r in rows] == [(1, 3), (2, 6), (3, 9), (4, 12)]
    lr = ws.cfg.stage_a.lr
    assert [r["lr"] for r in rows] == pytest.approx([0.0, lr / 2, lr, lr])  # warm-up over 2 UPDATES, not batches
    assert (result["steps"], result["micro_steps"]) == (4, 12)
    assert [p["step"] for p in result["probes"]] == [2, 4]


def test_the_smoke_returns_typed_results_and_records_them_field_by_field(micro_smoke, tmp_path):
    """run_smoke returns a SmokeResult (no string-keyed dict): the parent run's summary.json is it field by field, its
    metrics carry the schema's names; each stage run's stage_summary.json is its StageResult without the probes."""
    import dataclasses

    from latentgate.phases.results import SmokeResult, StageResult
    from latentgate.schema import Summary

    c = _client()
    assert isinstance(micro_smoke, SmokeResult)
    assert {Summary.TEXT_F1, Summary.LATENT_F1, Summary.LATENT_EM} <= {f.name for f in dataclasses.fields(SmokeResult)}
    saved = json.loads(Path(c.download_artifacts(micro_smoke.run_id, "summary.json", str(tmp_path))).read_text())
    assert saved == json.loads(json.dumps(micro_smoke.as_record()))
    metrics = c.get_run(micro_smoke.run_id).data.metrics
    assert (metrics[Summary.LATENT_F1], metrics[Summary.TEXT_F1]) == (micro_smoke.latent_f1, micro_smoke.text_f1)
    assert sorted(micro_smoke.children) == sorted(CHILDREN)
    stage_b = micro_smoke.children["stage_b"]
    recorded = json.loads(Path(c.download_artifacts(stage_b, "stage_summary.json", str(tmp_path))).read_text())
    assert set(recorded) == {f.name for f in dataclasses.fields(StageResult)} - {"probes"}
    assert recorded["run_id"] == stage_b and recorded["checkpoint_uri"] == f"runs:/{stage_b}/checkpoints/stage_b"
    assert micro_smoke.stage_b_probe_first_acc == recorded["final_probe"]["first_acc"]


def test_datasets_and_artifacts(micro_smoke):
    c = _client()
    a = c.get_run(micro_smoke.children["stage_a"])
    names = {d.dataset.name for d in a.inputs.dataset_inputs}
    assert names == {"train", "probe", "eval"}
    assert a.data.tags["dataset.eval.digest"]
    arts = {f.path for f in c.list_artifacts(a.info.run_id)}
    assert {"diagnostics.jsonl", "contract.json", "checkpoints", "stage_summary.json"} <= arts
    ck = {f.path for f in c.list_artifacts(micro_smoke.children["stage_b"], "checkpoints/stage_b")}
    assert "checkpoints/stage_b/manifest.json" in ck and "checkpoints/stage_b/lora" in ck
    ev = {f.path for f in c.list_artifacts(micro_smoke.children["eval"])}
    assert {"eval_detailed.jsonl", "metrics.json", "contract.json", "plots"} <= ev
    plots = {f.path for f in c.list_artifacts(a.info.run_id, "plots")}
    assert {"plots/first_acc.png", "plots/losses.png", "plots/grad_norm.png"} <= plots
    # the base run records the sanity gate; the run that trained the base LM (this one, or an earlier test's
    # with the same config: the registry reuses it) holds its weights
    assert "sanity_gate.json" in {f.path for f in c.list_artifacts(micro_smoke.children["base"])}
    _, holder = base_source(micro_smoke.base_source)
    assert "base_lm" in {f.path for f in c.list_artifacts(holder)}


def test_output_folder_contract(micro_smoke, micro_cfg):
    out = Path(micro_smoke.output_dir)
    a = out / "stage_a" / "checkpoints" / "stage_a"
    assert sorted(p.name for p in a.iterdir()) == sorted(
        ["manifest.json", "encoder.safetensors", "adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng.json"])
    b = out / "stage_b" / "checkpoints" / "stage_b"
    assert (b / "lora" / "adapter_model.safetensors").exists() and (b / "manifest.json").exists()
    assert not list(out.rglob("*.tmp-*"))  # atomic writes leave nothing behind
    diag = [json.loads(x) for x in (out / "stage_b" / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["global_step"] for d in diag] == list(range(1, micro_cfg.stage_b.steps + 1))
    required = {"global_step", "micro_step", "stage", "epoch", "lr", "first_raw", "first_weighted", "kce_raw",
                "kd_raw", "tf_raw", "first_acc", "first_acc_top5", "grad_norm", "grad_norm_encoder",
                "grad_norm_adapter", "grad_norm_lora", "answer_length_avg", "token_diversity", "elapsed"}
    assert required <= set(diag[0])
    epoch = [json.loads(x) for x in (out / "stage_b" / "diagnostics_epoch.jsonl").read_text().splitlines()]
    assert epoch and {"sample_predictions", "first_token_histogram", "loss_breakdown"} <= set(epoch[-1])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["paths"]) == set(micro_cfg.eval.paths)
    rows = [json.loads(x) for x in (out / "eval" / "eval_detailed.jsonl").read_text().splitlines()]
    assert len(rows) == micro_cfg.data.n_eval * len(micro_cfg.eval.paths)
    assert {"question", "references", "prediction", "em", "f1", "first_token_correct", "path"} <= set(rows[0])


def test_second_smoke_reuses_base(micro_smoke, micro_cfg, tmp_path):
    import dataclasses

    from latentgate.phases.smoke import run_smoke

    c = _client()
    cfg = dataclasses.replace(micro_cfg)
    cfg.run = dataclasses.replace(micro_cfg.run, output_dir=str(tmp_path))
    again = run_smoke(cfg, "micro")
    assert again.base_source == f"reused:{base_source(micro_smoke.base_source)[1]}"
    from latentgate.schema import Tag
    from latentgate.tracking.lineage import base_hash

    versions = c.search_model_versions(f"name='{micro_cfg.run.registry_base}'")
    assert [v.tags.get(Tag.BASE_CONFIG_HASH) for v in versions].count(base_hash(cfg)) == 1  # not trained twice


def test_mlflow_run_entry_point_makes_real_children(tmp_path):
    """`mlflow run . -e smoke` (what `make smoke` runs): the project's run is the parent, stages are children."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    env = cli_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    out = subprocess.run(["mlflow", "run", str(ROOT), "-e", "smoke", "-P", "preset=micro", "-P",
                          f"overrides=run.output_dir={tmp_path / 'runs'}", "--env-manager", "local",
                          "--experiment-name", "latentgate"], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "latent F1 / EM" in out.stdout
    import sqlite3

    db = sqlite3.connect(tmp_path / "mlflow.db")
    runs = dict(db.execute("select run_uuid, name from runs").fetchall())
    parents = dict(db.execute("select run_uuid, value from tags where key='mlflow.parentRunId'").fetchall())
    (parent,) = [r for r in runs if r not in parents]
    assert runs[parent].startswith("smoke micro (")  # run names say what differs: tests/test_browse.py
    assert sorted(runs[c].split()[0] for c, p in parents.items() if p == parent) == sorted(CHILDREN)
