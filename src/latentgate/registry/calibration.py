"""What the latest calibration says about a candidate: printed by `latentgate promote` and `latentgate analyze`,
and recorded by `promote` on the model version (tag `hero.calibration`).

The latest FINISHED `calibrate <set>` run (any experiment) carries the figures in its tag
latentgate.calibrate.summary: the fitted line smoke F1 -> hero F1 with what its prediction interval needs, and the
confusion matrix of verdict against hero outcome. Nothing here can fail a promotion: a store without a calibration
gives a one-line hint, and an unreadable one a one-line note.
"""

from __future__ import annotations

import json
import math

from latentgate.schema import CalibrateTag, Calibration, EvalKey, EvalPath, Tag, VersionTag
from latentgate.tracking.lineage import client

PHASE = "calibrate"  # the latentgate.phase tag of a calibration run (calibrate/runner.py writes it)


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))  # an F1 lives in [0, 1]; a straight line does not know it


def predict(fit: dict, x: float) -> tuple[float, float, float]:
    """(prediction, low, high): the 95% prediction interval of one new y at x, clipped to [0, 1]."""
    y = fit["intercept"] + fit["slope"] * x
    half = fit["t"] * fit["s"] * math.sqrt(1 + 1 / fit["n"] + (x - fit["x_mean"]) ** 2 / fit["sxx"])
    return _clip(y), _clip(y - half), _clip(y + half)


def outside_range(fit: dict, x: float) -> bool:
    """Whether x lies outside the smoke F1s the line was fitted on (an extrapolation the line cannot vouch for)."""
    return "x_min" in fit and not fit["x_min"] <= x <= fit["x_max"]


def assess(summary: dict, smoke_f1: float | None, passed: bool | None) -> dict:
    """Pure: the predicted hero F1 with its 95% interval (when a line was fitted and the F1 is known), and how often
    the candidate's verdict was right in the calibration."""
    c, fit = summary["confusion"], summary.get("fit")
    out = {"calibration_run": summary["run_id"], "set": summary["set"], "n": summary["n"],
           Calibration.HERO_F1_TARGET: summary[Calibration.HERO_F1_TARGET], Calibration.SMOKE_F1: smoke_f1,
           "passed": passed,
           "promote_success": [c["tp"], c["tp"] + c["fp"]], "refuse_failure": [c["tn"], c["tn"] + c["fn"]]}
    if fit and smoke_f1 is not None and outside_range(fit, smoke_f1):
        out.update(outside=[fit["x_min"], fit["x_max"]])
    elif fit and smoke_f1 is not None:
        y, lo, hi = predict(fit, smoke_f1)
        out.update(predicted_hero_f1=y, interval=[lo, hi])
    return out


def _share(pair: list[int]) -> str:
    k, n = pair
    return f"{k} of {n} ({k / n:.0%})" if n else "0 of 0"


def format_assessment(a: dict) -> str:
    head = (f"calibration (run {a['calibration_run'][:8]}, set {a['set']}, {a['n']} configurations, hero target F1 "
            f"{a[Calibration.HERO_F1_TARGET]:g}):")
    parts = []
    if "outside" in a:
        lo, hi = a["outside"]
        parts.append(f"smoke-scale latent F1 {a[Calibration.SMOKE_F1]:.3f} is outside the fitted range [{lo:.3f}, "
                     f"{hi:.3f}]: no predicted hero F1")
    elif "predicted_hero_f1" in a:
        lo, hi = a["interval"]
        parts.append(f"smoke-scale latent F1 {a[Calibration.SMOKE_F1]:.3f} predicts hero F1 "
                     f"{a['predicted_hero_f1']:.3f} [{lo:.3f}, {hi:.3f}] (95% prediction interval)")
    elif a[Calibration.SMOKE_F1] is None:
        parts.append("no latent F1 for this candidate, so no predicted hero F1")
    else:
        parts.append("no fitted line in that calibration, so no predicted hero F1")
    promote = f"a PASS led to a successful hero in {_share(a['promote_success'])}"
    refuse = f"a REFUSE was followed by a failed hero in {_share(a['refuse_failure'])}"
    parts += [promote] if a["passed"] else [refuse] if a["passed"] is False else [promote, refuse]
    return f"{head} {'; '.join(parts)}"


def latest_summary(client) -> dict | None:
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return None
    runs = client.search_runs(exps, max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{Tag.PHASE}` = '{PHASE}' and attributes.status = 'FINISHED'")
    if not runs or CalibrateTag.SUMMARY not in runs[0].data.tags:
        return None
    return json.loads(runs[0].data.tags[CalibrateTag.SUMMARY])


def calibration_note(eval_run: str | None, passed: bool | None, version: str | None = None,
                     name: str | None = None) -> str:
    """One line for `promote` / `analyze` about the candidate behind `eval_run`; with `version` (a promotion that
    was not a dry run), also the model-version tag hero.calibration."""
    try:
        c = client()
        summary = latest_summary(c)
        if summary is None:
            return "calibration: none recorded yet (`latentgate calibrate` measures whether the gate predicts the hero)"
        f1 = c.get_run(eval_run).data.metrics.get(EvalKey.metric(EvalPath.LATENT, EvalKey.F1)) if eval_run else None
        a = assess(summary, f1, passed)
        if version and name:
            c.set_model_version_tag(name, version, VersionTag.CALIBRATION, json.dumps(a, sort_keys=True))
        return format_assessment(a)
    except Exception as err:  # noqa: BLE001 - the calibration informs a promotion, it never fails one
        first = (str(err).splitlines() or [""])[0][:160]
        return f"calibration: unavailable ({type(err).__name__}: {first})"
