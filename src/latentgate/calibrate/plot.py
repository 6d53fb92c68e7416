"""The calibration scatter: smoke-scale latent F1 against hero-scale latent F1, coloured by the checklist's verdict,
with the hero target and the fitted line and its 95% prediction band."""

from __future__ import annotations

from pathlib import Path

from latentgate.analysis.plots import new_figure, save_png
from latentgate.registry.calibration import LineFit, predict
from latentgate.schema import Calibration

VERDICT_STYLE = {True: ("#2ca02c", "PASS (promote)"), False: ("#d62728", "REFUSE")}
SPLIT_MARKER = {"fit": "o", "holdout": "^"}


def scatter(records: list[dict], summary: dict, path: Path, title: str = "") -> Path:
    fig, ax = new_figure(7.0, 5.0)
    smoke, hero = Calibration.SMOKE_F1, Calibration.HERO_F1
    shown = [r for r in records if r[smoke] is not None and r[hero] is not None]
    for verdict, (colour, label) in VERDICT_STYLE.items():
        for split, marker in SPLIT_MARKER.items():
            pts = [r for r in shown if r["verdict"] == verdict and r["split"] == split]
            if pts:
                ax.scatter([r[smoke] for r in pts], [r[hero] for r in pts], c=colour, marker=marker,
                           s=40, label=f"{label}{', held out' if split == 'holdout' else ''}", zorder=3)
    for r in shown:
        ax.annotate(r["name"], (r[smoke], r[hero]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(summary[Calibration.HERO_F1_TARGET], ls="--", c="#7f7f7f", lw=1,
               label=f"hero target F1 {summary[Calibration.HERO_F1_TARGET]:g}")
    fit = summary.get("fit")
    if fit:
        top = max([r[smoke] for r in shown] + [0.0]) * 1.05 or 1.0
        xs = [top * i / 50 for i in range(51)]
        ys = [predict(LineFit.from_dict(fit), x) for x in xs]
        ax.plot(xs, [y[0] for y in ys], c="#1f77b4", lw=1,
                label=f"fit: hero = {fit['intercept']:.3f} + {fit['slope']:.3f} x smoke")
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
