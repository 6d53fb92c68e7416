"""`latentgate calibrate`: the statistics (small tables: confusion, line, threshold proposal, leave-one-out held-out
verdicts), the set files and the hero they build (the one `latentgate hero` builds), the reuse key, what `promote`
prints (only a calibration of the candidate's family; clipped, never extrapolated), and a micro calibration end to
end into the real SQLite store: its in-sample and held-out confusion matrices against the verdicts and outcomes of
the runs it made, its artifacts, and a repeated command that reuses every chain instead of training again (about
35 s of CPU on 2 cores; minutes of wall time when other jobs share them)."""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ROOT, every_criterion_decides
from latentgate.calibrate import stats
from latentgate.calibrate.figures import SplitAgreement
from latentgate.calibrate.records import ByRole, ChainRecord, ConfigurationRecord, GateRow, StageSteps
from latentgate.errors import ConfigError
from latentgate.registry.calibration import (
    CalibrationSummary,
    Confusion,
    Family,
    LineFit,
    assess,
    calibration_for,
    format_assessment,
    predict,
)
from latentgate.registry.gate_report import CheckRow
from latentgate.registry.hero_recipe import BUDGET_KEYS
from latentgate.tracking.reuse import ReuseKey

# ---- pure statistics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs, counts, agreement, p_promote, p_refuse", [
    ([], {"tp": 0, "fp": 0, "fn": 0, "tn": 0}, None, None, None),
    ([(True, True), (False, False)], {"tp": 1, "fp": 0, "fn": 0, "tn": 1}, 1.0, 1.0, 1.0),
    ([(True, False), (True, True), (False, True), (False, False)], {"tp": 1, "fp": 1, "fn": 1, "tn": 1},
     0.5, 0.5, 0.5),
    ([(False, False)] * 3 + [(False, True)], {"tp": 0, "fp": 0, "fn": 1, "tn": 3}, 0.75, None, 0.75),
])
def test_confusion_and_rates(pairs, counts, agreement, p_promote, p_refuse):
    c = stats.confusion(pairs)
    assert c == Confusion(**counts)
    r = stats.rates(c)
    assert (r.agreement, r.precision_promote, r.precision_refuse) == (agreement, p_promote, p_refuse)
    assert r.n == len(pairs)


@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (10, 2.228), (30, 2.042), (120, 1.980), (10**9, 1.960)])
def test_t_quantiles(df, t):
    assert stats.t975(df) == pytest.approx(t, abs=1e-3)
    assert 2.000 < stats.t975(45) < 2.021  # between the table's knots


def test_fit_line_and_prediction_interval():
    assert stats.fit_line([0.1, 0.2], [0.3, 0.5]) is None  # two points: no residual degrees of freedom
    assert stats.fit_line([0.2, 0.2, 0.2], [0.1, 0.3, 0.5]) is None  # one x: no line
    exact = stats.fit_line([0, 1, 2, 3], [1, 3, 5, 7]).line
    assert (exact.slope, exact.intercept, exact.s) == pytest.approx((2, 1, 0))
    assert (exact.x_min, exact.x_max) == (0, 3)
    assert predict(exact, 10) == pytest.approx((21, 21, 21))
    xs, ys = [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]  # slope 0.5, intercept 0.5, residuals -0.5, 1, -0.5
    fitted = stats.fit_line(xs, ys)
    fit = fitted.line
    assert (fit.slope, fit.intercept) == pytest.approx((0.5, 0.5))
    assert fit.s == pytest.approx(math.sqrt(1.5))  # SSE 1.5 over n - 2 = 1
    assert fitted.r2 == pytest.approx(0.25)  # SSE 1.5 of a total 2
    assert LineFit.from_dict(fitted.to_dict()) == fit  # what the summary tag carries
    y, lo, hi = predict(fit, 1.0)
    half = 12.706 * math.sqrt(1.5) * math.sqrt(1 + 1 / 3)  # at the mean x
    assert (y, lo, hi) == pytest.approx((1.0, 1.0 - half, 1.0 + half), abs=1e-3)


def _row(name, observed, op, threshold, passed=None, missing=()) -> GateRow:
    from latentgate.registry.checklist import OPS

    passed = OPS[op](observed, threshold) if passed is None else passed
    return GateRow(name, passed, observed, op, threshold, missing=tuple(missing))


FAMILY = Family("builtin:aaaa", "data1", (30, 30))
KEY = ReuseKey("gate", "cfg0", "", "c" * 40, "train0", "eval0", "builtin:aaaa")


def _chain(run_id: str, wall: float = 0.0) -> ChainRecord:
    return ChainRecord(run_id, "FINISHED", reused=False, reuse_key=KEY, commit=KEY.git_commit, wall_seconds=wall)


def _record(rows, split="fit", outcome=False, smoke_f1=None, hero_f1=None, finished=True, verdict=False,
            flops=(0.0, 0.0), wall=(0.0, 0.0)) -> ConfigurationRecord:
    """A configuration's record with what the statistics read; its chains are stand-ins."""
    return ConfigurationRecord(name="c", expect="good", preset="micro", overrides={}, split=split, verdict=verdict,
                               failing=(), rows=None if rows is None else tuple(rows), outcome=outcome,
                               hero_finished=finished, family=FAMILY, smoke_f1=smoke_f1, hero_f1=hero_f1,
                               flops=ByRole(*flops), micro_step_flops={}, config_hash=ByRole("g", "h"),
                               gate=_chain("g", wall[0]), hero=_chain("h", wall[1]))


