"""The statistics of a calibration, pure (no store access, no torch, no scipy): verdict-vs-outcome confusion matrix,
agreement and precisions, a least-squares line with its prediction interval, a threshold proposal, and the
held-out judgement of that proposal (leave-one-out verdicts at several hero targets, agreement with its Wilson
interval).

A verdict is True for "promote" (every checklist criterion passed), False for "refuse". An outcome is True when the
hero-scale run reached the target F1. Records are calibrate/records.py `ConfigurationRecord`s (rows: `GateRow`s);
the figures are calibrate/figures.py types.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from latentgate.calibrate.figures import (
    CalibrationStats,
    Cost,
    FittedLine,
    Proposal,
    Rates,
    Shape,
    SplitAgreement,
    TargetReport,
)
from latentgate.calibrate.records import ConfigurationRecord, GateRow
from latentgate.eval.scoring import wilson_interval
from latentgate.registry.calibration import Confusion, LineFit
from latentgate.registry.checklist import (
    BREAKTHROUGH,
    COLLAPSE,
    GRADIENTS,
    LEARNING,
    OPS,
    PROVENANCE_KINDS,
    QUALITY,
    STABILITY,
    Checklist,
)

if TYPE_CHECKING:  # the annotation only: no store access here (registry.gate reads one)
    from latentgate.registry.gate_report import CheckRow

Records = Sequence[ConfigurationRecord]

# Two-sided 95% Student t quantiles (t_{0.975, df}); beyond df 30, linear in 1/df towards the normal's 1.960.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045,
        30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
Z975 = 1.960


def t975(df: int) -> float:
    """t_{0.975, df}: the half-width factor of a two-sided 95% interval."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df in T975:
        return T975[df]
    knots = sorted(T975) + [math.inf]
    for lo, hi in zip(knots, knots[1:]):
        if lo < df < hi:
            t_lo, t_hi = T975[lo], T975.get(hi, Z975)
            w = (1 / lo - 1 / df) / (1 / lo - (0 if hi == math.inf else 1 / hi))
            return t_lo + w * (t_hi - t_lo)
    return Z975


def confusion(pairs: Iterable[tuple[bool, bool]]) -> Confusion:
    """(verdict, outcome) pairs -> tp: promote & success, fp: promote & failure, fn: refuse & success,
    tn: refuse & failure."""
    pairs = [(bool(v), bool(o)) for v, o in pairs]
    return Confusion(tp=sum(v and o for v, o in pairs), fp=sum(v and not o for v, o in pairs),
                     fn=sum(not v and o for v, o in pairs), tn=sum(not v and not o for v, o in pairs))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def rates(c: Confusion) -> Rates:
    """Agreement, precision of promote and of refuse (figures.Rates), with their counts."""
    n = c.tp + c.fp + c.fn + c.tn
    return Rates(n=n, agreement=_ratio(c.tp + c.tn, n), precision_promote=_ratio(c.tp, c.tp + c.fp),
                 precision_refuse=_ratio(c.tn, c.tn + c.fn), n_promote=c.tp + c.fp, n_refuse=c.tn + c.fn)


def fit_line(xs: list[float], ys: list[float]) -> FittedLine | None:
    """Ordinary least squares y = intercept + slope x with what a 95% prediction interval needs; None with fewer
    than 3 points or when every x is the same (no line, or no residual degrees of freedom)."""
    n = len(xs)
    if n != len(ys) or n < 3:
        return None
    x_mean, y_mean = sum(xs) / n, sum(ys) / n
    sxx = sum((x - x_mean) ** 2 for x in xs)
    if sxx <= 1e-12:  # every x the same (up to rounding): F1s live in [0, 1]
        return None
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sxx
    intercept = y_mean - slope * x_mean
    sse = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    s = math.sqrt(sse / (n - 2))
    ss_tot = sum((y - y_mean) ** 2 for y in ys)
    line = LineFit(slope=slope, intercept=intercept, s=s, n=n, x_mean=x_mean, sxx=sxx, t=t975(n - 2),
                   x_min=min(xs), x_max=max(xs))
    return FittedLine(line, r2=(1 - sse / ss_tot) if ss_tot > 0 else None)


