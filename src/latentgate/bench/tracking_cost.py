"""Comparison 1: a Stage A loop with full MLflow tracking against the same loop with NullTracker."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from latentgate.bench.fixtures import Snapshot, smoke_workspace
from latentgate.bench.report import FAIL, Row, interleave, median, paired_ratio, ratio_row
from latentgate.bench.timing import (
    CLOCKS,
    JUDGE_CLOCK,
    StepClock,
    best_of,
    clock,
    mlflow_state,
    segments,
    since,
    split_clocks,
    stage_overrides,
    temp_env,
    total_of,
)
from latentgate.config import Config, flatten, resolve
from latentgate.schema import Artifact, Stage
from latentgate.tracking import lineage
from latentgate.tracking.runs import setup_experiment, tracked_run
from latentgate.tracking.tracker import NullTracker
from latentgate.train.trainer import train_stage

# ---- 1. tracking overhead -------------------------------------------------------------------------------------

TRACKING = ("training step with full MLflow tracking (SQLite store: per-step metrics, probes, checkpoints)",
            "the same loop with NullTracker", ">= 0.97x")


def bench_tracking(cfg: Config, work: Path, reps: int = 3, steps: int = 40, stage: str = "stage_a",
                   store_uri: str | None = None) -> Row:
    """`train_stage` inside a real tracked run (metrics batched into a fresh SQLite store, probes and checkpoints
    flushed and logged as artifacts) vs the same call with `NullTracker`, both from the same starting weights.
    Timed: the training loop plus the artifact logging of its checkpoint. Run start/params/tags/end are one-off
    per stage and reported separately. `store_uri`: an existing store (default: a fresh SQLite file in `work`)."""
    half = max(1, steps // 2)
    cfg = resolve(None, {**flatten(cfg), **stage_overrides(stage, steps, half, half)})
    if store_uri is None:
        (work / "store").mkdir(parents=True, exist_ok=True)
        store_uri = f"sqlite:///{work / 'store' / 'mlflow.db'}"
    ws = smoke_workspace(cfg, work / "base", stage)
    snap = Snapshot(ws)
    results: dict[str, list] = {"tracked": [], "null": []}
    with mlflow_state(), temp_env(MLFLOW_TRACKING_URI=store_uri, MLFLOW_DISABLE_TELEMETRY="true"):
        setup_experiment("latentgate-bench")

        def run(name: str):
            snap.restore()
            out = work / f"{name}-{len(results[name])}"
            tracked = name == "tracked"
            ctx = tracked_run(f"bench-{stage}", nested=False) if tracked else contextlib.nullcontext(NullTracker())
            t_run = clock()
            with ctx as tr:
                tr.log_params(flatten(cfg))
                timed = StepClock(tr)
                t0 = clock()
                res = train_stage(ws, getattr(cfg, stage), timed, out, name=stage)
                tr.log_artifact(out / Artifact.DIAGNOSTICS)
                tr.log_artifacts(res["checkpoint"], Artifact.checkpoint(stage))
                t1 = clock()
            results[name].append({"run_id": tr.run_id, "losses": _losses(out / Artifact.DIAGNOSTICS),
                                  "setup": since(t_run)[0] - (t1[0] - t0[0])})
            return segments(t0, timed.marks, t1)

        raw = interleave({"null": lambda: run("null"), "tracked": lambda: run("tracked")}, reps,
                         timer=lambda name, result, wall: result)
        run_id = results["tracked"][-1]["run_id"]
        logged = len(lineage.client().get_metric_history(run_id, Stage.metric(stage, Stage.LOSS)))
    best = {k: best_of(v) for k, v in raw.items()}
    totals = {k: split_clocks([total_of(r) for r in v]) for k, v in raw.items()}
    c = CLOCKS.index(JUDGE_CLOCK["clock"])
    ratio = best["null"][c] / best["tracked"][c]
    side = paired_ratio(totals["null"]["wall"], totals["tracked"]["wall"])
    same = all(r["losses"] == results["null"][0]["losses"] for r in results["tracked"] + results["null"])
    setup = median([r["setup"] for r in results["tracked"]])
    per_step_ms = (best["tracked"][c] - best["null"][c]) / steps * 1000
    details = {"steps": steps, "reps": reps, "stage": stage, "probe_every": half, "checkpoint_every": half,
               "clock": CLOCKS[c], "ratio_best_wall": best["null"][0] / best["tracked"][0],
               "ratio_best_cpu": best["null"][1] / best["tracked"][1],
               "ratio_median_wall": side, "best_s": best, "totals_s": totals,
               "overhead_ms_per_step": per_step_ms, "run_start_end_s": setup,
               "metrics_logged_for_loss": logged, "identical_losses": same}
    measured = (f"{ratio:.3f}x by {CLOCKS[c]} time ({best['tracked'][c]:.2f} s vs {best['null'][c]:.2f} s for "
                f"{steps} steps, {per_step_ms:+.1f} ms/step); wall: best {details['ratio_best_wall']:.3f}x, median "
                f"of {reps} pairs {side:.3f}x; run start/end {setup:.2f} s once per stage")
    row = ratio_row("tracking", TRACKING[0], TRACKING[1], ratio, ">=", 0.97, measured, details=details)
    if logged != steps or not same:
        row.status = FAIL
        row.measured += f"; BROKEN: {logged} of {steps} loss metrics in the store, identical losses: {same}"
    return row


def _losses(path: Path) -> list[float]:
    return [json.loads(line)[Stage.LOSS] for line in path.read_text().splitlines() if line.strip()]