def _rec(split, quality, outcome, lineage=0, collapsed=False):
    rows = [_row("generation_quality", quality, ">=", 0.01),
            _row("lineage", lineage, "==", 0),
            _row("no_mode_collapse", 0.0, "<", 0.1, passed=not collapsed)]
    return _record(rows, split, outcome)


def test_threshold_proposal_fits_one_split_and_is_judged_on_the_other():
    # hero success needs a smoke F1 around 0.3; the checklist's 0.01 passes everything
    records = [_rec("fit", 0.05, False), _rec("fit", 0.1, False), _rec("fit", 0.4, True), _rec("fit", 0.6, True),
               _rec("fit", 0.7, True, collapsed=True), _rec("fit", 0.8, False, lineage=1),
               _rec("holdout", 0.02, False), _rec("holdout", 0.5, True), _record(None, "holdout", False)]
    prop = stats.propose_thresholds(records)
    assert set(prop.changes) == {"generation_quality"}  # lineage (==) is a pin, never tuned
    old, new = prop.changes["generation_quality"]
    assert old == 0.01 and 0.1 < new <= 0.4
    # before: the two low F1s are promoted and fail; after: only the collapsed success still disagrees
    assert prop.fit == SplitAgreement(n=6, before=0.5, after=pytest.approx(5 / 6))
    assert prop.holdout == SplitAgreement(n=3, before=pytest.approx(2 / 3), after=1.0)
    assert prop.to_dict()["changes"] == {"generation_quality": {"from": 0.01, "to": new}}  # calibration.json's
    # a row failing for another reason (collapse) keeps failing whatever its threshold; no rows refuses
    assert not stats.verdict_with(records[4].rows, {"no_mode_collapse": 1.0})
    assert not stats.verdict_with(None, {})
    assert stats.verdict_with(records[2].rows, {"generation_quality": 0.3})


def _collapse_row(checklist, top_share: float, repetition: float) -> GateRow:
    """A no_mode_collapse row as the gate reports it (registry/gate.py), then as the calibration keeps it."""
    crit, rule = checklist.criterion("no_mode_collapse"), checklist.collapse_rule()
    st = {"n": 100, "top_prediction": "the", "top_prediction_count": round(100 * top_share),
          "top_prediction_share": top_share, "top_k": rule.top_k, "top_k_share": top_share, "empty_share": 0.0,
          "repetition_rate": repetition}
    why = rule.why(top_share, repetition, "the", top_share, 0.0)
    row = CheckRow(crit.name, why is None, repetition, crit.op, crit.threshold, detail=why or "", kind=crit.kind,
                   collapse=st)
    return GateRow.of(row, stats.other_failures(row, checklist))


def test_threshold_proposal_keeps_every_reason_a_row_failed():
    from latentgate.registry.checklist import load_checklist

    cl = load_checklist()
    both = _collapse_row(cl, top_share=0.6, repetition=0.3)  # one answer for 60% AND 30% repetitive
    assert not both.passed and len(both.failure) == 1 and "one answer" in both.failure[0]
    assert "repetitive" not in both.failure[0]  # the thresholded reason is the observed value, not a failure
    repetitive = _collapse_row(cl, top_share=0.1, repetition=0.3)  # only too repetitive
    assert not repetitive.passed and repetitive.failure == ()
    loose = {"no_mode_collapse": 0.9}
    assert stats.verdict_with([repetitive], loose)  # the threshold was its only reason
    assert not stats.verdict_with([both], loose)  # the top-share limit still fails it
    # the proposal cannot promote the doubly failed row by loosening the repetition limit
    fine = _collapse_row(cl, top_share=0.05, repetition=0.0)
    records = [_record([both], outcome=True), _record([fine], outcome=True)]
    prop = stats.propose_thresholds(records)
    assert prop.changes == {} and prop.fit.after == 0.5


def _loo(quality: float, hero_f1: float | None, finished: bool = True) -> ConfigurationRecord:
    return _record([_row("generation_quality", quality, ">=", 0.01)], finished=finished, smoke_f1=quality,
                   hero_f1=hero_f1)


def test_leave_one_out_heldout_verdicts_at_several_targets():
    # smoke F1 0.05, 0.1, 0.4, 0.6 -> hero F1 0.02, 0.05, 0.3, 0.5; the checklist's 0.01 promotes all four
    records = [_loo(0.05, 0.02), _loo(0.1, 0.05), _loo(0.4, 0.3), _loo(0.6, 0.5)]
    assert stats.hero_targets(0.1) == [0.1, 0.2, 0.4]
    # target 0.1: each left-out record is judged by a threshold fitted on the other three (0.25, 0.225, 0.35,
    # 0.25): the two low ones are refused, the two high ones promoted, all four right
    h = stats.heldout_report(records, 0.1)
    assert h.verdicts == (False, False, True, True) and h.outcomes == (False, False, True, True)
    assert h.confusion == Confusion(tp=2, fp=0, fn=0, tn=2)
    assert h.agreement == 1.0 and h.precision_promote == 1.0 and h.failures_refused == 1.0
    assert h.agreement_wilson == pytest.approx((0.510, 1.0), abs=1e-3)  # Wilson 95% of 4 of 4
    # target 0.4: only the last hero succeeds; left out, 0.4 is promoted by the 0.35 fitted on the others: wrong
    h = stats.heldout_report(records, 0.4)
    assert h.verdicts == (False, False, True, True) and h.outcomes == (False, False, False, True)
    assert h.confusion == Confusion(tp=1, fp=1, fn=0, tn=2)
    assert (h.agreement, h.precision_promote, h.failures_refused) == (0.75, 0.5, pytest.approx(2 / 3))
    assert (h.n_promote, h.n_failures) == (2, 3)
    # a hero that did not finish is a failure whatever F1 it recorded
    assert not stats.outcome_at(0.5, False, 0.1) and stats.outcome_at(0.5, True, 0.5)
    summary = stats.summarize([replace(r, verdict=True, outcome=stats.outcome_at(r.hero_f1, r.hero_finished, 0.1),
                                       flops=ByRole(1.0, 10.0), gate=_chain("g", 1.0), hero=_chain("h", 5.0))
                               for r in records], 0.1)
    assert [x.target for x in summary.heldout] == [0.1, 0.2, 0.4]
    assert summary.confusion == Confusion(tp=2, fp=2, fn=0, tn=0)  # in sample, at the checklist's 0.01
    assert (summary.flops.ratio, summary.wall_seconds.ratio) == (0.1, 0.2)  # 4 x 1 of 4 x 10, 4 x 1 of 4 x 5


