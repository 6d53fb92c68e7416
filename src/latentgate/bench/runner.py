"""Run the selected comparisons, one row each (an error in one becomes an ERROR row, never a lost table), then
print and write the table."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentgate.bench import generation, gpu, processes, report, step, timing, tracking_cost
from latentgate.bench.report import ERROR, NOT_MEASURED, Row
from latentgate.bench.sweeps import bench_sweep

KEYS = ("startup", "tracking", "generation", "step", "compile", "gpu")  # the default set; `smoke`, `sweep` on request


@dataclass
class BenchOptions:
    only: tuple[str, ...] = KEYS
    smoke: bool = False
    smoke_preset: str = "smoke"
    smoke_args: tuple[str, ...] = ()
    sweep: bool = False
    preset: str = "smoke"
    threads: int = 1
    clock: str = "cpu"
    quick: bool = False
    reps: int | None = None
    out_dir: Path = Path("bench-out")
    overrides: dict = field(default_factory=dict)

    def plan(self) -> dict:
        """Repetitions and step budgets per comparison (`--quick`: enough to exercise everything)."""
        q = self.quick
        return {"startup": {"reps": self.reps or (3 if q else 7)},
                "tracking": {"reps": self.reps or (2 if q else 3), "steps": 10 if q else 50},
                "generation": {"reps": self.reps or (2 if q else 3), "n": 200},
                "step": {"reps": self.reps or (2 if q else 3), "steps": 6 if q else 16},
                "compile": {"reps": self.reps or (1 if q else 3), "steps": 4 if q else 10, "warm": 1 if q else 2}}


def _sweep_rows(opts: BenchOptions) -> list[Row]:
    return bench_sweep(out_dir=opts.out_dir, quick=opts.quick, threads=opts.threads)


def run_bench(opts: BenchOptions, echo=print) -> list[Row]:
    torch.set_num_threads(max(1, opts.threads))
    timing.JUDGE_CLOCK["clock"] = opts.clock
    cfg = timing.bench_config(opts.preset, opts.overrides, threads=opts.threads)
    plan = opts.plan()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="latentgate-bench-") as tmp:
        work = Path(tmp)
        jobs = {
            "startup": (processes.STARTUP, lambda: processes.bench_startup(**plan["startup"])),
            "tracking": (tracking_cost.TRACKING,
                         lambda: tracking_cost.bench_tracking(cfg, work / "tracking", **plan["tracking"])),
            "generation": (generation.GENERATION,
                           lambda: generation.bench_generation(cfg, work / "generation", **plan["generation"])),
            "step": (step.STEP, lambda: step.bench_step(cfg, work / "step", **plan["step"])),
            "compile": (step.COMPILE, lambda: step.bench_compile(cfg, work / "compile", **plan["compile"])),
        }
        for key in opts.only:
            if key == "gpu":
                echo("bench: gpu ...")
                try:
                    rows += gpu.bench_gpu()
                except Exception as err:  # noqa: BLE001 - one failed comparison must not lose the table
                    rows.append(report.error_row("gpu_step", *gpu.GPU_STEP, err))
                continue
            if key not in jobs:
                continue
            what, fn = jobs[key]
            echo(f"bench: {key} ...")
            try:
                got = fn()
                new_rows = got if isinstance(got, list) else [got]
            except Exception as err:  # noqa: BLE001
                new_rows = [report.error_row(key, *what, err)]
            rows += new_rows
            for row in new_rows:
                echo(f"  {row.key} {row.status}: {row.measured}")
        if opts.smoke:
            echo(f"bench: smoke (latentgate smoke --preset {opts.smoke_preset}) ...")
            try:
                rows.append(processes.bench_smoke(opts.smoke_preset, list(opts.smoke_args), opts.out_dir))
            except Exception as err:  # noqa: BLE001
                rows.append(report.error_row("smoke", *processes.SMOKE, err))
        else:
            rows.append(report.not_measured("smoke", *processes.SMOKE, "run `latentgate bench --smoke`"))
        if opts.sweep:
            echo("bench: sweep ...")
            try:
                rows += _sweep_rows(opts)
            except Exception as err:  # noqa: BLE001
                rows.append(report.error_row("sweep", "sweep comparisons", "-", "-", err))
    return rows


def finish(rows: list[Row], opts: BenchOptions, echo=print) -> bool:
    env = report.environment()
    env.update({"clock": opts.clock, "preset": opts.preset, "quick": opts.quick})
    echo("")
    echo(report.format_table(rows))
    js, md = report.write_outputs(rows, opts.out_dir, env)
    echo(f"\nwritten: {js}, {md}")
    failed = [r.key for r in rows if r.status in (report.FAIL, ERROR)]
    skipped = [r.key for r in rows if r.status == NOT_MEASURED]
    if failed:
        echo(f"targets missed: {', '.join(failed)}")
    if skipped:
        echo(f"not measured: {', '.join(skipped)}")
    return not failed
