"""Live monitor: poll the tracking store (any MLFLOW_TRACKING_URI: a SQLite file or a tracking server), print one
line per new probe and per eval, and raise alerts, in colour, as a run tag `latentgate.alert.<kind>` and through
an optional user command. It reads metric histories only; it never parses logs.

The alert kinds and their rules: analysis/alerts.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field

import click
from mlflow.exceptions import MlflowException

from latentgate.analysis import history
from latentgate.analysis.alerts import Alert, EvalWatch, Limits, StageWatch, default_limits
from latentgate.errors import StoreError
from latentgate.schema import GradGroup, Loss, Stage, Tag
from latentgate.tracking import lineage

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_WARNING, EXIT_STALLED, EXIT_CRITICAL = 0, 1, 2, 3, 4, 5
EXIT_FOR_SEVERITY = {"info": EXIT_OK, "warning": EXIT_WARNING, "stall": EXIT_STALLED, "critical": EXIT_CRITICAL}
# Exit codes: documented in latentgate.analysis.cli (monitor --help) and analysis/README.md.
COLOUR = {"info": "green", "warning": "yellow", "stall": "magenta", "critical": "red"}
STAGE_KEYS = (Stage.FIRST_ACC, Stage.LOSS, *Loss.RAW_KEYS, Stage.LR, *GradGroup.NORM_KEYS, Stage.TOKEN_DIVERSITY,
              *history.PROBE_KEYS)


@dataclass
class Monitor:
    """Follow a run (and every run under it). `poll()` prints what is new; `follow()` loops until the run ends."""

    run_id: str
    limits: Limits = field(default_factory=lambda: default_limits())
    on_alert: str | None = None
    set_tags: bool = True
    echo: object = None          # callable(str, colour|None); default: click.echo with click.style
    clock: object = time.time
    client: object = None

    def __post_init__(self):
        self.client = self.client or lineage.client()
        self.root = history.get_run(self.client, self.run_id)  # fails early (exit 2) on an unknown id
        self.stage_watch: dict[tuple[str, str], StageWatch] = {}
        self.eval_watch: dict[str, EvalWatch] = {}
        self.signatures: dict[str, tuple] = {}
        self.failed_seen: set[str] = set()
        self.alerts: list[Alert] = []
        self.polls = 0
        self.last_activity: float | None = None
        self.finished = False
        self.stalled = False
        self._tag_warned = False

    # -- output --------------------------------------------------------------------------------------------
    def _echo(self, text: str, colour: str | None = None) -> None:
        if self.echo is not None:
            self.echo(text, colour)
            return
        click.echo(click.style(text, fg=colour, bold=True) if colour else text)

    def _emit(self, alert: Alert) -> None:
        self.alerts.append(alert)
        self._echo(f"ALERT {alert.kind} [{alert.severity}] {alert.message}", COLOUR[alert.severity])
        if self.set_tags:
            for rid in dict.fromkeys([alert.run_id, self.run_id]):
                try:
                    self.client.set_tag(rid, Tag.ALERT_PREFIX + alert.kind, alert.message[:5000])
                except Exception as err:  # noqa: BLE001 - a read-only store must not stop the monitor
                    if not self._tag_warned:
                        self._tag_warned = True
                        self._echo(f"latentgate: warning: cannot tag run {rid[:8]}: {str(err).splitlines()[0][:160]}")
        if self.on_alert:
            env = {**os.environ, "LATENTGATE_ALERT_KIND": alert.kind, "LATENTGATE_ALERT_SEVERITY": alert.severity,
                   "LATENTGATE_ALERT_MESSAGE": alert.message, "LATENTGATE_ALERT_RUN_ID": alert.run_id,
                   "LATENTGATE_ALERT_ROOT_RUN_ID": self.run_id,
                   "LATENTGATE_ALERT_STEP": "" if alert.step is None else str(alert.step),
                   "LATENTGATE_ALERT_VALUE": "" if alert.value is None else repr(alert.value)}
            try:
                done = subprocess.run(self.on_alert, shell=True, env=env, timeout=60)  # noqa: S602 (user's command)
                if done.returncode:
                    self._echo(f"latentgate: warning: --on-alert command exited {done.returncode}")
            except (OSError, subprocess.TimeoutExpired) as err:
                self._echo(f"latentgate: warning: --on-alert command failed: {err}")

    # -- one pass ------------------------------------------------------------------------------------------
    def poll(self) -> list[Alert]:
        """Read what is new in the store, print it, raise alerts. Returns the alerts of this pass."""
        now = self.clock()
        first = self.polls == 0
        self.polls += 1
        try:
            root = self.client.get_run(self.run_id)  # status first: whatever is read after it is at least as new
            runs = [root, *history.descendants(self.client, root)]
        except MlflowException as err:
            raise StoreError(f"tracking store read failed: {str(err).splitlines()[0][:200]}",
                             "check MLFLOW_TRACKING_URI / the server, then run the monitor again") from None
        lines: list[str] = []
        alerts: list[Alert] = []
        newest_ms = 0
        for run in runs:
            newest_ms = max(newest_ms, run.info.start_time or 0)
            rid, status = run.info.run_id, run.info.status
            signature = (status, tuple(sorted(run.data.metrics.items())))
            terminal = status in history.TERMINAL
            if self.signatures.get(rid) != signature:
                self.signatures[rid] = signature
                if not first:
                    self.last_activity = now
                keys = list(run.data.metrics)
                for prefix in history.stage_prefixes(keys):
                    w = self.stage_watch.get((rid, prefix))
                    if w is None:
                        bs = run.data.params.get(f"{prefix}.batch_size")
                        w = self.stage_watch[(rid, prefix)] = StageWatch(rid, prefix, self.limits,
                                                                         int(bs) if bs and bs.isdigit() else None)
                    stage_hist = history.load_stage(self.client, run, prefix, keys=STAGE_KEYS)
                    got = w.update(stage_hist.series, terminal)
                    lines += got[0]
                    alerts += got[1]
                    newest_ms = max(newest_ms, w.last_ts_ms)
                if history.is_eval_run(keys):
                    w = self.eval_watch.setdefault(rid, EvalWatch(rid, self.limits))
                    got = w.update(history.eval_metrics(run.data.metrics))
                    lines += got[0]
                    alerts += got[1]
            else:
                newest_ms = max(newest_ms, *(w.last_ts_ms for (r, _), w in self.stage_watch.items() if r == rid),
                                0)
            if status in ("FAILED", "KILLED") and rid not in self.failed_seen:
                self.failed_seen.add(rid)
                err = run.data.tags.get(Tag.ERROR, "")
                kind = "nan" if "non-finite" in err or "nan" in err.lower().split() else "failed"
                phase = run.data.tags.get(Tag.PHASE, "run")
                alerts.append(Alert(kind, f"{phase} {rid[:8]} ended {status}" + (f": {err[:300]}" if err else ""), rid))
        if first:
            self.last_activity = max(newest_ms / 1000, (root.info.start_time or 0) / 1000) if newest_ms else now
            alerts = _last_per_kind(alerts)  # catching up on history: the latest state of each alert, not all
        for line in lines:
            self._echo(line)
        for a in alerts:
            self._emit(a)
        self.finished = root.info.status in history.TERMINAL
        idle_s = now - (self.last_activity or now)
        if not self.finished and not self.stalled and idle_s > self.limits.stall_minutes * 60:
            self.stalled = True
            idle = (now - self.last_activity) / 60
            stall = Alert("stall", f"{root.data.tags.get(Tag.PHASE, 'run')} {self.run_id[:8]}: no new metrics "
                          f"for {idle:.1f} min (limit {self.limits.stall_minutes:g} min) while RUNNING", self.run_id)
            self._emit(stall)
            alerts.append(stall)
        return alerts

    def follow(self, interval: float = 10.0, max_polls: int | None = None) -> int:
        while True:
            self.poll()
            if self.finished or self.stalled or (max_polls is not None and self.polls >= max_polls):
                break
            time.sleep(interval)
        if self.finished:
            self._echo(f"run {self.run_id[:8]} {self.root_status()}; {len(self.alerts)} alert(s)")
        return self.exit_code()

    def root_status(self) -> str:
        return self.signatures.get(self.run_id, ("?",))[0]

    def exit_code(self) -> int:
        return max((EXIT_FOR_SEVERITY[a.severity] for a in self.alerts), default=EXIT_OK)


def _last_per_kind(alerts: list[Alert]) -> list[Alert]:
    last: dict[tuple[str, str], Alert] = {}
    for a in alerts:
        last.pop((a.run_id, a.kind), None)
        last[(a.run_id, a.kind)] = a
    return list(last.values())
