"""What a calibration says about a candidate: printed by `latentgate promote` and `latentgate analyze`, and recorded
by `promote` on the model version (tag `hero.calibration`).

A FINISHED `calibrate <set>` run carries its figures in the tag latentgate.calibrate.summary (`CalibrationSummary`):
the fitted line smoke F1 -> hero F1 with what its prediction interval needs and the x-range it was fitted on, the
confusion matrix of verdict against hero outcome (in sample, and of the leave-one-out held-out verdicts), and the
family it measured: for each configuration the base LM, the data config and the gate budget, plus the hero scale.

Only a calibration of the candidate's family applies: the newest one that calibrated a configuration with the
candidate's base LM, data config and gate steps, at the hero scale of the checklist in force. A prediction is
clipped to [0, 1], and a smoke F1 outside the fitted range gets no prediction. Nothing here can fail a promotion:
a store without a (matching) calibration gives a one-line hint, and an unreadable one a one-line note.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from mlflow.exceptions import MlflowException

from latentgate.config import Config, config_hash, from_flat
from latentgate.registry.candidate import CandidateEvidence, Missing
from latentgate.registry.checklist import load_checklist
from latentgate.schema import CalibrateTag, Calibration, EvalKey, EvalPath, Tag, VersionTag
from latentgate.tracking.lineage import base_hash, client

PHASE = "calibrate"  # the latentgate.phase tag of a calibration run (calibrate/runner.py writes it)
SEARCHED = 100  # calibration runs looked at, newest first, for one of the candidate's family


# ---- the family a calibration measured -------------------------------------------------------------------------------

def base_identity(cfg: Config) -> str:
    """The base LM a run trains against: the builtin LM by its base run's config hash (its weights follow from its
    base and data config), an external one by name and revision."""
    if cfg.base.name == "builtin":
        return f"builtin:{base_hash(cfg)}"
    return f"{cfg.base.name}@{cfg.base.revision or 'unpinned'}"


def data_identity(cfg: Config) -> str:
    """The data config, hashed as the checklist's eval-set pins are keyed."""
    return config_hash(cfg, ("data",))


@dataclass(frozen=True)
class Family:
    """What a gate run shares with the calibrated ones when the calibration's figures apply to it."""

    base: str  # base_identity
    data: str  # data_identity
    gate_steps: tuple[int, int]  # stage_a.steps, stage_b.steps of the gate (smoke-scale) run

    @classmethod
    def of(cls, cfg: Config) -> Family:
        return cls(base_identity(cfg), data_identity(cfg), (cfg.stage_a.steps, cfg.stage_b.steps))

    @classmethod
    def from_dict(cls, d: dict) -> Family:
        return cls(str(d["base"]), str(d["data"]), (int(d["gate_steps"][0]), int(d["gate_steps"][1])))

    def to_dict(self) -> dict:
        return {"base": self.base, "data": self.data, "gate_steps": list(self.gate_steps)}

    def steps_text(self) -> str:
        return f"{self.gate_steps[0]} + {self.gate_steps[1]} steps"


# ---- the recorded figures --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LineFit:
    """hero F1 = intercept + slope x smoke F1, least squares, with what a 95% prediction interval needs and the
    range of smoke F1s it was fitted on (calibrate/stats.py fit_line)."""

    slope: float
    intercept: float
    s: float  # residual standard deviation
    n: int
    x_mean: float
    sxx: float
    t: float  # t_{0.975, n-2}
    x_min: float | None = None  # None: recorded before the range was (treated as covering nothing)
    x_max: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> LineFit:
        return cls(float(d["slope"]), float(d["intercept"]), float(d["s"]), int(d["n"]), float(d["x_mean"]),
                   float(d["sxx"]), float(d["t"]), _opt_float(d.get("x_min")), _opt_float(d.get("x_max")))

    def to_dict(self) -> dict:
        return asdict(self)

    def covers(self, x: float) -> bool:
        return self.x_min is not None and self.x_max is not None and self.x_min <= x <= self.x_max

    def range_text(self) -> str:
        return "unknown" if self.x_min is None or self.x_max is None else f"[{self.x_min:.3f}, {self.x_max:.3f}]"


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


