"""The breakthrough report: every figure the plan's `analyze_breakthrough.py` printed, computed from MLflow metric
histories and run artifacts, closed by the readiness checklist and the plan's recommendation.

`build_report(bundle)` returns a JSON-able dict; `to_markdown` and `print_rich` render it; `analyze(run_id)` does
all of it, makes the plots and logs report.md, report.json and the PNGs to the run (under `analysis/`).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from latentgate.analysis.history import EVAL_PATHS, RunBundle, StageHistory
from latentgate.errors import ConfigError

# The plan's defaults (used only when no checklist file can be read).
PLAN_DEFAULTS = {
    "first_token_learning": 0.12,   # peak probe first-token accuracy >= 12%
    "first_token_stability": 0.20,  # final within 20% of peak
    "f1_breakthrough": 0.0,         # F1 > 0 on at least one eval example
    "generation_quality": 0.01,     # mean latent F1 >= 0.01
    "gradient_health": 500.0,       # max grad norm < 500
    "no_mode_collapse": 0.10,       # < 10% repetitive predictions
}
CRITERIA = tuple(PLAN_DEFAULTS)
VERDICTS = ("hero-ready", "phase3", "phase2")
GRAD_GROUPS = ("grad_norm", "grad_norm_encoder", "grad_norm_adapter", "grad_norm_lora")
CONTROLS = ("token_budget", "zero_latent", "shuffled_latent")
# Gate criteria about provenance rather than learning: failing them is not a reason to tune.
EVIDENCE_CRITERIA = ("lineage", "eval_dataset_digest")


# ------------------------------------------------------------------------------------------------------------
# The decision (pure)
# ------------------------------------------------------------------------------------------------------------


def recommend(peak_first_acc: float, f1: float, checklist_passed: bool | None, threshold: float) -> str:
    """The plan's decision tree, with the checklist as the bar for "hero-ready":

    * "hero-ready": every checklist criterion passes (that includes latent F1 > 0) -> Phase 4 (hero run);
    * "phase3": latent F1 = 0 but peak first-token accuracy >= threshold -> exposure bias, scheduled sampling;
    * "phase2": anything else (first-token accuracy below threshold, or F1 > 0 but the checklist fails) -> tune.
    """
    if checklist_passed and f1 > 0:
        return "hero-ready"
    if f1 <= 0 and peak_first_acc >= threshold:
        return "phase3"
    return "phase2"


NEXT_STEP = {
    "hero-ready": "Phase 4: promote the checkpoint and launch the hero run (latentgate promote / latentgate hero)",
    "phase3": "Phase 3: exposure bias; add scheduled sampling (latentgate fix --resume-from <stage B checkpoint>)",
    "phase2": "Phase 2: tune (latentgate sweep; e.g. first-token CE weight, more steps, cosine LR)",
}


# ------------------------------------------------------------------------------------------------------------
# Checklist (thresholds) and the registry gate, both optional
# ------------------------------------------------------------------------------------------------------------


def checklist_thresholds(path: str | Path | None = None) -> tuple[dict[str, float], str]:
    """Thresholds from the readiness checklist file, and where they came from. The registry's loader is used
    when it exists; the plan's defaults only when no checklist file can be found."""
    try:
        from latentgate.registry.checklist import load_checklist
    except ImportError:
        load_checklist = None
    if load_checklist is not None:
        try:
            cl = load_checklist(path)
        except (ConfigError, FileNotFoundError):
            if path is not None and Path(path).is_file():
                raise  # the file exists but is invalid: say so, never fall back silently
            if path is not None:
                raise ConfigError(f"checklist {path} does not exist",
                                  "pass an existing checklist file, or omit --checklist") from None
            cl = None  # no default checklist file: the plan's defaults
        if cl is not None:
            out = dict(PLAN_DEFAULTS)
            for name in CRITERIA:
                try:
                    value = cl.threshold(name)
                except (ConfigError, KeyError, LookupError):
                    continue
                if value is not None:
                    out[name] = float(value)
            label = str(getattr(cl, "path", None) or getattr(cl, "source", None) or path or "checklist")
            version = getattr(cl, "version", None)
            return out, f"{label}{f' (version {version})' if version else ''}"
    if path is not None:
        return _read_checklist_file(Path(path)), str(path)
    return dict(PLAN_DEFAULTS), "plan defaults (no checklist file)"


