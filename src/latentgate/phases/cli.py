"""`latentgate base | stage-a | stage-b | eval | extend | fix | hero | pipeline | resume`: the plan's phases, one
subcommand per MLproject entry point. Top-level imports: click and cli_common only (`latentgate --help` stays fast).
"""

from __future__ import annotations

import os

import click

from latentgate.cli_common import config_options, echo_main, guarded, resolve_config
from latentgate.schema import EvalKey, Probe

CHECKPOINT_HELP = "runs:/<run_id>/<path>, models:/<name>@<alias> (or /<version>), or a local checkpoint folder"


def _phase(entry_point: str, default_preset: str, input_option: str | None = None, implied: tuple = ()):
    """A click command running entry point `entry_point` with the shared config options. `implied` overrides
    define the phase whatever the preset (the user's own --set / --overrides still come after them)."""
    from_help = {"resume_from": f"Stage A checkpoint to start from: {CHECKPOINT_HELP}",
                 "checkpoint": f"checkpoint to evaluate: {CHECKPOINT_HELP}"}

    def command(preset, sets, overrides, **kwargs):
        cfg = resolve_config(preset, implied + tuple(sets), overrides, default_preset)
        from latentgate.phases.entry import run_entry

        result = run_entry(entry_point, cfg, preset or default_preset, kwargs.get(input_option or "", "") or "")
        echo_main(_summary(entry_point, result))

    command = guarded(command)
    command = config_options(command)
    if input_option:
        command = click.option(f"--{input_option.replace('_', '-')}", input_option, required=True,
                               help=from_help[input_option])(command)
    return command


def _summary(entry_point: str, result) -> str:
    """What a phase prints: its run, then by kind of result the checkpoint and last probe (a stage), every path's
    scores (an eval) or the base LM (base)."""
    from latentgate.phases.results import BaseResult, EvalResult, StageResult  # lazy: `--help` imports no MLflow

    lines = [f"{entry_point}: run {result.run_id}"]
    if isinstance(result, StageResult):
        lines.append(f"checkpoint  {result.checkpoint_uri}")
        if result.final_probe:
            lift = "" if result.final(Probe.LIFT) is None else (
                f" (lift {result.final(Probe.LIFT):+.1%} over the controls: constant guess "
                f"{result.final(Probe.CONST):.1%}, shuffled latent {result.final(Probe.SHUFFLED):.1%})")
            lines.append(f"probe first-token accuracy {result.final(Probe.FIRST_ACC) or 0:.1%}{lift} after "
                         f"{result.steps} optimizer steps")
    elif isinstance(result, EvalResult):
        for path, m in result.paths.items():
            lines.append(f"{path:16s} EM {m[EvalKey.EM]:.3f}  F1 {m[EvalKey.F1]:.3f}  "
                         f"first-token top-1 {m[EvalKey.FIRST_TOP1]:.3f}")
    elif isinstance(result, BaseResult):
        lines.append(f"base LM     {result.source}")
    return "\n".join(lines)


base = click.command("base", help="Train the builtin base LM (or reuse the registered one), then the sanity gate.")(
    _phase("base", "smoke"))
stage_a = click.command("stage-a", help="Stage A: encoder + adapter against the frozen base LM registered for "
                                        "this config.")(_phase("stage_a", "smoke"))
stage_b = click.command("stage-b", help="Stage B: LoRA + encoder + adapter, starting from a Stage A checkpoint.")(
    _phase("stage_b", "smoke", "resume_from"))
eval_ = click.command("eval", help="Score a checkpoint on every eval path (latent and its controls).")(
    _phase("eval", "smoke", "checkpoint"))
extend = click.command("extend", help="Phase 1: Stage B from a Stage A checkpoint with the budget doubled in "
                                      "optimizer steps (preset extend).")(_phase("extend", "extend", "resume_from"))
fix = click.command("fix", help="Phase 3: Stage B with scheduled sampling, p(gold) 1.0 -> 0.5 (preset fix).")(
    _phase("fix", "fix", "resume_from", implied=("stage_b.scheduled_sampling=true",)))


@click.command("hero")
@click.option("--scale", type=float, default=None,
              help="hero budget over the approved run: steps, warm-up, probe and checkpoint cadence x this "
                   "(default: hero.scale of the checklist)")
@click.option("--checklist", default=None, help="the checklist in force (default: registry/hero.yaml); the approving "
                                                "promotion must have used the same file")
@click.option("--dry-run", "dry_run", type=click.BOOL, default=False, show_default=True,
              help="print the hero's resolved config and its diff from the approved recipe; train nothing")
@click.option("--allow-recipe-change", "allow_recipe_change", is_flag=True,
              help="let --set change recipe keys (not budget or runtime ones); the diff is recorded on the run")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="runtime (run.device, run.threads, ...) or budget keys; recipe keys need --allow-recipe-change")
@click.option("--overrides", default="", help="space-separated key=value pairs, as --set (MLproject parameter)")
@guarded
def hero(scale, checklist, dry_run, allow_recipe_change, sets, overrides):
    """Phase 4: the approved recipe at the hero budget. Starts only from the version holding the registry alias
    `hero`, promoted under the checklist in force; its config is that version's Stage B config, budget x scale."""
    from latentgate.config import cli_overrides
    from latentgate.registry.approval import HeroRequest, plan_hero
    from latentgate.tracking.lineage import use_store

    request = HeroRequest(overrides=cli_overrides(sets, overrides), scale=scale or None, checklist=checklist or None,
                          allow_recipe_change=allow_recipe_change)
    if dry_run or not os.environ.get("MLFLOW_RUN_ID"):  # read from the registry first: no torch, no run yet, so
        use_store()  # a refusal comes in a second (inside `mlflow run`, the entry point marks its run FAILED)
        start = plan_hero(request)
        if dry_run:
            echo_main(start.as_text())
            return
    from latentgate.phases.entry import hero as run_hero
    from latentgate.phases.smoke import format_summary

    echo_main(format_summary(run_hero(request)))


@click.command("resume")
@click.argument("run_id")
@click.option("--allow-other-commit", is_flag=True, help="resume a run recorded at another git commit (both "
              "commits are recorded, and the registry's lineage check flags the run)")
@guarded
def resume(run_id, allow_other_commit):
    """Continue a killed or failed training phase (stage_a, stage_b, extend, fix) in the same MLflow run, from
    its last checkpoint. A FINISHED run is never overwritten."""
    from latentgate.phases.entry import resume as resume_run

    echo_main(_summary("resume", resume_run(run_id, allow_other_commit)))


COMMANDS = [base, stage_a, stage_b, eval_, extend, fix, hero, resume]