def predict(fit: LineFit, x: float) -> tuple[float, float, float]:
    """(prediction, low, high): the 95% prediction interval of one new y at x, as the line gives it (unclipped; see
    `clip01` for what is printed)."""
    y = fit.intercept + fit.slope * x
    half = fit.t * fit.s * math.sqrt(1 + 1 / fit.n + (x - fit.x_mean) ** 2 / fit.sxx)
    return y, y - half, y + half


def clip01(v: float) -> float:
    """An F1 lives in [0, 1]: so does its prediction."""
    return min(1.0, max(0.0, v))


@dataclass(frozen=True)
class Confusion:
    """Verdict against hero outcome: tp promote+success, fp promote+failure, fn refuse+success, tn refuse+failure."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Confusion:
        return cls(int(d["tp"]), int(d["fp"]), int(d["fn"]), int(d["tn"]))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def promote_success(self) -> tuple[int, int]:
        """(PASS verdicts followed by a successful hero, PASS verdicts)."""
        return self.tp, self.tp + self.fp

    @property
    def refuse_failure(self) -> tuple[int, int]:
        """(REFUSE verdicts followed by a failed hero, REFUSE verdicts)."""
        return self.tn, self.tn + self.fn


@dataclass(frozen=True)
class CalibrationSummary:
    """The tag latentgate.calibrate.summary of a calibration run: what `promote` and `analyze` need."""

    set: str
    run_id: str
    hero_f1_target: float
    n: int
    confusion: Confusion  # the checklist's own verdicts (in sample)
    fit: LineFit | None
    heldout: Confusion | None = None  # leave-one-out verdicts (thresholds refitted without the configuration)
    hero_scale: float | None = None  # None: recorded before families were
    families: tuple[Family, ...] = field(default_factory=tuple)
    checklist_sha256: str = ""  # the checklist whose verdicts it measured ("": recorded before this was)

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationSummary:
        return cls(set=str(d["set"]), run_id=str(d["run_id"]),
                   hero_f1_target=float(d[Calibration.HERO_F1_TARGET]), n=int(d["n"]),
                   confusion=Confusion.from_dict(d["confusion"]),
                   fit=LineFit.from_dict(d["fit"]) if d.get("fit") else None,
                   heldout=Confusion.from_dict(d["heldout"]) if d.get("heldout") else None,
                   hero_scale=_opt_float(d.get("hero_scale")),
                   families=tuple(Family.from_dict(f) for f in d.get("families") or ()),
                   checklist_sha256=str(d.get("checklist_sha256") or ""))

    def to_dict(self) -> dict:
        return {"set": self.set, "run_id": self.run_id, Calibration.HERO_F1_TARGET: self.hero_f1_target,
                "n": self.n, "confusion": self.confusion.to_dict(),
                "fit": None if self.fit is None else self.fit.to_dict(),
                "heldout": None if self.heldout is None else self.heldout.to_dict(),
                "hero_scale": self.hero_scale, "families": [f.to_dict() for f in self.families],
                "checklist_sha256": self.checklist_sha256}

    def family_mismatch(self, candidate: Family, hero_scale: float) -> str | None:
        """None when this calibration measured the candidate's family; else what differs, in words."""
        if not self.families or self.hero_scale is None:
            return "it records no family (made before families were recorded; run `latentgate calibrate` again)"
        if self.hero_scale != hero_scale:
            return f"hero scale x{hero_scale:g} differs: its heroes ran at x{self.hero_scale:g}"
        why = []
        for what, mine, theirs in (("base LM", candidate.base, {f.base for f in self.families}),
                                   ("data config", candidate.data, {f.data for f in self.families}),
                                   ("gate budget", candidate.steps_text(), {f.steps_text() for f in self.families})):
            if mine not in theirs:
                why.append(f"{what} {mine} differs from the calibrated {', '.join(sorted(theirs))}")
        if why:
            return "; ".join(why)
        if candidate not in self.families:
            return "no calibrated configuration has this base LM, data config and gate budget together"
        return None


