"""`latentgate analyze | monitor | compare`: thin commands over latentgate.analysis. Top-level imports: click and
latentgate.cli_common only (`latentgate --help` must not import mlflow or matplotlib)."""

from __future__ import annotations

import click

from latentgate.cli_common import guarded
from latentgate.tracking.uris import RunUri

EXIT_CODES_HELP = """\b
Exit codes (the most severe alert seen wins):
  0  the run finished (or, without --follow, the snapshot was taken) with info alerts at most
  1  unexpected error
  2  usage or store error (unknown run id, unreachable tracking store, bad option)
  3  a warning alert was raised (regression, collapse, grad_spike)
  4  the run stalled (no new metrics for --stall-minutes); --follow stops there
  5  a critical alert (NaN/inf, or a watched run ended FAILED/KILLED)
  130  interrupted (Ctrl-C)"""


def _console():
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160, no_color=True)


def _check(ok: bool, problem: str, fix: str) -> None:
    if not ok:
        from latentgate.errors import ConfigError

        raise ConfigError(problem, fix)


@click.command()
@click.argument("target")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="also keep report.md, report.json and plots/ in this folder (default: a temporary folder)")
@click.option("--no-log", is_flag=True, help="do not log the report and plots to the run (under analysis/)")
@click.option("--last-n", default=3, show_default=True, type=int, help="probes the stability figures cover")
@click.option("--checklist", default=None, help="readiness checklist file (default: registry/hero.yaml)")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
@click.option("--json", "as_json", is_flag=True, help="print report.json instead of the tables")
@guarded
def analyze(target, out_dir, no_log, last_n, checklist, no_plots, as_json):
    """Breakthrough report for TARGET: a run id (a smoke parent, a stage run or an eval run) or a local
    diagnostics.jsonl. Peak / final / regression of the probe first-token accuracy, F1 breakthrough, mode
    collapse, gradient health, the readiness checklist and the plan's recommendation (hero-ready, phase3, phase2).
    Figures come from MLflow metric histories and run artifacts, never from logs."""
    import json
    import tempfile
    from pathlib import Path

    from latentgate.analysis.render import print_rich
    from latentgate.analysis.report import analyze as run_analyze

    _check(last_n >= 1, f"--last-n must be >= 1, got {last_n}", "pass --last-n 3 (the default)")
    with tempfile.TemporaryDirectory(prefix="latentgate-analyze-") as tmp:
        out = Path(out_dir) if out_dir else Path(tmp)
        rep, files = run_analyze(target, out, log=not no_log, last_n=last_n, checklist_path=checklist,
                                 plots=not no_plots)
        if as_json:
            click.echo(json.dumps(rep, indent=2, sort_keys=True, default=str))
            return
        print_rich(rep, _console())
        if rep.get("eval"):
            from latentgate.registry.calibration import calibration_note

            click.echo(calibration_note(rep["eval"]["run_id"], rep["readiness"]["passed"], checklist=checklist))
        if rep["run"]["run_id"] and not no_log:
            click.echo(f"logged: {RunUri(rep['run']['run_id'], 'analysis/')} (report.md, report.json"
                       f"{', plots/' if any(f.suffix == '.png' for f in files) else ''})")
        if out_dir:
            click.echo(f"written: {', '.join(str(f) for f in files)}")


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="keep polling until the run ends (or stalls)")
@click.option("--interval", default=10.0, show_default=True, type=float, help="seconds between polls")
@click.option("--stall-minutes", default=30.0, show_default=True, type=float,
              help="alert (exit 4) when a RUNNING run logs nothing for this long")
@click.option("--regression-threshold", default=None, type=float,
              help="relative drop from the peak probe first_acc that alerts (default: the checklist's "
                   "first_token_stability)")
@click.option("--spike-factor", default=10.0, show_default=True, type=float,
              help="grad_norm above this many times the median of the previous steps alerts")
@click.option("--on-alert", "on_alert", default=None, metavar="CMD",
              help="shell command run on each alert, with LATENTGATE_ALERT_KIND, _SEVERITY, _MESSAGE, _RUN_ID, "
                   "_ROOT_RUN_ID, _STEP, _VALUE in its environment (e.g. notify-send \"$LATENTGATE_ALERT_MESSAGE\")")
@click.option("--no-tags", is_flag=True, help="do not write latentgate.alert.<kind> tags on the runs")
@click.option("--checklist", default=None, help="readiness checklist file the default limits come from")
@guarded
def monitor(run_id, follow, interval, stall_minutes, regression_threshold, spike_factor, on_alert, no_tags,
            checklist):
    """Print one line per new probe (step, first_acc with its 95% interval, lr, losses) and per eval of RUN_ID
    and every run under it, and alert in colour, as a run tag latentgate.alert.<kind> and through --on-alert:
    new peak first_acc, first F1 > 0 at eval (latent path only, never the text teacher), regression from the
    peak, collapse, grad-norm spike, NaN, failed run, stall. Works with any MLFLOW_TRACKING_URI."""
    from latentgate.analysis.monitor import Monitor, default_limits

    _check(interval > 0, f"--interval must be > 0, got {interval}", "pass e.g. --interval 10")
    _check(stall_minutes > 0, f"--stall-minutes must be > 0, got {stall_minutes}", "pass e.g. --stall-minutes 30")
    _check(spike_factor > 1, f"--spike-factor must be > 1, got {spike_factor}", "pass e.g. --spike-factor 10")
    _check(regression_threshold is None or 0 < regression_threshold < 1,
           f"--regression-threshold must be in (0, 1), got {regression_threshold}", "pass e.g. 0.2 (20% below peak)")
    limits = default_limits(regression_threshold, stall_minutes, spike_factor, checklist)
    mon = Monitor(run_id, limits=limits, on_alert=on_alert, set_tags=not no_tags)
    click.echo(f"monitoring {run_id} ({mon.root.data.tags.get('latentgate.phase', 'run')}, {mon.root.info.status}); "
               f"regression > {limits.regression:.0%}, stall > {stall_minutes:g} min"
               + (f", polling every {interval:g} s" if follow else ""))
    if follow:
        code = mon.follow(interval)
    else:
        mon.poll()
        code = mon.exit_code()
    raise SystemExit(code)


@click.command()
@click.argument("run_ids", nargs=-1, required=True)
@click.option("--plot", default="compare_first_acc.png", show_default=True, type=click.Path(dir_okay=False),
              help="where to write the overlay of the probe first_acc curves")
@click.option("--no-plot", is_flag=True, help="skip the overlay plot")
@click.option("--json", "as_json", is_flag=True, help="print the comparison as JSON")
@guarded
def compare(run_ids, plot, no_plot, as_json):
    """Side by side: key metrics (peak/final probe first_acc, latent/text/token-budget F1, collapse, grad norm)
    and the params that differ across RUN_IDS (smoke vs extend vs sweep trials vs hero), plus an overlay plot."""
    import json
    from pathlib import Path

    from latentgate.analysis.compare import compare_runs, print_rich

    result = compare_runs(list(run_ids), plot=None if no_plot else Path(plot))
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print_rich(result, _console())


COMMANDS = [analyze, monitor, compare]
