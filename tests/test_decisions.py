"""The pipeline's decision tree follows the gate (issue #26): where the gate's deciding criteria pass, the next step
is the hero (Phase 4), whatever a criterion that only shows says; where the gate refuses, the plan's other branches
apply. The gate's report is built here directly (its rows as `check_candidate` fills them, judged by the shipped
registry/hero.yaml), and read by the same functions the pipeline and the analysis report read it with."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from latentgate.analysis.report import recommend
from latentgate.eval.controls import collapse_stats
from latentgate.registry.checklist import BREAKTHROUGH, COLLAPSE, LEARNING, QUALITY, load_checklist
from latentgate.registry.decisions import FIX, HERO, PROMOTE, decide, evidence_from_report
from latentgate.registry.gate_report import CheckRow, Report

N_EVAL = 200
# A candidate whose latent path answers every question wrongly (best example F1 0, mean F1 0, no two answers alike)
# while its first-token probe learned and its learning curve, read at the hero's budget, passes.
OBSERVED = {
    "first_token_learning": 0.13, "first_token_stability": 0.05, "f1_breakthrough": 0.0, "generation_quality": 0.0,
    "gradient_health": 3.0, "no_mode_collapse": 0.0, "probe_f1_at_hero_budget": 0.0, "probe_nll_at_hero_budget": 2.0,
    "probe_lift_at_hero_budget": 0.2, "eval_size": N_EVAL, "beats_controls": 0.0, "no_nan_or_skipped_steps": 0,
    "lineage": 0, "eval_dataset_digest": "31ebe9c7f09ef364",
}
SHOWN = {"stage_b/probe_first_acc": 0.15, "stage_b/probe_first_acc_const": 0.02,
         "stage_b/probe_first_acc_shuffled": 0.01}


def gate_report(cl, **changed) -> Report:
    """The gate's report on that candidate (`changed`: other observed values), each row judged as
    registry/gate.py `check_candidate` judges it, and the verdict read from the deciding rows only."""
    observed = {**OBSERVED, **changed}
    assert set(observed) == set(cl.names()), "the shipped checklist changed: give this candidate its new criteria"
    collapse = collapse_stats([f"wrong answer {i}" for i in range(N_EVAL)], [False] * N_EVAL,
                              top_k=cl.collapse_rule().top_k)
    rows = []
    for crit in cl.criteria:
        value = observed[crit.name]
        threshold = value if crit.name == "eval_dataset_digest" else crit.threshold  # the pin of its data config
        passed = crit.compare(value, threshold)
        if crit.name == COLLAPSE:
            passed = passed and not cl.collapse_rule().why(collapse.top_prediction_share, collapse.repetition_rate,
                                                           top_k_share=collapse.top_k_share,
                                                           empty_share=collapse.empty_share)
        rows.append(CheckRow(crit.name, passed, value, crit.op, threshold, kind=crit.kind, params=crit.params,
                             shown=SHOWN if crit.name == LEARNING else {},
                             collapse=asdict(collapse) if crit.name == COLLAPSE else None, decides=crit.decides))
    return Report(candidate="e" * 32, passed=all(r.passed for r in rows if r.decides), rows=rows, missing=[],
                  eval_run="e" * 32, checklist=str(cl.path), checklist_sha256=cl.sha256)


@pytest.mark.parametrize("phase", ["extend", "sweep", "fix"])
def test_a_candidate_the_gate_passes_with_latent_f1_0_goes_to_the_hero_not_phase3(phase):
    cl = load_checklist()
    report = gate_report(cl)
    assert report.passed and not report.failing()  # the gate would promote it ...
    assert report.row(BREAKTHROUGH).observed == 0.0 and not report.row(BREAKTHROUGH).passed  # ... at latent F1 0
    assert not report.row(QUALITY).passed and report.row(LEARNING).passed

    launched = decide(evidence_from_report(report, cl, phase, launch_hero=True), cl)
    assert (launched.rule, launched.next_phase) == ("ready_launch_hero", HERO), launched.reason
    assert "the gate passes" in launched.reason and "best example F1 0 not > 0" in launched.reason
    promoted = decide(evidence_from_report(report, cl, phase), cl)
    assert (promoted.rule, promoted.next_phase) == ("ready_stop_before_hero", PROMOTE), promoted.reason
    assert recommend(evidence_from_report(report, cl, phase), cl)[0] == "hero-ready"


def test_where_the_gate_refuses_the_plans_other_branches_apply():
    """The same candidate with its deciding learning curve short of the bar: refused, and F1 0 with the first token
    learned is exposure bias (Phase 3), as before."""
    cl = load_checklist()
    report = gate_report(cl, probe_lift_at_hero_budget=0.0)
    assert not report.passed and report.failing() == ["probe_lift_at_hero_budget"]
    decision = decide(evidence_from_report(report, cl, "extend", launch_hero=True), cl)
    assert (decision.rule, decision.next_phase) == ("exposure_bias", FIX), decision.reason
    assert recommend(evidence_from_report(report, cl, "extend"), cl)[0] == "phase3"
