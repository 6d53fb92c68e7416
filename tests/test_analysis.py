"""Analysis and monitoring, on real runs in the session's SQLite MLflow store: the report's figures against the
metric histories they come from, the recommendation's three branches, valid PNG plots, and the live monitor
following a run while a thread appends to it (the F1 > 0 alert exactly once, never on the text baseline)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import every_criterion_decides, micro_scale_checklist, recorded_candidate
from latentgate.schema import Probe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _invoke(*args: str):
    from click.testing import CliRunner

    from latentgate.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ------------------------------------------------------------------------------------------------------------
# The report, on a real micro smoke
# ------------------------------------------------------------------------------------------------------------


def test_report_figures_equal_values_recomputed_from_metric_history(micro_smoke, micro_cfg, tmp_path):
    import numpy as np
    from mlflow import MlflowClient

    from latentgate.analysis.report import analyze
    from latentgate.train.workspace import load_splits

    # the shipped rules at micro scale: the shipped file refuses the micro smoke's 24 unpinned eval questions
    # (test_the_shipped_checklist_refuses_the_micro_smoke_on_provenance), this copy judges what it learned
    checklist = micro_scale_checklist(tmp_path, micro_cfg, load_splits(micro_cfg)["eval"])
    rep, files = analyze(micro_smoke.run_id, tmp_path / "out", log=True, last_n=2, checklist_path=checklist)
    client = MlflowClient()
    kids = micro_smoke.children

    for stage in ("stage_a", "stage_b"):
        probes = _history(client, kids[stage], f"{stage}/probe_first_acc")
        assert len(probes) >= 2
        values = [v for _, v in probes]
        peak = max(values)
        peak_step = next(s for s, v in probes if v == peak)
        fig = next(s for s in rep["stages"] if s["run_id"] == kids[stage])
        assert fig["probes"] == len(probes)
        assert fig["peak_first_acc"] == peak and fig["peak_step"] == peak_step
        assert fig["final_first_acc"] == values[-1] and fig["final_step"] == probes[-1][0]
        expected_regression = (peak - values[-1]) / peak * 100 if peak > 0 else 0.0
        assert fig["regression_pct"] == pytest.approx(expected_regression)
        assert fig["last_n"]["mean"] == pytest.approx(np.mean(values[-2:]))
        assert fig["last_n"]["std"] == pytest.approx(np.std(values[-2:]))
        lo = dict(_history(client, kids[stage], f"{stage}/probe_first_acc_lo"))
        assert fig["peak_interval"][0] == lo[peak_step]
        top5 = dict(_history(client, kids[stage], f"{stage}/probe_first_acc_top5"))
        assert fig["top5_final"] == top5[probes[-1][0]]
        grads = [v for _, v in _history(client, kids[stage], f"{stage}/grad_norm")]
        g = rep["gradients"]["stages"][stage]["groups"]["total"]
        assert g["max"] == max(grads) and g["n"] == len(grads)
        assert g["p90"] == pytest.approx(np.percentile(grads, 90))
        assert g["p50"] == pytest.approx(np.percentile(grads, 50))
    all_grads = [v for st in ("stage_a", "stage_b") for _, v in _history(client, kids[st], f"{st}/grad_norm")]
    assert rep["gradients"]["max_grad_norm"] == max(all_grads)
    assert rep["evaluated_stage"]["run_id"] == kids["stage_b"]  # the eval scored Stage B's checkpoint

    # Eval figures: the metrics of the eval run, and the per-example rows of its eval_detailed.jsonl artifact.
    ev_run = client.get_run(kids["eval"])
    for path in ("latent", "text", "token_budget", "zero_latent", "shuffled_latent"):
        assert rep["eval"]["paths"][path]["f1"] == ev_run.data.metrics[f"eval/{path}/f1"]
    detailed = Path(client.download_artifacts(kids["eval"], "eval_detailed.jsonl", str(tmp_path)))
    latent_rows = [json.loads(x) for x in detailed.read_text().splitlines() if json.loads(x)["path"] == "latent"]
    col = rep["eval"]["collapse"]
    assert col["n"] == len(latent_rows)
    assert col["repetition_count"] == sum(r["error_mode"] == "repetition" for r in latent_rows)
    assert col["empty_count"] == sum(r["error_mode"] == "empty" for r in latent_rows)
    assert col["top_prediction_share"] == pytest.approx(ev_run.data.metrics["eval/latent/top_prediction_share"])
    nonzero = [i for i, r in enumerate(latent_rows) if r["f1"] > 0]
    assert rep["eval"]["breakthrough"]["first_f1_nonzero_idx"] == (nonzero[0] if nonzero else None)
    metrics_json = json.loads(Path(client.download_artifacts(kids["eval"], "metrics.json", str(tmp_path))).read_text())
    assert rep["eval"]["f1_distribution"] == metrics_json["paths"]["latent"]["f1_distribution"]

    # The readiness table has the plan's six criteria; a recommendation is made from the same figures.
    names = [r["name"] for r in rep["readiness"]["rows"]]
    assert {"first_token_learning", "first_token_stability", "f1_breakthrough", "generation_quality",
            "gradient_health", "no_mode_collapse"} <= set(names)
    # The micro smoke's latent path gives every input the same answer: Phase 2 (tuning), for collapse, never Phase 3.
    assert rep["recommendation"]["verdict"] == "phase2"
    assert "collapse" in rep["recommendation"]["reason"]
    if rep["readiness"]["source"] == "latentgate.registry.gate":  # two implementations, one set of figures
        gate = {r["name"]: r["observed"] for r in rep["readiness"]["rows"]}
        sb_fig = next(s for s in rep["stages"] if s["run_id"] == kids["stage_b"])
        # the lift (not the raw accuracy) at the final step (the registered checkpoint, not the peak)
        assert gate["first_token_learning"] == pytest.approx(sb_fig["final_first_acc_lift"])
        assert gate["gradient_health"] == pytest.approx(rep["gradients"]["max_grad_norm"])
    assert rep["recommendation"]["peak_first_acc"] == next(
        s["peak_first_acc"] for s in rep["stages"] if s["run_id"] == kids["stage_b"])

    # report.md, report.json and the plots were logged to the run; report.json is the report.
    logged = {a.path for a in client.list_artifacts(micro_smoke.run_id, "analysis")}
    assert {"analysis/report.md", "analysis/report.json", "analysis/plots"} <= logged
    plots = {Path(a.path).name for a in client.list_artifacts(micro_smoke.run_id, "analysis/plots")}
    assert {"first_acc.png", "losses.png", "grad_norm.png", "f1_histogram.png", "error_modes.png"} <= plots
    got = json.loads(Path(client.download_artifacts(micro_smoke.run_id, "analysis/report.json",
                                                    str(tmp_path / "dl"))).read_text())
    assert got["stages"][-1]["peak_first_acc"] == rep["stages"][-1]["peak_first_acc"]
    for f in files:
        if f.suffix == ".png":
            _assert_png(f)


def test_the_shipped_checklist_refuses_the_micro_smoke_on_provenance(micro_smoke):
    """24 questions of an eval set the shipped hero.yaml does not pin: the report stops before judging learning and
    says what to pin or re-run, never to tune (no sweep changes where the evidence comes from)."""
    from latentgate.analysis.history import load_run_bundle
    from latentgate.analysis.report import build_report

    rep = build_report(load_run_bundle(micro_smoke.run_id))
    assert rep["readiness"]["source"] == "latentgate.registry.gate"
    rows = {r["name"]: r for r in rep["readiness"]["rows"]}
    assert not rows["eval_size"]["passed"] and rows["eval_size"]["observed"] == 24
    assert not rows["eval_dataset_digest"]["passed"] and rows["lineage"]["passed"]
    rec = rep["recommendation"]
    assert rec["rule"] == "provenance", rec
    assert "eval_size" in rec["reason"] and "eval_dataset_digest" in rec["reason"]
    assert "pin the eval set" in rec["next_step"], rec["next_step"]
    assert "sweep" not in rec["next_step"] and "tune" not in rec["next_step"], rec["next_step"]


def test_analyze_accepts_a_stage_run_an_eval_run_and_the_cli(micro_smoke, tmp_path):
    from latentgate.analysis.history import load_run_bundle

    stage = load_run_bundle(micro_smoke.children["stage_b"])
    assert [s.stage for s in stage.stages] == ["stage_b"] and not stage.evals
    ev = load_run_bundle(micro_smoke.children["eval"])  # the stage it scored comes along (checkpoint tag)
    assert [s.run_id for s in ev.stages] == [micro_smoke.children["stage_b"]]
    assert len(ev.evals) == 1 and ev.evals[0].rows

    result = _invoke("analyze", micro_smoke.run_id, "--no-log", "--no-plots", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "First-token learning" in result.output and "Recommendation:" in result.output
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Readiness checklist" in md and "## Recommendation" in md
    bad = _invoke("analyze", "0" * 32, "--no-log")
    assert bad.exit_code == 2 and "not found" in bad.output

    # The plan's script name, over a local diagnostics.jsonl (structured records, not a log).
    import runpy
    import sys

    diag = Path(micro_smoke.output_dir) / "stage_b" / "diagnostics.jsonl"
    argv = sys.argv
    sys.argv = ["analyze_breakthrough.py", str(diag), "--json", "--no-plots"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "analysis" / "analyze_breakthrough.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, None)


# ------------------------------------------------------------------------------------------------------------
# Recommendation: synthetic histories, one per branch, and one the gate passes at latent F1 0
# ------------------------------------------------------------------------------------------------------------


CONST = 0.01  # the synthetic probes' constant-guess control (the shuffled-latent one is 0)


HISTORIES = {  # name: (verdict, probe history of stage B (raw; lift = raw - 1%), per-example latent F1 over the
    # smoke's 200 eval questions: every wrong answer different, so 4 of them are not "4 answers for half the inputs")
    "hero-ready": ("hero-ready", {10: 0.05, 20: 0.15, 30: 0.14}, [0.0, 1.0, 0.0, 0.0] * 50),
    # latent F1 0 everywhere, but the lift's curve read at the hero's budget passes the gate: the gate decides
    "hero-ready at latent F1 0": ("hero-ready", {10: 0.05, 20: 0.14, 30: 0.13}, [0.0, 0.0, 0.0, 0.0] * 50),
    # the final lift passes first_token_learning, but it falls from probe to probe: the gate refuses the curve
    "phase3": ("phase3", {10: 0.17, 20: 0.15, 30: 0.13}, [0.0, 0.0, 0.0, 0.0] * 50),
    # a lift short of first_token_learning, and flat: the gate refuses the curve
    "phase2": ("phase2", {10: 0.06, 20: 0.08, 30: 0.06}, [0.0, 0.0, 0.0, 0.0] * 50),
}


def test_recommendation_branches_on_synthetic_histories(mlflow_store, tmp_path):
    import yaml

    from latentgate.analysis.history import load_run_bundle
    from latentgate.analysis.report import build_report, recommend
    from latentgate.registry.checklist import load_checklist
    from latentgate.registry.decisions import PhaseEvidence

    bundles = {}
    for name, (verdict, probes, f1s) in HISTORIES.items():
        # a whole recorded lineage on the pinned eval set: the registry gate judges it, and the report shows that
        runs = recorded_candidate(tmp_path / name, probes, f1s, const=CONST)
        bundles[name] = load_run_bundle(runs["parent"])
        rep = build_report(bundles[name])
        assert rep["readiness"]["source"] == "latentgate.registry.gate"
        assert rep["recommendation"]["verdict"] == verdict, (name, rep["recommendation"])
        # the readiness is the gate's (its deciding rows), and the gate alone sends a run to the hero: hero-ready
        # exactly where it passes, latent F1 0 included
        rows = rep["readiness"]["rows"]
        assert rep["readiness"]["passed"] is all(r["passed"] for r in rows if r["decides"])
        assert rep["readiness"]["passed"] is (verdict == "hero-ready"), name
        assert rep["recommendation"]["threshold"] == rep["readiness"]["thresholds"]["first_token_learning"]
    hero = build_report(bundles["hero-ready"])
    learning = next(r for r in hero["readiness"]["rows"] if r["name"] == "first_token_learning")
    assert learning["observed"] == pytest.approx(0.13)  # the final lift, not the peak's 0.14; its detail says so
    assert learning["detail"].startswith("at the final step 30: probe_first_acc 0.14, probe_first_acc_const 0.01")
    assert hero["recommendation"]["first_acc_lift"] == learning["observed"]  # the gate's figure, never a second one
    stage_b = next(s for s in hero["stages"] if s["stage"] == "stage_b")
    # the report's stage figures: the peak lift and the controls at its step (registry.series, as the gate's peaks)
    assert (stage_b["peak_first_acc_lift"], stage_b["peak_lift_step"]) == (pytest.approx(0.14), 20)
    assert (stage_b[Probe.CONST], stage_b["peak_first_acc"], stage_b["regression_pct"]) == \
        (CONST, 0.15, pytest.approx(100 / 15))
    # the collapse statistics are the gate's evidence (its no_mode_collapse row), at the checklist's top_k
    collapse = hero["eval"]["collapse"]
    assert (collapse["n"], collapse["top_prediction"], collapse["top_prediction_share"]) == (200, "paris", 0.25)
    assert collapse["top_k"] == load_checklist().collapse_rule().top_k
    assert hero["eval"]["breakthrough"]["first_f1_nonzero_idx"] == 1

    # The pure function (the pipeline's decision tree), at the edges: the final LIFT over the controls decides.
    cl = load_checklist()

    def evidence(lift, f1, passed, raw=None, const=0.05, share=0.1) -> PhaseEvidence:
        return PhaseEvidence(phase="extend", f1_max=f1, first_acc=raw or const + lift, checklist_passed=passed,
                             first_acc_lift=lift, first_acc_const=const, first_acc_shuffled=0.0,
                             top_prediction_share=share, repetition_rate=0.0)

    assert recommend(evidence(0.30, 0.05, True), cl)[0] == "hero-ready"
    assert recommend(evidence(0.30, 0.05, False), cl)[0] == "phase2"   # F1 > 0 but the checklist fails: tune
    bar = cl.threshold("first_token_learning")
    assert recommend(evidence(bar, 0.0, False), cl)[0] == "phase3"    # exactly at the threshold
    assert recommend(evidence(bar - 1e-4, 0.0, False), cl)[0] == "phase2"
    # raw 17.2%, all of it the constant guess, one answer for everyone: collapse, tune (never exposure bias)
    verdict, decision = recommend(evidence(0.0, 0.0, False, raw=0.172, const=0.172, share=1.0), cl)
    assert (verdict, decision.rule) == ("phase2", "collapsed")

    # The threshold comes from the checklist file, and is judged at the final step (the registered checkpoint):
    # the Phase 2 history's lift peaks at 7% and ends at 5%. At 6% it stays Phase 2 (the peak would pass); lowered
    # to 4% it becomes Phase 3.
    pytest.importorskip("latentgate.registry.checklist")
    from latentgate.registry.checklist import DEFAULT_PATH

    for threshold, verdict in ((0.06, "phase2"), (0.04, "phase3")):
        data = every_criterion_decides(yaml.safe_load(DEFAULT_PATH.read_text()))
        for c in data["criteria"]:
            if c["name"] == "first_token_learning":
                c["threshold"] = threshold
        custom = tmp_path / f"checklist-{threshold}.yaml"
        custom.write_text(yaml.safe_dump(data))
        rep = build_report(bundles["phase2"], checklist_path=custom)
        assert rep["readiness"]["thresholds"]["first_token_learning"] == threshold
        assert rep["recommendation"]["verdict"] == verdict, (threshold, rep["recommendation"])


def test_the_reports_peaks_are_the_gates_and_it_never_judges_alone(tmp_path):
    """Issue #26, evidence computed once: a peak is registry/series.py's for the gate (metric_peak, metric_final_drop)
    and the report's stage figures alike, so a NaN probe (a diverged step) is no peak for either (the report's own
    max() over the records once returned the NaN when it came first). Without the gate's report (here: no eval
    run) the report shows its figures and judges nothing: no readiness rows of its own, no recommendation."""
    import math

    from latentgate.analysis.history import bundle_from_diagnostics
    from latentgate.analysis.report import build_report, stage_figures
    from latentgate.registry.series import Point, drop_from_peak, peak

    probes = ((10, math.nan), (20, 0.15), (30, 0.15), (40, 0.12))
    diag = tmp_path / "diagnostics.jsonl"
    diag.write_text("".join(json.dumps({"stage": "stage_b", "global_step": step, "probe_first_acc": acc,
                                        "probe_first_acc_const": CONST, "probe_first_acc_shuffled": 0.0,
                                        "probe_first_acc_lift": acc - CONST}) + "\n" for step, acc in probes))
    bundle = bundle_from_diagnostics(diag)
    fig = stage_figures(bundle.stages[0])
    assert (fig["peak_first_acc"], fig["peak_step"]) == (0.15, 20)  # the earliest of equal maxima, NaN skipped
    assert (fig["peak_first_acc_lift"], fig["peak_lift_step"]) == (pytest.approx(0.14), 20)
    assert fig["regression_pct"] == pytest.approx(100 * drop_from_peak(0.15, 0.12)) == pytest.approx(20.0)
    assert peak(probes) == Point(20, 0.15) and peak([(1, math.nan)]) is None
    assert drop_from_peak(0.0, 0.1) == 0.0 and math.isnan(drop_from_peak(0.15, math.nan))

    rep = build_report(bundle)
    assert rep["readiness"]["rows"] == [] and rep["readiness"]["passed"] is None
    assert rep["readiness"]["note"].startswith("no eval run") and rep["recommendation"] is None


# ------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------


def test_stage_and_eval_plots_are_valid_pngs_and_fast(micro_smoke, tmp_path):
    from latentgate.analysis.plots import make_eval_plots, make_stage_plots

    out = Path(micro_smoke.output_dir)
    make_stage_plots(out / "stage_a" / "diagnostics.jsonl", tmp_path / "warm")  # first call pays the imports
    t0 = time.perf_counter()
    stage = make_stage_plots(out / "stage_b" / "diagnostics.jsonl", tmp_path / "b")
    t_stage = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = make_eval_plots(out / "eval", tmp_path / "e")
    t_eval = time.perf_counter() - t0
    assert sorted(p.name for p in stage) == ["first_acc.png", "grad_norm.png", "losses.png"]
    assert sorted(p.name for p in ev) == ["error_modes.png", "f1_histogram.png"]
    for p in stage + ev:
        _assert_png(p)
    assert t_stage < 3 and t_eval < 3, (t_stage, t_eval)  # ~0.3 s each when the machine is idle
    # Robust: nothing to plot is not an error.
    assert make_stage_plots(tmp_path / "missing.jsonl", tmp_path / "x") == []
    assert make_eval_plots(tmp_path / "nothing-here", tmp_path / "x") == []


# ------------------------------------------------------------------------------------------------------------
# The live monitor
# ------------------------------------------------------------------------------------------------------------


def test_monitor_follows_a_growing_run_and_alerts_f1_once_never_on_text_baseline(mlflow_store, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    exp_id = mlflow.get_experiment_by_name("latentgate").experiment_id
    parent = client.create_run(exp_id, run_name="smoke", tags={"latentgate.phase": "smoke"}).info.run_id
    ids: dict[str, str] = {}
    errors: list[BaseException] = []

    def log(run_id, items, step):
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in items.items()])

    def writer():
        try:
            time.sleep(0.6)
            sb = ids["stage_b"] = client.create_run(exp_id, run_name="stage_b", tags={
                "latentgate.phase": "stage_b", "mlflow.parentRunId": parent}).info.run_id
            for step in range(1, 7):
                m = {"stage_b/loss": 3.0, "stage_b/grad_norm": 1.0, "stage_b/lr": 1e-4, "stage_b/first_acc": 0.1}
                if step in (3, 6):
                    acc = 0.05 if step == 3 else 0.10
                    m.update({"stage_b/probe_first_acc": acc, "stage_b/probe_first_acc_lo": acc / 2,
                              "stage_b/probe_first_acc_hi": acc * 2, "stage_b/probe_f1": 0.0})
                log(sb, m, step)
                if step == 3:
                    time.sleep(0.6)
            client.set_terminated(sb)
            ev = ids["eval"] = client.create_run(exp_id, run_name="eval", tags={
                "latentgate.phase": "eval", "mlflow.parentRunId": parent}).info.run_id
            # The text teacher scores F1 > 0 first: the predecessor's monitor announced a breakthrough here.
            log(ev, {"eval/text/f1": 0.8, "eval/text/em": 0.6, "eval/latent/f1": 0.0, "eval/zero_latent/f1": 0.0},
                0)
            time.sleep(0.8)
            log(ev, {"eval/latent/f1": 0.04, "eval/latent/em": 0.0, "eval/latent/top_prediction_share": 0.2,
                     "eval/latent/repetition_rate": 0.0}, 0)
            time.sleep(0.8)
            log(ev, {"eval/latent/f1": 0.05}, 1)  # still > 0: no second alert
            time.sleep(0.5)
            client.set_terminated(ev)
            client.set_terminated(parent)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
            client.set_terminated(parent, status="FAILED")

    alert_log = tmp_path / "alerts.txt"
    on_alert = f'echo "$LATENTGATE_ALERT_KIND $LATENTGATE_ALERT_RUN_ID" >> {alert_log}'
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = _invoke("monitor", parent, "--follow", "--interval", "0.2", "--on-alert", on_alert)
    finally:
        thread.join(timeout=30)
    assert not errors, errors
    out = result.output
    assert result.exit_code == 0, out  # info alerts only
    assert "stage_b  step     3  first_acc   5.0%" in out and "stage_b  step     6  first_acc  10.0%" in out
    assert "eval " in out and "latent F1 0.040" in out
    assert out.count("ALERT f1_breakthrough") == 1, out
    assert "ALERT new_peak" in out
    kinds = alert_log.read_text().split("\n")
    assert sum(line.startswith("f1_breakthrough ") for line in kinds) == 1
    assert f"f1_breakthrough {ids['eval']}" in kinds
    tags = client.get_run(ids["eval"]).data.tags
    assert "0.0400" in tags["latentgate.alert.f1_breakthrough"]
    assert "latentgate.alert.f1_breakthrough" in client.get_run(parent).data.tags


def test_monitor_never_alerts_on_text_or_control_f1(mlflow_store):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    exp_id = mlflow.get_experiment_by_name("latentgate").experiment_id
    ev = client.create_run(exp_id, run_name="eval", tags={"latentgate.phase": "eval"}).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(ev, metrics=[Metric(k, v, now, 0) for k, v in {
        "eval/text/f1": 0.79, "eval/token_budget/f1": 0.06, "eval/zero_latent/f1": 0.02, "eval/latent/f1": 0.0,
        "eval/latent/top_prediction_share": 0.1, "eval/latent/repetition_rate": 0.0}.items()])
    client.set_terminated(ev)
    result = _invoke("monitor", ev)
    assert result.exit_code == 0, result.output
    assert "latent F1 0.000" in result.output and "text 0.790" in result.output
    assert "ALERT" not in result.output
    assert not any(k.startswith("latentgate.alert.") for k in client.get_run(ev).data.tags)


def test_monitor_stall_exits_4_and_failed_run_exits_5(mlflow_store):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    exp_id = mlflow.get_experiment_by_name("latentgate").experiment_id
    old = int(time.time() * 1000) - 120_000  # started and last logged two minutes ago
    run = client.create_run(exp_id, start_time=old, run_name="stage_b",
                            tags={"latentgate.phase": "stage_b"}).info.run_id
    client.log_batch(run, metrics=[Metric("stage_b/loss", 3.0, old, 1), Metric("stage_b/first_acc", 0.0, old, 1)])
    result = _invoke("monitor", run, "--follow", "--interval", "0.1", "--stall-minutes", "1")
    assert result.exit_code == 4, result.output
    assert "ALERT stall" in result.output
    assert "latentgate.alert.stall" in client.get_run(run).data.tags

    client.set_tag(run, "latentgate.error", "TrainingFault: stage_b: non-finite loss at optimizer step 2")
    client.set_terminated(run, status="FAILED")
    result = _invoke("monitor", run, "--no-tags")
    assert result.exit_code == 5, result.output
    assert "ALERT nan" in result.output
    bad = _invoke("monitor", run, "--interval", "0")
    assert bad.exit_code == 2


def test_compare_two_runs(micro_smoke, mlflow_store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    other = recorded_candidate(tmp_path / "other", *HISTORIES["hero-ready at latent F1 0"][1:], const=CONST)["parent"]
    client.log_param(other, "stage_b.lr", "1e-4")
    plot = tmp_path / "overlay.png"
    result = _invoke("compare", micro_smoke.run_id, other, "--plot", str(plot), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["run_id"] for r in data["runs"]] == [micro_smoke.run_id, other]
    assert data["runs"][1]["peak_first_acc"] == 0.14 and data["runs"][1]["peak_step"] == 20
    eval_metrics = client.get_run(micro_smoke.children["eval"]).data.metrics
    assert data["runs"][0]["latent_f1"] == eval_metrics["eval/latent/f1"]
    assert "stage_b.lr" in data["differing_params"]
    _assert_png(plot)
    os.remove(plot)
