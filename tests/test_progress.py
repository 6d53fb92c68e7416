"""Progress output: plain lines on stderr without a terminal (every piece of work starts, reports and ends), nothing
with --quiet, rank 0 only. The CLI tests run the real `latentgate smoke --preset micro` in a subprocess, whose stderr
is a pipe (no TTY)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli_env, run_cli
from latentgate.tracking import progress

PREFIX = progress.PREFIX
SUMMARY_HEAD = "── latentgate smoke ──"


def _progress_lines(stderr: str) -> list[str]:
    return [ln[len(PREFIX):] for ln in stderr.splitlines() if ln.startswith(PREFIX)]


# ---- the module ------------------------------------------------------------------------------------------------

def test_modes_follow_quiet_ci_and_tty(monkeypatch):
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress, "_isatty", lambda: True)
    assert progress.mode() == "rich"
    monkeypatch.setenv("CI", "true")
    assert progress.mode() == "plain"  # CI output is a log, even on a pseudo-terminal
    monkeypatch.delenv("CI")
    monkeypatch.setattr(progress, "_isatty", lambda: False)
    assert progress.mode() == "plain"
    monkeypatch.setenv(progress.QUIET_ENV, "1")
    assert progress.mode() == "off"


def test_plain_task_lines_count_eta_fields_and_interval(monkeypatch, capsys):
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    with progress.task("stage_a", total=4, every=0) as bar:
        bar.update(1, loss=2.5)
        bar.update(2, loss=2.25, first_acc=0.5)
    with progress.task("quiet one", total=3, every=3600) as bar:  # the interval holds back the step lines
        bar.update(1, loss=1.0)
        bar.update(2, loss=1.0)
        bar.update(3, loss=0.5, force=True)
    with pytest.raises(RuntimeError), progress.task("broken", total=10, every=3600) as bar:
        bar.update(3)
        raise RuntimeError("boom")
    with progress.task(None, total=3, every=0) as bar:  # no name: silent
        bar.update(1)
    lines = _progress_lines(capsys.readouterr().err)
    assert lines[0] == "stage_a started (4 steps)"
    assert lines[1].startswith("stage_a 1/4 steps (25%) | loss 2.5000 | ") and "ETA" in lines[1]
    assert lines[2].startswith("stage_a 2/4 steps (50%) | loss 2.2500, probe first-token 50.0% | ")
    assert lines[3].startswith("stage_a done: 2/4 steps (50%) | loss 2.2500, probe first-token 50.0% in ")
    assert lines[4:7] == ["quiet one started (3 steps)", lines[5], lines[6]]
    assert lines[5].startswith("quiet one 3/3 steps (100%) | loss 0.5000") and lines[6].startswith("quiet one done")
    assert lines[7] == "broken started (10 steps)" and lines[8].startswith("broken stopped at 3/10 steps (30%) in ")
    assert len(lines) == 9


def test_work_of_unknown_size_says_started_and_done(monkeypatch, capsys):
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    with progress.task("download some/lm", unit="files"):  # e.g. a hub download: no total known beforehand
        pass
    lines = _progress_lines(capsys.readouterr().err)
    assert lines[0] == "download some/lm started" and lines[1].startswith("download some/lm done in ")


def test_quiet_and_other_ranks_print_nothing(monkeypatch, capsys):
    monkeypatch.setenv(progress.QUIET_ENV, "1")
    with progress.task("stage_a", total=2, every=0) as bar:
        bar.update(1, loss=1.0)
    monkeypatch.delenv(progress.QUIET_ENV)
    monkeypatch.setattr("latentgate.distributed.owns_store", lambda: False)  # a rank > 0
    with progress.task("stage_a", total=2, every=0) as bar:
        bar.update(1, loss=1.0)
    assert capsys.readouterr().err == ""


def test_upload_dir_reports_the_size_and_uploads_the_folder_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    (tmp_path / "ck" / "lora").mkdir(parents=True)
    (tmp_path / "ck" / "manifest.json").write_text("{}")
    (tmp_path / "ck" / "lora" / "adapter.safetensors").write_bytes(b"x" * 2046)
    logged = []

    class Recorder:  # the folder goes to log_artifacts in one call (atomic into a local store)
        def log_artifacts(self, path, artifact_path=None):
            logged.append((path, artifact_path))

    progress.upload_dir(Recorder(), tmp_path / "ck", "checkpoints/stage_b", "checkpoint stage_b")
    assert logged == [(tmp_path / "ck", "checkpoints/stage_b")]
    lines = _progress_lines(capsys.readouterr().err)
    assert lines[0] == "upload checkpoint stage_b started (2.0 KiB)"
    assert lines[1].startswith("upload checkpoint stage_b done: 2.0 KiB of 2.0 KiB (100%) in ") and len(lines) == 2


# ---- the real CLI ------------------------------------------------------------------------------------------------

def test_smoke_without_a_tty_prints_plain_progress_lines(mlflow_store, tmp_path):
    """Every phase reports: the chain, the base LM (trained: a base seed of its own), both stages with loss and probe
    first-token accuracy, the uploads, eval with each path's F1. The first line comes within 5 s of the start."""
    env = cli_env({progress.EVERY_ENV: "0", "CI": ""})  # every update prints: the periodic lines are checked too
    cmd = [sys.executable, "-m", "latentgate", "smoke", "--preset", "micro", "--set", "base.seed=9173",
           "--set", f"run.output_dir={tmp_path}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    first_s = time.monotonic() - t0
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = _progress_lines(first + err)
    assert first.startswith(PREFIX + "smoke started (4 phases, preset micro: base LM -> stage_a -> stage_b -> eval)")
    assert first_s < 5, f"first progress line after {first_s:.1f} s"
    text = "\n".join(lines)
    for needle in ("smoke 0/4 phases (0%) | opening the tracking store",
                   "smoke 1/4 phases (25%) | stage_a", "smoke 3/4 phases (75%) | eval",
                   "base LM started (30 steps)", "base LM 15/30 steps (50%) | loss ",
                   "upload base LM done: ", "eval (text teacher) done: 24/24 answers (100%) | text F1 ",
                   "stage_a started (6 steps)", "stage_a 3/6 steps (50%) | loss ",
                   "stage_b done: 6/6 steps (100%) | loss ", "upload checkpoint stage_b done: ",
                   "eval done: 120/120 answers (100%) | latent F1 ", "smoke done: 4/4 phases (100%) in "):
        assert needle in text, f"{needle!r} not in:\n{text}"
    assert "ETA" in next(ln for ln in lines if ln.startswith("stage_a 3/6"))
    assert "probe first-token" in next(ln for ln in lines if ln.startswith("stage_a done"))
    for path in ("text", "token_budget", "zero_latent", "shuffled_latent"):
        assert f"{path} F1 " in next(ln for ln in lines if ln.startswith("eval done"))
    assert rest.startswith(SUMMARY_HEAD)  # stdout: the summary alone


@pytest.mark.slow  # ~11 s: a second CLI smoke (the no-TTY one above stays in the default run)
def test_quiet_smoke_prints_the_summary_only(mlflow_store, tmp_path):
    proc = run_cli("--quiet", "smoke", "--preset", "micro", "--set", f"run.output_dir={tmp_path}",
                   env={progress.EVERY_ENV: "0", "CI": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [ln for ln in proc.stderr.splitlines() if not ln.startswith("latentgate: warning:")] == []
    assert proc.stdout.startswith(SUMMARY_HEAD) and len(proc.stdout.strip().splitlines()) == 8
