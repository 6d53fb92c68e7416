"""compare: key metrics and the params that differ across runs (smoke vs extend vs sweep trials vs hero), and an
overlay plot of their probe first-token accuracy curves. Read from the tracking store only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from latentgate.analysis import history
from latentgate.analysis.plots import overlay_first_acc
from latentgate.analysis.report import eval_figures, gradient_figures, stage_figures
from latentgate.schema import EvalKey, EvalPath, Probe, Summary, Tag
from latentgate.tracking import lineage

# Params that differ between any two runs and say nothing about the experiment.
NOISE_PARAMS = ("run.output_dir",)


def run_summary(bundle: history.RunBundle) -> dict[str, Any]:
    stage_hist = bundle.evaluated_stage()
    fig = stage_figures(stage_hist) if stage_hist is not None else {}
    ev = eval_figures(bundle.evals[-1]) if bundle.evals else {}
    paths = ev.get("paths", {}) if ev else {}
    latent = paths.get(EvalPath.LATENT, {})
    return {
        "run_id": bundle.run_id, "name": bundle.run_name, "phase": bundle.phase, "status": bundle.status,
        "preset": bundle.tags.get(Tag.PRESET, ""), "stage": fig.get("stage"),
        "steps": fig.get("steps"), "peak_first_acc": fig.get("peak_first_acc"), "peak_step": fig.get("peak_step"),
        "final_first_acc": fig.get("final_first_acc"), "regression_pct": fig.get("regression_pct"),
        "top5_final": fig.get("top5_final"), "peak_first_acc_lift": fig.get("peak_first_acc_lift"),
        Summary.LATENT_F1: latent.get(EvalKey.F1), Summary.LATENT_EM: latent.get(EvalKey.EM),
        Summary.TEXT_F1: paths.get(EvalPath.TEXT, {}).get(EvalKey.F1),
        "token_budget_f1": paths.get(EvalPath.TOKEN_BUDGET, {}).get(EvalKey.F1),
        EvalKey.REPETITION_RATE: latent.get(EvalKey.REPETITION_RATE),
        EvalKey.TOP_PREDICTION_SHARE: latent.get(EvalKey.TOP_PREDICTION_SHARE),
        "max_grad_norm": gradient_figures(bundle.stages)["max_grad_norm"],
        "wall_seconds": bundle.wall_seconds(),
    }


def curve(bundle: history.RunBundle) -> list[tuple[int, float]]:
    """Probe first_acc over the run's stages laid end to end (stage B's steps follow stage A's)."""
    pts, end = [], 0
    for stage_hist in bundle.stages:
        probes = stage_hist.probes()
        if not probes:
            continue
        steps = stage_hist.steps()
        offset = end if steps and min(steps) <= end else 0
        pts += [(offset + p["step"], p[Probe.FIRST_ACC]) for p in probes]
        end = max(end, offset + stage_hist.max_step())
    return pts


def differing_params(params: list[dict[str, str]]) -> dict[str, list[str | None]]:
    keys = sorted({k for p in params for k in p})
    out = {}
    for k in keys:
        if k in NOISE_PARAMS:
            continue
        vals = [p.get(k) for p in params]
        if len(set(vals)) > 1:
            out[k] = vals
    return out


def compare_runs(run_ids: list[str], plot: Path | None = None) -> dict[str, Any]:
    """Summaries, differing params and (if `plot`) an overlay PNG for the given runs, in the given order."""
    cl = lineage.client()
    bundles = [history.load_run_bundle(r, cl, with_artifacts=False) for r in run_ids]
    out = {"runs": [run_summary(b) for b in bundles],
           "differing_params": differing_params([b.all_params() for b in bundles]),
           "plot": None}
    if plot is not None:
        curves = {}
        for b in bundles:
            label = f"{b.run_name or b.phase} {b.run_id[:8]}"
            curves[label] = curve(b)
        made = overlay_first_acc(curves, plot)
        out["plot"] = str(made) if made else None
    return out


def _cell(v, kind: str = "num") -> str:
    if v is None:
        return "—"
    if kind == "pct":
        return f"{v:.1%}"
    if kind == "int":
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.3g}" if kind == "g" else f"{v:.3f}"
    return str(v)


ROWS = (("phase", "phase", "str"), ("preset", "preset", "str"), ("status", "status", "str"),
        ("stage (evaluated)", "stage", "str"), ("steps", "steps", "int"),
        ("peak probe first_acc", "peak_first_acc", "pct"), ("  at step", "peak_step", "int"),
        ("final probe first_acc", "final_first_acc", "pct"), ("regression from peak %", "regression_pct", "g"),
        ("final top-5", "top5_final", "pct"), ("peak lift over controls", "peak_first_acc_lift", "pct"),
        ("latent F1", Summary.LATENT_F1, "num"), ("latent EM", Summary.LATENT_EM, "num"),
        ("text F1 (teacher)", Summary.TEXT_F1, "num"), ("token-budget F1", "token_budget_f1", "num"),
        ("latent repetition", EvalKey.REPETITION_RATE, "pct"),
        ("top prediction share", EvalKey.TOP_PREDICTION_SHARE, "pct"),
        ("max grad norm", "max_grad_norm", "g"), ("wall seconds", "wall_seconds", "g"))


def table_rows(result: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(header, metric rows, differing-param rows) for printing."""
    runs = result["runs"]
    header = ["", *[f"{r['name'] or r['phase']} {r['run_id'][:8]}" for r in runs]]
    metric_rows = [[label, *[_cell(r.get(key), kind) for r in runs]] for label, key, kind in ROWS]
    param_rows = [[k, *["—" if v is None else str(v) for v in vals]]
                  for k, vals in result["differing_params"].items()]
    return header, metric_rows, param_rows


def print_rich(result: dict, console=None) -> None:
    console = console or Console()
    header, metric_rows, param_rows = table_rows(result)
    for title, rows in (("Key metrics", metric_rows), ("Params that differ", param_rows)):
        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        if rows:
            console.print(table)
        else:
            console.print(f"{title}: none")
    if result.get("plot"):
        console.print(f"first_acc overlay: {result['plot']}")
