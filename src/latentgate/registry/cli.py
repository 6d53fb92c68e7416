"""Registry subcommands: promote, demote, verify, register. Top-level imports: click only (fast --help)."""

from __future__ import annotations

import click

from latentgate.cli_common import guarded

_CHECKLIST = click.option("--checklist", default=None, type=click.Path(dir_okay=False),
                          help="checklist file (default: registry/hero.yaml)")
_NAME = click.option("--name", default=None, help="registered model name (default: the checklist's model_name)")


def _refuse_if_failed(report, what: str) -> None:
    from latentgate.errors import GateRefused

    if not report.passed:
        failing = ", ".join(report.failing()) or "missing evidence"
        raise GateRefused(f"{what}: failing criteria: {failing}",
                          "see the table above (--explain shows each query); fix the run, or the checklist in a "
                          "reviewed change")


@click.command()
@click.argument("version_or_run")
@click.option("--dry-run", "dry_run", type=click.BOOL, default=False, show_default=True,
              help="true: evaluate and print the table, change nothing")
@click.option("--explain", is_flag=True, help="also print each criterion's query and what it found (changes nothing)")
@_CHECKLIST
@_NAME
@guarded
def promote(version_or_run, dry_run, explain, checklist, name):
    """Evaluate the hero checklist for VERSION_OR_RUN (a model version, or an eval/smoke run, which is registered
    first) and move the alias `hero` only if every criterion passes. Exit 4 when refused."""
    from latentgate.registry.gate import promote as do_promote
    from latentgate.registry.gate_report import format_table

    report = do_promote(version_or_run, dry_run=dry_run or explain, checklist=checklist, name=name)
    click.echo(format_table(report, explain=explain))
    from latentgate.registry.calibration import calibration_note  # what the latest calibration says; recorded too

    recorded = None if dry_run or explain else report.version
    click.echo(calibration_note(report.eval_run, report.passed, version=recorded, name=report.model_name,
                                checklist=checklist))
    _refuse_if_failed(report, f"{version_or_run} {'would be ' if dry_run or explain else ''}refused")


@click.command()
@click.argument("version")
@click.option("--reason", required=True, help="why (kept in the version's tags)")
@click.option("--to", "to", default=None, help="then promote this version (the alias moves only if it passes)")
@_CHECKLIST
@_NAME
@guarded
def demote(version, reason, to, checklist, name):
    """Take the alias `hero` off VERSION (history stays in its tags); optionally promote --to another version."""
    from latentgate.registry.gate import demote as do_demote
    from latentgate.registry.gate_report import format_table

    out = do_demote(version, reason, to=to, checklist=checklist, name=name)
    held = "it held the alias" if out["held_alias"] else "it did not hold the alias"
    click.echo(f"version {out['version']}: demoted ({held})")
    if out["promoted"] is not None:
        click.echo(format_table(out["promoted"]))
    click.echo(f"alias {out['alias']} -> {('version ' + out['holder']) if out['holder'] else 'nobody'}")
    if out["promoted"] is not None:
        _refuse_if_failed(out["promoted"], f"version {to} refused")


@click.command()
@_CHECKLIST
@_NAME
@click.option("--explain", is_flag=True, help="also print each criterion's query and what it found")
@guarded
def verify(checklist, name, explain):
    """Re-check the version holding `hero`: an alias set by hand, or evidence that no longer passes, fails (exit 4)."""
    from latentgate.registry.approval import verify as do_verify
    from latentgate.registry.gate_report import format_table

    report = do_verify(checklist=checklist, name=name)
    click.echo(format_table(report, explain=explain))
    _refuse_if_failed(report, f"the alias {report.alias} does not hold")


@click.command()
@click.argument("eval_run")
@_CHECKLIST
@_NAME
@guarded
def register(eval_run, checklist, name):
    """Register a finished eval run's model (pyfunc: checkpoint, base LM, tokenizer, contract) as a new version."""
    from latentgate.registry.checklist import load_checklist
    from latentgate.registry.model import register_candidate

    name = name or load_checklist(checklist).model_name
    version = register_candidate(eval_run, name)
    click.echo(f"registered {name} version {version} (models:/{name}/{version}); next: latentgate promote {version}")


COMMANDS = [promote, demote, verify, register]
