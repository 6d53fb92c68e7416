"""Configs and clocks shared by the bench comparisons: wall and CPU time, interleaved repetitions."""

from __future__ import annotations

import contextlib
import os
import time

import mlflow
from mlflow.tracking import fluent

from latentgate.config import Config, resolve
from latentgate.tracking.tracker import NullTracker

# ---- configs --------------------------------------------------------------------------------------------------


def bench_config(preset: str = "smoke", overrides: dict | None = None, threads: int | None = None) -> Config:
    """The preset's config (model sizes, batch size, losses) with the bench's step budget overrides."""
    ov = dict(overrides or {})
    if threads is not None:
        ov["run.threads"] = threads
    return resolve(preset, ov)


def stage_overrides(stage: str, steps: int, probe_every: int, checkpoint_every: int) -> dict:
    return {f"{stage}.steps": steps, f"{stage}.warmup_steps": min(2, steps - 1), f"{stage}.probe_every": probe_every,
            f"{stage}.checkpoint_every": checkpoint_every}


@contextlib.contextmanager
def temp_env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def mlflow_state():
    """Give back MLflow's process-wide tracking URI and active experiment after the bench used its own store."""
    uri, exp = mlflow.get_tracking_uri(), getattr(fluent, "_active_experiment_id", None)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri)
        if hasattr(fluent, "_active_experiment_id"):
            fluent._active_experiment_id = exp


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds. Both are always reported; `JUDGE_CLOCK` picks the one the CPU comparisons are
    judged on. On a shared machine CPU time is the low-noise measure of work done (other people's jobs stretch
    our wall time, not our CPU time; measured here: wall 2.5x CPU under load, CPU time within a few % run to run).
    It misses time spent waiting on I/O; the SQLite store's fsyncs are a small part of a log_batch here."""
    return time.perf_counter(), time.process_time()


CLOCKS = ("wall", "cpu")
JUDGE_CLOCK = {"clock": "cpu"}  # set by `latentgate bench --clock`


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


class StepClock:
    """Wraps a tracker (NullTracker by default) and notes the clock each time the trainer logs a step's metrics,
    i.e. at the end of every optimizer step (after its probe, if it had one)."""

    def __init__(self, inner=None):
        self.inner = inner if inner is not None else NullTracker()
        self.marks: list[tuple[float, float]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.marks.append(clock())
        self.inner.log_metrics(metrics, step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def segments(start: tuple[float, float], marks: list[tuple[float, float]], end: tuple[float, float] | None = None):
    """(wall, cpu) durations between consecutive clock readings."""
    points = [start, *marks] + ([end] if end is not None else [])
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(points, points[1:], strict=False)]


def best_of(reps: list[list[tuple[float, float]]], which: slice | None = None) -> tuple[float, float]:
    """Per segment, the fastest repetition (noise on a shared machine only ever adds time), summed: (wall, cpu).
    The work in segment k is identical in every repetition (same weights, batches and seeds)."""
    n = min(len(r) for r in reps)
    idx = range(n)[which or slice(None)]
    return (sum(min(r[k][0] for r in reps) for k in idx), sum(min(r[k][1] for r in reps) for k in idx))


def split_clocks(samples: list[tuple[float, float]]) -> dict[str, list[float]]:
    return {"wall": [x[0] for x in samples], "cpu": [x[1] for x in samples]}


def total_of(rep: list[tuple[float, float]], which: slice | None = None) -> tuple[float, float]:
    part = rep[which or slice(None)]
    return sum(x[0] for x in part), sum(x[1] for x in part)
