"""Live monitor: poll the tracking store (any MLFLOW_TRACKING_URI: a SQLite file or a tracking server), print one
line per new probe and per eval, and raise alerts, in colour, as a run tag `latentgate.alert.<kind>` and through
an optional user command. It reads metric histories only; it never parses logs.

Alerts (kind: severity):
  new_peak         info      a new peak of the held-out probe first-token accuracy
  probe_f1         info      the probe's greedy F1 passed the checklist's f1_breakthrough during training (latent path)
  f1_breakthrough  info      the first eval whose latent F1 passes f1_breakthrough, on the LATENT path only (never the
                             text teacher or a control); the mean F1 is judged, so an alert means some example passes
  regression       warning   probe first_acc fell below its peak by more than first_token_stability allows (relative
                             drop; --regression-threshold overrides the checklist's threshold)
  collapse         warning   eval: the latent path collapsed as the checklist's no_mode_collapse defines it (one
                             prediction for more than its max_top_prediction_share of the inputs, or a repetition
                             share failing its threshold); training: a probe where every step since the previous
                             probe predicted one token
  grad_spike       warning   grad_norm > --spike-factor x the median of the previous steps, or failing gradient_health
  nan              critical  a NaN/inf metric, or a run that failed on a non-finite loss or gradient
  failed           critical  a watched run ended FAILED or KILLED
  stall            stall     no new metrics for --stall-minutes while the run is RUNNING
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import click
from mlflow.exceptions import MlflowException

from latentgate.analysis import history
from latentgate.errors import StoreError
from latentgate.registry.checklist import BREAKTHROUGH, GRADIENTS, STABILITY, CollapseRule, Criterion, load_checklist
from latentgate.schema import EvalKey, EvalPath, GradGroup, Loss, Probe, Stage, Tag
from latentgate.tracking import lineage

SEVERITY = {"new_peak": "info", "probe_f1": "info", "f1_breakthrough": "info", "regression": "warning",
            "collapse": "warning", "grad_spike": "warning", "nan": "critical", "failed": "critical",
            "stall": "stall"}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_WARNING, EXIT_STALLED, EXIT_CRITICAL = 0, 1, 2, 3, 4, 5
EXIT_FOR_SEVERITY = {"info": EXIT_OK, "warning": EXIT_WARNING, "stall": EXIT_STALLED, "critical": EXIT_CRITICAL}
# Exit codes: documented in latentgate.analysis.cli (monitor --help) and analysis/README.md.
COLOUR = {"info": "green", "warning": "yellow", "stall": "magenta", "critical": "red"}
STAGE_KEYS = (Stage.FIRST_ACC, Stage.LOSS, *Loss.RAW_KEYS, Stage.LR, *GradGroup.NORM_KEYS, Stage.TOKEN_DIVERSITY,
              *history.PROBE_KEYS)
NAN_KEYS = (Stage.LOSS, Stage.GRAD_NORM, *Loss.RAW_KEYS, Probe.key(Probe.FIRST_ACC), Probe.key(Probe.NLL))
PROBE_ACC, PROBE_F1 = Probe.key(Probe.FIRST_ACC), Probe.key(Probe.F1)  # the probe's record keys the monitor reads
SPIKE_MIN_HISTORY = 5
SPIKE_WINDOW = 50
SPIKE_COOLDOWN = 20


@dataclass
class Alert:
    kind: str
    message: str
    run_id: str
    step: int | None = None
    value: float | None = None
    severity: str = ""

    def __post_init__(self):
        self.severity = self.severity or SEVERITY[self.kind]


@dataclass
class Limits:
    """What alerts: the checklist's criteria, compared as the gate, the report and the pipeline compare them
    (`default_limits` reads them from the checklist file), and the monitor's own options."""

    stability: Criterion             # first_token_stability: a relative drop from the peak that fails it alerts
    gradients: Criterion             # gradient_health: a grad norm that fails it alerts
    breakthrough: Criterion          # f1_breakthrough: a latent F1 that passes it alerts (info)
    collapse: CollapseRule           # no_mode_collapse
    stall_minutes: float = 30.0
    spike_factor: float = 10.0

    @property
    def regression(self) -> float:
        return self.stability.threshold

    @property
    def grad_limit(self) -> float:
        return self.gradients.threshold


def _fmt_pct(v) -> str:
    return "   —  " if v is None else f"{v:6.1%}"


