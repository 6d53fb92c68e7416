"""What a calibration records, as types: a chain run (`ChainRecord`), a checklist row as the calibration keeps it
(`GateRow`), one configuration (`ConfigurationRecord`) and the whole calibration (`CalibrationResult`).

`to_dict` writes each into configuration.json and calibration.json with the field names those files have always
had (non-finite floats become null); `from_dict` reads them back, so a calibration can be re-judged offline from its
calibration.json. registry/calibration.py never reads these files: it reads the summary tag (`CalibrationSummary`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from latentgate.calibrate.figures import CalibrationStats
from latentgate.registry.calibration import Family
from latentgate.schema import Calibration, Summary
from latentgate.tracking.reuse import ReuseKey

if TYPE_CHECKING:  # the annotation only
    from latentgate.calibrate.spec import CalibrationSet
    from latentgate.registry.gate_report import CheckRow


T = TypeVar("T")


def json_safe(v):
    """JSON-safe: non-finite floats become None (what the statistics read as 'no number')."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


@dataclass(frozen=True)
class ByRole(Generic[T]):
    """One figure for each chain of a configuration."""

    gate: T
    hero: T

    def to_dict(self) -> dict:
        return {"gate": self.gate, "hero": self.hero}

    @classmethod
    def from_dict(cls, d: dict) -> ByRole:
        return cls(d["gate"], d["hero"])


@dataclass(frozen=True)
class StageSteps:
    """What a stage of a chain ran: optimizer steps (the budget's unit) and micro-steps (what compute counts)."""

    optimizer: int = 0
    micro: int = 0


@dataclass(frozen=True)
class ChainRecord:
    """What the calibration reads from a chain run (runner.chain_record)."""

    run_id: str
    status: str  # the chain's MLflow run status: FINISHED, or FAILED on a deterministic fault
    reused: bool
    reuse_key: ReuseKey  # the key it was found or tagged with
    commit: str  # the git commit it was trained at (another one only with --allow-other-commit)
    error: str = ""
    children: dict[str, str] = field(default_factory=dict)  # phase (base, stage_a, stage_b, eval) -> run id
    latent_f1: float | None = None  # its eval run's mean latent F1; None when the eval did not finish
    steps: dict[str, StageSteps] = field(default_factory=dict)  # stage -> what it ran
    wall_seconds: float = 0.0  # the chain's duration less its base run's
    wall_seconds_with_base: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # each phase's run, and "between" them

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    def micro_steps(self, stage: str) -> int:
        return self.steps[stage].micro if stage in self.steps else 0

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "status": self.status, "reused": self.reused,
                "reuse_key": self.reuse_key.to_dict(), "commit": self.commit, "error": self.error,
                "children": dict(self.children), Summary.LATENT_F1: json_safe(self.latent_f1),
                "steps": {s: asdict(ran) for s, ran in self.steps.items()}, "wall_seconds": self.wall_seconds,
                "wall_seconds_with_base": self.wall_seconds_with_base, "phase_seconds": dict(self.phase_seconds)}

    @classmethod
    def from_dict(cls, d: dict) -> ChainRecord:
        key = ReuseKey(**{f.name: d["reuse_key"][f.name] for f in fields(ReuseKey)})
        return cls(d["run_id"], d["status"], bool(d["reused"]), key, d["commit"], d.get("error") or "",
                   dict(d["children"]), d[Summary.LATENT_F1],
                   {s: StageSteps(int(ran["optimizer"]), int(ran["micro"])) for s, ran in d["steps"].items()},
                   float(d["wall_seconds"]), float(d["wall_seconds_with_base"]), dict(d.get("phase_seconds") or {}))


@dataclass(frozen=True)
class GateRow:
    """A checklist row of the gate's report (registry/gate_report.py CheckRow) as the calibration keeps it: what
    re-judging it at another threshold needs, and `failure`, every reason it fails besides its threshold (what no
    threshold change can fix: stats.other_failures)."""

    name: str
    passed: bool
    observed: Any
    op: str
    threshold: Any
    kind: str = ""
    missing: tuple[str, ...] = ()
    decides: bool = True  # false: judged and shown, never refusing (hero.yaml `decides`)
    failure: tuple[str, ...] = ()

    @classmethod
    def of(cls, row: CheckRow, failure: list[str]) -> GateRow:
        return cls(row.name, bool(row.passed), json_safe(row.observed), row.op, json_safe(row.threshold), row.kind,
                   tuple(row.missing), bool(row.decides), tuple(failure))

    def to_dict(self) -> dict:
        return json_safe({"name": self.name, "kind": self.kind, "passed": self.passed, "observed": self.observed,
                          "op": self.op, "threshold": self.threshold, "missing": list(self.missing),
                          "decides": self.decides, "failure": list(self.failure)})

    @classmethod
    def from_dict(cls, d: dict) -> GateRow:
        return cls(d["name"], bool(d["passed"]), d.get("observed"), d.get("op", ""), d.get("threshold"),
                   d.get("kind", ""), tuple(d.get("missing") or ()), bool(d.get("decides", True)),
                   tuple(d.get("failure") or ()))