def _read_checklist_file(path: Path) -> dict[str, float]:
    """A checklist YAML/JSON read without the registry: {name: value}, {name: {threshold: v}} or
    {criteria: [{name, threshold}]}."""
    if not path.is_file():
        raise ConfigError(f"checklist {path} does not exist", "pass an existing checklist file, or omit --checklist")
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    items = data.get("criteria", data) if isinstance(data, dict) else data
    if isinstance(items, dict):
        items = [{"name": k, **(v if isinstance(v, dict) else {"threshold": v})} for k, v in items.items()]
    out = dict(PLAN_DEFAULTS)
    for item in items or []:
        if isinstance(item, dict) and item.get("name") in out and isinstance(item.get("threshold"), (int, float)):
            out[item["name"]] = float(item["threshold"])
    return out


def gate_readiness(eval_run_id: str | None, checklist_path=None) -> dict | None:
    """The registry's checklist, evaluated read-only on the eval run; None when that module is unavailable."""
    if not eval_run_id:
        return None
    try:
        from latentgate.registry.gate import evaluate as gate_evaluate
    except ImportError:
        return None
    rep = gate_evaluate(eval_run_id, checklist_path=checklist_path)
    rows = []
    for r in rep.rows:
        r = r if isinstance(r, dict) else vars(r)
        rows.append({k: r.get(k) for k in ("name", "passed", "observed", "op", "threshold", "source", "detail")})
    return {"source": "latentgate.registry.gate", "passed": bool(rep.passed), "rows": rows,
            "missing": list(getattr(rep, "missing", []) or [])}


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


def stage_figures(st: StageHistory, last_n: int = 3, stability: float = 0.2) -> dict[str, Any]:
    probes = st.probes()
    out: dict[str, Any] = {"stage": st.stage, "run_id": st.run_id, "status": st.status, "steps": st.max_step(),
                           "probes": len(probes)}
    batch = [v for _, v in st.values("first_acc")]
    if batch:
        out["batch_first_acc_max"] = max(batch)
    lrs = st.values("lr")
    if lrs:
        out["lr_final"] = lrs[-1][1]
    if not probes:
        return out
    peak = max(probes, key=lambda p: (p["first_acc"], -p["step"]))  # earliest step among equal maxima
    final = probes[-1]
    tail = [p["first_acc"] for p in probes[-last_n:]]
    out.update({
        "peak_first_acc": peak["first_acc"], "peak_step": peak["step"],
        "peak_interval": [peak.get("first_acc_lo"), peak.get("first_acc_hi")],
        "final_first_acc": final["first_acc"], "final_step": final["step"],
        "final_interval": [final.get("first_acc_lo"), final.get("first_acc_hi")],
        "regression_pct": (peak["first_acc"] - final["first_acc"]) / peak["first_acc"] * 100
        if peak["first_acc"] > 0 else 0.0,
        "stable": peak["first_acc"] > 0 and final["first_acc"] >= (1 - stability) * peak["first_acc"],
        "last_n": {"n": len(tail), "mean": statistics.fmean(tail), "min": min(tail), "max": max(tail),
                   "std": statistics.pstdev(tail)},
    })
    top5 = [p["first_acc_top5"] for p in probes if "first_acc_top5" in p]
    if top5:
        out.update(top5_at_peak=peak.get("first_acc_top5"), top5_final=final.get("first_acc_top5"),
                   top5_max=max(top5))
    f1s = [p["f1"] for p in probes if "f1" in p]
    if f1s:
        out.update(probe_f1_max=max(f1s), probe_f1_final=final.get("f1"))
    return out