# ---- re-judging with other thresholds, and the proposal -----------------------------------------------------------

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def other_failures(row: CheckRow, checklist: Checklist) -> list[str]:
    """Why a gate report row fails besides its observed value against its threshold: what no threshold change
    can fix. An eval_collapse row keeps each collapse limit it failed (one answer, top-k answers, empty answers);
    any other row that failed although its value passed its threshold keeps that (e.g. a digest tag that does not
    match the scored rows)."""
    if row.missing:
        return []
    if row.kind == "eval_collapse" and row.collapse:
        collapse = row.collapse
        why = checklist.collapse_rule(row.name).why(collapse["top_prediction_share"], None, collapse["top_prediction"],
                                                    collapse["top_k_share"], collapse["empty_share"])
        return [why] if why else []
    if not row.passed:
        try:
            passes_threshold = checklist.criterion(row.name).compare(row.observed, row.threshold)
        except (TypeError, ValueError):
            return []
        if passes_threshold:
            return [row.detail or "failed besides its threshold"]
    return []


def row_passes(row: GateRow, threshold) -> bool:
    """Would this checklist row (a gate report row) pass at `threshold`? Missing evidence never passes, and a row
    that failed for a reason besides its threshold keeps failing: its `failure` (every such reason, e.g. one answer
    covering the eval set besides too many repetitive ones) is kept whatever the threshold. Rows recorded without
    `failure` fall back to: failed although the observed value passed its own threshold."""
    if row.missing or row.failure:
        return False
    obs, op = row.observed, row.op
    if not (_number(obs) and _number(threshold) and _number(row.threshold) and op in OPS):
        return bool(row.passed)
    failed_otherwise = not row.passed and OPS[op](obs, row.threshold)
    return not failed_otherwise and bool(OPS[op](obs, threshold))


def deciding(rows: Iterable[GateRow]) -> list[GateRow]:
    """The rows the verdict reads (`decides`)."""
    return [r for r in rows if r.decides]


def verdict_with(rows: Sequence[GateRow] | None, thresholds: dict[str, float]) -> bool:
    """The checklist's verdict with some thresholds replaced; rows None (the gate's chain failed) refuses. Only
    deciding rows count, as in registry/gate.check_candidate."""
    if not rows:
        return False
    return all(row_passes(r, thresholds.get(r.name, r.threshold)) for r in deciding(rows))


def _agreement(records: Records, thresholds: dict[str, float]) -> float | None:
    pairs = [(verdict_with(r.rows, thresholds), r.outcome) for r in records]
    return rates(confusion(pairs)).agreement


def tunable(records: Records) -> list[str]:
    """Deciding criteria with an inequality and a numeric threshold. Pins such as lineage == 0 and the provenance
    criteria (eval set size, lineage, digest) are not tuned."""
    names: list[str] = []
    for rec in records:
        for r in deciding(rec.rows or ()):
            if r.kind in PROVENANCE_KINDS:  # where the evidence comes from: a pin, never fitted to outcomes
                continue
            if r.op != "==" and _number(r.threshold) and r.name not in names:
                names.append(r.name)
    return names


def current_thresholds(records: Records) -> dict:
    current = {}
    for rec in records:
        for r in rec.rows or ():
            current.setdefault(r.name, r.threshold)
    return current


def _held_out_threshold(fit: Records, chosen: dict, name: str, observed: list[float], now: float) -> float:
    """The best-agreeing threshold for `name` that no threshold under test picked: among equally good candidates,
    the one farthest from every observed value (the middle of the widest gap), then the more lenient one (without
    evidence either way the gate does not refuse). Candidates: the observed values, the midpoints between them and
    one half-range beyond each end (pass all, fail all), so a fit on a few records may keep each on its side."""
    if not observed:
        return now
    spread = (observed[-1] - observed[0]) / 2 if len(observed) > 1 else max(abs(observed[0]), 1.0)
    candidates = {*observed, *((a + b) / 2 for a, b in zip(observed, observed[1:])),
                  observed[0] - spread, observed[-1] + spread}
    op = next(r.op for rec in fit for r in rec.rows or () if r.name == name)
    lenient = -1.0 if op in (">=", ">") else 1.0
    scored = [(_agreement(fit, {**chosen, name: c}) or 0.0, min(abs(c - o) for o in observed), lenient * c, c)
              for c in candidates]
    return max(scored)[3]


