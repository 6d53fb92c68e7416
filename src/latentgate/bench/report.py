"""Bench results: one row per comparison, judged against its target, printed as a table and written as JSON and
markdown (bench-out/bench.json, bench-out/bench.md)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

PASS, FAIL, NOT_MEASURED, ERROR, INFO = "PASS", "FAIL", "not measured", "ERROR", "info"
_OPS: dict[str, Callable[[float, float], bool]] = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t,
                                                   ">": lambda v, t: v > t, "<": lambda v, t: v < t}


@dataclass
class Row:
    """One line of the table. `value` is compared with `threshold` through `op`; the verdict is `status`."""

    key: str
    what: str
    compared_with: str
    measured: str
    target: str
    status: str
    value: float | None = None
    op: str | None = None
    threshold: float | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def judge(value: float | None, op: str, threshold: float) -> str:
    if value is None:
        return NOT_MEASURED
    return PASS if _OPS[op](value, threshold) else FAIL


def ratio_row(key: str, what: str, compared_with: str, value: float | None, op: str, threshold: float,
              measured: str, unit: str = "x", details: dict | None = None) -> Row:
    return Row(key, what, compared_with, measured, f"{op} {threshold:g}{unit}", judge(value, op, threshold),
               value, op, threshold, details or {})


def not_measured(key: str, what: str, compared_with: str, target: str, why: str) -> Row:
    return Row(key, what, compared_with, f"not measured ({why})", target, NOT_MEASURED)


def error_row(key: str, what: str, compared_with: str, target: str, err: BaseException) -> Row:
    first = (str(err).splitlines() or [""])[0][:200]
    return Row(key, what, compared_with, f"error: {type(err).__name__}: {first}", target, ERROR)


# ---- timing ---------------------------------------------------------------------------------------------------

def interleave(variants: dict[str, Callable[[], object]], reps: int, counts: dict[str, int] | None = None,
               timer: Callable[[str, object, float], float] | None = None) -> dict[str, list[float]]:
    """Run the variants alternately (A B, B A, A B, ...) so machine noise hits both sides alike. Returns each
    variant's seconds per repetition. `counts` lets a slow variant run fewer repetitions (the first rounds);
    `timer(name, result, wall)` may replace the wall time with a time the variant measured itself."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    counts = counts or {}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            if len(times[name]) >= counts.get(name, reps):
                continue
            t0 = time.perf_counter()
            result = variants[name]()
            wall = time.perf_counter() - t0
            times[name].append(timer(name, result, wall) if timer else wall)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(fast: list[float], slow: list[float]) -> float:
    """Speed of `slow`-side relative to `fast`-side: median over repetitions of fast_i / slow_i (pairs taken
    from the same interleaved round, so a noisy round affects both)."""
    n = min(len(fast), len(slow))
    return statistics.median(fast[i] / slow[i] for i in range(n))


# ---- output ---------------------------------------------------------------------------------------------------

COLUMNS = (("what", "what"), ("compared_with", "compared with"), ("measured", "measured"), ("target", "target"),
           ("status", "result"))


def environment() -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def format_table(rows: list[Row], width: int = 60) -> str:
    """A plain-text table (fixed columns, long cells wrapped)."""
    limits = {"what": 34, "compared_with": 30, "measured": width, "target": 16, "status": 12}
    cells = [[textwrap.wrap(str(getattr(r, k)), limits[k]) or [""] for k, _ in COLUMNS] for r in rows]
    widths = [max([len(h)] + [len(line) for row in cells for line in row[i]]) for i, (_, h) in enumerate(COLUMNS)]
    sep = "  "
    header = sep.join(h.ljust(w) for (_, h), w in zip(COLUMNS, widths, strict=True))
    out = [header.rstrip(), sep.join("-" * w for w in widths)]
    for row in cells:
        for j in range(max(len(c) for c in row)):
            line = sep.join((c[j] if j < len(c) else "").ljust(w) for c, w in zip(row, widths, strict=True))
            out.append(line.rstrip())
    return "\n".join(out)


def format_markdown(rows: list[Row], env: dict) -> str:
    lines = [f"Measured {env.get('date', '')} on {env.get('cpus')} CPU cores"
             f"{' + ' + env['cuda'] if env.get('cuda') else ' (no GPU)'}, torch {env.get('torch')}, "
             f"{env.get('torch_threads')} torch thread(s), load average {env.get('load_average', 'n/a')}.", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(getattr(r, k)).replace("|", "\\|") for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[Row], out_dir: Path, env: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "bench.json", out_dir / "bench.md"
    js.write_text(json.dumps({"environment": env, "rows": [r.to_dict() for r in rows]}, indent=2, default=str))
    md.write_text(format_markdown(rows, env))
    return js, md


def overall(rows: list[Row]) -> bool:
    """True when no measured target failed or errored (rows not measured do not fail the bench)."""
    return not any(r.status in (FAIL, ERROR) for r in rows)
