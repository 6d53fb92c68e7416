"""The breakthrough report: every figure the plan's `analyze_breakthrough.py` printed, computed from MLflow metric
histories and run artifacts, closed by the readiness checklist and the plan's recommendation.

`build_report(bundle)` returns a JSON-able dict; `render.to_markdown` and `render.print_rich` show it;
`analyze(run_id)` does all of it, makes the plots and logs report.md, report.json and the PNGs to the run (under
`analysis/`).
The readiness table is the registry gate's report on the eval run (`registry.gate.check_candidate`, read-only), and
the recommendation is the pipeline's own decision tree (`registry.decisions.decide`) on the evidence the pipeline
reads from that report (`registry.decisions.evidence_from_report`): the report, the monitor and the pipeline judge a
run by the same file and the same rules, and no figure they judge is computed here a second time. Peaks and drops
from a peak are `registry.series`'s (as the gate's); collapse statistics are the gate's (`decisions.collapse_of`) or,
without it, the eval's recorded ones.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from latentgate.analysis import history
from latentgate.analysis.history import RunBundle, StageHistory
from latentgate.analysis.plots import bundle_plots
from latentgate.analysis.render import to_markdown
from latentgate.errors import ConfigError
from latentgate.eval import scoring
from latentgate.eval.controls import Collapse
from latentgate.eval_row import EvalRow
from latentgate.registry import decisions, series
from latentgate.registry.checklist import BREAKTHROUGH, GRADIENTS, LEARNING, Checklist, load_checklist
from latentgate.registry.gate import check_candidate
from latentgate.registry.gate_report import Report
from latentgate.schema import EvalKey, EvalPath, GradGroup, Probe, Stage, Summary, Tag
from latentgate.tracking import lineage

VERDICTS = ("hero-ready", "phase3", "phase2")
# The decision tree's next phase, as the plan's verdict (the report judges a Phase 1 result).
VERDICT_OF = {decisions.PROMOTE: "hero-ready", decisions.HERO: "hero-ready", decisions.FIX: "phase3",
              decisions.SWEEP: "phase2", decisions.STOP: "phase2"}


# ------------------------------------------------------------------------------------------------------------
# The decision (pure)
# ------------------------------------------------------------------------------------------------------------


def recommend(evidence: decisions.PhaseEvidence, checklist: Checklist) -> tuple[str, decisions.Decision]:
    """The plan's verdict on a Phase 1 result: the pipeline's decision tree (`decide`) on the same evidence, read
    against the same checklist, so the report never recommends what the pipeline would not do:

    * "hero-ready": the gate passes (every deciding criterion of the checklist, whatever the criteria shown only
      say) -> Phase 4 (hero run);
    * "phase3": the gate refuses, F1 fails f1_breakthrough, the final first-token LIFT over the controls passes
      first_token_learning, no collapse (no_mode_collapse) -> exposure bias, scheduled sampling;
    * "phase2": anything else, including mode collapse (rule `collapsed`: one answer for many inputs) -> tune.
    """
    decision = decisions.decide(evidence, checklist)
    return VERDICT_OF[decision.next_phase], decision


NEXT_STEP = {
    "hero-ready": "Phase 4: promote the checkpoint and launch the hero run (latentgate promote / latentgate hero)",
    "phase3": "Phase 3: exposure bias; add scheduled sampling (latentgate fix --resume-from <stage B checkpoint>)",
    "phase2": "Phase 2: tune (latentgate sweep; e.g. first-token CE weight, more steps, cosine LR)",
}
NEXT_STEP_OF_RULE = {
    "collapsed": "Phase 2: the latent path gives the same answer whatever the input (mode collapse), which scheduled "
                 "sampling does not fix; tune (latentgate sweep; e.g. first-token CE weight, LR, more Stage A steps)",
    "provenance": "Stop: the evidence cannot be trusted as recorded, which no phase of the plan fixes; pin the eval "
                  "set (eval_dataset_digest in the checklist), score enough eval examples, re-run the smoke so its "
                  "runs form a clean lineage at one commit, then analyze again",
}


# ------------------------------------------------------------------------------------------------------------
# Thresholds (the checklist file) and the registry gate
# ------------------------------------------------------------------------------------------------------------


def thresholds(cl: Checklist) -> dict[str, float]:
    """Every numeric threshold of the checklist by criterion name (the report shows them; nothing else reads them
    from here)."""
    return {c.name: c.threshold for c in cl.criteria if c.threshold is not None}


GATE = "latentgate.registry.gate"


def gate_report(bundle: RunBundle, cl: Checklist) -> tuple[Report | None, str]:
    """The registry gate's report on the bundle's eval run (read-only: `check_candidate`), or None and why not. The
    gate is the one judge: without it the report shows its figures and no readiness of its own."""
    if not bundle.evals:
        return None, ("no eval run: the registry gate judges an eval run and its lineage (analyze the smoke or its "
                      "eval run)")
    try:
        return check_candidate(bundle.evals[-1].run_id, cl), ""
    except Exception as err:  # noqa: BLE001 - the report's figures still stand without the gate
        return None, f"registry gate failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def gate_readiness(report: Report | None, note: str = "") -> dict:
    """The readiness table: the gate's rows as it judged them (empty, with the note, when it could not judge)."""
    if report is None:
        return {"source": GATE, "passed": None, "rows": [], "missing": [], "note": note}
    rows = [{k: getattr(r, k) for k in ("name", "passed", "observed", "op", "threshold", "source", "detail",
                                                "decides")}
            for r in report.rows]
    return {"source": GATE, "passed": report.passed, "rows": rows, "missing": list(report.missing)}