def fit_thresholds(fit: Records, current: dict, passes: int = 2, held_out: bool = False) -> dict[str, float]:
    """The thresholds that agree best with the outcomes of `fit` (coordinate ascent on agreement): only those that
    change, {name: new value}. Among equally good values a proposal keeps the current one, else the nearest to it.
    `held_out`: the current thresholds may have been fitted on the very record left out, so they must not tip a tie
    (`_held_out_threshold`)."""
    chosen: dict[str, float] = {}
    for _ in range(passes):
        for name in tunable(fit):
            observed = sorted({r.observed for rec in fit for r in rec.rows or ()
                               if r.name == name and _number(r.observed)})
            now = chosen.get(name, current[name])
            if held_out:
                chosen[name] = _held_out_threshold(fit, chosen, name, observed, now)
                continue
            candidates = {now, *observed, *((a + b) / 2 for a, b in zip(observed, observed[1:]))}
            scored = [(_agreement(fit, {**chosen, name: c}) or 0.0, -abs(c - current[name]), c == now, c)
                      for c in candidates]
            chosen[name] = max(scored, key=lambda x: (x[0], x[2], x[1]))[3]
    return {n: v for n, v in chosen.items() if v != current[n]}


def propose_thresholds(records: Records, passes: int = 2) -> Proposal:
    """New thresholds fitted on the records of split "fit", judged before and after on split "holdout" (each record
    read for its split, rows and outcome)."""
    fit = [r for r in records if r.split == "fit"]
    held = [r for r in records if r.split == "holdout"]
    current = current_thresholds(records)
    after = fit_thresholds(fit, current, passes)
    return Proposal(changes={n: (current[n], v) for n, v in after.items()},
                    fit=SplitAgreement(len(fit), _agreement(fit, {}), _agreement(fit, after)),
                    holdout=SplitAgreement(len(held), _agreement(held, {}), _agreement(held, after)))


# ---- held-out judgement: leave one out, at several hero targets --------------------------------------------------

def outcome_at(hero_f1: float | None, hero_finished: bool, target: float) -> bool:
    """Did a configuration's hero succeed at `target`: it finished and its latent F1 reached the target."""
    return bool(hero_finished) and hero_f1 is not None and hero_f1 >= target


def _judged_at(records: Records, target: float) -> list[ConfigurationRecord]:
    """The records with their outcome at another hero target."""
    return [replace(r, outcome=outcome_at(r.hero_f1, r.hero_finished, target)) for r in records]


def hero_targets(target: float) -> list[float]:
    """The checklist's target and two higher ones, 0.1 and 0.3 above it: at the plan's 0.10 these are the edges of
    its hero bands (0.10-0.20, 0.20-0.40, 0.40+). A gate tuned to one line shows here."""
    return [target, round(target + 0.1, 6), round(target + 0.3, 6)]


def leave_one_out(records: Records, passes: int = 2) -> list[bool]:
    """Each record's held-out verdict: the thresholds fitted on every other record (all of them, whatever their
    split; ties broken without the current thresholds, which may come from a fit that saw this record), then the
    left-out record judged with them (each record read for its rows and outcome)."""
    current = current_thresholds(records)
    out = []
    for i, rec in enumerate(records):
        others = [*records[:i], *records[i + 1:]]
        out.append(verdict_with(rec.rows, fit_thresholds(others, current, passes, held_out=True) if others else {}))
    return out


def heldout_report(records: Records, target: float) -> TargetReport:
    """Leave-one-out verdicts against the outcomes at `target`: the confusion matrix, agreement with its Wilson 95%
    interval, the precision of promote and the share of failed heroes the gate refused (each with its counts)."""
    judged = _judged_at(records, target)
    return _report(target, leave_one_out(judged), [j.outcome for j in judged])