def _shaped(quality: float, collapse: float, hero_f1: float) -> ConfigurationRecord:
    """A record with a deciding F1 row and a collapse row that is shown only (decides false)."""
    rows = [_row("generation_quality", quality, ">=", 0.01),
            replace(_row("no_mode_collapse", collapse, "<", 0.1), decides=False)]
    return _record(rows, smoke_f1=quality, hero_f1=hero_f1)


def test_rows_that_do_not_decide_are_neither_judged_nor_tuned():
    # good recipes whose collapse share is high at the gate (0.3): shown only, they must not refuse them
    records = [_shaped(0.02, 0.0, 0.02), _shaped(0.05, 0.3, 0.04), _shaped(0.3, 0.3, 0.5), _shaped(0.5, 0.3, 0.9)]
    assert stats.verdict_with(records[3].rows, {})  # the failing collapse row is shown, not deciding
    assert not stats.verdict_with([replace(r, decides=True) for r in records[3].rows], {})
    assert stats.tunable(records) == ["generation_quality"]
    h = stats.heldout_report(records, 0.1)
    assert h.verdicts == (False, False, True, True) and h.agreement == 1.0


def test_held_out_verdicts_do_not_lean_on_thresholds_fitted_with_the_left_out_record():
    # 0.019 was fitted on all four and separates them. Left out, 0.0198 is judged by the middle of (0.0176, 0.13),
    # 0.074, and refused; 0.0176 by the middle of (0.005, 0.0198), 0.0124, and promoted: both wrong, whatever
    # threshold the file holds (a tie broken towards 0.019 would have made both right)
    def rec(q, hero, threshold):
        return _record([_row("generation_quality", q, ">=", threshold)], smoke_f1=q, hero_f1=hero)

    for threshold in (0.019, 0.10):
        records = [rec(0.005, 0.02, threshold), rec(0.0176, 0.1, threshold), rec(0.0198, 0.44, threshold),
                   rec(0.13, 0.9, threshold)]
        h = stats.heldout_report(records, 0.2)
        assert h.verdicts == (False, True, False, True), threshold
        assert h.confusion == Confusion(tp=1, fp=1, fn=1, tn=1)


def test_gate_shapes_side_by_side_on_the_same_records():
    records = [_shaped(0.02, 0.0, 0.02), _shaped(0.05, 0.3, 0.04), _shaped(0.3, 0.3, 0.5), _shaped(0.5, 0.3, 0.9)]
    shapes = {x.shape: x for x in stats.compare_shapes(records, [0.1, 0.6])}
    # as written: the file's 0.01 promotes all four; two heroes fail at 0.1
    written = shapes["the checklist as written"].reports[0]
    assert written.verdicts == (True,) * 4 and written.confusion == Confusion(tp=2, fp=2, fn=0, tn=0)
    # the collapse criterion alone, refitted: it cannot split 0.3 from 0.3, so one failure is always promoted
    alone = shapes["no_mode_collapse alone"].reports[0]
    assert alone.agreement < 1.0 and shapes["no_mode_collapse alone"].deciding == ("no_mode_collapse",)
    # generation_quality alone (also the deciding set): held out, all four right at 0.1; at 0.6 only the last
    # succeeds and, left out, it is judged by a threshold fitted on three records with no success: refused
    f1 = shapes["generation_quality alone"].reports
    assert f1[0].agreement == 1.0 and f1[1].outcomes == (False, False, False, True)
    assert shapes["the plan's six"].deciding == ("generation_quality", "no_mode_collapse")
    assert [r.target for r in f1] == [0.1, 0.6]
    from latentgate.calibrate.report import format_shapes

    text = "\n".join(format_shapes(list(shapes.values())))
    assert "generation_quality alone" in text and "100% [51%,100%]" in text


def _full_record(name: str, smoke_f1: float | None, hero_f1: float | None, verdict: bool, split="fit"):
    """A record as the runner makes it, with every field filled (a non-finite observed value among its rows)."""
    rows = (_row("generation_quality", smoke_f1 if smoke_f1 is not None else 0.0, ">=", 0.01),
            GateRow("gradient_health", False, math.inf, "<", 500.0, kind="metric_max", failure=("non-finite",)),
            GateRow("eval_size", False, None, ">=", 64, kind="eval_size", missing=("eval/n",), decides=False))
    chain = ChainRecord("r" * 32, "FINISHED", reused=True, reuse_key=KEY, commit="d" * 40, error="",
                        children={"base": "b" * 32, "stage_a": "a" * 32, "eval": "e" * 32}, latent_f1=smoke_f1,
                        steps={"stage_a": StageSteps(3, 6), "stage_b": StageSteps(4, 8)}, wall_seconds=12.5,
                        wall_seconds_with_base=20.0, phase_seconds={"base": 7.5, "stage_a": 10.0, "between": 2.5})
    hero = replace(chain, run_id="h" * 32, status="FAILED" if hero_f1 is None else "FINISHED", latent_f1=hero_f1,
                   reused=False, error="TrainingFault: loss nan" if hero_f1 is None else "")
    return ConfigurationRecord(name=name, expect="good", preset="smoke", overrides={"stage_a.lr": 0.03},
                               split=split, verdict=verdict, failing=() if verdict else ("gradient_health",),
                               rows=rows, outcome=hero_f1 is not None and hero_f1 >= 0.1,
                               hero_finished=hero_f1 is not None, family=FAMILY, smoke_f1=smoke_f1, hero_f1=hero_f1,
                               flops=ByRole(1e12, 1e13), micro_step_flops={"stage_a": 1e10, "stage_b": 2e10},
                               config_hash=ByRole("g" * 16, "h" * 16), gate=chain, hero=hero,
                               heldout_verdict=verdict, child_run="k" * 32)