# ------------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stage_figures(stage_hist: StageHistory, last_n: int = 3) -> dict[str, Any]:
    probes = stage_hist.probes()
    out: dict[str, Any] = {"stage": stage_hist.stage, "run_id": stage_hist.run_id, "status": stage_hist.status,
                           "steps": stage_hist.max_step(), "probes": len(probes)}
    batch = [v for _, v in stage_hist.values(Stage.FIRST_ACC)]
    if batch:
        out["batch_first_acc_max"] = max(batch)
    lrs = stage_hist.values(Stage.LR)
    if lrs:
        out["lr_final"] = lrs[-1][1]
    if not probes:
        return out
    acc, lo, hi, top5 = Probe.FIRST_ACC, Probe.FIRST_ACC_LO, Probe.FIRST_ACC_HI, Probe.FIRST_ACC_TOP5
    at_step = {p["step"]: p for p in probes}
    top = series.peak((p["step"], p[acc]) for p in probes)  # the gate's peak: earliest step among equal maxima
    if top is None:  # no finite accuracy: no peak to show
        return out
    peak = at_step[top.step]
    final = probes[-1]
    tail = [p[acc] for p in probes[-last_n:]]
    out.update({
        "peak_first_acc": top.value, "peak_step": top.step, "peak_interval": [peak.get(lo), peak.get(hi)],
        "final_first_acc": final[acc], "final_step": final["step"], "final_interval": [final.get(lo), final.get(hi)],
        "regression_pct": series.drop_from_peak(top.value, final[acc]) * 100,
        "last_n": {"n": len(tail), "mean": statistics.fmean(tail), "min": min(tail), "max": max(tail),
                   "std": statistics.pstdev(tail)},
    })
    top5s = [p[top5] for p in probes if top5 in p]
    if top5s:
        out.update(top5_at_peak=peak.get(top5), top5_final=final.get(top5), top5_max=max(top5s))
    f1s = [p[Probe.F1] for p in probes if Probe.F1 in p]
    if f1s:
        out.update(probe_f1_max=max(f1s), probe_f1_final=final.get(Probe.F1))
    lift = series.peak((p["step"], p[Probe.LIFT]) for p in probes if Probe.LIFT in p)
    if lift is not None:  # the controls: what the probe scores with no information about the input
        best = at_step[lift.step]
        out.update({Probe.CONST: best.get(Probe.CONST), Probe.SHUFFLED: best.get(Probe.SHUFFLED)},  # at the peak lift
                   peak_first_acc_lift=lift.value, peak_lift_step=lift.step, peak_lift_first_acc=best[acc],
                   final_first_acc_lift=final.get(Probe.LIFT), final_const=final.get(Probe.CONST),
                   final_shuffled=final.get(Probe.SHUFFLED),
                   final_top_first_token_share=final.get(Probe.TOP_SHARE),
                   final_distinct_first_tokens=final.get(Probe.DISTINCT))
    return out


def gradient_figures(stages: list[StageHistory]) -> dict[str, Any]:
    per_stage: dict[str, dict] = {}
    overall = None
    for stage_hist in stages:
        label = _stage_label(stage_hist, stages)
        groups = {}
        for key in GradGroup.NORM_KEYS:
            pts = [(s, v) for s, v in stage_hist.values(key) if not math.isnan(v)]
            if not pts:
                continue
            vals = [v for _, v in pts]
            step_max = max(pts, key=lambda p: p[1])[0]
            groups[key.removeprefix(GradGroup.norm_key("")) if key != Stage.GRAD_NORM else "total"] = {
                "max": max(vals), "max_step": step_max, "p50": percentile(vals, 50), "p90": percentile(vals, 90),
                "p99": percentile(vals, 99), "n": len(vals)}
            if key == Stage.GRAD_NORM:
                overall = max(vals) if overall is None else max(overall, max(vals))
        nan_steps = [s for s, v in stage_hist.values(Stage.GRAD_NORM) if math.isnan(v)]
        if groups or nan_steps:
            per_stage[label] = {"groups": groups, "nan_steps": nan_steps}
    return {"stages": per_stage, "max_grad_norm": overall}


