"""Progress of long work for a person watching: the base LM, each stage, eval (each path), sweep trials and
artifact uploads. Rank 0 alone shows it (`latentgate.distributed.owns_store()`).

Three modes, chosen when a piece of work starts (`mode()`):

    rich   stderr is a terminal: live bars (rich) with done/total, loss, probe first-token accuracy and ETA; a
           finished piece of work leaves one summary line
    plain  stderr is not a terminal, or CI is set: one line to stderr when a piece of work starts, then one every
           LATENTGATE_PROGRESS_SECONDS (default 10) while it runs, and one when it ends, each starting with
           `latentgate: progress: ` (a log file or CI output stays readable; grep for the prefix)
    off    `latentgate --quiet` (LATENTGATE_QUIET=1, inherited by the processes it starts), or a rank > 0

Progress never changes what is computed or logged, and a display that fails stops showing progress instead of
failing the run. Top-level imports: the standard library only (the CLI's start-up stays fast); rich is imported
when the first live bar starts.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from pathlib import Path

from latentgate import distributed

PREFIX = "latentgate: progress: "
QUIET_ENV = "LATENTGATE_QUIET"
EVERY_ENV = "LATENTGATE_PROGRESS_SECONDS"
DEFAULT_EVERY_S = 10.0
_FALSE = ("", "0", "false", "no", "off")

_lock = threading.RLock()
_live = None  # the rich Progress shared by every open task of this process
_live_tasks = 0


def set_quiet(quiet: bool = True) -> None:
    """`latentgate --quiet`: no progress in this process, nor in the processes it starts (sweep workers)."""
    if quiet:
        os.environ[QUIET_ENV] = "1"


def mode() -> str:
    """"off", "plain" or "rich" (see the module doc)."""
    if os.environ.get(QUIET_ENV, "").strip().lower() not in _FALSE:
        return "off"
    if not distributed.owns_store():
        return "off"
    if os.environ.get("CI", "").strip().lower() not in _FALSE or os.environ.get("TERM") == "dumb" or not _isatty():
        return "plain"
    return "rich"


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def emit(text: str) -> None:
    """One plain progress line to stderr (plain mode), or above the live bars (rich mode)."""
    m = mode()
    if m == "off":
        return
    try:
        if m == "rich" and _live is not None:
            _live.console.print(text, markup=False, highlight=False)
        else:
            print((PREFIX if m == "plain" else "") + text, file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - a broken stderr must not stop training
        pass


def seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _field(key: str, value) -> str:
    if key == "loss":
        return f"loss {value:.4f}"
    if key == "first_acc":
        return f"probe first-token {value:.1%}"
    if key == "at":  # what runs now (a phase of a chain)
        return str(value)
    if isinstance(value, float):
        return f"{key} {value:.3f}" if key.endswith(("F1", "f1", "EM", "value")) else f"{key} {value:.4g}"
    return f"{key} {value}"


class Task:
    """One piece of work with a known (or unknown: None) total. Use as a context manager; `update` as it goes."""

    def __init__(self, name: str | None, total: float | None = None, unit: str = "steps", start: float = 0,
                 every: float | None = None, detail: str = "", eta: bool = True):
        self.name, self.total, self.unit, self.detail, self.show_eta = name or "", total, unit, detail, eta
        self.completed = self._start = start
        self.fields: dict = {}
        self.every = _every() if every is None else every
        self.mode = mode() if name else "off"  # no name: a silent task (e.g. an eval inside a training loop)
        self.t0 = self._last = time.monotonic()
        self._id = None
        self.closed = self.mode == "off"

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Task":
        if self.mode == "plain":
            size = ""
            if self.total:
                size = _size(self.total) if self.unit == "bytes" else f"{self.total:g} {self.unit}"
            what = ", ".join(x for x in (size, self.detail) if x)
            what = f" ({what})" if what else ""
            detail = f" ({self.detail})" if self.detail else ""
            emit(f"{self.name} resumed at {self._count()}{detail}" if self._start else f"{self.name} started{what}")
        elif self.mode == "rich":
            if self.detail:
                emit(f"{self.name}: {self.detail}")
            self._id = _rich_add(self)
            if self._id is None:
                self.mode, self.closed = "off", True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(stopped=exc_type is not None)
        return False

    def update(self, completed: float | None = None, advance: float = 0, force: bool = False, **fields) -> None:
        """Set (or advance) what is done, and the fields shown beside it. A plain line is printed when the interval
        has passed since the last one, or now with `force` (e.g. the next phase of a chain begins)."""
        if self.closed:
            return
        if completed is not None:
            self.completed = completed
        self.completed += advance
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        now = time.monotonic()
        if self.mode == "plain":
            if force or now - self._last >= self.every:
                self._last = now
                emit(self.line())
        elif self._id is not None:
            _rich_update(self)

    def close(self, stopped: bool = False, **fields) -> None:
        """The summary line (with `fields`, e.g. the final F1 of each eval path); "stopped" after an error."""
        if self.closed:
            return
        self.fields.pop("at", None)  # what was running: nothing now
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        self.closed = True
        verb = "stopped" if stopped else "done"
        count = self._count()
        if count:  # "done: 6/6 steps (100%)"; nothing to count (a download of unknown size): "done"
            verb = f"{verb} at {count}" if stopped else f"{verb}: {count}"
        text = f"{self.name} {verb}{self._info(' | ')} in {seconds(time.monotonic() - self.t0)}"
        if self._id is not None:
            _rich_remove(self, text, stopped)
        else:
            emit(text)

    # -- text -----------------------------------------------------------------------------------------------------
    def _count(self) -> str:
        if not self.total and not self.completed:
            return ""
        if self.unit == "bytes":
            done = _size(self.completed) + (f" of {_size(self.total)}" if self.total else "")
        else:
            done = f"{self.completed:g}" + (f"/{self.total:g}" if self.total else "") + f" {self.unit}"
        if self.total:
            done += f" ({min(self.completed / self.total, 1.0):.0%})"
        return done

    def _info(self, sep: str = " | ") -> str:
        info = ", ".join(_field(k, v) for k, v in self.fields.items())
        return f"{sep}{info}" if info else ""

    def eta(self) -> float | None:
        elapsed = time.monotonic() - self.t0
        done = self.completed - self._start
        if not (self.total and self.show_eta) or done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (self.total - self.completed) * elapsed / done)

    def _times(self) -> str:
        eta = self.eta()
        return f"{seconds(time.monotonic() - self.t0)} elapsed" + (f", ETA {seconds(eta)}" if eta is not None else "")

    def line(self) -> str:
        return " ".join(x for x in (self.name, self._count()) if x) + f"{self._info()} | {self._times()}"


def task(name: str | None, total: float | None = None, unit: str = "steps", start: float = 0,
         every: float | None = None, detail: str = "", eta: bool = True) -> Task:
    """`with progress.task("stage_a", total=150) as bar: ... bar.update(step, loss=..., first_acc=...)`.
    A task named None shows nothing; `every`: seconds between plain lines (default LATENTGATE_PROGRESS_SECONDS);
    `detail`: shown once, when it starts; `eta`: False where the units take unequal times (phases of a chain)."""
    return Task(name, total, unit, start, every, detail, eta)


# ---- rich: one live display for every open task of the process ----------------------------------------------------

def _rich_add(t: Task):
    global _live, _live_tasks
    try:
        with _lock:
            if _live is None:
                from rich.console import Console  # lazy: fast -q start-up
                from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn  # lazy: fast -q start-up

                _live = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=30),
                                 TextColumn("{task.fields[count]}", markup=False),
                                 TextColumn("{task.fields[info]}", markup=False),
                                 TextColumn("{task.fields[times]}", style="dim", markup=False),
                                 console=Console(stderr=True), transient=True, refresh_per_second=4)
                _live.start()
                atexit.register(_stop_live)  # a task left open by an error must not leave the cursor hidden
            _live_tasks += 1
            return _live.add_task(t.name, total=t.total, completed=t.completed, count=t._count(), info=t._info(""),
                                  times=t._times())
    except Exception:  # noqa: BLE001 - no terminal display after all: run on without one
        return None


def _rich_update(t: Task) -> None:
    try:
        _live.update(t._id, completed=t.completed, total=t.total, count=t._count(), info=t._info(""),
                     times=t._times())
    except Exception:  # noqa: BLE001
        pass


def _rich_remove(t: Task, text: str, stopped: bool = False) -> None:
    global _live, _live_tasks
    try:
        with _lock:
            _live.remove_task(t._id)
            from rich.markup import escape  # lazy: fast -q start-up

            mark = "[yellow]■[/yellow]" if stopped else "[green]✓[/green]"
            _live.console.print(f"{mark} {escape(text)}", highlight=False)
            _live_tasks -= 1
            if _live_tasks <= 0:
                _stop_live()
    except Exception:  # noqa: BLE001
        pass


def _stop_live() -> None:
    global _live, _live_tasks
    with _lock:
        if _live is not None:
            try:
                _live.stop()
            finally:
                _live, _live_tasks = None, 0


# ---- helpers for the callers ----------------------------------------------------------------------------------------

def upload_dir(tracker, local_dir, artifact_path: str, label: str) -> None:
    """`tracker.log_artifacts(local_dir, artifact_path)` (whole: into a local store it is atomic) as a piece of work
    with its size: a checkpoint or a base LM can be gigabytes on its way to the artifact store."""
    files = [p for p in Path(local_dir).rglob("*") if p.is_file()]
    with task(f"upload {label}", total=sum(p.stat().st_size for p in files) or None, unit="bytes") as bar:
        tracker.log_artifacts(local_dir, artifact_path)
        bar.update(bar.total or 0)