def probe_line(stage: str, step: int, rec: dict) -> str:
    lo, hi = rec.get(Probe.key(Probe.FIRST_ACC_LO)), rec.get(Probe.key(Probe.FIRST_ACC_HI))
    interval = f" [{lo:.1%}, {hi:.1%}]" if lo is not None and hi is not None else ""
    parts = [f"{stage:8s} step {step:5d}", f"first_acc {_fmt_pct(rec.get(PROBE_ACC))}{interval}"]
    if (lift := rec.get(Probe.key(Probe.LIFT))) is not None:
        parts.append(f"lift {lift:+.1%}")
    if (top5 := rec.get(Probe.key(Probe.FIRST_ACC_TOP5))) is not None:
        parts.append(f"top5 {top5:.1%}")
    if rec.get(PROBE_F1) is not None:
        parts.append(f"probe_f1 {rec[PROBE_F1]:.3f}")
    if rec.get(Stage.LR) is not None:
        parts.append(f"lr {rec[Stage.LR]:.2e}")
    if rec.get(Stage.LOSS) is not None:
        terms = " ".join(f"{t} {rec[Loss.key(t)]:.3g}" for t in Loss.TERMS if Loss.key(t) in rec)
        parts.append(f"loss {rec[Stage.LOSS]:.4g}" + (f" ({terms})" if terms else ""))
    if rec.get(Stage.GRAD_NORM) is not None:
        parts.append(f"grad {rec[Stage.GRAD_NORM]:.3g}")
    return "  ".join(parts)


def eval_line(run_id: str, metrics: dict[str, dict[str, float]]) -> str:
    latent = metrics.get(EvalPath.LATENT, {})
    top1 = latent.get(EvalKey.FIRST_TOP1)
    head = (f"eval     {run_id[:8]}   latent F1 {latent['f1']:.3f} EM {latent.get('em', 0):.3f}"
            + (f" first@1 {top1:.1%}" if top1 is not None else "")
            if "f1" in latent else f"eval     {run_id[:8]}   latent F1 pending")
    others = [f"{p} {m['f1']:.3f}" for p, m in metrics.items() if p != EvalPath.LATENT and "f1" in m]
    return head + (f"  | not latent (no alert): {', '.join(others)}" if others else "")


class StageWatch:
    """Alert state of one stage of one run; `update` consumes the steps not seen yet."""

    def __init__(self, run_id: str, stage: str, limits: Limits, batch_size: int | None):
        self.run_id, self.stage, self.limits, self.batch_size = run_id, stage, limits, batch_size
        self.done_step = 0
        self.peak: float | None = None
        self.peak_step = 0
        self.regression_raised = False
        self.grads: list[float] = []
        self.last_spike = -10**9
        self.nan_keys: set[str] = set()
        self.collapse_raised = False
        self.probe_f1_raised = False
        self.single_token_since_probe = True
        self.diversity_seen = False
        self.probes_seen = 0
        self.last_ts_ms = 0

    def update(self, series: dict[str, list[tuple[int, float, int]]], terminal: bool):
        by_step: dict[int, dict[str, float]] = {}
        for key, pts in series.items():
            for step, value, ts in pts:
                self.last_ts_ms = max(self.last_ts_ms, ts)
                if step > self.done_step:
                    by_step.setdefault(step, {})[key] = value
        steps = sorted(by_step)
        if steps and not terminal:
            # The newest step may still be half-written (a batch split across two writes): wait for a later one.
            steps = steps[:-1]
        lines, alerts = [], []
        for step in steps:
            rec = by_step[step]
            self._check_step(step, rec, alerts)
            if PROBE_ACC in rec:
                lines.append(probe_line(self.stage, step, rec))
                self._check_probe(step, rec, alerts)
            self.done_step = step
        return lines, alerts

    def _alert(self, alerts, kind, message, step=None, value=None):
        alerts.append(Alert(kind, f"{self.stage} {self.run_id[:8]} step {step}: {message}", self.run_id, step, value))

    def _check_step(self, step: int, rec: dict, alerts: list) -> None:
        for key in NAN_KEYS:
            v = rec.get(key)
            if v is not None and not math.isfinite(v) and key not in self.nan_keys:
                self.nan_keys.add(key)
                self._alert(alerts, "nan", f"{self.stage}/{key} is {v}", step, v)
        g = rec.get(Stage.GRAD_NORM)
        if g is not None and math.isfinite(g):
            window = self.grads[-SPIKE_WINDOW:]
            med = statistics.median(window) if len(window) >= SPIKE_MIN_HISTORY else None
            relative = med is not None and med > 0 and g > self.limits.spike_factor * med
            unhealthy = not self.limits.gradients.compare(g)
            if (relative or unhealthy) and step - self.last_spike > SPIKE_COOLDOWN:
                self.last_spike = step
                why = f"> {self.limits.spike_factor:g}x the median {med:.3g}" if relative \
                    else f"is not {self.limits.gradients.as_text()} ({self.limits.gradients.name})"
                self._alert(alerts, "grad_spike", f"grad_norm {g:.3g} {why}", step, g)
            self.grads.append(g)
        div = rec.get(Stage.TOKEN_DIVERSITY)
        if div is not None and self.batch_size:
            self.diversity_seen = True
            self.single_token_since_probe &= div <= 1.0 / self.batch_size + 1e-9

    def _check_probe(self, step: int, rec: dict, alerts: list) -> None:
        acc = rec[PROBE_ACC]
        self.probes_seen += 1
        if not math.isfinite(acc):
            return
        if acc > 0 and (self.peak is None or acc > self.peak):
            prev = "" if not self.peak else f" (previous {self.peak:.1%} at step {self.peak_step})"
            self.peak, self.peak_step, self.regression_raised = acc, step, False
            self._alert(alerts, "new_peak", f"new peak probe first_acc {acc:.1%}{prev}", step, acc)
        elif self.peak is None:
            self.peak, self.peak_step = acc, step
        drop = (self.peak - acc) / self.peak if self.peak else None
        if drop is not None and not self.regression_raised and not self.limits.stability.compare(drop):
            self.regression_raised = True
            self._alert(alerts, "regression", f"probe first_acc {acc:.1%} is {drop:.0%} below its peak "
                        f"{self.peak:.1%} (step {self.peak_step}; threshold {self.limits.regression:.0%})", step, acc)
        f1, rule = rec.get(PROBE_F1), self.limits.breakthrough
        if f1 is not None and rule.compare(f1) and not self.probe_f1_raised:
            self.probe_f1_raised = True
            self._alert(alerts, "probe_f1", f"probe greedy F1 {f1:.3f} {rule.as_text()} (latent path, during "
                        "training)", step, f1)
        if (self.probes_seen > 1 and self.diversity_seen and self.single_token_since_probe
                and not self.collapse_raised):
            self.collapse_raised = True
            self._alert(alerts, "collapse", "every batch since the previous probe predicted a single first token "
                        "(token_diversity at its floor)", step, rec.get(Stage.TOKEN_DIVERSITY))
        self.single_token_since_probe, self.diversity_seen = True, False