def _stage_label(stage_hist: StageHistory, stages: list[StageHistory]) -> str:
    same = [s for s in stages if s.stage == stage_hist.stage]
    if len(same) == 1:
        return stage_hist.stage
    return f"{stage_hist.stage}#{same.index(stage_hist) + 1}"


def eval_figures(ev, collapse: Collapse | None = None) -> dict[str, Any]:
    """One eval run's figures: per-path metrics, the latent path's breakthrough and error modes from its rows, and
    its collapse statistics as the gate judged them (`collapse`, its no_mode_collapse evidence), else as the eval
    recorded them (metrics.json): never computed again here."""
    out: dict[str, Any] = {"run_id": ev.run_id, "status": ev.status, "checkpoint": ev.checkpoint,
                           "paths": {p: dict(ev.metrics[p]) for p in EvalPath.ALL if p in ev.metrics}}
    latent_rows = ev.path_rows(EvalPath.LATENT)
    agg = ((ev.aggregates or {}).get("paths") or {}).get(EvalPath.LATENT) or {}
    latent = ev.metrics.get(EvalPath.LATENT, {})
    if latent_rows:
        f1s = [r.f1 for r in latent_rows]
        idx = scoring.first_nonzero_index(f1s)
        modes = {m: 0 for m in scoring.ERROR_MODES}
        for r in latent_rows:
            modes[r.error_mode] = modes.get(r.error_mode, 0) + 1
        alike = asdict(collapse) if collapse is not None else _recorded_collapse(latent)
        n = len(latent_rows)
        out["breakthrough"] = {
            "any_f1_nonzero": idx is not None, "first_f1_nonzero_idx": idx, "n": n,
            "n_f1_nonzero": sum(1 for v in f1s if v > 0), "mean_f1_rows": sum(f1s) / n, "max_f1": max(f1s),
            "example": None if idx is None else {k: latent_rows[idx].value(k) for k in
                                                  (EvalRow.ID, EvalRow.QUESTION, EvalRow.PREDICTION,
                                                   EvalRow.REFERENCES, EvalRow.F1)},
        }
        out["f1_distribution"] = scoring.f1_buckets(f1s)
        out["collapse"] = {
            **alike, "repetition_count": modes.get("repetition", 0), "empty_count": modes.get("empty", 0),
            EvalKey.EMPTY_RATE: modes.get("empty", 0) / n,
            EvalKey.DISTINCT_FIRST_TOKENS: len({r.first_token for r in latent_rows}), "error_modes": modes,
        }
    elif latent:  # metrics only (artifacts missing)
        out["breakthrough"] = {"any_f1_nonzero": latent.get("f1", 0) > 0, "first_f1_nonzero_idx":
                               agg.get(EvalKey.FIRST_F1_NONZERO_IDX), "n": agg.get("n"), "example": None}
        if agg.get(EvalKey.F1_DISTRIBUTION):
            out["f1_distribution"] = agg[EvalKey.F1_DISTRIBUTION]
        out["collapse"] = {**_recorded_collapse(latent), **(asdict(collapse) if collapse is not None else {}),
                           **{k: latent.get(k) for k in (EvalKey.EMPTY_RATE, EvalKey.DISTINCT_FIRST_TOKENS)}}
        if agg.get(EvalKey.ERROR_MODES):
            out["collapse"]["error_modes"] = agg[EvalKey.ERROR_MODES]
    if latent and "f1" in latent:
        out["latent_beats_controls"] = {c: latent["f1"] > ev.metrics[c]["f1"] for c in EvalPath.CONTROLS
                                        if "f1" in ev.metrics.get(c, {})}
    return out


def _recorded_collapse(latent: dict) -> dict:
    """The latent path's collapse aggregates as the eval recorded them (metrics.json / eval/latent/* metrics)."""
    return {k: latent.get(k) for k in (EvalKey.TOP_PREDICTION_SHARE, EvalKey.REPETITION_RATE)}


# ------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------