def gradient_figures(stages: list[StageHistory]) -> dict[str, Any]:
    per_stage: dict[str, dict] = {}
    overall = None
    for st in stages:
        label = _stage_label(st, stages)
        groups = {}
        for key in GRAD_GROUPS:
            pts = [(s, v) for s, v in st.values(key) if not math.isnan(v)]
            if not pts:
                continue
            vals = [v for _, v in pts]
            step_max = max(pts, key=lambda p: p[1])[0]
            groups[key.removeprefix("grad_norm_") if key != "grad_norm" else "total"] = {
                "max": max(vals), "max_step": step_max, "p50": percentile(vals, 50), "p90": percentile(vals, 90),
                "p99": percentile(vals, 99), "n": len(vals)}
            if key == "grad_norm":
                overall = max(vals) if overall is None else max(overall, max(vals))
        nan_steps = [s for s, v in st.values("grad_norm") if math.isnan(v)]
        if groups or nan_steps:
            per_stage[label] = {"groups": groups, "nan_steps": nan_steps}
    return {"stages": per_stage, "max_grad_norm": overall}


def _stage_label(st: StageHistory, stages: list[StageHistory]) -> str:
    same = [s for s in stages if s.stage == st.stage]
    if len(same) == 1:
        return st.stage
    return f"{st.stage}#{same.index(st) + 1}"


def eval_figures(ev) -> dict[str, Any]:
    from latentgate.eval import scoring

    out: dict[str, Any] = {"run_id": ev.run_id, "status": ev.status, "checkpoint": ev.checkpoint,
                           "paths": {p: dict(ev.metrics[p]) for p in EVAL_PATHS if p in ev.metrics}}
    latent_rows = ev.path_rows("latent")
    agg = ((ev.aggregates or {}).get("paths") or {}).get("latent") or {}
    latent = ev.metrics.get("latent", {})
    if latent_rows:
        f1s = [float(r["f1"]) for r in latent_rows]
        idx = scoring.first_nonzero_index(f1s)
        modes = {m: 0 for m in scoring.ERROR_MODES}
        for r in latent_rows:
            modes[r.get("error_mode", "wrong_entity")] = modes.get(r.get("error_mode", "wrong_entity"), 0) + 1
        preds: dict[str, int] = {}
        for r in latent_rows:
            preds[r["prediction"]] = preds.get(r["prediction"], 0) + 1
        top_pred, top_count = max(preds.items(), key=lambda kv: kv[1])
        n = len(latent_rows)
        out["breakthrough"] = {
            "any_f1_nonzero": idx is not None, "first_f1_nonzero_idx": idx, "n": n,
            "n_f1_nonzero": sum(1 for v in f1s if v > 0), "mean_f1_rows": sum(f1s) / n, "max_f1": max(f1s),
            "example": None if idx is None else {k: latent_rows[idx].get(k) for k in
                                                  ("id", "question", "prediction", "references", "f1")},
        }
        out["f1_distribution"] = scoring.f1_buckets(f1s)
        out["collapse"] = {
            "n": n, "top_prediction": top_pred, "top_prediction_count": top_count,
            "top_prediction_share": top_count / n, "repetition_count": modes.get("repetition", 0),
            "repetition_rate": modes.get("repetition", 0) / n, "empty_count": modes.get("empty", 0),
            "empty_rate": modes.get("empty", 0) / n,
            "distinct_first_tokens": len({r.get("first_token") for r in latent_rows}), "error_modes": modes,
        }
    elif latent:  # metrics only (artifacts missing)
        out["breakthrough"] = {"any_f1_nonzero": latent.get("f1", 0) > 0, "first_f1_nonzero_idx":
                               agg.get("first_f1_nonzero_idx"), "n": agg.get("n"), "example": None}
        if agg.get("f1_distribution"):
            out["f1_distribution"] = agg["f1_distribution"]
        out["collapse"] = {k: latent.get(k) for k in ("top_prediction_share", "repetition_rate", "empty_rate",
                                                       "distinct_first_tokens")}
        if agg.get("error_modes"):
            out["collapse"]["error_modes"] = agg["error_modes"]
    if latent and "f1" in latent:
        out["latent_beats_controls"] = {c: latent["f1"] > ev.metrics[c]["f1"] for c in CONTROLS
                                        if "f1" in ev.metrics.get(c, {})}
    return out


