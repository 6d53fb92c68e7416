"""PNG plots (matplotlib, Agg canvas, no pyplot global state, so they are safe in threads and fast).

Stage plots read diagnostics.jsonl records (or the same records rebuilt from MLflow metric histories):
first-token accuracy (batch, and the probe with its 95% interval and its controls: the better of the constant
guess and the shuffled latent, and that floor plus the checklist's lift threshold) over optimizer steps with the
stage boundaries marked, every loss term, and the gradient norm per group. Eval plots read eval_detailed.jsonl:
the F1 histogram per path and the error modes per path. A plot that cannot be drawn is skipped with a warning:
plotting never fails the run that calls it.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from latentgate.analysis.history import read_jsonl, split_stages
from latentgate.errors import LatentgateError
from latentgate.eval.scoring import ERROR_MODES, F1_BUCKETS, f1_buckets
from latentgate.eval_row import EvalRow
from latentgate.registry.checklist import GRADIENTS, LEARNING, load_checklist
from latentgate.schema import Artifact, EvalKey, EvalPath, GradGroup, Loss, Probe, Stage

DPI = 100
PATH_COLOURS = {EvalPath.LATENT: "#d62728", EvalPath.TEXT: "#1f77b4", EvalPath.TOKEN_BUDGET: "#2ca02c",
                EvalPath.ZERO_LATENT: "#7f7f7f", EvalPath.SHUFFLED_LATENT: "#bcbd22"}
PROBE_ACC, CONST, SHUFFLED = Probe.key(Probe.FIRST_ACC), Probe.key(Probe.CONST), Probe.key(Probe.SHUFFLED)


def new_figure(width: float = 7.0, height: float = 3.6):
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_png(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _layout(stages: list[tuple[str, list[dict]]]):
    """Each stage's records on one optimizer-step axis: (name, [(x, record)], start_x). A stage whose steps
    restart at 1 is placed after the previous one; a resumed stage continuing its step count is not shifted."""
    placed, end = [], 0
    for name, records in stages:
        steps = [int(r.get(Stage.GLOBAL_STEP, i + 1)) for i, r in enumerate(records)]
        if not steps:
            continue
        offset = end if min(steps) <= end else 0
        placed.append((name, [(offset + s, r) for s, r in zip(steps, records, strict=True)], offset))
        end = max(end, offset + max(steps))
    return placed


def _boundaries(ax, placed) -> None:
    for i, (name, _pts, offset) in enumerate(placed):
        if i > 0:
            ax.axvline(offset + 0.5, color="black", linestyle="--", linewidth=0.8, alpha=0.6)
        ax.text(offset + 0.5, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", ha="left",
                fontsize=8, alpha=0.8)


def _series(placed, key: str):
    xs, ys = [], []
    for _, pts, _ in placed:
        for x, r in pts:
            if _finite(r.get(key)):
                xs.append(x)
                ys.append(float(r[key]))
    return xs, ys


def _plot_first_acc(placed, out: Path, threshold: float | None) -> Path | None:
    bx, by = _series(placed, Stage.FIRST_ACC)
    px, py = _series(placed, PROBE_ACC)
    if not bx and not px:
        return None
    fig, ax = new_figure()
    if bx:
        ax.plot(bx, by, color="#999999", linewidth=0.8, alpha=0.7, label="batch first_acc")
    for i, one in enumerate(placed):  # each stage its own line: a new stage starts a new curve
        sx, sy = _series([one], PROBE_ACC)
        if not sx:
            continue
        rows = [r for _, r in one[1] if _finite(r.get(PROBE_ACC))]
        lo, hi = [[r.get(Probe.key(k)) for r in rows] for k in (Probe.FIRST_ACC_LO, Probe.FIRST_ACC_HI)]
        if all(_finite(v) for v in lo + hi):
            ax.fill_between(sx, lo, hi, color="#d62728", alpha=0.15, label="probe 95% CI" if i == 0 else None)
        ax.plot(sx, sy, color="#d62728", marker="o", markersize=3, linewidth=1.5,
                label="probe first_acc" if i == 0 else None)
        tx, ty = _series([one], Probe.key(Probe.FIRST_ACC_TOP5))
        if tx:
            ax.plot(tx, ty, color="#ff7f0e", linestyle=":", marker=".", linewidth=1,
                    label="probe top-5" if i == 0 else None)
        floor = [(x, max(r[CONST], r[SHUFFLED])) for x, r in one[1]
                 if _finite(r.get(CONST)) and _finite(r.get(SHUFFLED))]
        if floor:  # what the probe scores with no information about the input; the checklist reads the lift above it
            ax.plot([x for x, _ in floor], [v for _, v in floor], color="#555555", linestyle="--", linewidth=1,
                    label="controls (best of constant guess, shuffled latent)" if i == 0 else None)
            if threshold is not None:
                ax.plot([x for x, _ in floor], [v + threshold for _, v in floor], color="green", linestyle=":",
                        linewidth=1, label=f"checklist: controls + {threshold:.0%}" if i == 0 else None)
    _boundaries(ax, placed)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("first-token accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.93))
    return save_png(fig, out)


def _plot_losses(placed, out: Path) -> Path | None:
    keys = [k for k in (Stage.LOSS, *Loss.RAW_KEYS) if _series(placed, k)[0]]
    if not keys:
        return None
    fig, ax = new_figure()
    positive = True
    for k in keys:
        xs, ys = _series(placed, k)
        positive = positive and min(ys) > 0
        ax.plot(xs, ys, linewidth=1.5 if k == Stage.LOSS else 1, label="total (weighted)" if k == Stage.LOSS else k)
    if positive:
        ax.set_yscale("log")
    _boundaries(ax, placed)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="upper right")
    return save_png(fig, out)


def _plot_grad(placed, out: Path, grad_limit: float | None) -> Path | None:
    keys = [k for k in GradGroup.NORM_KEYS if _series(placed, k)[0]]
    if not keys:
        return None
    fig, ax = new_figure()
    top = 0.0
    for k in keys:
        xs, ys = _series(placed, k)
        top = max(top, max(ys))
        ax.plot(xs, ys, linewidth=1.5 if k == Stage.GRAD_NORM else 1,
                label="total" if k == Stage.GRAD_NORM else k.removeprefix(GradGroup.norm_key("")))
    if grad_limit is not None and top > grad_limit / 10:
        ax.axhline(grad_limit, color="red", linestyle=":", linewidth=1, label=f"limit {grad_limit:g}")
    if top > 0:
        ax.set_yscale("log")
    _boundaries(ax, placed)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("grad norm (pre-clip)")
    ax.legend(fontsize=7, loc="upper right")
    return save_png(fig, out)


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - a plot never fails the run that asked for it
        warnings.warn(f"latentgate: plot {getattr(fn, '__name__', fn)} skipped: {type(err).__name__}: {err}",
                      stacklevel=3)
        return None


def stage_plots(stages: list[tuple[str, list[dict]]], out_dir: Path, threshold: float | None = None,
                grad_limit: float | None = None) -> list[Path]:
    """first_acc.png, losses.png, grad_norm.png for stages given as [(name, records)] in order. `threshold` (the
    checklist's first-token lift) and `grad_limit` (its gradient health) draw the checklist's lines."""
    out_dir = Path(out_dir)
    placed = _layout(stages)
    if not placed:
        return []
    made = [_guard(_plot_first_acc, placed, out_dir / "first_acc.png", threshold),
            _guard(_plot_losses, placed, out_dir / "losses.png"),
            _guard(_plot_grad, placed, out_dir / "grad_norm.png", grad_limit)]
    return [p for p in made if p is not None]


def make_stage_plots(diagnostics_jsonl: Path, out_dir: Path, checklist_path=None) -> list[Path]:
    """Plots of one run's diagnostics.jsonl (one stage, or several in file order), with the checklist's lines.
    Returns the PNGs written; [] when the file is missing or empty."""
    path = Path(diagnostics_jsonl)
    if not path.is_file():
        return []
    try:
        records = read_jsonl(path)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"latentgate: cannot read {path} for plots: {err}", stacklevel=2)
        return []
    try:
        cl = load_checklist(checklist_path)
        threshold, grad_limit = cl.threshold(LEARNING), cl.threshold(GRADIENTS)
    except LatentgateError as err:  # plots without the checklist's lines rather than none
        warnings.warn(f"latentgate: plots drawn without the checklist's lines: {err}", stacklevel=2)
        threshold = grad_limit = None
    return stage_plots(split_stages(records), out_dir, threshold, grad_limit)


def _path_order(paths) -> list[str]:
    known = [p for p in PATH_COLOURS if p in paths]
    return known + sorted(p for p in paths if p not in PATH_COLOURS)


def _grouped_bars(ax, categories: list[str], per_path: dict[str, dict[str, int]]) -> None:
    paths = _path_order(per_path)
    width = 0.8 / max(1, len(paths))
    for i, path in enumerate(paths):
        xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [per_path[path].get(c, 0) for c in categories], width=width, label=path,
               color=PATH_COLOURS.get(path), edgecolor="black" if path == EvalPath.LATENT else None,
               linewidth=1.2 if path == EvalPath.LATENT else 0)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, fontsize=8)
    ax.set_ylabel("examples")
    ax.legend(fontsize=7)


def eval_plots(rows: list[EvalRow], out_dir: Path, aggregates: dict | None = None) -> list[Path]:
    """f1_histogram.png and error_modes.png from eval_detailed rows (or metrics.json aggregates)."""
    out_dir = Path(out_dir)
    f1s: dict[str, list[float]] = {}
    modes: dict[str, dict[str, int]] = {}
    for r in rows:
        f1s.setdefault(r.path, []).append(r.f1)
        m = modes.setdefault(r.path, {})
        m[r.error_mode] = m.get(r.error_mode, 0) + 1
    buckets = {p: f1_buckets(v) for p, v in f1s.items()}
    if not rows and aggregates:
        for p, a in (aggregates.get("paths") or {}).items():
            if a.get(EvalKey.F1_DISTRIBUTION):
                buckets[p] = a[EvalKey.F1_DISTRIBUTION]
            if a.get(EvalKey.ERROR_MODES):
                modes[p] = a[EvalKey.ERROR_MODES]

    def hist():
        if not buckets:
            return None
        fig, ax = new_figure(7.0, 3.4)
        _grouped_bars(ax, list(F1_BUCKETS), buckets)
        ax.set_xlabel("per-example F1")
        ax.set_title("F1 distribution per path (latent outlined)", fontsize=9)
        return save_png(fig, out_dir / "f1_histogram.png")

    def error_modes():
        if not modes:
            return None
        fig, ax = new_figure(7.0, 3.4)
        cats = list(ERROR_MODES) + sorted({m for v in modes.values() for m in v} - set(ERROR_MODES))
        _grouped_bars(ax, cats, modes)
        ax.set_title("error modes per path", fontsize=9)
        return save_png(fig, out_dir / "error_modes.png")

    return [p for p in (_guard(hist), _guard(error_modes)) if p is not None]


def make_eval_plots(eval_dir: Path, out_dir: Path) -> list[Path]:
    """Plots of an eval output folder (eval_detailed.jsonl, else metrics.json). [] when neither exists."""
    eval_dir = Path(eval_dir)
    rows, agg = [], None
    try:
        if (eval_dir / Artifact.EVAL_DETAILED).is_file():
            rows = EvalRow.read(eval_dir / Artifact.EVAL_DETAILED)
        if (eval_dir / Artifact.EVAL_METRICS).is_file():
            agg = json.loads((eval_dir / Artifact.EVAL_METRICS).read_text())
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"latentgate: cannot read {eval_dir} for plots: {err}", stacklevel=2)
        return []
    if not rows and not agg:
        return []
    return eval_plots(rows, out_dir, agg)


def bundle_plots(bundle, out_dir: Path, threshold: float | None = None,
                 grad_limit: float | None = None) -> list[Path]:
    """All plots of a run bundle: the stages on one step axis (from metric histories), and its last eval."""
    out_dir = Path(out_dir)
    made = stage_plots([(s.stage, s.records()) for s in bundle.stages], out_dir, threshold, grad_limit)
    if bundle.evals:
        ev = bundle.evals[-1]
        made += eval_plots(ev.rows or [], out_dir, ev.aggregates)
    return made


def overlay_first_acc(curves: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    """compare: probe first_acc curves of several runs on one axis (raw accuracy: the checklist reads the lift over
    each run's controls, so no checklist line is drawn here)."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, ax = new_figure(7.5, 4.0)
    for label, pts in curves.items():
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", markersize=3, linewidth=1.3, label=label)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("optimizer step (stages in sequence)")
    ax.set_ylabel("probe first-token accuracy")
    ax.legend(fontsize=7)
    return save_png(fig, Path(out))
