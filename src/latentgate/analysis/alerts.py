"""The monitor's alert rules: what a run's new metric points say, judged by the readiness checklist's criteria
(`Limits`, read from registry/hero.yaml by `default_limits`). A `StageWatch` follows one stage of one run, an
`EvalWatch` one eval run; each turns the points it has not seen into printed lines and `Alert`s. No store access:
analysis/monitor.py reads the store, prints, and delivers the alerts.

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
import statistics
from dataclasses import dataclass

from latentgate.registry.checklist import BREAKTHROUGH, GRADIENTS, STABILITY, CollapseRule, Criterion, load_checklist
from latentgate.schema import EvalKey, EvalPath, Loss, Probe, Stage

SEVERITY = {"new_peak": "info", "probe_f1": "info", "f1_breakthrough": "info", "regression": "warning",
            "collapse": "warning", "grad_spike": "warning", "nan": "critical", "failed": "critical",
            "stall": "stall"}
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


def default_limits(regression: float | None = None, stall_minutes: float = 30.0, spike_factor: float = 10.0,
                   checklist_path=None) -> Limits:
    """Limits from the readiness checklist (stability, gradient health, F1 breakthrough, mode collapse);
    `regression` overrides first_token_stability's threshold."""
    cl = load_checklist(checklist_path)
    return Limits(stability=cl.criterion(STABILITY).with_threshold(regression), gradients=cl.criterion(GRADIENTS),
                  breakthrough=cl.criterion(BREAKTHROUGH), collapse=cl.collapse_rule(), stall_minutes=stall_minutes,
                  spike_factor=spike_factor)
