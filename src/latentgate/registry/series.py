"""A metric series' peak and its drop from it: the one computation of both.

The gate's checks (registry/evidence.py: metric_peak, metric_final, metric_final_drop) read a run's MLflow metric
history through these; the analysis report (analysis/report.py stage_figures) reads a stage's probe records through
the same two, so the peak first-token accuracy, the peak LIFT over the controls and the drop from the peak are
computed here alone. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    step: int  # the optimizer step the value was recorded at
    value: float


def peak(points: Iterable[tuple[int, float]]) -> Point | None:
    """The largest finite value of (step, value) points, at the earliest step that reached it; None when no value is
    finite (a series of NaNs has no peak)."""
    best: Point | None = None
    for step, value in sorted(points, key=lambda p: p[0]):
        if isinstance(value, (int, float)) and math.isfinite(value) and (best is None or value > best.value):
            best = Point(step, value)
    return best


def drop_from_peak(peak_value: float, final: float) -> float:
    """(peak - final) / peak: the relative fall from the peak to the final value; 0 when the peak is not positive,
    NaN when the final value is not finite."""
    if not math.isfinite(final):
        return float("nan")
    return (peak_value - final) / peak_value if peak_value > 0 else 0.0