def build_report(bundle: RunBundle, last_n: int = 3, checklist_path=None) -> dict[str, Any]:
    """The report of a run bundle: its figures, and the registry gate's judgement of its eval run (the readiness
    table, and through `decisions.evidence_from_report` the recommendation), which it never recomputes."""
    cl = load_checklist(checklist_path)
    th_source = f"{cl.path} (version {cl.version}, sha256 {cl.sha256[:12]})"
    stages = [stage_figures(s, last_n) for s in bundle.stages]
    for fig, stage_hist in zip(stages, bundle.stages, strict=True):
        fig["label"] = _stage_label(stage_hist, bundle.stages)
    evaluated = bundle.evaluated_stage()
    ev_stage = next((f for f, s in zip(stages, bundle.stages, strict=True) if s is evaluated), None)
    gate, note = gate_report(bundle, cl)
    ev = eval_figures(bundle.evals[-1], decisions.collapse_of(gate)) if bundle.evals else None
    grads = gradient_figures(bundle.stages)
    readiness = {**gate_readiness(gate, note), "thresholds": thresholds(cl), "thresholds_source": th_source}
    peak = (ev_stage or {}).get("peak_first_acc")
    f1 = (((ev or {}).get("paths") or {}).get(EvalPath.LATENT) or {}).get("f1")
    rec = None
    if gate is not None and peak is not None and f1 is not None:
        evidence = decisions.evidence_from_report(gate, cl, "extend",  # the report judges a Phase 1 result
                                                  run_ids={"stage_b": ev_stage["run_id"], "eval": ev["run_id"]})
        verdict, decision = recommend(evidence, cl)
        next_step = NEXT_STEP_OF_RULE.get(decision.rule, NEXT_STEP[verdict])
        failed = gate.failing()
        broke_through = cl.criterion(BREAKTHROUGH).compare(evidence.f1_max)
        if verdict == "phase2" and broke_through and failed and set(failed) <= set(cl.provenance()):
            next_step = (f"the learning criteria pass but the evidence does not ({', '.join(failed)}): re-run the "
                         "smoke so its runs form a clean lineage at one commit on the pinned eval set, then promote")
        rec = {"verdict": verdict, "rule": decision.rule, "next_step": next_step, "peak_first_acc": peak,
               "first_acc_lift": evidence.first_acc_lift, Summary.LATENT_F1: f1,
               "checklist_passed": readiness["passed"], "threshold": cl.threshold(LEARNING),
               "reason": decision.reason}
    return {
        "run": {"run_id": bundle.run_id, "name": bundle.run_name, "phase": bundle.phase, "status": bundle.status,
                "preset": bundle.tags.get(Tag.PRESET, ""), "git_commit": bundle.tags.get(Tag.GIT_COMMIT, ""),
                "source": bundle.source,
                "wall_seconds": bundle.wall_seconds()},
        "last_n": last_n,
        "stages": stages,
        "evaluated_stage": None if ev_stage is None else {"label": ev_stage["label"], "run_id": ev_stage["run_id"]},
        "eval": ev,
        "gradients": grads,
        "readiness": readiness,
        "recommendation": rec,
    }


# ------------------------------------------------------------------------------------------------------------
# The command's work
# ------------------------------------------------------------------------------------------------------------


def analyze(target: str, out_dir: Path, log: bool = True, last_n: int = 3, checklist_path=None,
            plots: bool = True) -> tuple[dict, list[Path]]:
    """Build the report for a run id (or a local diagnostics.jsonl), write report.md/json and the plots into
    out_dir, and (for a run) log them to the run under `analysis/`. Returns (report, files)."""
    if last_n < 1:
        raise ConfigError(f"--last-n must be >= 1, got {last_n}", "pass --last-n 3 (the default)")
    if target.endswith(".jsonl") or Path(target).is_file():
        bundle = history.bundle_from_diagnostics(Path(target))
        log = False
    else:
        bundle = history.load_run_bundle(target)
    rep = build_report(bundle, last_n=last_n, checklist_path=checklist_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    md = out_dir / "report.md"
    md.write_text(to_markdown(rep))
    js = out_dir / "report.json"
    js.write_text(json.dumps(rep, indent=2, sort_keys=True, default=str))
    files += [md, js]
    pngs: list[Path] = []
    if plots:
        cl = load_checklist(checklist_path)
        pngs = bundle_plots(bundle, out_dir / "plots", threshold=cl.threshold(LEARNING),
                            grad_limit=cl.threshold(GRADIENTS))
    if log and bundle.run_id:
        cl = lineage.client()
        for f in files:
            cl.log_artifact(bundle.run_id, str(f), "analysis")
        for p in pngs:
            cl.log_artifact(bundle.run_id, str(p), "analysis/plots")
    return rep, files + pngs
