"""`latentgate bench` (also `python -m latentgate.bench`, `make bench`). Top-level imports: click only."""

from __future__ import annotations

import sys

import click

from latentgate.cli_common import guarded

CHOICES = ("startup", "tracking", "generation", "step", "compile", "gpu")


@click.command("bench")
@click.option("--only", default=",".join(CHOICES), show_default=True,
              help="comma-separated comparisons to run (startup, tracking, generation, step, compile, gpu)")
@click.option("--smoke", is_flag=True, help="also time a full `latentgate smoke` in a subprocess (wall, peak RSS, F1)")
@click.option("--smoke-preset", default="smoke", show_default=True, help="preset for --smoke")
@click.option("--sweep", is_flag=True, help="also run the sweep comparisons: 2 workers vs 1 and pruning vs none "
              "(phase2, 8 and 16 smoke-size trials: ~25 min on 2 cores; with --quick: micro trials)")
@click.option("--preset", default="smoke", show_default=True, help="config whose model sizes the comparisons use")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="config override for the comparisons")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="torch threads (1 keeps CPU-time measurements clean on a shared machine)")
@click.option("--clock", type=click.Choice(["cpu", "wall"]), default="cpu", show_default=True,
              help="clock the CPU ratios are judged on (both are always reported)")
@click.option("--quick", is_flag=True, help="fewer repetitions and steps (a sanity run, not figures)")
@click.option("--reps", type=click.IntRange(1), default=None, help="repetitions per comparison (default per plan)")
@click.option("--out", "out_dir", default="bench-out", show_default=True, type=click.Path(file_okay=False),
              help="folder for bench.json and bench.md")
@guarded
def bench(only, smoke, smoke_preset, sweep, preset, sets, threads, clock, quick, reps, out_dir):
    """Side-by-side performance ratios with PASS/FAIL per target: tracking overhead, batched generation (vs HF
    batched and per-example `generate`), trainer step vs a bare loop, eager vs torch.compile, CLI start-up, GPU rows
    (when CUDA is there); --smoke and --sweep on request."""
    from pathlib import Path

    from latentgate import config
    from latentgate.bench.runner import BenchOptions, finish, run_bench
    from latentgate.errors import ConfigError

    keys = tuple(k.strip() for k in only.split(",") if k.strip())
    unknown = sorted(set(keys) - set(CHOICES))
    if unknown:
        raise ConfigError(f"unknown comparison(s) {unknown}", f"choose from {', '.join(CHOICES)}")
    opts = BenchOptions(only=keys, smoke=smoke, smoke_preset=smoke_preset, sweep=sweep, preset=preset,
                        threads=threads, clock=clock, quick=quick, reps=reps, out_dir=Path(out_dir),
                        overrides=config.cli_overrides(sets))
    rows = run_bench(opts, echo=lambda m: click.echo(m, err=True))
    ok = finish(rows, opts, echo=click.echo)
    sys.exit(0 if ok else 1)


COMMANDS = [bench]