def local_readiness(stage: dict | None, ev: dict | None, grads: dict, th: dict[str, float]) -> dict:
    """The six criteria from this report's own figures (when the registry gate is unavailable)."""
    rows = []

    ops = {"first_token_learning": ">=", "first_token_stability": "<=", "f1_breakthrough": ">",
           "generation_quality": ">=", "gradient_health": "<", "no_mode_collapse": "<"}

    def row(name, observed, passed, source):
        rows.append({"name": name, "passed": None if observed is None else bool(passed), "observed": observed,
                     "op": ops[name], "threshold": th[name], "source": source})

    peak = (stage or {}).get("peak_first_acc")
    final = (stage or {}).get("final_first_acc")
    src_stage = f"{(stage or {}).get('stage', 'stage')}/probe_first_acc"
    row("first_token_learning", peak, peak is not None and peak >= th["first_token_learning"], src_stage)
    regression = None if peak is None else (stage or {}).get("regression_pct", 0.0) / 100
    row("first_token_stability", regression,
        peak is not None and peak > 0 and final >= (1 - th["first_token_stability"]) * peak, src_stage)
    bt = (ev or {}).get("breakthrough") or {}
    latent = ((ev or {}).get("paths") or {}).get("latent") or {}
    n_nonzero = bt.get("n_f1_nonzero", (1 if bt.get("any_f1_nonzero") else 0) if bt else None)
    row("f1_breakthrough", n_nonzero, bool(bt.get("any_f1_nonzero")), "eval_detailed.jsonl (latent)")
    f1 = latent.get("f1")
    row("generation_quality", f1, f1 is not None and f1 >= th["generation_quality"], "eval/latent/f1")
    gmax = grads.get("max_grad_norm")
    row("gradient_health", gmax, gmax is not None and gmax < th["gradient_health"], "grad_norm (all stages)")
    rep = ((ev or {}).get("collapse") or {}).get("repetition_rate")
    row("no_mode_collapse", rep, rep is not None and rep < th["no_mode_collapse"], "eval_detailed.jsonl (latent)")
    missing = [r["name"] for r in rows if r["observed"] is None]
    return {"source": "local (latentgate.registry.gate unavailable)", "rows": rows, "missing": missing,
            "passed": not missing and all(r["passed"] for r in rows)}


# ------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------


