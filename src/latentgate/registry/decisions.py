"""The plan's decision tree, pure: what one phase produced (`PhaseEvidence`) -> the next phase (`decide`). The
pipeline follows it and the analysis report recommends with it; every threshold and comparison comes from the
checklist (registry/hero.yaml through `registry.checklist`). The gate is the one rule for the hero: a candidate it
passes goes on to promote and Phase 4; the plan's other branches apply only to one it refuses.

`evidence_from_report` and `collapse_of` are the one place that reads the gate's report (registry/gate.py
check_candidate) for the pipeline's decision and the analysis report: neither computes a figure of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentgate.eval.controls import Collapse
from latentgate.registry.checklist import BREAKTHROUGH, COLLAPSE, LEARNING, QUALITY

# next_phase values
PROMOTE, HERO, FIX, SWEEP, STOP = "promote", "hero", "fix", "sweep", "stop"


@dataclass(frozen=True)
class PhaseEvidence:
    """What one phase produced, as the decision tree reads it."""

    phase: str  # the phase just finished: extend | sweep | fix
    f1_max: float | None  # best latent F1 over the eval examples
    first_acc: float | None  # raw probe first-token accuracy at the registered checkpoint (never read as learning)
    checklist_passed: bool  # the gate's verdict (check_candidate, read-only): every DECIDING criterion passes
    f1_mean: float | None = None
    first_acc_lift: float | None = None  # lift over the controls there: what first_token_learning judges
    first_acc_const: float | None = None  # the probe's constant-guess control
    first_acc_shuffled: float | None = None  # the probe's shuffled-latent control, at the same step
    top_prediction_share: float | None = None  # eval, latent path: share of its most frequent (normalised) answer
    repetition_rate: float | None = None  # eval, latent path: share of repetitive predictions
    top_k_share: float | None = None  # eval, latent path: share of its top_k answers (the collapse rule's k)
    empty_share: float | None = None  # eval, latent path: share of empty answers
    checklist_failed: tuple[str, ...] = ()  # names of the criteria that failed or lacked evidence
    provenance_failed: tuple[str, ...] = ()  # those about where the evidence comes from (Checklist.provenance)
    budget_left_s: float | None = None  # None: no budget
    launch_hero: bool = False
    run_ids: dict = field(default_factory=dict)  # stage_b, eval (and sweep) runs the numbers come from


@dataclass(frozen=True)
class Decision:
    rule: str
    next_phase: str
    evidence: PhaseEvidence
    reason: str = ""


def decide(evidence: PhaseEvidence, checklist) -> Decision:
    """The plan's decision tree, with the gate as its one rule for Phase 4: where the gate passes (every deciding
    criterion of the checklist, `checklist_passed`), the next step is promote and then the hero, whatever a
    criterion that is only shown says (latent F1 0 included). Where it refuses, the plan's branches pick the next
    phase: `checklist` is the registry's Checklist, whose criteria f1_breakthrough, first_token_learning and
    no_mode_collapse supply every threshold and comparison (registry/hero.yaml); the only other number is the
    budget (spent when none is left)."""
    f1c, ftc = checklist.criterion(BREAKTHROUGH), checklist.criterion(LEARNING)
    f1_ok = f1c.compare(evidence.f1_max)
    ft_ok = ftc.compare(evidence.first_acc_lift)
    collapse = checklist.collapse_rule().why(evidence.top_prediction_share, evidence.repetition_rate,
                                             top_k_share=evidence.top_k_share, empty_share=evidence.empty_share)
    f1_txt = f"best example F1 {fmt_value(evidence.f1_max)} {'' if f1_ok else 'not '}{f1c.as_text()}"
    ft_txt = (f"final first-token lift {fmt_value(evidence.first_acc_lift)} {'' if ft_ok else 'not '}"
              f"{ftc.as_text()} (raw {fmt_value(evidence.first_acc)}; controls: constant guess "
              f"{fmt_value(evidence.first_acc_const)}, shuffled latent {fmt_value(evidence.first_acc_shuffled)})")
    spent = evidence.budget_left_s is not None and evidence.budget_left_s <= 0
    failed = ", ".join(evidence.checklist_failed) or "none"

    def out(rule: str, nxt: str, reason: str) -> Decision:
        return Decision(rule, nxt, evidence, reason)

    if evidence.checklist_passed:  # the gate's verdict, and nothing else, decides Phase 4
        gate_txt = f"the gate passes (every deciding criterion of the checklist; {f1_txt})"
        if evidence.launch_hero and not spent:
            return out("ready_launch_hero", HERO, f"{gate_txt}: promote, then the hero run")
        why = "budget spent" if evidence.launch_hero else "--launch-hero not given"
        return out("ready_stop_before_hero", PROMOTE, f"{gate_txt}: promote; stop before the hero ({why})")
    if evidence.provenance_failed:  # no phase of the plan can fix where the evidence comes from
        which = ", ".join(evidence.provenance_failed)
        return out("provenance", STOP, f"the evidence cannot be trusted as recorded ({which} failed): pin the eval "
                                       "set (eval_dataset_digest in the checklist) and re-run the lineage at one "
                                       "commit on it, then judge again; tuning would change nothing")
    if spent:
        return out("budget_exhausted", STOP, f"after {evidence.phase}: not ready (failed: {failed}) and the budget "
                                             "is spent")
    if evidence.phase == "extend":
        if collapse:
            return out("collapsed", SWEEP, f"{collapse}; {f1_txt}, {ft_txt}: the latent path answers alike whatever "
                                           f"the input, not exposure bias; checklist failed: {failed}: Phase 2 (sweep)")
        if not f1_ok and ft_ok:
            return out("exposure_bias", FIX, f"{f1_txt}, {ft_txt}: exposure bias, Phase 3 (scheduled sampling)")
        return out("needs_tuning", SWEEP, f"{f1_txt}, {ft_txt}, checklist failed: {failed}: Phase 2 (sweep)")
    if evidence.phase == "sweep":
        also = f"; {collapse}" if collapse else ""
        return out("still_short_after_sweep", FIX, f"best trial: {f1_txt}{also}, checklist failed: {failed}: Phase 3")
    return out("plan_exhausted", STOP, f"after {evidence.phase}: {f1_txt}, checklist failed: {failed}; no phase "
                                       "of the plan is left")


def evidence_from_report(report, checklist, phase: str, budget_left_s: float | None = None,
                         launch_hero: bool = False, run_ids: dict | None = None) -> PhaseEvidence:
    """The decision tree's evidence, read from the gate's report (registry/gate.py check_candidate): the one
    computation of every figure, never a second one."""
    def observed(name: str):
        r = report.row(name)
        return None if r is None else r.observed

    learning, collapse = report.row(LEARNING), collapse_of(report)
    shown = learning.shown if learning else {}
    show = (learning.params.get("show") if learning else None) or []
    raw, const, shuffled = ([shown.get(k) for k in show] + [None] * 3)[:3]  # show: [raw, constant, shuffled]
    failed = tuple(sorted(set(report.failing()))) + tuple(report.missing)
    provenance = tuple(n for n in checklist.provenance() if n in failed)
    return PhaseEvidence(phase=phase, f1_max=observed(BREAKTHROUGH), first_acc=raw,
                         checklist_passed=bool(report.passed), f1_mean=observed(QUALITY),
                         first_acc_lift=observed(LEARNING), first_acc_const=const,
                         first_acc_shuffled=shuffled,
                         top_prediction_share=None if collapse is None else collapse.top_prediction_share,
                         repetition_rate=None if collapse is None else collapse.repetition_rate,
                         top_k_share=None if collapse is None else collapse.top_k_share,
                         empty_share=None if collapse is None else collapse.empty_share, checklist_failed=failed,
                         provenance_failed=provenance, budget_left_s=budget_left_s, launch_hero=launch_hero,
                         run_ids=dict(run_ids or {}))


def collapse_of(report) -> Collapse | None:
    """The collapse statistics the gate judged (the evidence of its no_mode_collapse row, computed once by
    eval/controls.py collapse_stats); None without a report or without that evidence."""
    row = report.row(COLLAPSE) if report is not None else None
    return Collapse(**row.collapse) if row is not None and row.collapse else None


def fmt_value(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"
