"""The calibration scatter: smoke-scale latent F1 against hero-scale latent F1, coloured by the checklist's verdict,
with the hero target and the fitted line and its 95% prediction band."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from latentgate.analysis.plots import new_figure, save_png
from latentgate.calibrate.figures import CalibrationStats
from latentgate.calibrate.records import ConfigurationRecord
from latentgate.registry.calibration import predict

VERDICT_STYLE = {True: ("#2ca02c", "PASS (promote)"), False: ("#d62728", "REFUSE")}
SPLIT_MARKER = {"fit": "o", "holdout": "^"}


def scatter(records: Sequence[ConfigurationRecord], stats: CalibrationStats, path: Path, title: str = "") -> Path:
    fig, ax = new_figure(7.0, 5.0)
    shown = [r for r in records if r.smoke_f1 is not None and r.hero_f1 is not None]
    for verdict, (colour, label) in VERDICT_STYLE.items():
        for split, marker in SPLIT_MARKER.items():
            pts = [r for r in shown if r.verdict == verdict and r.split == split]
            if pts:
                ax.scatter([r.smoke_f1 for r in pts], [r.hero_f1 for r in pts], c=colour, marker=marker,
                           s=40, label=f"{label}{', held out' if split == 'holdout' else ''}", zorder=3)
    for r in shown:
        ax.annotate(r.name, (r.smoke_f1, r.hero_f1), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(stats.hero_f1_target, ls="--", c="#7f7f7f", lw=1, label=f"hero target F1 {stats.hero_f1_target:g}")
    if stats.fit:
        line = stats.fit.line
        top = max([r.smoke_f1 for r in shown] + [0.0]) * 1.05 or 1.0
        xs = [top * i / 50 for i in range(51)]
        ys = [predict(line, x) for x in xs]
        ax.plot(xs, [y[0] for y in ys], c="#1f77b4", lw=1,
                label=f"fit: hero = {line.intercept:.3f} + {line.slope:.3f} x smoke")
        ax.fill_between(xs, [y[1] for y in ys], [y[2] for y in ys], color="#1f77b4", alpha=0.12,
                        label="95% prediction interval")
    missing = len(records) - len(shown)
    ax.set_xlabel("smoke-scale latent F1")
    ax.set_ylabel("hero-scale latent F1")
    ax.set_title((title or "gate fidelity") + (f" ({missing} without an eval F1, not shown)" if missing else ""),
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return save_png(fig, path)
