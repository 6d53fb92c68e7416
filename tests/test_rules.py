"""One rule set: registry/hero.yaml is read by the gate, the analysis report, the live monitor and the pipeline's
decision tree alike. One recorded candidate (a real lineage in the session's SQLite store: base, Stage A, Stage B
with its probe history and controls, an eval run with its artifacts, all FINISHED at one commit, scored on the smoke
preset's pinned eval set) passes the shipped file. Copies of the file with ONE threshold changed move every consumer
that reads that criterion, on the same evidence: the gate's evaluation, the report's recommendation (and its local
readiness table), the monitor's alerts and the pipeline's decision (from the evidence the pipeline gathers)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from latentgate.registry.checklist import DEFAULT_PATH, load_checklist

STEPS = 30
PROBES = {10: 0.05, 20: 0.15, 30: 0.14}  # Stage B's raw probe first-token accuracy: peak 15%, final 6.7% below it
CONST = 0.01  # the probe's constant-guess control (shuffled-latent: 0): peak lift 14%
GRAD = 2.0  # every grad norm
LATENT_F1 = [0.0, 1.0, 0.0, 0.0] * 50  # per example, over the smoke's 200 eval questions: best 1.0, mean 0.25;
# one answer ('paris') for a quarter of them, every other answer different, none repetitive


def _smoke_eval_digest() -> str:
    """The eval dataset digest the shipped file pins for the smoke preset's data config."""
    from latentgate.config import config_hash, resolve

    return load_checklist().pinned_digest(config_hash(resolve("smoke"), ("data",)))