class EvalWatch:
    def __init__(self, run_id: str, limits: Limits):
        self.run_id, self.limits = run_id, limits
        self.seen: dict | None = None
        self.raised: set[str] = set()

    def update(self, metrics: dict[str, dict[str, float]]):
        lines, alerts = [], []
        if not metrics or metrics == self.seen:
            return lines, alerts
        self.seen = metrics
        lines.append(eval_line(self.run_id, metrics))
        latent = metrics.get(EvalPath.LATENT, {})  # the latent path only: a text-teacher or control F1 never alerts
        tag = f"eval {self.run_id[:8]}"
        bad = {k: v for k, v in latent.items() if not math.isfinite(v)}
        if bad and "nan" not in self.raised:
            self.raised.add("nan")
            alerts.append(Alert("nan", f"{tag}: non-finite latent metrics {bad}", self.run_id))
        # The mean latent F1 (a metric) stands for the criterion's best example F1: a mean that passes means an
        # example that passes (at a threshold of 0 the two verdicts are the same).
        f1, rule = latent.get("f1"), self.limits.breakthrough
        if f1 is not None and rule.compare(f1) and "f1_breakthrough" not in self.raised:
            self.raised.add("f1_breakthrough")
            alerts.append(Alert("f1_breakthrough", f"{tag}: BREAKTHROUGH latent F1 {f1:.4f} {rule.as_text()}",
                                self.run_id, 0, f1))
        share = latent.get(EvalKey.TOP_PREDICTION_SHARE)
        why = self.limits.collapse.why(share, latent.get(EvalKey.REPETITION_RATE))
        if "collapse" not in self.raised and why:
            self.raised.add("collapse")
            alerts.append(Alert("collapse", f"{tag}: latent path {why}", self.run_id, 0, share))
        return lines, alerts


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


def default_limits(regression: float | None = None, stall_minutes: float = 30.0, spike_factor: float = 10.0,
                   checklist_path=None) -> Limits:
    """Limits from the readiness checklist (stability, gradient health, F1 breakthrough, mode collapse);
    `regression` overrides first_token_stability's threshold."""
    cl = load_checklist(checklist_path)
    return Limits(stability=cl.criterion(STABILITY).with_threshold(regression), gradients=cl.criterion(GRADIENTS),
                  breakthrough=cl.criterion(BREAKTHROUGH), collapse=cl.collapse_rule(), stall_minutes=stall_minutes,
                  spike_factor=spike_factor)
