"""`pipeline`: the plan's decision tree, carried out and recorded.

    base -> stage_a -> Phase 1 (extend) -> eval -> the gate (check_candidate, read-only)
      the gate passes                           -> promote (alias hero); stop before the hero unless --launch-hero
      the gate refuses, and:
        mode collapse (one answer for many       -> Phase 2 (sweep), rule `collapsed`: a model that says the same
          inputs, or repetition)                    thing to everyone is not an exposure-bias case
        no F1 breakthrough, first-token learning -> Phase 3 (fix: scheduled sampling) -> eval -> the gate
        otherwise                                -> Phase 2 (sweep) -> eval of the best trial -> the gate
                                                    -> Phase 3 if still refused
    "The gate passes" is the gate's own verdict: every criterion the checklist marks as deciding passes, whatever
    the criteria shown only say (a latent F1 of 0 included). "F1 breakthrough", "first-token learning" and "mode
    collapse" are the checklist's criteria f1_breakthrough (best example F1), first_token_learning (final first-token
    LIFT: the probe's first-token accuracy minus the better of its controls, constant guess and shuffled latent; raw
    accuracy is shown, never read as learning) and no_mode_collapse. No new phase starts once the budget is spent.
    Every threshold and comparison comes from the checklist file (registry/hero.yaml, through
    latentgate.registry.checklist), none from a constant here.

Like MLflow's multistep example, each step is an entry point run (`mlflow.projects.run`, with our env_manager
passed on: inner runs do not inherit it) and a FINISHED run with the same entry point, resolved config (step key)
input URI and git commit is reused instead of run again. Steps hand each other checkpoints as runs:/ URIs. Every
decision, the evidence it used (metric values, run ids) and the rule that fired go to the pipeline run as
decisions.json and decisions.md. `decide` is a pure function, so each branch is testable with synthetic evidence.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import ExecutionException
from mlflow.projects import _project_spec

from latentgate.config import Config, flatten, parse_set_args, resolve
from latentgate.errors import ConfigError, LatentgateError
from latentgate.phases.entry import INPUT_PARAM, hero, run_entry
from latentgate.pipeline.summary import PipelineSummary, Step, decisions_markdown
from latentgate.registry.approval import HeroRequest, plan_hero
from latentgate.registry.checklist import load_checklist
from latentgate.registry.decisions import (
    HERO,
    PROMOTE,
    STOP,
    SWEEP,
    Decision,
    PhaseEvidence,
    decide,
    evidence_from_report,
)
from latentgate.registry.gate import check_candidate, promote
from latentgate.registry.model import version_for_eval_run
from latentgate.schema import Artifact, SweepTag, Tag
from latentgate.sweep.study import load_study
from latentgate.tracking import lineage
from latentgate.tracking.reuse import find_phase_run, reuse_key
from latentgate.tracking.runs import adopt_project_run, git_commit, setup_experiment, tracked_run
from latentgate.tracking.uris import ModelUri, RunUri
from latentgate.train.workspace import load_splits

ROOT = Path(__file__).resolve().parents[3]

# ---- phase configs ----------------------------------------------------------------------------------------------

def phase_overrides(phase: str, cfg: Config) -> dict:
    """A phase relative to the pipeline's preset: Phase 1 doubles Stage B's OPTIMIZER-step budget; Phase 3 keeps
    that budget and adds scheduled sampling (p_gold 1.0 -> 0.5) at a constant LR (the cosine decay the plan proposed
    against regression lowered latent F1 in every seed of the README's A/B on the hard preset). For the smoke preset
    these equal the extend and fix presets (a test holds them to it)."""
    doubled = {"stage_b.steps": 2 * cfg.stage_b.steps}
    if cfg.stage_b.checkpoint_every == 0:  # a long phase should be resumable
        doubled["stage_b.checkpoint_every"] = max(1, cfg.stage_b.steps // 3)
    if phase == "extend":
        return doubled
    if phase == "fix":
        return {**doubled, "stage_b.scheduled_sampling": True, "stage_b.p_gold_floor": 0.5,
                "stage_b.schedule": "constant"}
    raise ConfigError(f"no phase overrides for {phase!r}", "use extend or fix")


# ---- steps: run an entry point, or reuse a finished run -------------------------------------------------------

@dataclass
class PipelineOptions:
    preset: str = "smoke"
    overrides: dict = field(default_factory=dict)
    launch_hero: bool = False
    checklist: str | None = None
    budget_minutes: float = 0.0
    env_manager: str = "local"
    runner: str = "project"  # project | inprocess
    hero_scale: float = 0.0  # 0: the checklist's hero.scale
    sweep_study: str = "phase2"
    sweep_trials: int = 0


def _overrides_string(overrides: dict) -> str:
    parts = []
    for k, v in overrides.items():
        text = str(v).lower() if isinstance(v, bool) else str(v)
        if not text or any(c.isspace() for c in text):
            raise ConfigError(f"pipeline override {k}={text!r} is empty or contains white space",
                              "pass pipeline overrides as key=value without spaces")
        parts.append(f"{k}={text}")
    return " ".join(parts)


class ProjectRunner:
    """Each step is `mlflow.projects.run` of this project's entry point, nested under the pipeline's run."""

    def __init__(self, env_manager: str, experiment_id: str):
        self.env_manager = env_manager
        self.experiment_id = experiment_id
        bindir = str(Path(sys.executable).parent)  # `latentgate` of this interpreter, for the MLproject commands
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    def run(self, entry_point: str, params: dict) -> str:
        try:
            submitted = mlflow.projects.run(uri=str(ROOT), entry_point=entry_point, parameters=params,
                                            env_manager=self.env_manager, experiment_id=self.experiment_id,
                                            synchronous=False)
        except ExecutionException as err:
            raise LatentgateError(f"step {entry_point} could not start: {str(err).splitlines()[0][:300]}",
                                  "check the MLproject entry point and its parameters") from None
        return _wait(entry_point, submitted)


class InProcessRunner:
    """Each step runs its entry point function in this process (same runs, tags and reuse; no `mlflow run`
    start-up cost). For tests and quick local use."""

    def run(self, entry_point: str, params: dict) -> str:
        if entry_point == "hero":
            request = HeroRequest(scale=float(params["scale"]) or None, checklist=params["checklist"] or None)
            return hero(request).run_id
        cfg = resolve(params["preset"], parse_set_args([params.get("overrides", "")]))
        return run_entry(entry_point, cfg, params["preset"], params.get(INPUT_PARAM.get(entry_point, ""), "")).run_id


def _wait(entry_point: str, submitted) -> str:
    """Wait for an inner `mlflow run`; a run its process left RUNNING (killed) is ended here."""

    ok = submitted.wait()
    client = lineage.client()
    if client.get_run(submitted.run_id).info.status == "RUNNING":
        client.set_terminated(submitted.run_id, status="FINISHED" if ok else "FAILED")
    if not ok:
        raise StepFailed(entry_point, submitted.run_id)
    return submitted.run_id


class StepFailed(LatentgateError):
    def __init__(self, entry_point: str, run_id: str):

        error = lineage.client().get_run(run_id).data.tags.get(Tag.ERROR, "see the run's log")
        super().__init__(f"step {entry_point} failed (run {run_id}): {error}",
                         f"fix the cause; `latentgate resume {run_id}` continues a training step from its checkpoint")


def already_ran(entry_point: str, cfg: Config, input_uri: str, commit: str, experiment_id: str) -> str | None:
    """A FINISHED run of `entry_point` with the same reuse key (tracking/reuse.py: resolved config, input URI, git
    commit, data digests) and the same logged config."""
    key = reuse_key(entry_point, cfg, input_uri, load_splits(cfg), commit=commit)
    return find_phase_run(lineage.client(), experiment_id, key, cfg)


class Pipeline:
    def __init__(self, opts: PipelineOptions, tracker, runner, experiment_id: str, commit: str, checklist):
        self.opts, self.tr, self.runner = opts, tracker, runner
        self.experiment_id, self.commit, self.checklist = experiment_id, commit, checklist
        self.t0 = time.monotonic()
        self.steps: list[Step] = []
        self.decisions: list[Decision] = []

    def budget_left_s(self) -> float | None:
        if not self.opts.budget_minutes:
            return None
        return self.opts.budget_minutes * 60 - (time.monotonic() - self.t0)

    def step(self, entry_point: str, overrides: dict | None = None, input_uri: str = "",
             preset: str | None = None, reuse_input: str | None = None) -> str:
        """Run `entry_point` on `input_uri`, or reuse a FINISHED run of it with the same config, input and commit
        (`reuse_input`: what the run records as its input, when that differs from the URI it is given)."""
        preset = preset or self.opts.preset
        merged = {**self.opts.overrides, **(overrides or {})}
        cfg = resolve(preset, merged)
        t0 = time.monotonic()
        run_id = already_ran(entry_point, cfg, reuse_input or input_uri, self.commit, self.experiment_id)
        reused = run_id is not None
        if not reused:
            params = {"preset": preset, "overrides": _overrides_string(merged)}
            if entry_point in INPUT_PARAM:
                params[INPUT_PARAM[entry_point]] = input_uri
            run_id = self.runner.run(entry_point, params)
        self.add(Step(entry_point, run_id, reused, input_uri, {k: str(v) for k, v in merged.items()},
                      round(time.monotonic() - t0, 1)))
        return run_id

    def add(self, step: Step) -> None:
        """Record a step: steps.json, and the pipeline run's children."""
        self.steps.append(step)
        self.tr.log_dict([asdict(s) for s in self.steps], "steps.json")
        self.tr.set_tags({Tag.CHILDREN: ",".join(s.run_id for s in self.steps if s.run_id)})

    def hero_step(self) -> str:
        """Phase 4: the hero of the approved version (phases/entry.py plan_hero, the same definition as `latentgate
        hero` and `latentgate calibrate`), or a FINISHED hero run of the same config, version and commit."""
        t0 = time.monotonic()
        checklist = str(self.checklist.path)
        start = plan_hero(HeroRequest(scale=self.opts.hero_scale or None, checklist=checklist))
        version_uri = str(ModelUri(start.approved.name, version=start.approved.version))
        run_id = already_ran("hero", start.plan.config, version_uri, self.commit, self.experiment_id)
        reused = run_id is not None
        if not reused:
            run_id = self.runner.run("hero", {"scale": self.opts.hero_scale, "checklist": checklist})
        self.add(Step("hero", run_id, reused, version_uri, seconds=round(time.monotonic() - t0, 1)))
        return run_id

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)
        self.tr.log_dict(self.summary().to_dict(), "decisions.json")
        self.tr.log_text(decisions_markdown(self.summary()), "decisions.md")

    def summary(self) -> PipelineSummary:
        return PipelineSummary(self.tr.run_id, self.opts.preset, dict(self.opts.overrides), self.commit,
                               str(self.checklist.path), self.checklist.sha256, tuple(self.steps),
                               tuple(self.decisions))