@pytest.fixture(scope="module")
def candidate(mlflow_store, tmp_path_factory) -> dict:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from latentgate.config import flatten, resolve

    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("latentgate").experiment_id
    now = int(time.time() * 1000)
    commit = "0123456789abcdef0123456789abcdef01234567"
    parent = client.create_run(exp, run_name="rules", tags={"latentgate.phase": "smoke"}).info.run_id

    def child(phase: str, **tags) -> str:
        return client.create_run(exp, run_name=phase, tags={"latentgate.phase": phase, "mlflow.parentRunId": parent,
                                                             "latentgate.git_commit": commit, **tags}).info.run_id

    base = child("base")
    stage_a = child("stage_a")
    stage_b = child("stage_b", **{"latentgate.init_from": f"runs:/{stage_a}/checkpoints/stage_a",
                                  "latentgate.base_run": base})
    for stage, run in (("stage_a", stage_a), ("stage_b", stage_b)):
        metrics = []
        for step in range(1, STEPS + 1):
            metrics += [Metric(f"{stage}/loss", 5.0 - step * 0.01, now, step),
                        Metric(f"{stage}/grad_norm", GRAD, now, step), Metric(f"{stage}/first_acc", 0.05, now, step)]
            if stage == "stage_b" and step in PROBES:
                acc = PROBES[step]
                metrics += [Metric("stage_b/probe_first_acc", acc, now, step),
                            Metric("stage_b/probe_first_acc_const", CONST, now, step),
                            Metric("stage_b/probe_first_acc_shuffled", 0.0, now, step),
                            Metric("stage_b/probe_first_acc_lift", acc - CONST, now, step)]
        client.log_batch(run, metrics=metrics, params=[Param(f"{stage}.steps", str(STEPS))])
    ev = child("eval", **{"latentgate.checkpoint": f"runs:/{stage_b}/checkpoints/stage_b",
                          "latentgate.base_run": base, "dataset.eval.digest": _smoke_eval_digest()})
    from latentgate.tracking.tracker import example_sha256
    from latentgate.train.workspace import load_splits

    examples = load_splits(resolve("smoke"))["eval"]  # the pinned eval set: its rows hash to the pinned digest
    rows = [{"id": ex.id, "path": "latent", "question": ex.question, "references": ["paris"],
             "prediction": "paris" if f > 0 else f"x{i}", "first_token": i, "em": float(f == 1.0), "f1": f,
             "first_token_correct": f > 0, "error_mode": "correct" if f == 1.0 else "wrong_entity",
             "example_sha256": example_sha256(ex)} for i, (f, ex) in enumerate(zip(LATENT_F1, examples, strict=True))]
    rows += [{**r, "path": "text", "f1": 0.8} for r in rows]
    mean = sum(LATENT_F1) / len(LATENT_F1)
    paths = {"latent": {"f1": mean, "em": mean, "n": len(LATENT_F1), "top_prediction_share": 0.25,
                        "repetition_rate": 0.0},
             "text": {"f1": 0.8}, "zero_latent": {"f1": 0.0}, "shuffled_latent": {"f1": 0.0}}
    out = tmp_path_factory.mktemp("rules")
    (out / "eval_detailed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "metrics.json").write_text(json.dumps({"paths": paths}))
    client.log_artifact(ev, str(out / "eval_detailed.jsonl"))
    client.log_artifact(ev, str(out / "metrics.json"))
    params = [Param(k, str(v)) for k, v in flatten(resolve("smoke")).items()]  # the config the eval ran with
    client.log_batch(ev, metrics=[Metric(f"eval/{p}/{k}", v, now, 0) for p, m in paths.items() for k, v in m.items()
                                  if k != "n"], params=params)
    for run in (base, stage_a, stage_b, ev, parent):
        client.set_terminated(run)
    return {"parent": parent, "stage_b": stage_b, "eval": ev}


def _edited(tmp_path: Path, name: str, edit: dict) -> Path:
    """A copy of the shipped hero.yaml with one criterion edited."""
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    if edit:
        crit = next(c for c in data["criteria"] if c["name"] == edit["criterion"])
        for key, value in edit.items():
            if key == "params":
                crit["params"].update(value)
            elif key != "criterion":
                crit[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


SHIPPED_ALERTS = {"new_peak", "f1_breakthrough"}
CASES = {  # name: (edit of one criterion, gate's failing criteria, decision rule, report verdict, monitor alerts)
    "shipped": ({}, [], "ready_stop_before_hero", "hero-ready", SHIPPED_ALERTS),
    "stability: a 5% drop from the peak is too much": (
        {"criterion": "first_token_stability", "threshold": 0.05}, ["first_token_stability"], "needs_tuning",
        "phase2", SHIPPED_ALERTS | {"regression"}),
    "learning: a 20% lift is needed": (
        {"criterion": "first_token_learning", "threshold": 0.20}, ["first_token_learning"], "needs_tuning",
        "phase2", SHIPPED_ALERTS),  # the monitor raises no alert on the lift (it prints it with every probe)
    "breakthrough: F1 above 1 (never)": (
        {"criterion": "f1_breakthrough", "threshold": 1.0}, ["f1_breakthrough"], "exposure_bias", "phase3",
        SHIPPED_ALERTS - {"f1_breakthrough"}),
    "gradients: a grad norm of 2 is unhealthy": (
        {"criterion": "gradient_health", "threshold": 1.5}, ["gradient_health"], "needs_tuning", "phase2",
        SHIPPED_ALERTS | {"grad_spike"}),
    "collapse: one answer for 25% of the inputs is too many": (
        {"criterion": "no_mode_collapse", "params": {"max_top_prediction_share": 0.2}}, ["no_mode_collapse"],
        "collapsed", "phase2", SHIPPED_ALERTS | {"collapse"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_threshold_moves_the_gate_the_report_the_monitor_and_the_pipeline(candidate, case, tmp_path):
    from latentgate.analysis.history import load_run_bundle
    from latentgate.analysis.monitor import Monitor, default_limits
    from latentgate.analysis.report import build_report
    from latentgate.pipeline.run import PipelineOptions, gather_evidence
    from latentgate.registry.decisions import decide
    from latentgate.registry.gate import check_candidate

    edit, failing, rule, verdict, alerts = CASES[case]
    path = _edited(tmp_path, "checklist", edit)
    cl = load_checklist(path)

    # 1. the checklist, evaluated by the registry's gate on the recorded evidence
    report = check_candidate(candidate["eval"], path)
    assert sorted(report.failing()) == failing and not report.missing, [r for r in report.rows if not r.passed]
    assert report.passed is (not failing)

    # 2. the pipeline's decision tree, on the evidence the pipeline gathers (the gate's verdict included)
    evidence = gather_evidence("extend", candidate["stage_b"], candidate["eval"], PipelineOptions(checklist=str(path)),
                               None, checklist=cl)
    assert (evidence.f1_max, evidence.first_acc, evidence.top_prediction_share) == (1.0, 0.14, 0.25)  # final step
    assert evidence.first_acc_lift == pytest.approx(0.13)  # the same numbers in every case; the rules differ
    assert decide(evidence, cl).rule == rule

    # 3. the analysis report: its recommendation (the gate's table), and its local table judged by the same file
    bundle = load_run_bundle(candidate["parent"])
    rep = build_report(bundle, checklist_path=path)
    assert rep["readiness"]["source"] == "latentgate.registry.gate"
    assert (rep["recommendation"]["rule"], rep["recommendation"]["verdict"]) == (rule, verdict)
    local = build_report(bundle, checklist_path=path, use_gate=False)["readiness"]
    assert sorted(r["name"] for r in local["rows"] if not r["passed"]) == failing

    # 4. the live monitor's alerts
    mon = Monitor(candidate["parent"], limits=default_limits(checklist_path=path), set_tags=False,
                  echo=lambda *_: None)
    assert {a.kind for a in mon.poll()} == alerts
