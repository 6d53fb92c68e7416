"""`latentgate calibrate`: how well the gate predicts the hero. Top-level imports: click and cli_common only."""

from __future__ import annotations

import click

from latentgate.cli_common import config_options, guarded


@click.command()
@click.argument("set_file", default="cpu", required=False)
@click.option("--checklist", default=None, help="readiness checklist file (default: registry/hero.yaml); its "
              "calibration.hero_f1_target defines a successful hero")
@click.option("--allow-other-commit", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              show_default=True, help="also reuse chains trained at another git commit (same config, data and base "
              "LM): for a change you know leaves training and eval alone, e.g. a new rule file; the commits are "
              "recorded. A bare flag means true; the MLproject passes true or false")
@click.option("--check", is_flag=True, help="only validate the set file and print the resolved configurations")
@config_options
@guarded
def calibrate(set_file, checklist, allow_other_commit, check, preset, sets, overrides):
    """Run the configurations of SET_FILE (a name in calibrations/, default cpu, or a YAML path): for each, the
    smoke-scale chain and the checklist's verdict (no alias moves), and a hero-scale chain (the hero `latentgate
    hero` would run: steps, warm-up, probe and checkpoint cadence x hero_scale) whose outcome is hero latent F1 >=
    the checklist's target. Finished chains with the same resolved config, commit, data and base LM are reused.
    One parent run `calibrate <set>` records the confusion matrix, agreement, precisions, leave-one-out held-out
    verdicts at several hero targets, the cost ratio, smoke F1 vs hero F1 with a prediction interval,
    calibration.json and calibration.png. --preset replaces the set's default preset; --set / --overrides apply to every
    configuration."""
    import json

    from latentgate import config
    from latentgate.calibrate.spec import load_set

    cs = load_set(set_file, extra=config.cli_overrides(sets, overrides), preset=preset)
    if check:
        click.echo(json.dumps(cs.to_dict(), indent=2, sort_keys=True))
        return
    from latentgate.calibrate.report import format_summary  # lazy: the CLI starts without MLflow or torch
    from latentgate.calibrate.runner import run_calibration
    from latentgate.registry.checklist import load_checklist

    load_checklist(checklist).hero_f1_target()  # a checklist without the target fails before anything trains
    click.echo(format_summary(run_calibration(cs, checklist, echo=click.echo, allow_other_commit=allow_other_commit)))


COMMANDS = [calibrate]
