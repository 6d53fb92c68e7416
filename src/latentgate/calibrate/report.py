"""What a calibration prints (and writes as its parent run's description): the per-configuration table, the
confusion matrix and rates, the cost, the fitted line, the threshold proposal, the held-out verdicts and the gate
shapes side by side. Text only, from calibrate/records.py and calibrate/figures.py types."""

from __future__ import annotations

from latentgate.calibrate.figures import Shape, TargetReport
from latentgate.calibrate.records import CalibrationResult


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _ratio(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _word(verdict: bool | None) -> str:
    return "n/a" if verdict is None else "PROMOTE" if verdict else "REFUSE"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_heldout(h: TargetReport) -> str:
    c, (lo, hi) = h.confusion, h.agreement_wilson
    return (f"  hero F1 >= {h.target:g}: agreement {_pct(h.agreement)} ({c.tp + c.tn} of {h.n}, 95% "
            f"Wilson [{lo:.0%}, {hi:.0%}]); precision of promote {_pct(h.precision_promote)} (of "
            f"{h.n_promote}); hero failures refused {_pct(h.failures_refused)} (of {h.n_failures}); "
            f"promote+success {c.tp}, promote+failure {c.fp}, refuse+success {c.fn}, refuse+failure {c.tn}")


def format_summary(r: CalibrationResult) -> str:
    stats = r.stats
    c, rates, fit, prop = stats.confusion, stats.rates, stats.fit, stats.proposal
    lines = [f"── latentgate calibrate {r.set.name}: {rates.n} configurations, hero target F1 >= "
             f"{stats.hero_f1_target:g}, hero scale x{r.set.hero_scale} ──",
             f"{'configuration':20s} {'split':8s} {'verdict':8s} {'held out':8s} {'smoke F1':>8s} {'hero F1':>8s}  "
             "outcome   reused",
             *[f"{x.name:20s} {x.split:8s} {_word(x.verdict):8s} {_word(x.heldout_verdict):8s} "
               f"{_f(x.smoke_f1):>8s} {_f(x.hero_f1):>8s}  {'success' if x.outcome else 'failure':9s} "
               f"{','.join(x.reused()) or '-'}" for x in r.configurations],
             f"confusion (verdict vs hero): promote+success {c.tp}, promote+failure {c.fp}, "
             f"refuse+success {c.fn}, refuse+failure {c.tn}",
             f"agreement {_pct(rates.agreement)}; precision of promote {_pct(rates.precision_promote)} "
             f"(of {rates.n_promote}), of refuse {_pct(rates.precision_refuse)} (of {rates.n_refuse})",
             f"cost of the gate over the hero: {_ratio(stats.flops.ratio)} of the FLOPs, "
             f"{_ratio(stats.wall_seconds.ratio)} of the wall time",
             *[f"  {role} wall time by phase: " + ", ".join(f"{p} {sec:.0f} s" for p, sec in phases.items())
               for role, phases in stats.phase_seconds.items()]]
    if fit:
        line = fit.line
        lines.append(f"hero F1 = {line.intercept:.3f} + {line.slope:.3f} x smoke F1 (n {line.n}, residual sd "
                     f"{line.s:.3f}, 95% prediction interval +-{line.t:.2f} x sd x sqrt(1 + 1/n + ...))")
    else:
        lines.append(f"no line fitted: {stats.fit_points} configuration(s) with both F1s, and a line needs 3 with "
                     "different smoke F1s")
    if prop.changes:
        changes = ", ".join(f"{n} {old:g} -> {new:g}" for n, (old, new) in prop.changes.items())
        lines.append(f"proposed thresholds (fitted on {prop.fit.n}): {changes}; agreement on the "
                     f"{prop.holdout.n} held out: {_pct(prop.holdout.before)} -> {_pct(prop.holdout.after)} "
                     f"(fit split {_pct(prop.fit.before)} -> {_pct(prop.fit.after)})")
    else:
        lines.append(f"no threshold change proposed: the current ones agree best on the {prop.fit.n} fitted "
                     f"configurations ({_pct(prop.fit.before)}; held out {_pct(prop.holdout.before)})")
    lines.append(f"held-out verdicts (leave-one-out: thresholds refitted on the other {rates.n - 1} configurations, "
                 "the left-out one judged with them):")
    lines += [format_heldout(h) for h in stats.heldout]
    if stats.shapes:
        lines += format_shapes(stats.shapes)
    lines.append(f"run id {r.run_id} (calibration.json, calibration.png)")
    return "\n".join(lines)


def format_shapes(shapes: tuple[Shape, ...] | list[Shape]) -> list[str]:
    """Gate shapes side by side: held-out agreement (and the failed heroes refused) at each hero target."""
    targets = [rep.target for rep in shapes[0].reports]
    width = max(len(x.shape) for x in shapes)
    head = f"{'gate shape (held out, but as written)':{width}s}" + "".join(
        f"  {'F1 >= ' + format(t, 'g'):>26s}" for t in targets)
    lines = ["gate shapes on the same runs: agreement [Wilson 95%], failed heroes refused", head]
    for x in shapes:
        cells = []
        for rep in x.reports:
            lo, hi = rep.agreement_wilson
            cells.append(f"{_pct(rep.agreement):>4s} [{lo:.0%},{hi:.0%}] ref {_pct(rep.failures_refused):>4s}")
        lines.append(f"{x.shape:{width}s}" + "".join(f"  {c:>26s}" for c in cells))
    return lines
