"""`latentgate pipeline`. Top-level imports: click and cli_common only (`latentgate --help` stays fast)."""

from __future__ import annotations

import click

from latentgate.cli_common import config_options, guarded


@click.command("pipeline")
@click.option("--launch-hero", type=click.BOOL, default=False, show_default=True,
              help="after a promotion, go on to the hero run (default: stop before it)")
@click.option("--checklist", default="", help="readiness checklist file (default: registry/hero.yaml)")
@click.option("--budget-minutes", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="no new phase starts once this much wall time has passed (0: no limit)")
@click.option("--env-manager", default="local", show_default=True,
              help="env manager for every inner mlflow run (inner runs do not inherit the outer one's)")
@click.option("--runner", type=click.Choice(["project", "inprocess"]), default="project", show_default=True,
              help="project: each step is an `mlflow run` of its entry point; inprocess: steps run in this process")
@click.option("--hero-scale", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="hero budget over the approved run, as `latentgate hero --scale` (0: hero.scale of the checklist)")
@click.option("--sweep-study", default="phase2", show_default=True, help="sweep study of Phase 2 (sweeps/<name>.yaml)")
@click.option("--sweep-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="trials of the Phase 2 sweep (0: the study file's n_trials)")
@config_options
@guarded
def pipeline(launch_hero, checklist, budget_minutes, env_manager, runner, hero_scale, sweep_study, sweep_trials,
             preset, sets, overrides):
    """The plan's decision tree: Phase 1 -> checklist -> promote / Phase 3 / Phase 2 (+ Phase 3), reusing
    finished steps, with every decision recorded in decisions.json / decisions.md of the pipeline run."""
    from latentgate import config as cfgmod
    from latentgate.pipeline.run import PipelineOptions, run_pipeline
    from latentgate.pipeline.summary import format_decisions

    pairs = cfgmod.cli_overrides(sets, overrides)
    opts = PipelineOptions(preset=preset or "smoke", overrides=pairs, launch_hero=launch_hero,
                           checklist=checklist or None, budget_minutes=budget_minutes, env_manager=env_manager,
                           runner=runner, hero_scale=hero_scale, sweep_study=sweep_study,
                           sweep_trials=sweep_trials)
    click.echo(format_decisions(run_pipeline(opts)))


COMMANDS = [pipeline]