# ---- evidence, registry, sweep ------------------------------------------------------------------------------------

def gather_evidence(phase: str, stage_run: str, eval_run: str, opts: PipelineOptions, budget_left_s,
                    extra_runs: dict | None = None, checklist=None) -> PhaseEvidence:
    """A phase's evidence: the registry gate's report on its eval run (read-only), as the decision tree reads it."""
    checklist = checklist or load_checklist(opts.checklist)
    report = check_candidate(eval_run, checklist)
    return evidence_from_report(report, checklist, phase, budget_left_s, opts.launch_hero,
                                {"stage_b": stage_run, "eval": eval_run, **(extra_runs or {})})


def run_sweep_phase(pl: Pipeline, stage_a_uri: str) -> tuple[str, str, dict]:
    """Phase 2 through the `sweep` entry point (always an inner `mlflow run`, env_manager passed on). Returns the
    best trial's Stage B run (the one its eval run evaluated: the trial's own run holds only trial/* metrics, the
    probe histories and their controls are in its Stage B child), its eval run, and its tuned keys (relative to the
    pipeline's config)."""
    declared = _project_spec.load_project(str(ROOT)).get_entry_point("sweep").parameters
    # one study per (study file, Stage A run): a rerun of the pipeline continues it, another Stage A never does
    name = f"{load_study(pl.opts.sweep_study).name}-{lineage.run_id_of(stage_a_uri)[:8]}"
    wanted = {"study": pl.opts.sweep_study, "n_trials": pl.opts.sweep_trials or None, "resume_from": stage_a_uri,
              "name": name, "preset": pl.opts.preset, "overrides": _overrides_string(pl.opts.overrides)}
    params = {k: v for k, v in wanted.items() if k in declared and v is not None}
    t0 = time.monotonic()
    submitted = mlflow.projects.run(uri=str(ROOT), entry_point="sweep", parameters=params,
                                    env_manager=pl.opts.env_manager, experiment_id=pl.experiment_id,
                                    synchronous=False)
    _wait("sweep", submitted)
    client = lineage.client()
    tags = client.get_run(submitted.run_id).data.tags
    best, best_eval = tags.get(SweepTag.BEST_TRIAL_RUN), tags.get(SweepTag.BEST_EVAL_RUN)
    if not best or best == "None" or not best_eval or best_eval == "None":
        raise LatentgateError(f"the sweep run {submitted.run_id} names no best trial with an eval run "
                              f"({SweepTag.BEST_TRIAL}={tags.get(SweepTag.BEST_TRIAL)})",
                              "check the sweep's trials (latentgate sweep ...); at least one must complete")
    stage_b = lineage.run_id_of(client.get_run(best_eval).data.tags.get(Tag.CHECKPOINT, "")) or best
    trial = client.get_run(best).data.params
    base_cfg = flatten(resolve(pl.opts.preset, pl.opts.overrides))
    tuned = {k: v for k, v in trial.items() if k.startswith(("stage_b.", "model.lora_")) and k in base_cfg
             and str(base_cfg[k]) != v and " " not in v}
    pl.add(Step("sweep", submitted.run_id, input_uri=stage_a_uri, seconds=round(time.monotonic() - t0, 1),
                best_trial_run=best, best_stage_b_run=stage_b, best_eval_run=best_eval))
    return stage_b, best_eval, tuned


