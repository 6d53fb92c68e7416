"""What the calibration's statistics (stats.py) return, as types: the rates of a confusion matrix, the report at one
hero target, the threshold proposal, a gate shape's reports, the cost, and everything together (`CalibrationStats`).
`to_dict` writes calibration.json's field names; the confusion matrix and the fitted line are registry/calibration.py's
`Confusion` and `LineFit`, the types the summary tag carries."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from latentgate.registry.calibration import Confusion, LineFit
from latentgate.schema import Calibration


@dataclass(frozen=True)
class Rates:
    """Agreement (verdict == outcome), precision of promote (a PASS led to a successful hero) and of refuse (a
    REFUSE was followed by a failed hero); None where nothing was judged."""

    n: int
    agreement: float | None
    precision_promote: float | None
    precision_refuse: float | None
    n_promote: int
    n_refuse: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FittedLine:
    """stats.fit_line: the least-squares line (what a prediction interval needs) and how much of hero F1 it explains."""

    line: LineFit
    r2: float | None  # None: every hero F1 the same
    level: float = 0.95  # of the prediction interval its `t` gives

    def to_dict(self) -> dict:
        return {**self.line.to_dict(), "level": self.level, "r2": self.r2}


@dataclass(frozen=True)
class TargetReport:
    """Verdicts against the outcomes at one hero target (held out, or as written): the confusion matrix, agreement
    with its Wilson 95% interval, the precision of promote and the share of failed heroes refused."""

    target: float
    confusion: Confusion
    verdicts: tuple[bool, ...]
    outcomes: tuple[bool, ...]
    n: int
    agreement: float | None
    agreement_wilson: tuple[float, float]
    precision_promote: float | None
    n_promote: int
    failures_refused: float | None
    n_failures: int

    def to_dict(self) -> dict:
        return {**asdict(self), "confusion": self.confusion.to_dict(), "verdicts": list(self.verdicts),
                "outcomes": list(self.outcomes), "agreement_wilson": list(self.agreement_wilson)}


@dataclass(frozen=True)
class SplitAgreement:
    """Agreement on one split of the set before and after a threshold proposal."""

    n: int
    before: float | None
    after: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Proposal:
    """New thresholds fitted on split "fit" ({name: (current, proposed)}), judged before and after on both splits."""

    changes: dict[str, tuple[float, float]]
    fit: SplitAgreement
    holdout: SplitAgreement

    def to_dict(self) -> dict:
        return {"changes": {n: {"from": old, "to": new} for n, (old, new) in self.changes.items()},
                "fit": self.fit.to_dict(), "holdout": self.holdout.to_dict()}


@dataclass(frozen=True)
class Shape:
    """One gate shape on the same runs: which criteria decide (None: the checklist as written) and its report at
    each hero target."""

    shape: str
    deciding: tuple[str, ...] | None
    reports: tuple[TargetReport, ...]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "deciding": None if self.deciding is None else list(self.deciding),
                "reports": [r.to_dict() for r in self.reports]}


@dataclass(frozen=True)
class Cost:
    """One unit (FLOPs or wall seconds) summed over every gate chain and every hero chain."""

    gate: float
    hero: float

    @property
    def ratio(self) -> float | None:
        return self.gate / self.hero if self.hero else None

    def to_dict(self) -> dict:
        return {"gate": self.gate, "hero": self.hero, "ratio": self.ratio}


@dataclass(frozen=True)
class CalibrationStats:
    """Everything the calibration run reports from its records (stats.summarize). `heldout`: one report per hero
    target, the checklist's first."""

    hero_f1_target: float
    confusion: Confusion  # the checklist's own verdicts, in sample
    rates: Rates
    flops: Cost
    wall_seconds: Cost
    phase_seconds: dict[str, dict[str, float]]  # role -> phase -> seconds (stats.phase_seconds)
    fit: FittedLine | None
    fit_points: int  # configurations with both F1s
    proposal: Proposal
    heldout: tuple[TargetReport, ...]
    shapes: tuple[Shape, ...]

    def to_dict(self) -> dict:
        return {Calibration.HERO_F1_TARGET: self.hero_f1_target, "confusion": self.confusion.to_dict(),
                **self.rates.to_dict(),
                "cost": {"flops": self.flops.to_dict(), "wall_seconds": self.wall_seconds.to_dict(),
                         "phase_seconds": self.phase_seconds},
                "fit": None if self.fit is None else self.fit.to_dict(), "fit_points": self.fit_points,
                "proposal": self.proposal.to_dict(), "heldout": [h.to_dict() for h in self.heldout],
                "shapes": [s.to_dict() for s in self.shapes]}
