"""Comparisons 4 and 5, run in subprocesses: CLI start-up against `python -c pass`, and the smoke itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from latentgate.bench.report import FAIL, PASS, Row, interleave, judge, median, ratio_row
from latentgate.schema import Summary

# ---- 4. CLI start-up ------------------------------------------------------------------------------------------

STARTUP = ("`latentgate --help` / `latentgate config` start-up (lazy imports)", "`python -c pass`", "<= 0.5 s")


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "latentgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "latentgate"]


def heavy_imports_at_startup() -> list[str]:
    """Heavy modules that `import latentgate.cli` pulls in (must be none)."""
    code = ("import sys, latentgate.cli; print(','.join(m for m in ('torch', 'mlflow', 'transformers', 'peft', "
            "'optuna', 'evaluate', 'pandas', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return [m for m in out.stdout.strip().split(",") if m]


def bench_startup(reps: int = 5) -> Row:
    cli = cli_command()
    cmds = {"python -c pass": [sys.executable, "-c", "pass"], "latentgate --help": cli + ["--help"],
            "latentgate config": cli + ["config"]}

    def runner(cmd):
        def go():
            subprocess.run(cmd, capture_output=True, check=True, timeout=60)
        return go

    times = interleave({k: runner(v) for k, v in cmds.items()}, reps)
    med = {k: median(v) for k, v in times.items()}
    worst = max(med["latentgate --help"], med["latentgate config"])
    heavy = heavy_imports_at_startup()
    details = {"reps": reps, "seconds": times, "median_s": med, "heavy_imports": heavy, "command": cli}
    measured = (f"--help {med['latentgate --help']:.2f} s, config {med['latentgate config']:.2f} s "
                f"(python -c pass {med['python -c pass']:.2f} s; +{worst - med['python -c pass']:.2f} s); "
                f"heavy imports at start-up: {', '.join(heavy) or 'none'}")
    row = ratio_row("startup", STARTUP[0], STARTUP[1], worst, "<=", 0.5, measured, unit=" s", details=details)
    if heavy:
        row.status = FAIL
    return row


# ---- 5. the smoke ---------------------------------------------------------------------------------------------

SMOKE = ("`latentgate smoke` on this CPU (base LM cached): wall time, latent F1, peak RSS", "-",
         "<= 5 min, F1 > 0, <= 2 GiB")
_RUN_ID = re.compile(r"run id\s+([0-9a-f]{32})")
_LATENT = re.compile(r"latent F1 / EM\s+([0-9.]+)\s*/\s*([0-9.]+)")
_WALL = re.compile(r"wall time\s+([0-9.]+)\s*s")
_URI = re.compile(r"--backend-store-uri\s+(\S+?)\)")


def parse_smoke_summary(text: str) -> dict:
    """run id, latent F1/EM and wall time from `format_summary` output."""
    out: dict = {}
    if m := _RUN_ID.search(text):
        out["run_id"] = m.group(1)
    if m := _LATENT.search(text):
        out[Summary.LATENT_F1], out[Summary.LATENT_EM] = float(m.group(1)), float(m.group(2))
    if m := _WALL.search(text):
        out["wall_seconds"] = float(m.group(1))
    if m := _URI.search(text):
        out["tracking_uri"] = m.group(1)
    return out


# Forks from this (possibly large) process: its exec'd child's ru_maxrss would start from our RSS, so a small
# launcher process forks the command and reports that child's own wait4 rusage.
_LAUNCHER = ("import json, os, sys\n"
             "pid = os.fork()\n"
             "if pid == 0:\n    os.execvp(sys.argv[2], sys.argv[2:])\n"
             "_, status, ru = os.wait4(pid, 0)\n"
             "open(sys.argv[1], 'w').write(json.dumps([ru.ru_maxrss, ru.ru_utime, ru.ru_stime]))\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def measure_subprocess(cmd: list[str], env: dict | None = None, cwd: Path | None = None,
                       log: Path | None = None) -> dict:
    """Run cmd; its wall time, exit code, peak RSS (bytes, from wait4's rusage of that very child) and output."""
    with tempfile.TemporaryDirectory(prefix="latentgate-measure-") as tmp:
        usage_file = Path(tmp) / "rusage.json"
        out_file = Path(tmp) / "output.txt"
        with out_file.open("w") as fh:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(usage_file), *cmd], stdout=fh,
                                  stderr=subprocess.STDOUT, env=env, cwd=cwd)
            wall = time.perf_counter() - t0
        text = out_file.read_text()
        max_rss_kib, user_s, sys_s = json.loads(usage_file.read_text())
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
    return {"wall_s": wall, "rc": proc.returncode, "max_rss_bytes": max_rss_kib * 1024, "output": text,
            "user_s": user_s, "sys_s": sys_s}


def smoke_f1_from_store(run_id: str, env: dict, printed_uri: str | None = None) -> float | None:
    """The parent run's `latent_f1` metric, read back from the store the smoke wrote to."""
    try:
        uri = env.get("MLFLOW_TRACKING_URI") or printed_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        return MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics.get(Summary.LATENT_F1)
    except Exception:  # noqa: BLE001 - the printed summary is the fallback
        return None


def bench_smoke(preset: str = "smoke", extra_args: list[str] | None = None, out_dir: Path | None = None,
                env: dict | None = None, wall_target: float = 300.0, rss_target: float = 2 * 1024**3) -> Row:
    # the malloc settings come from the caller's environment (`make bench` exports the Makefile's)
    run_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
               **(env or {})}
    cmd = cli_command() + ["smoke", "--preset", preset, *(extra_args or [])]
    res = measure_subprocess(cmd, env=run_env, log=(out_dir / "smoke.log") if out_dir else None)
    parsed = parse_smoke_summary(res["output"])
    f1_store = None
    if "run_id" in parsed:
        f1_store = smoke_f1_from_store(parsed["run_id"], run_env, parsed.get("tracking_uri"))
    f1 = f1_store if f1_store is not None else parsed.get(Summary.LATENT_F1)
    wall, rss = res["wall_s"], res["max_rss_bytes"]
    details = {"command": cmd, "rc": res["rc"], "wall_s": wall, "max_rss_bytes": rss, Summary.LATENT_F1: f1,
               "latent_f1_source": "mlflow" if f1_store is not None else "printed summary", **parsed,
               "user_s": res["user_s"], "sys_s": res["sys_s"],
               "output_tail": res["output"][-2000:] if res["rc"] else ""}
    checks = {"wall": judge(wall, "<=", wall_target), "f1": judge(f1, ">", 0.0), "rss": judge(rss, "<=", rss_target)}
    details["checks"] = checks
    status = PASS if res["rc"] == 0 and all(c == PASS for c in checks.values()) else FAIL
    f1_text = "n/a" if f1 is None else f"{f1:.3f}"
    measured = (f"{wall:.0f} s ({checks['wall']}), latent F1 {f1_text} ({checks['f1']}), peak RSS "
                f"{rss / 1024**3:.2f} GiB ({checks['rss']}); preset {preset}"
                + ("" if res["rc"] == 0 else f"; exit code {res['rc']}"))
    return Row("smoke", SMOKE[0], SMOKE[1], measured, f"<= {wall_target / 60:g} min, F1 > 0, <= "
               f"{rss_target / 1024**3:g} GiB", status, wall, "<=", wall_target, details)