def promote_version(eval_run: str, checklist_path: str | None, name: str) -> str:
    """Move the alias `hero` to the eval run's model version (registered once: a rerun finds the version it
    registered before). The gate re-checks every criterion itself."""
    report = promote(version_for_eval_run(eval_run, name) or eval_run, dry_run=False, checklist=checklist_path,
                     name=name)
    if not report.passed:
        raise LatentgateError(f"the gate refused {eval_run} although its evaluation passed: {report.failing()}",
                              f"inspect `latentgate promote {eval_run} --dry-run true`")
    return str(report.version)


# ---- the pipeline ---------------------------------------------------------------------------------------------------

def run_pipeline(opts: PipelineOptions) -> PipelineSummary:
    cfg = resolve(opts.preset, opts.overrides)  # a bad override fails here, before any step
    _overrides_string(opts.overrides)
    checklist = load_checklist(opts.checklist)
    setup_experiment(cfg.run.experiment)
    commit = git_commit()[0]
    with tracked_run("pipeline", nested=False, run_id=adopt_project_run(),
                     tags={Tag.ENTRY_POINT: "pipeline", Tag.PRESET: opts.preset}) as tr:
        experiment_id = mlflow.get_run(tr.run_id).info.experiment_id
        tr.log_params({"pipeline.preset": opts.preset, "pipeline.launch_hero": opts.launch_hero,
                       "pipeline.budget_minutes": opts.budget_minutes, "pipeline.env_manager": opts.env_manager,
                       "pipeline.runner": opts.runner, "pipeline.checklist": str(checklist.path),
                       "pipeline.checklist_sha256": checklist.sha256, **flatten(cfg)})
        runner = ProjectRunner(opts.env_manager, experiment_id) if opts.runner == "project" else InProcessRunner()
        pl = Pipeline(opts, tr, runner, experiment_id, commit, checklist)
        pl.step("base")
        stage_a_uri = str(RunUri(pl.step("stage_a"), Artifact.checkpoint("stage_a")))
        phase, tuned = "extend", {}
        stage_over = phase_overrides("extend", cfg)
        stage_run = pl.step("extend", stage_over, stage_a_uri)
        eval_run = pl.step("eval", stage_over, str(RunUri(stage_run, Artifact.checkpoint("stage_b"))))
        extra: dict = {}
        while True:
            evidence = gather_evidence(phase, stage_run, eval_run, opts, pl.budget_left_s(), extra, checklist)
            decision = decide(evidence, checklist)
            pl.record(decision)
            if decision.next_phase in (PROMOTE, HERO):
                name = checklist.model_name
                version = promote_version(eval_run, opts.checklist, name)
                pl.add(Step("promote", input_uri=eval_run, version=version))
                if decision.next_phase == HERO:  # reused only for the same approved version and config
                    pl.hero_step()
                break
            if decision.next_phase == STOP:
                break
            if decision.next_phase == SWEEP:
                stage_run, eval_run, tuned = run_sweep_phase(pl, stage_a_uri)
                phase, extra = "sweep", {"sweep": pl.steps[-1].run_id}
                continue
            phase, extra = "fix", {}
            stage_over = {**phase_overrides("fix", cfg), **tuned}
            stage_run = pl.step("fix", stage_over, stage_a_uri)
            eval_run = pl.step("eval", stage_over, str(RunUri(stage_run, Artifact.checkpoint("stage_b"))))
        summary = pl.summary()
        tr.set_tags({Tag.FINAL_RULE: decision.rule, Tag.FINAL_NEXT: decision.next_phase})
        tr.log_dict(summary.to_dict(), "decisions.json")
        tr.log_text(decisions_markdown(summary), "decisions.md")
    return summary
