"""What `mlflow ui` shows, read back from the real SQLite store of the micro smoke: run names that say what differs,
descriptions with the outcome, the eval table (one row per question and path), system metrics, dataset sources."""

from __future__ import annotations

import json
from pathlib import Path

from latentgate.schema import MlflowTag
from latentgate.tracking import labels

NOTE = MlflowTag.NOTE


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _run(run_id):
    return _client().get_run(run_id)


def test_names_of_the_issue_and_the_trials():
    from latentgate import config

    cfg = config.resolve("smoke", {"stage_b.first_token_ce_weight": 6.0, "stage_b.lr": 1e-4, "stage_b.steps": 350})
    assert labels.stage_run_name("stage_b", "stage_b", cfg) == "stage_b fte=6 lr=1e-4 350 steps"
    cfg = config.resolve("smoke", {"stage_b.schedule": "constant", "stage_b.kd_weight": 0.0, "stage_b.k": 8,
                                   "model.lora_r": 16, "stage_b.scheduled_sampling": True})
    assert labels.stage_run_name("fix", "stage_b", cfg) == "fix fte=3 lr=5e-4 constant kd=0 K=8 ss r=16 150 steps"
    params = {"stage_b.first_token_ce_weight": 5.6923, "stage_b.steps": 350, "stage_b.lr": 0.00032,
              "stage_b.schedule": "cosine", "model.lora_r": 8}
    assert labels.trial_run_name(7, params) == "trial-7 fte=5.69 lr=3.2e-4 cosine r=8 350 steps"
    assert labels.short_params({"data.eval_source": "postgresql://u:hunter2@db/x"}) == \
        "eval_source=postgresql://u:***@db/x"  # secrets never reach a run name


def test_run_names_say_what_differs(micro_smoke, micro_cfg):
    kids = micro_smoke.children
    stage_b = f"stage_b fte=3 lr=5e-4 r=2 {micro_cfg.stage_b.steps} steps"  # micro: LoRA rank 2, not the default 8
    assert _run(kids["stage_a"]).info.run_name == f"stage_a fte=3 lr=1e-3 {micro_cfg.stage_a.steps} steps"
    assert _run(kids["stage_b"]).info.run_name == stage_b
    assert _run(kids["eval"]).info.run_name == f"eval of {stage_b}"
    assert _run(kids["base"]).info.run_name.startswith("base builtin 2x32 ")  # trained, or reused from a run
    assert _run(micro_smoke.run_id).info.run_name == f"smoke micro ({stage_b.removeprefix('stage_b ')})"


def test_descriptions_carry_the_outcome(micro_smoke):
    kids = micro_smoke.children
    ev = _run(kids["eval"])
    f1 = ev.data.metrics["eval/latent/f1"]
    assert f"Latent F1 {f1:.3f}" in ev.data.tags[NOTE] and "eval_table.json" in ev.data.tags[NOTE]
    for stage in ("stage_a", "stage_b"):
        run = _run(kids[stage])
        acc = run.data.metrics[f"{stage}/final_probe_first_acc"]
        note = run.data.tags[NOTE]
        assert note.startswith(f"**{stage}** ({stage}): ") and f"accuracy {acc:.1%} at the end" in note
        assert f"runs:/{run.info.run_id}/checkpoints/{stage}" in note and "Final loss " in note
    base = _run(kids["base"]).data.tags[NOTE]
    assert base.startswith("**Base LM** ") and "sanity gate passed" in base
    parent = _run(micro_smoke.run_id).data.tags[NOTE]
    assert f"latent F1 {micro_smoke.latent_f1:.3f}" in parent and kids["eval"] in parent


def test_eval_table_has_one_row_per_question_and_path(micro_smoke, micro_cfg):
    import mlflow

    ev = micro_smoke.children["eval"]
    table = mlflow.load_table("eval_table.json", run_ids=[ev])
    detailed = Path(mlflow.artifacts.download_artifacts(run_id=ev, artifact_path="eval_detailed.jsonl"))
    rows = [json.loads(line) for line in detailed.read_text().splitlines() if line]
    assert len(table) == len(rows) == micro_cfg.data.n_eval * len(micro_cfg.eval.paths)
    assert {"id", "path", "question", "prediction", "references", "f1", "em", "error_mode"} <= set(table.columns)
    assert set(table["path"]) == set(micro_cfg.eval.paths)
    for (_, got), want in zip(table.iterrows(), rows):
        assert (got["id"], got["path"], got["prediction"], got["f1"], got["error_mode"]) == (
            want["id"], want["path"], want["prediction"], want["f1"], want["error_mode"])
        assert got["references"] == " | ".join(want["references"])


def test_eval_run_records_system_metrics(micro_smoke, micro_cfg, monkeypatch, tmp_path):
    """An eval of the smoke's Stage B checkpoint, in this process, sampling system metrics every 0.2 s."""
    from latentgate.phases.stages import run_eval
    from latentgate.tracking.lineage import base_from_run, resolve_checkpoint
    from latentgate.train.workspace import load_splits

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = f"runs:/{micro_smoke.children['stage_b']}/checkpoints/stage_b"
    ev = run_eval(micro_cfg, base_from_run(micro_smoke.children["stage_b"]), resolve_checkpoint(uri), tmp_path,
                  load_splits(micro_cfg), source_uri=uri)
    metrics = _run(ev.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/disk_usage_percentage"} <= set(metrics), sorted(metrics)
    assert not any(k.startswith("system/gpu") for k in metrics)  # no CUDA here: no GPU figures, and no error


def test_datasets_are_logged_with_their_source(micro_smoke):
    run = _run(micro_smoke.children["stage_a"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    for name in ("train", "probe", "eval"):
        ds = inputs[name].dataset
        assert ds.source_type == "code"
        assert json.loads(ds.source)["tags"] == {**json.loads(ds.source)["tags"], "generator":
                                                 "latentgate.data.synthetic", "split": name}
        assert {t.key: t.value for t in inputs[name].tags}["mlflow.data.context"]
    assert inputs["eval"].dataset.digest == run.data.tags["dataset.eval.digest"]  # the digest the gate pins