def build_report(bundle: RunBundle, last_n: int = 3, checklist_path=None, use_gate: bool = True) -> dict[str, Any]:
    th, th_source = checklist_thresholds(checklist_path)
    stages = [stage_figures(s, last_n, th["first_token_stability"]) for s in bundle.stages]
    for fig, st in zip(stages, bundle.stages, strict=True):
        fig["label"] = _stage_label(st, bundle.stages)
    evaluated = bundle.evaluated_stage()
    ev_stage = next((f for f, s in zip(stages, bundle.stages, strict=True) if s is evaluated), None)
    ev = eval_figures(bundle.evals[-1]) if bundle.evals else None
    grads = gradient_figures(bundle.stages)
    readiness = None
    note = ""
    if use_gate and ev is not None:
        try:
            readiness = gate_readiness(ev["run_id"], checklist_path)
        except Exception as err:  # noqa: BLE001 - the report still stands without the gate
            note = f"registry gate failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    if readiness is None:
        readiness = local_readiness(ev_stage, ev, grads, th)
        readiness["note"] = note or "checklist unavailable: figures below are this report's, against " + th_source
    readiness["thresholds"] = th
    readiness["thresholds_source"] = th_source
    rec = None
    peak = (ev_stage or {}).get("peak_first_acc")
    f1 = (((ev or {}).get("paths") or {}).get("latent") or {}).get("f1")
    if peak is not None and f1 is not None:
        verdict = recommend(peak, f1, readiness["passed"], th["first_token_learning"])
        failed = [r["name"] for r in readiness["rows"] if not r["passed"]]
        next_step = NEXT_STEP[verdict]
        if verdict == "phase2" and f1 > 0 and failed and set(failed) <= set(EVIDENCE_CRITERIA):
            next_step = (f"the learning criteria pass but the evidence does not ({', '.join(failed)}): re-run the "
                         "smoke so its runs form a clean lineage at one commit on the pinned eval set, then promote")
        rec = {"verdict": verdict, "next_step": next_step, "peak_first_acc": peak, "latent_f1": f1,
               "checklist_passed": readiness["passed"], "threshold": th["first_token_learning"],
               "reason": _reason(verdict, peak, f1, readiness, th["first_token_learning"])}
    return {
        "run": {"run_id": bundle.run_id, "name": bundle.run_name, "phase": bundle.phase, "status": bundle.status,
                "preset": bundle.tags.get("latentgate.preset", ""),
                "git_commit": bundle.tags.get("latentgate.git_commit", ""), "source": bundle.source,
                "wall_seconds": bundle.wall_seconds()},
        "last_n": last_n,
        "stages": stages,
        "evaluated_stage": None if ev_stage is None else {"label": ev_stage["label"], "run_id": ev_stage["run_id"]},
        "eval": ev,
        "gradients": grads,
        "readiness": readiness,
        "recommendation": rec,
    }


def _reason(verdict: str, peak: float, f1: float, readiness: dict, threshold: float) -> str:
    if verdict == "hero-ready":
        return f"every checklist criterion passes; latent F1 {f1:.3f} > 0"
    if verdict == "phase3":
        return f"latent F1 = 0 but peak first-token accuracy {peak:.1%} >= {threshold:.0%}: exposure bias"
    if f1 > 0:
        failed = [r["name"] for r in readiness["rows"] if not r["passed"]]
        return f"latent F1 {f1:.3f} > 0 but the checklist fails ({', '.join(failed) or 'missing data'})"
    return f"latent F1 = 0 and peak first-token accuracy {peak:.1%} < {threshold:.0%}"


# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------


def _pct(v, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}%}"


def _num(v, fmt: str = ".3f") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return "nan" if isinstance(v, float) and math.isnan(v) else format(v, fmt)
    return str(v)


def _interval(iv) -> str:
    if not iv or iv[0] is None:
        return ""
    return f" [{_pct(iv[0])}, {_pct(iv[1])}]"