# ---- a candidate, assessed -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assessment:
    """What one calibration says about one candidate (recorded as the version tag hero.calibration)."""

    calibration_run: str
    set: str
    n: int
    hero_f1_target: float
    smoke_f1: float | None
    passed: bool | None
    promote_success: tuple[int, int]
    refuse_failure: tuple[int, int]
    heldout_promote_success: tuple[int, int] | None = None
    heldout_refuse_failure: tuple[int, int] | None = None
    fit_range: str | None = None  # the smoke F1s the line was fitted on, as text; None without a line
    outside_range: bool = False  # the candidate's smoke F1 lies outside them: no prediction
    predicted_hero_f1: float | None = None  # clipped to [0, 1]
    interval: tuple[float, float] | None = None  # the 95% prediction interval, clipped to [0, 1]
    other_checklist: str = ""  # the sha256 of the checklist it measured, when not the one in force

    def to_dict(self) -> dict:
        return asdict(self)


def assess(summary: CalibrationSummary, smoke_f1: float | None, passed: bool | None,
           checklist_sha256: str = "") -> Assessment:
    """Pure: the predicted hero F1 with its 95% interval, both clipped to [0, 1], when a line was fitted and the
    candidate's smoke F1 lies in the fitted range; and how often the candidate's verdict was right. With the sha256
    of the checklist in force, a calibration of another checklist says so (its figures describe that rule)."""
    fit = summary.fit
    held = summary.heldout
    same = not checklist_sha256 or summary.checklist_sha256 == checklist_sha256
    other = "" if same else (summary.checklist_sha256 or "unknown")
    out = Assessment(summary.run_id, summary.set, summary.n, summary.hero_f1_target, smoke_f1, passed,
                     summary.confusion.promote_success, summary.confusion.refuse_failure,
                     held.promote_success if held else None, held.refuse_failure if held else None,
                     fit.range_text() if fit else None, other_checklist=other)
    if fit is None or smoke_f1 is None:
        return out
    if not fit.covers(smoke_f1):
        return replace(out, outside_range=True)
    y, lo, hi = predict(fit, smoke_f1)
    return replace(out, predicted_hero_f1=clip01(y), interval=(clip01(lo), clip01(hi)))


def _share(pair: tuple[int, int]) -> str:
    k, n = pair
    return f"{k} of {n} ({k / n:.0%})" if n else "0 of 0"


def format_assessment(a: Assessment) -> str:
    head = (f"calibration (run {a.calibration_run[:8]}, set {a.set}, {a.n} configurations, hero target F1 "
            f"{a.hero_f1_target:g}):")
    parts = []
    if a.predicted_hero_f1 is not None and a.interval is not None:
        lo, hi = a.interval
        parts.append(f"smoke-scale latent F1 {a.smoke_f1:.3f} predicts hero F1 {a.predicted_hero_f1:.3f} "
                     f"[{lo:.3f}, {hi:.3f}] (95% prediction interval, clipped to [0, 1])")
    elif a.outside_range:
        parts.append(f"smoke-scale latent F1 {a.smoke_f1:.3f} is outside the fitted range {a.fit_range}, so no "
                     "predicted hero F1")
    elif a.smoke_f1 is None:
        parts.append("no latent F1 for this candidate, so no predicted hero F1")
    else:
        parts.append("no fitted line in that calibration, so no predicted hero F1")
    for verdict, word, shown in ((True, "PASS", "led to a successful hero"),
                                 (False, "REFUSE", "was followed by a failed hero")):
        if a.passed is not None and a.passed is not verdict:
            continue
        held = a.heldout_promote_success if verdict else a.heldout_refuse_failure
        own = a.promote_success if verdict else a.refuse_failure
        if held is not None:
            parts.append(f"a {word} like this {shown} in {held[0]} of {held[1]} held-out cases (leave-one-out)")
        parts.append(f"under the calibrated checklist a {word} {shown} in {_share(own)}")
    if a.other_checklist:
        parts.append(f"measured under another checklist (sha256 {a.other_checklist[:12]}), not the one in force: "
                     "run `latentgate calibrate` again (chains are reused) for figures of this rule")
    return f"{head} {'; '.join(parts)}"