def phase_seconds(records: Records) -> dict[str, dict[str, float]]:
    """Wall seconds per role (gate, hero) and phase (base, stage_a, stage_b, eval, between), summed over every
    chain, as its runs recorded them (a reused chain, when it was trained): where the gate's time goes."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        for role, chain in r.chains().items():
            if not chain.phase_seconds:
                continue
            into = out.setdefault(role, {})
            for phase, sec in chain.phase_seconds.items():
                into[phase] = into.get(phase, 0.0) + sec
    return out


# ---- gate shapes measured against each other --------------------------------------------------------------------

PLAN_SIX = (LEARNING, STABILITY, BREAKTHROUGH, QUALITY, GRADIENTS, COLLAPSE)  # the seed plan's acceptance criteria


def deciding_only(records: Records, names) -> list[ConfigurationRecord]:
    """The records with only `names` deciding (every other row shown only): another gate shape, same evidence."""
    keep = set(names)
    return [replace(r, rows=None if r.rows is None else tuple(replace(row, decides=row.name in keep)
                                                               for row in r.rows)) for r in records]


def as_written_report(records: Records, target: float) -> TargetReport:
    """The checklist's verdicts as recorded (its deciding criteria at its own thresholds, nothing refitted) against
    the outcomes at `target`. In-sample when the thresholds were fitted on these runs: the held-out figures are the
    leave-one-out ones."""
    judged = _judged_at(records, target)
    return _report(target, [verdict_with(r.rows, {}) for r in judged], [r.outcome for r in judged])


def _report(target: float, verdicts: list[bool], outcomes: list[bool]) -> TargetReport:
    c = confusion(zip(verdicts, outcomes))
    r = rates(c)
    lo, hi = wilson_interval(c.tp + c.tn, r.n)
    return TargetReport(target=target, confusion=c, verdicts=tuple(verdicts), outcomes=tuple(outcomes), n=r.n,
                        agreement=r.agreement, agreement_wilson=(lo, hi), precision_promote=r.precision_promote,
                        n_promote=r.n_promote, failures_refused=_ratio(c.tn, c.tn + c.fp), n_failures=c.tn + c.fp)


def compare_shapes(records: Records, targets: list[float]) -> list[Shape]:
    """Figures of several gate shapes on the same records, at each target: the checklist as written (its verdicts as
    recorded, nothing refitted), then held out (leave-one-out refits of the deciding thresholds) the checklist's
    deciding set, the plan's six, and each tunable criterion alone. What `decides` in hero.yaml is chosen by."""
    names = list(dict.fromkeys(row.name for r in records for row in r.rows or ()))
    chosen = list(dict.fromkeys(row.name for r in records for row in deciding(r.rows or ())))
    shapes = [("the checklist as written", None), (f"deciding: {', '.join(chosen)}", chosen),
              ("the plan's six", [n for n in PLAN_SIX if n in names])]
    alone = [n for n in names if n in tunable(deciding_only(records, [n]))]
    shapes += [(f"{n} alone", [n]) for n in alone]
    out = []
    for label, deciders in shapes:
        shaped = None if deciders is None else deciding_only(records, deciders)
        per = [as_written_report(records, t) if shaped is None else heldout_report(shaped, t) for t in targets]
        out.append(Shape(label, None if deciders is None else tuple(deciders), tuple(per)))
    return out


def summarize(records: Records, target: float) -> CalibrationStats:
    """Everything the calibration run reports, from its per-configuration records. `heldout`: one `heldout_report`
    per hero target, the checklist's first."""
    c = confusion((r.verdict, r.outcome) for r in records)
    scatter = [r for r in records if r.smoke_f1 is not None and r.hero_f1 is not None]
    return CalibrationStats(
        hero_f1_target=target, confusion=c, rates=rates(c),
        flops=Cost(sum(r.flops.gate for r in records), sum(r.flops.hero for r in records)),
        wall_seconds=Cost(sum(r.gate.wall_seconds for r in records), sum(r.hero.wall_seconds for r in records)),
        phase_seconds=phase_seconds(records),
        fit=fit_line([r.smoke_f1 for r in scatter], [r.hero_f1 for r in scatter]), fit_points=len(scatter),
        proposal=propose_thresholds(records), heldout=tuple(heldout_report(records, t) for t in hero_targets(target)),
        shapes=tuple(compare_shapes(records, hero_targets(target))))
