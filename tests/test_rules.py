"""One rule set: registry/hero.yaml is read by the gate, the analysis report, the live monitor and the pipeline's
decision tree alike. One recorded candidate (a real lineage in the session's SQLite store: base, Stage A, Stage B
with its probe history and controls, an eval run with its artifacts, all FINISHED at one commit, scored on the smoke
preset's pinned eval set) passes the shipped file. Copies of the file with ONE threshold changed move every consumer
that reads that criterion, on the same evidence: the gate's evaluation, the report's readiness table and
recommendation (both the gate's), the monitor's alerts and the pipeline's decision (from the evidence the pipeline
gathers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import every_criterion_decides, recorded_candidate
from latentgate.registry.checklist import DEFAULT_PATH, load_checklist

STEPS = 30
PROBES = {10: 0.05, 20: 0.15, 30: 0.14}  # Stage B's raw probe first-token accuracy: peak 15%, final 6.7% below it
CONST = 0.01  # the probe's constant-guess control (shuffled-latent: 0): peak lift 14%
GRAD = 2.0  # every grad norm
LATENT_F1 = [0.0, 1.0, 0.0, 0.0] * 50  # per example, over the smoke's 200 eval questions: best 1.0, mean 0.25;
# one answer ('paris') for a quarter of them, every other answer different, none repetitive


@pytest.fixture(scope="module")
def candidate(mlflow_store, tmp_path_factory) -> dict:
    return recorded_candidate(tmp_path_factory.mktemp("rules"), PROBES, LATENT_F1, const=CONST, grad=GRAD,
                              steps=STEPS)


def _edited(tmp_path: Path, name: str, edit: dict) -> Path:
    """A copy of the shipped hero.yaml with one criterion edited."""
    data = every_criterion_decides(yaml.safe_load(DEFAULT_PATH.read_text()))
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

    # 3. the analysis report: its readiness table is the gate's, its recommendation the pipeline's decision on the
    # evidence the pipeline reads
    rep = build_report(load_run_bundle(candidate["parent"]), checklist_path=path)
    assert rep["readiness"]["source"] == "latentgate.registry.gate"
    assert sorted(r["name"] for r in rep["readiness"]["rows"] if not r["passed"] and r["decides"]) == failing
    assert (rep["recommendation"]["rule"], rep["recommendation"]["verdict"]) == (rule, verdict)
    assert rep["recommendation"]["first_acc_lift"] == evidence.first_acc_lift

    # 4. the live monitor's alerts
    mon = Monitor(candidate["parent"], limits=default_limits(checklist_path=path), set_tags=False,
                  echo=lambda *_: None)
    assert {a.kind for a in mon.poll()} == alerts