# ---- the store -------------------------------------------------------------------------------------------------------

def calibration_summaries(c) -> list[CalibrationSummary]:
    """The FINISHED calibration runs' summaries, newest first (runs without the tag are skipped)."""
    exps = [e.experiment_id for e in c.search_experiments()]
    if not exps:
        return []
    runs = c.search_runs(exps, max_results=SEARCHED, order_by=["attributes.start_time DESC"],
                         filter_string=f"tags.`{Tag.PHASE}` = '{PHASE}' and attributes.status = 'FINISHED'")
    return [CalibrationSummary.from_dict(json.loads(r.data.tags[CalibrateTag.SUMMARY]))
            for r in runs if CalibrateTag.SUMMARY in r.data.tags]


def candidate_config(c, eval_run: str) -> Config:
    """The candidate's recipe: its Stage B run's logged config (the eval run's own when no Stage B is found)."""
    try:
        run = CandidateEvidence(eval_run, c).run("stage_b")
    except (Missing, MlflowException):
        run = c.get_run(eval_run)
    return from_flat(run.data.params)


def calibration_for(summaries: list[CalibrationSummary], candidate: Family,
                    hero_scale: float) -> tuple[CalibrationSummary | None, str]:
    """The newest calibration of the candidate's family, or None and why the newest one does not apply."""
    for s in summaries:
        if s.family_mismatch(candidate, hero_scale) is None:
            return s, ""
    newest = summaries[0]
    return None, (f"newest: run {newest.run_id[:8]}, set {newest.set}: "
                  f"{newest.family_mismatch(candidate, hero_scale)}")


def calibration_note(eval_run: str | None, passed: bool | None, version: str | None = None,
                     name: str | None = None, checklist=None) -> str:
    """One line for `promote` / `analyze` about the candidate behind `eval_run`; with `version` (a promotion that
    was not a dry run), also the model-version tag hero.calibration. `checklist`: the one in force (its hero.scale
    must equal the calibration's)."""
    try:
        c = client()
        summaries = calibration_summaries(c)
        if not summaries:
            return "calibration: none recorded yet (`latentgate calibrate` measures whether the gate predicts the hero)"
        if not eval_run:
            return "calibration: no eval run for this candidate, so no calibration applies"
        cl = load_checklist(checklist)
        found, why = calibration_for(summaries, Family.of(candidate_config(c, eval_run)), cl.hero_scale())
        if found is None:
            return (f"calibration: no calibration of this family ({why}); run `latentgate calibrate` with a set of "
                    "this base LM, data and gate budget")
        f1 = c.get_run(eval_run).data.metrics.get(EvalKey.metric(EvalPath.LATENT, EvalKey.F1))
        a = assess(found, f1, passed, cl.sha256)
        if version and name:
            c.set_model_version_tag(name, version, VersionTag.CALIBRATION, json.dumps(a.to_dict(), sort_keys=True))
        return format_assessment(a)
    except Exception as err:  # noqa: BLE001 - the calibration informs a promotion, it never fails one
        first = (str(err).splitlines() or [""])[0][:160]
        return f"calibration: unavailable ({type(err).__name__}: {first})"
