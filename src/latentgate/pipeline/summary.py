"""What a pipeline run did, as types: each step (`Step`) and the whole run (`PipelineSummary`: its steps and the
decision tree's decisions), and how it is recorded (decisions.json, decisions.md) and printed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from latentgate.registry.decisions import Decision, fmt_value


@dataclass
class Step:
    """One step of the pipeline, as steps.json and decisions.json record it."""

    entry_point: str
    run_id: str = ""
    reused: bool = False
    input_uri: str = ""
    overrides: dict = field(default_factory=dict)
    seconds: float = 0.0
    version: str = ""  # promote: the model version the alias moved to
    best_trial_run: str = ""  # sweep: its best trial's run, that trial's Stage B and eval runs
    best_stage_b_run: str = ""
    best_eval_run: str = ""

    @property
    def what(self) -> str:
        """The run it ran or reused; for promote, the version."""
        return self.run_id or self.version


@dataclass(frozen=True)
class PipelineSummary:
    """A pipeline run: what `run_pipeline` returns, and decisions.json (`to_dict`) and decisions.md record."""

    run_id: str  # the pipeline's own run
    preset: str
    overrides: dict
    git_commit: str
    checklist_path: str
    checklist_sha256: str
    steps: tuple[Step, ...]
    decisions: tuple[Decision, ...]

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "preset": self.preset, "overrides": self.overrides,
                "git_commit": self.git_commit, "checklist": {"path": self.checklist_path,
                                                            "sha256": self.checklist_sha256},
                "steps": [asdict(s) for s in self.steps], "decisions": [asdict(d) for d in self.decisions]}


def decisions_markdown(summary: PipelineSummary) -> str:
    lines = ["# latentgate pipeline decisions", "",
             f"preset `{summary.preset}`, git commit `{summary.git_commit}`, checklist `{summary.checklist_path}` "
             f"(sha256 {summary.checklist_sha256[:12]})", "",
             "## Steps", "", "| step | run | reused | input |", "|---|---|---|---|"]
    for s in summary.steps:
        lines.append(f"| {s.entry_point} | {s.what} | {'yes' if s.reused else 'no'} | {s.input_uri} |")
    lines += ["", "## Decisions", ""]
    for i, d in enumerate(summary.decisions, 1):
        ev = d.evidence
        lines += [f"### {i}. after {ev.phase}: `{d.rule}` -> **{d.next_phase}**", "", d.reason, "",
                  "| evidence | value |", "|---|---|",
                  f"| best example latent F1 | {fmt_value(ev.f1_max)} |",
                  f"| mean latent F1 | {fmt_value(ev.f1_mean)} |",
                  f"| probe first-token accuracy at the registered checkpoint (raw) | {fmt_value(ev.first_acc)} |",
                  f"| first-token lift over the controls there | {fmt_value(ev.first_acc_lift)} |",
                  f"| controls at that step: constant guess, shuffled latent | {fmt_value(ev.first_acc_const)}, "
                  f"{fmt_value(ev.first_acc_shuffled)} |",
                  f"| latent top prediction share, repetition | {fmt_value(ev.top_prediction_share)}, "
                  f"{fmt_value(ev.repetition_rate)} |",
                  f"| checklist passed | {ev.checklist_passed} |",
                  f"| checklist failed | {', '.join(ev.checklist_failed) or '-'} |",
                  f"| budget left (s) | {fmt_value(ev.budget_left_s)} |"]
        lines += [f"| run {k} | {v} |" for k, v in ev.run_ids.items()]
        lines.append("")
    return "\n".join(lines)


def format_decisions(summary: PipelineSummary) -> str:
    out = [f"── latentgate pipeline ── run {summary.run_id}"]
    for s in summary.steps:
        out.append(f"  {s.entry_point:8s} {s.what}  {'(reused)' if s.reused else ''}")
    for d in summary.decisions:
        out.append(f"decision after {d.evidence.phase}: {d.rule} -> {d.next_phase}: {d.reason}")
    return "\n".join(out)