@dataclass(frozen=True)
class ConfigurationRecord:
    """One configuration of a calibration set: the checklist's verdict on its gate chain, its hero chain's outcome,
    and what each chain cost (runner.run_configuration). `heldout_verdict` (the leave-one-out verdict at the
    checklist's target) and `child_run` (its run under the calibration) are set once every configuration ran."""

    name: str
    expect: str
    preset: str
    overrides: dict
    split: str  # fit | holdout
    verdict: bool  # True: promote (every deciding criterion passed)
    failing: tuple[str, ...]  # the failing deciding criteria and missing evidence
    rows: tuple[GateRow, ...] | None  # None: the gate chain failed, so nothing was judged
    outcome: bool  # the hero finished and reached the checklist's hero_f1_target
    hero_finished: bool
    family: Family
    smoke_f1: float | None
    hero_f1: float | None
    flops: ByRole[float]  # model FLOPs of each chain's stages
    micro_step_flops: dict[str, float]  # stage -> FLOPs of one micro-step
    config_hash: ByRole[str]
    gate: ChainRecord
    hero: ChainRecord
    heldout_verdict: bool | None = None
    child_run: str = ""

    @property
    def agree(self) -> bool:
        return self.verdict == self.outcome

    @property
    def wall_seconds(self) -> ByRole[float]:
        return ByRole(self.gate.wall_seconds, self.hero.wall_seconds)

    def chains(self) -> dict[str, ChainRecord]:
        return {"gate": self.gate, "hero": self.hero}

    def reused(self) -> list[str]:
        """The roles whose chain was reused instead of trained."""
        return [role for role, chain in self.chains().items() if chain.reused]

    def to_dict(self) -> dict:
        out = {"name": self.name, "expect": self.expect, "preset": self.preset, "overrides": self.overrides,
               "split": self.split, "verdict": self.verdict, "failing": list(self.failing),
               "rows": None if self.rows is None else [r.to_dict() for r in self.rows], "outcome": self.outcome,
               "hero_finished": self.hero_finished, "family": self.family.to_dict(),
               Calibration.SMOKE_F1: self.smoke_f1, Calibration.HERO_F1: self.hero_f1, "agree": self.agree,
               "flops": self.flops.to_dict(), "micro_step_flops": dict(self.micro_step_flops),
               "wall_seconds": self.wall_seconds.to_dict(), "config_hash": self.config_hash.to_dict(),
               "gate": self.gate.to_dict(), "hero": self.hero.to_dict(), "heldout_verdict": self.heldout_verdict}
        if self.child_run:
            out["child_run"] = self.child_run
        return json_safe(out)

    @classmethod
    def from_dict(cls, d: dict) -> ConfigurationRecord:
        rows = d.get("rows")
        return cls(d["name"], d["expect"], d["preset"], dict(d["overrides"]), d["split"], bool(d["verdict"]),
                   tuple(d["failing"]), None if rows is None else tuple(GateRow.from_dict(r) for r in rows),
                   bool(d["outcome"]), bool(d["hero_finished"]), Family.from_dict(d["family"]),
                   d[Calibration.SMOKE_F1], d[Calibration.HERO_F1], ByRole.from_dict(d["flops"]),
                   dict(d["micro_step_flops"]), ByRole.from_dict(d["config_hash"]), ChainRecord.from_dict(d["gate"]),
                   ChainRecord.from_dict(d["hero"]), d.get("heldout_verdict"), d.get("child_run") or "")


@dataclass(frozen=True)
class CalibrationResult:
    """A whole calibration: its parent run, the set and checklist it judged, the statistics and every record
    (calibration.json)."""

    run_id: str
    set: CalibrationSet
    checklist_path: str
    checklist_sha256: str
    stats: CalibrationStats
    configurations: tuple[ConfigurationRecord, ...]

    def to_dict(self) -> dict:
        return json_safe({"run_id": self.run_id, "set": self.set.to_dict(),
                          "checklist": {"path": self.checklist_path, "sha256": self.checklist_sha256},
                          **self.stats.to_dict(), "configurations": [r.to_dict() for r in self.configurations]})