def test_records_round_trip_through_calibration_json(tmp_path):
    """A record written to calibration.json reads back equal, with the fields the statistics, the scatter and the
    summary tag (registry/calibration.py) read; nothing non-finite reaches the JSON."""
    from latentgate.calibrate.plot import scatter
    from latentgate.calibrate.runner import promotion_summary
    from latentgate.calibrate.spec import CalibrationSet
    from latentgate.schema import Calibration

    records = (_full_record("a", 0.05, 0.02, True), _full_record("b", 0.2, 0.3, True),
               _full_record("c", 0.4, None, False), _full_record("d", 0.6, 0.5, True, split="holdout"))
    text = json.dumps([r.to_dict() for r in records], allow_nan=False)  # JSON-safe: inf observed -> null
    saved = json.loads(text)
    back = tuple(ConfigurationRecord.from_dict(d) for d in saved)
    assert back[0].rows[1].observed is None and records[0].rows[1].observed == math.inf  # the one change: inf
    assert back == tuple(replace(r, rows=(r.rows[0], replace(r.rows[1], observed=None), r.rows[2]))
                         for r in records)
    first = saved[0]  # calibration.json's field names, as before the records were typed
    assert (first["name"], first["split"], first["verdict"], first["outcome"], first["agree"]) == \
        ("a", "fit", True, False, False)
    assert (first[Calibration.SMOKE_F1], first[Calibration.HERO_F1]) == (0.05, 0.02)
    assert first["gate"]["steps"]["stage_b"] == {"optimizer": 4, "micro": 8}
    assert first["gate"]["reuse_key"]["digest"] == KEY.digest() and first["gate"]["latent_f1"] == 0.05
    assert first["wall_seconds"] == {"gate": 12.5, "hero": 12.5} and first["child_run"] == "k" * 32
    assert first["rows"][2] == {"name": "eval_size", "kind": "eval_size", "passed": False, "observed": None,
                                "op": ">=", "threshold": 64, "missing": ["eval/n"], "decides": False,
                                "failure": []}
    assert Family.from_dict(first["family"]) == FAMILY
    # the statistics read the same figures from the records read back ...
    original, reread = stats.summarize(records, 0.1), stats.summarize(back, 0.1)
    assert reread.to_dict() == original.to_dict()
    assert reread.fit is not None and reread.fit.line.n == 3 and reread.confusion == Confusion(tp=2, fp=1, tn=1)
    # ... and so does the summary tag `promote` reads, through its own JSON
    cs = CalibrationSet("unit", Path("unit.yaml"), "s" * 64, 10, ())
    tag = promotion_summary(cs, "p" * 32, reread, back, "x" * 64)
    assert CalibrationSummary.from_dict(json.loads(json.dumps(tag.to_dict()))) == tag
    assert tag.families == (FAMILY,) and tag.fit == reread.fit.line and tag.heldout == reread.heldout[0].confusion
    assert scatter(back, reread, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_mlproject_calibrate_entry_passes_allow_other_commit():
    """`mlflow run . -e calibrate -P allow_other_commit=true` reaches the CLI as --allow-other-commit; the default
    leaves it off, and the bare flag of the command line still works."""
    from mlflow.projects._project_spec import load_project

    from latentgate.cli import main

    entry = load_project(str(ROOT)).get_entry_point("calibrate")
    command = main.commands["calibrate"]
    for params, expected in (({}, False), ({"allow_other_commit": "true"}, True),
                             ({"allow_other_commit": "false", "set_file": "micro"}, False)):
        argv = shlex.split(entry.compute_command(params, storage_dir=None))
        assert argv[:2] == ["latentgate", "calibrate"], argv
        got = command.make_context("calibrate", argv[2:]).params
        assert got["allow_other_commit"] is expected, params
        assert got["set_file"] == params.get("set_file", "cpu") and got["overrides"] == ""
    assert command.make_context("calibrate", ["cpu", "--allow-other-commit"]).params["allow_other_commit"] is True


def test_learning_curve_extrapolated_straight_in_log_steps():
    from latentgate.registry.evidence import extrapolate_log_step

    # y = 0.1 + 0.05 ln(step): read at step 300 it is 0.1 + 0.05 ln 300
    points = [(s, 0.1 + 0.05 * math.log(s)) for s in (10, 20, 30)]
    value, slope = extrapolate_log_step(points, 300)
    assert value == pytest.approx(0.1 + 0.05 * math.log(300)) and slope == pytest.approx(0.05)
    flat, zero = extrapolate_log_step([(10, 0.2), (20, 0.2), (30, 0.2)], 300)
    assert flat == pytest.approx(0.2) and zero == pytest.approx(0.0)
    # an NLL read below 0 stays at its floor when no ceiling is given, and the other way round
    from latentgate.registry.evidence import bounded

    assert bounded(-0.44, 0.0, None) == 0.0 and bounded(1.3, None, 1.0) == 1.0 and bounded(0.5, 0.0, 1.0) == 0.5


# ---- what promote prints: the calibration of the candidate's family ------------------------------------------------

def _summary(run_id="c" * 32, families=(FAMILY,), hero_scale=10.0, fit=None, heldout=Confusion(3, 1, 2, 4)):
    return CalibrationSummary(set="cpu", run_id=run_id, hero_f1_target=0.1, n=10, confusion=Confusion(2, 0, 5, 3),
                              fit=fit, heldout=heldout, hero_scale=hero_scale, families=families)


def test_calibration_applies_only_to_its_family():
    s = _summary()
    assert CalibrationSummary.from_dict(s.to_dict()) == s
    assert s.family_mismatch(FAMILY, 10) is None
    why = s.family_mismatch(Family("builtin:aaaa", "data1", (150, 150)), 10)
    assert why == "gate budget 150 + 150 steps differs from the calibrated 30 + 30 steps"
    why = s.family_mismatch(Family("SmolLM2-135M@unpinned", "data2", (30, 30)), 10)
    assert "base LM SmolLM2-135M@unpinned differs from the calibrated builtin:aaaa" in why
    assert "data config data2 differs" in why
    assert s.family_mismatch(FAMILY, 5) == "hero scale x5 differs: its heroes ran at x10"
    mixed = _summary(families=(FAMILY, Family("builtin:bbbb", "data2", (30, 30))))
    assert "together" in mixed.family_mismatch(Family("builtin:aaaa", "data2", (30, 30)), 10)
    old = CalibrationSummary.from_dict({k: v for k, v in s.to_dict().items() if k not in ("families", "hero_scale")})
    assert "records no family" in old.family_mismatch(FAMILY, 10)
    # the newest calibration of the family applies, not the newest of any set
    other = _summary(run_id="n" * 32, families=(Family("builtin:zzzz", "data9", (150, 150)),))
    found, _ = calibration_for([other, s, _summary(run_id="o" * 32)], FAMILY, 10)
    assert found is s
    found, why = calibration_for([other], FAMILY, 10)
    assert found is None and why.startswith(f"newest: run {'n' * 8}, set cpu: base LM builtin:aaaa differs")


def test_predictions_are_clipped_and_never_extrapolated():
    from latentgate.config import resolve

    smoke, smollm, micro = (Family.of(resolve(p)) for p in ("smoke", "smollm2", "micro"))
    assert smoke.base != smollm.base and smoke.data != micro.data and smoke.gate_steps == (150, 150)
    # the line of issue #23: 0.903 predicted 4.901 [1.092, 8.710] from a calibration fitted on smoke F1s <= 0.4
    fit = LineFit(slope=5.0, intercept=0.386, s=0.9, n=5, x_mean=0.2, sxx=0.1, t=3.182, x_min=0.0, x_max=0.4)
    out = assess(_summary(fit=fit), 0.903, True)
    assert out.outside_range and out.predicted_hero_f1 is None and out.interval is None
    text = format_assessment(out)
    assert "0.903 is outside the fitted range [0.000, 0.400], so no predicted hero F1" in text
    inside = assess(_summary(fit=fit), 0.35, True)  # 2.136 [-..., ...] as the line gives it
    assert inside.predicted_hero_f1 == 1.0 and inside.interval == (pytest.approx(0.0), 1.0)
    low = assess(_summary(fit=LineFit(-2.0, 0.1, 0.01, 5, 0.2, 0.1, 3.182, 0.0, 0.4)), 0.3, False)
    assert low.predicted_hero_f1 == 0.0 and low.interval == (0.0, 0.0)
    text = format_assessment(inside)
    assert "predicts hero F1 1.000 [0.000, 1.000]" in text
    assert "a PASS like this led to a successful hero in 3 of 4 held-out cases (leave-one-out)" in text
    refused = format_assessment(low)
    assert "a REFUSE like this was followed by a failed hero in 4 of 6 held-out cases" in refused
    assert "PASS" not in refused
    # a calibration of another checklist says so: its figures describe that rule, not the one in force
    mine = replace(_summary(fit=fit), checklist_sha256="a" * 64)
    assert "another checklist" not in format_assessment(assess(mine, 0.35, True, "a" * 64))
    assert "measured under another checklist (sha256 aaaaaaaaaaaa)" in format_assessment(assess(mine, 0.35, True,
                                                                                                "b" * 64))


# ---- set files ----------------------------------------------------------------------------------------------------


def test_shipped_sets_resolve():
    from latentgate.calibrate.spec import load_set

    cpu = load_set("cpu")
    assert len(cpu.configurations) >= 12
    assert {c.expect for c in cpu.configurations} == {"good", "marginal", "broken"}
    assert {c.preset for c in cpu.configurations} == {"smoke", "hard"}
    assert any(c.holdout for c in cpu.configurations) and not all(c.holdout for c in cpu.configurations)
    for c in cpu.configurations:  # the hero scale changes the budget keys and nothing else
        assert (c.hero.stage_a.steps, c.hero.stage_b.steps) == (10 * c.gate.stage_a.steps, 10 * c.gate.stage_b.steps)
        assert c.hero.stage_b.lr == c.gate.stage_b.lr and c.hero.model == c.gate.model and c.hero.data == c.gate.data
        assert {k for k, a, h in _diff(c.gate, c.hero)} <= set(BUDGET_KEYS)
    micro = load_set("micro", extra={"run.threads": "1"})
    assert micro.name == "micro" and all(c.gate.run.threads == 1 for c in micro.configurations)


def _diff(a, b):
    from latentgate.config import flatten

    fa, fb = flatten(a), flatten(b)
    return [(k, fa[k], fb[k]) for k in fa if fa[k] != fb[k]]


def test_calibrate_builds_the_hero_that_latentgate_hero_builds(tmp_path):
    """The hero of a configuration is the approved recipe's hero: hero_plan(gate config, scale), as `latentgate hero`
    builds it from the approved Stage B run's logged params (phases/entry.py plan_hero: from_flat(params))."""
    from latentgate.calibrate.spec import load_set
    from latentgate.config import flatten, from_flat
    from latentgate.registry.hero_recipe import hero_plan

    path = tmp_path / "today.yaml"  # a set file in today's format, written elsewhere
    path.write_text("name: elsewhere\npreset: micro\nhero_scale: 4\noverrides: {stage_b.lr: 2.0e-3}\n"
                    "configurations:\n  - {name: a, expect: good}\n"
                    "  - {name: b, expect: marginal, overrides: {stage_a.warmup_steps: 2, stage_b.probe_every: 2}, "
                    "holdout: true}\n")
    cs = load_set(str(path))
    assert cs.name == "elsewhere" and cs.hero_scale == 4 and [c.split for c in cs.configurations] == ["fit", "holdout"]
    for c in cs.configurations:
        approved = from_flat({k: str(v) for k, v in flatten(c.gate).items()})  # as MLflow returns logged params
        assert approved == c.gate
        assert c.hero == hero_plan(approved, 4).config
        diff = dict((k, (a, h)) for k, a, h in _diff(c.gate, c.hero))
        # warm-up and probe cadence scale with the steps (not the steps alone)
        assert diff["stage_a.steps"] == (c.gate.stage_a.steps, 4 * c.gate.stage_a.steps)
        assert diff["stage_a.warmup_steps"] == (c.gate.stage_a.warmup_steps, 4 * c.gate.stage_a.warmup_steps)
        assert diff["stage_b.probe_every"] == (c.gate.stage_b.probe_every, 4 * c.gate.stage_b.probe_every)
        assert set(diff) <= set(BUDGET_KEYS) and c.hero.stage_b.lr == 2.0e-3


def test_reuse_key_covers_commit_data_and_base_weights():
    import dataclasses

    from latentgate.calibrate.reuse import base_weights, reuse_key
    from latentgate.config import resolve
    from latentgate.tracking.lineage import base_hash

    cfg = resolve("micro")
    key = reuse_key("gate", cfg)
    assert key == reuse_key("gate", resolve("micro")) and len(key.digest()) == 16
    assert key.git_commit and key.input_uri == "" and key.base_weights == f"builtin:{base_hash(cfg)}"
    other_data = reuse_key("gate", resolve("micro", {"data.seed": 7}))
    assert other_data.eval_digest != key.eval_digest and other_data.train_digest != key.train_digest
    other_base = resolve("micro", {"base.steps": 31})
    assert base_weights(other_base) != key.base_weights and reuse_key("gate", other_base).digest() != key.digest()
    for change in ({"git_commit": "0" * 40}, {"eval_digest": "f" * 16}, {"base_weights": "builtin:other"},
                   {"entry_point": "hero"}, {"input_uri": "runs:/x/checkpoint"}):
        assert dataclasses.replace(key, **change).digest() != key.digest()
    assert base_weights(resolve("micro", {"base.name": "org/some-lm", "base.revision": "abc123"})) == \
        "org/some-lm@abc123"


@pytest.mark.parametrize("body, match", [
    ("configurations: []\n", "no configurations"),
    ("colour: red\nconfigurations: [{name: a}]\n", "unknown key 'colour'"),
    ("configurations: [{name: a}, {name: a}]\n", "used twice"),
    ("configurations: [{name: a, expect: fine}]\n", "expect='fine'"),
    ("configurations: [{name: a, overrides: {stage_b.lrr: 1}}]\n", "configuration a: unknown config key"),
    ("hero_scale: 0\nconfigurations: [{name: a}]\n", "hero_scale=0"),
])
def test_bad_set_files_fail_in_one_line(tmp_path, body, match):
    from latentgate.calibrate.spec import load_set

    path = tmp_path / "bad.yaml"
    path.write_text("preset: micro\n" + body)
    with pytest.raises(ConfigError, match=match):
        load_set(str(path))


def test_cli_refuses_an_unknown_set():
    from conftest import run_cli

    proc = run_cli("calibrate", "nosuchset", timeout=60)
    assert proc.returncode == 2
    assert "unknown calibration set 'nosuchset'" in proc.stderr and "fix:" in proc.stderr


# ---- a micro calibration, end to end ------------------------------------------------------------------------------


# Micro runs learn nothing: every threshold is opened except the gradient norm's, which the high learning rate
# exceeds; the eval set is unpinned (micro data have no pin) and small. The hero target 0 counts a finished hero as
# a success, so `diverges` (non-finite loss at both scales) is the failure that splits the set. Expected:
EXPECTED = {"micro": ("promote", "success"), "lr-high": ("refuse", "success"), "diverges": ("refuse", "failure")}
OPEN = {"first_token_learning": -1.0, "first_token_stability": 1e9, "f1_breakthrough": -1.0,
        "generation_quality": 0.0, "gradient_health": 10.0, "no_mode_collapse": 1.1, "beats_controls": -1.0,
        "eval_size": 0}


@pytest.fixture()
def open_checklist(tmp_path):
    """registry/hero.yaml with the thresholds of OPEN and the micro set's hero scale (5), so that micro runs get
    verdicts that are not all alike and the calibration is of the micro candidates' family."""
    import yaml

    from latentgate.registry.checklist import DEFAULT_PATH

    data = every_criterion_decides(yaml.safe_load(DEFAULT_PATH.read_text()))
    for crit in data["criteria"]:
        if crit["name"] in OPEN:
            crit["threshold"] = OPEN[crit["name"]]
        if crit["kind"] == "eval_collapse":
            crit["params"].update(max_top_prediction_share=1.0, max_top_k_share=1.0, max_empty_share=1.0)
    data["eval_dataset_digest"] = "any"
    data["calibration"] = {"hero_f1_target": 0.0}
    data["hero"] = {"scale": 5}
    path = tmp_path / "checklist.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _runs(client, flt: str):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=flt, max_results=1000)


def _count(pairs) -> dict:
    """The confusion matrix, counted here (not with the function under test)."""
    return {"tp": sum(v and o for v, o in pairs), "fp": sum(v and not o for v, o in pairs),
            "fn": sum(not v and o for v, o in pairs), "tn": sum(not v and not o for v, o in pairs)}


def _hero_f1(c, hero_run: str) -> float | None:
    """A hero chain's latent F1, read from its eval child run; None when the chain did not finish."""
    if c.get_run(hero_run).info.status != "FINISHED":
        return None
    ev = _runs(c, f"tags.`mlflow.parentRunId` = '{hero_run}' and tags.`latentgate.phase` = 'eval'")
    return ev[0].data.metrics["eval/latent/f1"]


def test_micro_calibration_matrix_artifacts_and_reuse(mlflow_store, tmp_path, open_checklist):
    import dataclasses

    from mlflow import MlflowClient

    from latentgate.calibrate.report import format_summary
    from latentgate.calibrate.reuse import reuse_key
    from latentgate.calibrate.runner import find_chain, run_calibration
    from latentgate.calibrate.spec import load_set
    from latentgate.config import from_flat
    from latentgate.registry.calibration import calibration_note
    from latentgate.registry.hero_recipe import hero_plan
    from latentgate.schema import CalibrateTag
    from latentgate.tracking.runs import local_artifacts

    cs = load_set("micro", extra={"run.output_dir": str(tmp_path / "runs")})
    lines: list[str] = []
    result = run_calibration(cs, open_checklist, echo=lines.append)
    c = MlflowClient()
    parent = c.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["latentgate.phase"] == "calibrate"
    assert parent.info.run_name == "calibrate micro"

    # one child per configuration; its verdict and outcome tags are the expected ones, and the outcome is what the
    # hero chain it names recorded (finished, latent F1 >= 0)
    kids = {k.data.tags["latentgate.calibrate.configuration"]: k
            for k in _runs(c, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert sorted(kids) == sorted(EXPECTED)
    names = [conf.name for conf in cs.configurations]
    hero_f1 = {}
    for name, kid in kids.items():
        tags = kid.data.tags
        assert (tags["latentgate.calibrate.verdict"], tags["latentgate.calibrate.outcome"]) == EXPECTED[name]
        gate_run, hero_run = tags["latentgate.calibrate.gate_run"], tags["latentgate.calibrate.hero_run"]
        hero_f1[name] = _hero_f1(c, hero_run)
        assert (hero_f1[name] is not None and hero_f1[name] >= 0.0) == (EXPECTED[name][1] == "success")
        if name == "diverges":
            assert c.get_run(gate_run).info.status == c.get_run(hero_run).info.status == "FAILED"
            continue
        # the hero chain ran the hero `latentgate hero` builds from the gate's Stage B run (phases/entry.py plan_hero)
        gate_b = _runs(c, f"tags.`mlflow.parentRunId` = '{gate_run}' and tags.`latentgate.phase` = 'stage_b'")[0]
        hero_b = _runs(c, f"tags.`mlflow.parentRunId` = '{hero_run}' and tags.`latentgate.phase` = 'stage_b'")[0]
        assert from_flat(hero_b.data.params) == hero_plan(from_flat(gate_b.data.params), 5).config
    pairs = [(EXPECTED[n][0] == "promote", EXPECTED[n][1] == "success") for n in names]
    expected = _count(pairs)
    assert expected == {"tp": 1, "fp": 0, "fn": 1, "tn": 1}
    assert result.stats.confusion == Confusion(**expected)
    assert {k: int(parent.data.metrics[f"confusion_{k}"]) for k in expected} == expected
    assert result.stats.rates.agreement == pytest.approx(2 / 3)

    # held out (leave one out): with one configuration left out, the other two leave every threshold as it is
    # (lr-high's gradient norm cannot be passed by a value it observed; micro and diverges already agree), so each
    # held-out verdict is the recorded one; at the higher targets the outcomes are the recorded hero F1s'
    held = result.stats.heldout
    assert [h.target for h in held] == [0.0, 0.1, 0.3]
    assert list(held[0].verdicts) == [EXPECTED[n][0] == "promote" for n in names]
    assert held[0].confusion == Confusion(**expected) and held[0].agreement_wilson[0] > 0
    assert {k: int(parent.data.metrics[f"heldout_confusion_{k}"]) for k in expected} == expected
    for h in held:
        assert list(h.outcomes) == [hero_f1[n] is not None and hero_f1[n] >= h.target for n in names]
        assert _count(list(zip(h.verdicts, h.outcomes))) == h.confusion.to_dict()
        assert h.verdicts[names.index("diverges")] is False  # no gate evidence: refused whatever the thresholds
    assert tuple(r.heldout_verdict for r in result.configurations) == held[0].verdicts
    text = format_summary(result)
    assert "held-out verdicts (leave-one-out" in text and "hero F1 >= 0: agreement 67% (2 of 3, 95% Wilson" in text
    assert any(line.startswith("micro") and "PROMOTE  PROMOTE" in line for line in text.splitlines())
    for r in result.configurations:  # compute is counted from the optimizer steps the stage runs recorded
        if r.hero.finished:
            assert r.hero.steps["stage_b"].optimizer == 5 * r.gate.steps["stage_b"].optimizer > 0
    assert 0 < result.stats.flops.ratio < 0.3 and result.stats.wall_seconds.ratio > 0  # hero: 5x the gate's steps
    # where the time went, per phase: the chains' own runs, summed (the hero's Stage B ran 5x the gate's steps)
    by_phase = result.stats.phase_seconds
    assert {"base", "stage_a", "stage_b", "eval", "between"} <= set(by_phase["gate"])
    assert by_phase["hero"]["stage_b"] > by_phase["gate"]["stage_b"] > 0

    # artifacts: the JSON of it all and the scatter
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"calibration.json", "calibration.png"} <= arts
    folder = local_artifacts(f"runs:/{parent.info.run_id}")
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["confusion"] == expected and len(saved["configurations"]) == 3
    assert {"agreement", "precision_promote", "precision_refuse", "cost", "fit", "proposal", "heldout"} <= set(saved)
    assert saved == json.loads(json.dumps(result.to_dict()))
    # the records read back from it are the ones the run made; each configuration run's configuration.json too
    assert tuple(ConfigurationRecord.from_dict(d) for d in saved["configurations"]) == result.configurations
    for rec in result.configurations:
        own = json.loads((local_artifacts(f"runs:/{rec.child_run}") / "configuration.json").read_text())
        assert ConfigurationRecord.from_dict(own) == replace(rec, child_run="")
    assert (folder / "calibration.png").read_bytes()[:4] == b"\x89PNG"

    # reuse keys on the commit, data and base weights besides the config: another commit finds no chain
    gate_conf = cs.configurations[0]
    key = reuse_key("gate", gate_conf.gate)
    assert find_chain(key, gate_conf.gate) == result.configurations[0].gate.run_id
    assert c.get_run(find_chain(key, gate_conf.gate)).data.tags[CalibrateTag.REUSE_KEY] == key.digest()
    for change in ({"git_commit": "0" * 40}, {"eval_digest": "0" * 16}, {"base_weights": "builtin:0"}):
        assert find_chain(dataclasses.replace(key, **change), gate_conf.gate) is None
    # ... unless the user vouches for another commit (--allow-other-commit): then only the commit may differ
    other = dataclasses.replace(key, git_commit="0" * 40)
    assert find_chain(other, gate_conf.gate, allow_other_commit=True) == find_chain(key, gate_conf.gate)
    assert find_chain(dataclasses.replace(other, eval_digest="0" * 16), gate_conf.gate, allow_other_commit=True) is None

    # the gate shapes, side by side on the same runs: the checklist as written is the recorded verdicts
    shapes = {x.shape: x for x in result.stats.shapes}
    written = shapes["the checklist as written"].reports[0]
    assert written.verdicts == tuple(r.verdict for r in result.configurations)
    assert "gate shapes on the same runs" in text and "gradient_health alone" in shapes

    # the repeated command trains nothing: every chain is reused (the failed ones too), the matrix is the same
    chains = {r.info.run_id for r in _runs(c, f"tags.`{CalibrateTag.ROLE}` != ''")}
    stages = len(_runs(c, "tags.`latentgate.phase` = 'stage_a'"))
    again = run_calibration(cs, open_checklist, echo=lines.append)
    assert again.run_id != result.run_id and again.stats.confusion == Confusion(**expected)
    assert all(r.gate.reused and r.hero.reused for r in again.configurations)
    assert [(r.gate.run_id, r.hero.run_id) for r in again.configurations] == \
        [(r.gate.run_id, r.hero.run_id) for r in result.configurations]
    assert {r.info.run_id for r in _runs(c, f"tags.`{CalibrateTag.ROLE}` != ''")} == chains
    assert len(_runs(c, "tags.`latentgate.phase` = 'stage_a'")) == stages

    # what promote / analyze print about a candidate of the family: the latest calibration of it
    first = result.configurations[0]
    eval_run = first.gate.children["eval"]
    note = calibration_note(eval_run, first.verdict, checklist=open_checklist)
    assert note.startswith(f"calibration (run {again.run_id[:8]}, set micro, 3 configurations")
    assert "a PASS like this led to a successful hero in 1 of 1 held-out cases (leave-one-out)" in note
    assert "no fitted line" in note  # two smoke F1s: no line, so no prediction
    from conftest import run_cli

    proc = run_cli("promote", eval_run, "--dry-run", "true", "--checklist", str(open_checklist), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a PASS like this led to a successful hero in 1 of 1 held-out cases (leave-one-out)" in proc.stdout
    # under the shipped checklist (hero scale 10) the micro calibration (x5) is of another family
    other = calibration_note(eval_run, first.verdict)
    assert other.startswith("calibration: no calibration of this family (") and "hero scale x10 differs" in other
    # a promotion (not a dry run) records it on the model version
    name = f"lg-calibrate-{os.getpid()}"
    c.create_registered_model(name)
    mv = c.create_model_version(name, source=f"runs:/{eval_run}/checkpoint", run_id=eval_run)
    assert calibration_note(eval_run, first.verdict, version=mv.version, name=name,
                            checklist=open_checklist) == note
    recorded = json.loads(c.get_model_version(name, mv.version).tags["hero.calibration"])
    assert recorded["calibration_run"] == again.run_id and recorded["smoke_f1"] == first.smoke_f1
    assert recorded["heldout_promote_success"] == [1, 1]