def sections(rep: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows) tables: shared by markdown and the terminal."""
    out = []
    st_rows = []
    for s in rep["stages"]:
        peak = f"{_pct(s.get('peak_first_acc'))} @ {s.get('peak_step', '—')}{_interval(s.get('peak_interval'))}"
        st_rows.append([s["label"], str(s["steps"]), str(s["probes"]), peak,
                        f"{_pct(s.get('final_first_acc'))} @ {s.get('final_step', '—')}",
                        "—" if "regression_pct" not in s else f"{s['regression_pct']:.1f}%",
                        "—" if "last_n" not in s else
                        f"{_pct(s['last_n']['mean'])} ± {_pct(s['last_n']['std'])} "
                        f"({_pct(s['last_n']['min'])}–{_pct(s['last_n']['max'])})",
                        f"{_pct(s.get('top5_at_peak'))} / {_pct(s.get('top5_final'))}",
                        _num(s.get("probe_f1_max"))])
    out.append(("First-token learning (held-out probe)",
                ["stage", "steps", "probes", "peak (95% CI)", "final", "regression", f"last {rep['last_n']} probes",
                 "top-5 peak/final", "probe F1 max"], st_rows))
    ev = rep.get("eval")
    if ev:
        rows = []
        for path, m in ev["paths"].items():
            rows.append([path + ("" if path == "latent" else " (control)" if path in CONTROLS
                                 else " (teacher)" if path == "text" else ""),
                         _num(m.get("f1")), _num(m.get("em")), _pct(m.get("first_top1")), _pct(m.get("first_top5")),
                         _num(m.get("nll_per_token"), ".2f"), _pct(m.get("top_prediction_share")),
                         _pct(m.get("repetition_rate")), _pct(m.get("empty_rate"))])
        out.append(("Eval (per path)", ["path", "F1", "EM", "first@1", "first@5", "NLL/tok", "top share",
                                        "repetition", "empty"], rows))
        bt = ev.get("breakthrough") or {}
        dist = ev.get("f1_distribution") or {}
        ex = bt.get("example")
        brows = [["latent F1 > 0 on any example", _num(bt.get("any_f1_nonzero"))],
                 ["first example with F1 > 0", "none" if bt.get("first_f1_nonzero_idx") is None else
                  f"#{bt['first_f1_nonzero_idx']} ({ex['id']}): {ex['prediction']!r} vs {ex['references']} "
                  f"F1 {ex['f1']:.3f}" if ex else f"#{bt.get('first_f1_nonzero_idx')}"],
                 ["examples with F1 > 0", f"{bt.get('n_f1_nonzero', '—')} / {bt.get('n', '—')}"],
                 ["F1 distribution", ", ".join(f"{k}: {v}" for k, v in dist.items()) or "—"]]
        beats = ev.get("latent_beats_controls") or {}
        if beats:
            brows.append(["latent beats controls", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in beats.items())])
        out.append(("F1 breakthrough (latent path only)", ["", ""], brows))
        col = ev.get("collapse") or {}
        if col:
            top = f" ({col['top_prediction']!r} x{col['top_prediction_count']})" if "top_prediction" in col else ""
            reps = f"{col.get('repetition_count', '—')} ({_pct(col.get('repetition_rate'))})"
            crow = [["top prediction share", f"{_pct(col.get('top_prediction_share'))}{top}"],
                    ["repetitive (\"thethethe\")", reps],
                    ["empty", f"{col.get('empty_count', '—')} ({_pct(col.get('empty_rate'))})"],
                    ["distinct first tokens", _num(col.get("distinct_first_tokens"), "d")]]
            if col.get("error_modes"):
                crow.append(["error modes", ", ".join(f"{k}: {v}" for k, v in col["error_modes"].items())])
            out.append(("Mode collapse (latent path)", ["", ""], crow))
    grows = []
    for label, g in rep["gradients"]["stages"].items():
        for group, f in g["groups"].items():
            grows.append([label, group, _num(f["max"], ".3g"), str(f["max_step"]), _num(f["p50"], ".3g"),
                          _num(f["p90"], ".3g"), _num(f["p99"], ".3g")])
        if g["nan_steps"]:
            grows.append([label, "NaN at steps", ", ".join(map(str, g["nan_steps"][:10])), "", "", "", ""])
    if grows:
        out.append(("Gradient health (pre-clip norms)", ["stage", "group", "max", "at step", "p50", "p90", "p99"],
                    grows))
    rd = rep["readiness"]
    rrows = [[r["name"], "PASS" if r["passed"] else "—" if r["passed"] is None else "FAIL",
              _num(r["observed"], ".4g"), f"{r.get('op') or ''} {_num(r['threshold'], '.4g')}".strip(),
              str(r.get("source") or "") + (f" — {r['detail']}" if r.get("detail") and not r["passed"] else "")]
             for r in rd["rows"]]
    out.append((f"Readiness checklist ({rd['source']})", ["criterion", "result", "observed", "threshold", "source"],
                rrows))
    return out


def to_markdown(rep: dict) -> str:
    run = rep["run"]
    lines = [f"# latentgate breakthrough report: {run['name'] or run['run_id']}", ""]
    lines.append(f"run `{run['run_id']}` · phase {run['phase'] or '—'} · status {run['status']} · preset "
                 f"{run['preset'] or '—'} · commit {run['git_commit'][:10] or '—'}"
                 if run["run_id"] else f"source `{run['source']}`")
    lines.append("")
    for title, header, rows in sections(rep):
        lines += [f"## {title}", ""]
        if any(header):
            lines.append("| " + " | ".join(header) + " |")
        else:
            lines.append("| | |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
        lines.append("")
    rd = rep["readiness"]
    if rd.get("note"):
        lines += [f"_{rd['note']}_", ""]
    if rd.get("missing"):
        lines += [f"Missing evidence: {', '.join(rd['missing'])}", ""]
    lines += [f"Thresholds from: {rd['thresholds_source']}", ""]
    rec = rep.get("recommendation")
    lines.append("## Recommendation")
    lines.append("")
    if rec:
        lines += [f"**{rec['verdict']}**: {rec['reason']}.", "", f"Next: {rec['next_step']}."]
    else:
        lines.append("No recommendation: it needs a stage with probes and an eval run (latent path).")
    return "\n".join(lines) + "\n"


def print_rich(rep: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    run = rep["run"]
    console.print(f"[bold]latentgate report[/bold] {run['name'] or ''} {run['run_id'] or run['source']} "
                  f"({run['status']})")
    for title, header, rows in sections(rep):
        table = Table(title=title, title_justify="left", show_header=any(header))
        for h in header:
            table.add_column(h)
        for r in rows:
            styled = list(r)
            if title.startswith("Readiness") and r[1] in ("PASS", "FAIL"):
                styled[1] = f"[green]{r[1]}[/green]" if r[1] == "PASS" else f"[red]{r[1]}[/red]"
            table.add_row(*[str(c) for c in styled])
        console.print(table)
    rd = rep["readiness"]
    if rd.get("note"):
        console.print(f"[dim]{rd['note']}[/dim]")
    rec = rep.get("recommendation")
    if rec:
        colour = {"hero-ready": "green", "phase3": "yellow", "phase2": "red"}[rec["verdict"]]
        console.print(f"Recommendation: [bold {colour}]{rec['verdict']}[/bold {colour}] — {rec['reason']}")
        console.print(f"Next: {rec['next_step']}")
    else:
        console.print("No recommendation (needs a stage with probes and an eval run).")


# ------------------------------------------------------------------------------------------------------------
# The command's work
# ------------------------------------------------------------------------------------------------------------


def analyze(target: str, out_dir: Path, log: bool = True, last_n: int = 3, checklist_path=None,
            plots: bool = True) -> tuple[dict, list[Path]]:
    """Build the report for a run id (or a local diagnostics.jsonl), write report.md/json and the plots into
    out_dir, and (for a run) log them to the run under `analysis/`. Returns (report, files)."""
    from latentgate.analysis import history

    if last_n < 1:
        raise ConfigError(f"--last-n must be >= 1, got {last_n}", "pass --last-n 3 (the default)")
    if target.endswith(".jsonl") or Path(target).is_file():
        bundle = history.bundle_from_diagnostics(Path(target))
        log = False
    else:
        bundle = history.load_bundle(target)
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
        from latentgate.analysis.plots import bundle_plots

        pngs = bundle_plots(bundle, out_dir / "plots", threshold=rep["readiness"]["thresholds"]["first_token_learning"],
                            grad_limit=rep["readiness"]["thresholds"]["gradient_health"])
    if log and bundle.run_id:
        cl = history.client()
        for f in files:
            cl.log_artifact(bundle.run_id, str(f), "analysis")
        for p in pngs:
            cl.log_artifact(bundle.run_id, str(p), "analysis/plots")
    return rep, files + pngs
