"""The gate's report: one row per criterion (`CheckRow`), the verdict on a candidate (`Report`), its JSON form (the
`hero.report` artifact) and its printed table (`format_table`). Pure data and text: no store access.

registry/gate.py fills it (`check_candidate`, `promote`, `demote`); registry/writes.py records it on a version.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CheckRow:
    """One criterion judged on one candidate: a row of the gate's report (and of its JSON artifact)."""

    name: str
    passed: bool
    observed: Any
    op: str
    threshold: Any
    source: str = ""
    detail: str = ""
    missing: list[str] = field(default_factory=list)
    kind: str = ""
    description: str = ""
    params: dict = field(default_factory=dict)
    step: int | None = None  # metric_peak / metric_final / metric_extrapolated: the step observed
    shown: dict = field(default_factory=dict)  # the `show` metrics at that step
    collapse: dict | None = None  # eval_collapse: the statistics it judged (eval/controls.py Collapse)
    decides: bool = True  # false: judged and shown, never refusing (hero.yaml `decides`)
    calibrated_by: str = ""


@dataclass
class Report:
    candidate: str
    passed: bool
    rows: list[CheckRow]
    missing: list[str]
    version: str | None = None
    eval_run: str | None = None
    model_name: str = ""
    alias: str = ""
    lineage: dict = field(default_factory=dict)
    checklist: str = ""
    checklist_sha256: str = ""
    decision: str = "evaluated"  # evaluated | dry-run | promoted | refused | refused-holder | verified
    time: str = ""
    commit: str = ""

    def failing(self) -> list[str]:
        """The deciding criteria that failed: what refused the candidate."""
        return [r.name for r in self.rows if not r.passed and r.decides]

    def failing_reported(self) -> list[str]:
        """Criteria that failed but do not decide (the checklist's `decides: false`): shown, never refusing."""
        return [r.name for r in self.rows if not r.passed and not r.decides]

    def row(self, name: str) -> CheckRow | None:
        """The row of one criterion (None when the checklist has no such criterion)."""
        return next((r for r in self.rows if r.name == name), None)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def format_value(v) -> str:
    """An observed value or threshold as the table and the check tags print it."""
    if v is None:
        return "missing"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(report: Report, explain: bool = False) -> str:
    head = (f"── hero gate: {report.candidate}"
            + (f" (version {report.version})" if report.version and report.version not in report.candidate else "")
            + f"  eval run {report.eval_run or 'none'} ──")
    rows = [("criterion", "result", "observed", "threshold", "source")]
    for r in report.rows:
        thr = f"{r.op} {format_value(r.threshold)}" if r.threshold is not None else "—"
        why = f" — {r.detail}" if not r.passed and r.detail and not explain else ""
        result = ("PASS" if r.passed else "FAIL") + ("" if r.decides else " (shown)")
        rows.append((r.name, result, format_value(r.observed)[:40], thr[:24],
                     (r.source or "; ".join(r.missing)) + why))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head] + ["  ".join(x.ljust(w) for x, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
                      for row in rows]
    if explain:
        lines.append("")
        lines.append(f"checklist {report.checklist} (sha256 {report.checklist_sha256[:12]})")
        for r in report.rows:
            lines.append(f"- {r.name}: {r.description}")
            lines.append(f"    query: {r.kind} {json.dumps(r.params, sort_keys=True)}; passes when observed "
                         f"{r.op} threshold")
            if r.detail:
                lines.append(f"    found: {r.detail}")
            if r.calibrated_by:
                role = "decides" if r.decides else "shown only, does not decide"
                lines.append(f"    {role}: {r.calibrated_by}")
    if report.missing:
        lines.append("missing evidence:")
        lines += [f"  - {m}" for m in report.missing]
    verdict = {"dry-run": "would PROMOTE" if report.passed else "would REFUSE",
               "promoted": f"PROMOTED: alias {report.alias} -> version {report.version}",
               "refused": f"REFUSED: version {report.version} keeps no alias",
               "refused-holder": f"REFUSED: version {report.version} keeps the alias {report.alias} it held (a refusal "
                                 f"moves no alias; `latentgate demote {report.version} --reason ...` takes it off)",
               "verified": "VERIFIED" if report.passed else "VERIFY FAILED"}.get(report.decision,
                                                                                 "PASS" if report.passed else "FAIL")
    failing, shown = report.failing(), report.failing_reported()
    lines.append(f"{verdict}" + (f" (failing: {', '.join(failing)})" if failing and not report.passed else "")
                 + (f"; failing but not deciding: {', '.join(shown)}" if shown else ""))
    return "\n".join(lines)
