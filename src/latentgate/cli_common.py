"""Helpers every CLI module shares: config options, and the guard that turns errors into one line + exit code.
Top-level imports: click only, so `latentgate --help` stays fast.

The guard's promise (tests/test_reliability.py holds it to it): whatever goes wrong, stderr gets exactly one line
`latentgate: error: <problem> (fix: <what to do>)`, the exit code is non-zero (2 for errors the user can act on,
3 for a training fault, 4 for a refused gate, 143 / 130 / 129 for SIGTERM / SIGINT / SIGHUP, 1 for anything
unexpected), and no Python traceback is shown unless `latentgate --debug ...` is given.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import click

from latentgate.errors import STOP_SIGNALS, Interrupted, LatentgateError, StoreError, os_error_in_chain

# Messages of the SQLite / SQLAlchemy layer that mean "the disk refused the write", not a bug.
_STORE_WRITE_FAILURES = ("database or disk is full", "disk i/o error", "attempt to write a readonly database",
                         "unable to open database file")
# ... and of writers that raise no OSError on a full disk (torch's zip writer, safetensors, Rust / C++ libraries).
_DISK_FULL = ("no space left on device", "storagefull", "file write failed", "file too large")
_STORE_LOCKED = "database is locked"
# ... and of MLflow's REST client when the tracking server stops answering mid-run (rest_utils: "API request to
# <url> failed with exception <requests error>"), each with the reason shown
_SERVER_GONE = (("connection refused", "connection refused"), ("timed out", "timed out"),
                ("timeout", "timed out"), ("remotedisconnected", "connection dropped"),
                ("connection aborted", "connection dropped"), ("connection reset", "connection dropped"),
                ("max retries exceeded", "no answer after retries"))

# Set for every command unless the user set them: MLflow's HTTP client otherwise retries an unreachable server
# for ~4 minutes (7 retries, backoff factor 2, 120 s timeout), and prints "View run ... at: <tracking URI>" (with
# the password of a http://user:pw@host URI) to stdout for every run it ends.
MLFLOW_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 otherwise), from the launcher's environment."""
    from latentgate.distributed import launched

    return int(os.environ.get("RANK", "0")) if launched() else 0


def echo_main(text: str) -> None:
    """Print a command's result once: on rank 0 only when several processes run the command."""
    if _rank() == 0:
        click.echo(text)


def _fail(message: str, code: int) -> None:
    try:
        click.echo(f"latentgate: error: {f'[rank {_rank()}] ' if _rank() else ''}{message}", err=True)
    except OSError:  # stderr is gone (SIGHUP: the terminal closed); the exit code and the run's tags remain
        pass
    sys.exit(code)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    click.echo(f"latentgate: warning: {text}", err=True)


def prepare_runtime(debug: bool) -> None:
    """What every guarded command needs before it does anything:

    * SIGTERM and SIGHUP (a closed terminal or ssh session) become an exception (like SIGINT's KeyboardInterrupt),
      so runs end KILLED and never stay RUNNING; the trainer installs its own handler during training (checkpoint
      at the next step boundary).
    * SIGXFSZ (file-size limit hit) is ignored, so the write raises OSError(EFBIG) and is reported in one line
      instead of the process dying with a core dump.
    * Under torchrun / accelerate launch (WORLD_SIZE > 1) the process joins the process group.
    * MLflow's HTTP client gets one bounded timeout and retry budget, and never prints run URLs (MLFLOW_ENV_DEFAULTS).
    * Caches (matplotlib, Hugging Face, anything under XDG_CACHE_HOME) move to a private temporary folder when
      their usual place under HOME is not writable (`fall_back_caches`).
    * Progress bars of HF / MLflow are off, MLflow's own log lines are silenced (the one error line says what went
      wrong), and warnings are printed as one line each (`--debug` keeps all of them as they are).
    """
    if threading_main():
        for signum in STOP_SIGNALS:
            if signum != signal.SIGINT:  # SIGINT already raises KeyboardInterrupt
                signal.signal(signum, _raise_interrupted)
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from latentgate.distributed import init_from_env

    init_from_env()  # under torchrun / accelerate launch (WORLD_SIZE > 1) only; torch is not imported otherwise
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    fall_back_caches()
    if debug:
        return
    for key, value in {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                       "MLFLOW_LOGGING_LEVEL": "CRITICAL"}.items():
        os.environ.setdefault(key, value)
    if "mlflow" in sys.modules:  # already configured at import (in-process callers): quiet it the same way
        import logging

        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    warnings.showwarning = _one_line_warning
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=r".*Converting a tensor with requires_grad=True to a scalar.*")


# Cache folders libraries create under HOME, by the variable that moves each (unset: its default under HOME).
CACHE_VARS = {"XDG_CACHE_HOME": ".cache", "HF_HOME": ".cache/huggingface", "MPLCONFIGDIR": ".config/matplotlib"}


def _writable(folder: Path) -> bool:
    """Whether `folder` is, or could be created as, a writable folder (nothing is created here)."""
    for place in (folder, *folder.parents):
        try:
            if place.exists():
                return place.is_dir() and os.access(place, os.W_OK | os.X_OK)
        except OSError:  # a symlink loop, a path through a file
            return False
    return False


def fall_back_caches() -> dict[str, str]:
    """A read-only or unusable HOME (a locked-down container, a CI sandbox) must not stop a run: each cache whose
    variable is unset and whose default folder under HOME is not writable moves to
    <tmp>/latentgate-<uid>/<name> (private, reused by later commands). Returns the variables set."""
    home = Path(os.path.expanduser("~"))
    moved = {}
    for var, rel in CACHE_VARS.items():
        if os.environ.get(var) or _writable(home / rel):
            continue
        folder = Path(tempfile.gettempdir()) / f"latentgate-{os.getuid()}" / Path(rel).name.lstrip(".")
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_uid != os.getuid() or not _writable(folder):
                continue  # someone else's folder: leave the library's own fallback (or error) alone
        except OSError:
            continue
        os.environ[var] = moved[var] = str(folder)
    return moved


def _named_file(err: BaseException) -> str | None:
    """The first file name an exception in `err`'s cause/context chain carries (OSError.filename), if any."""
    cur, seen = err, set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if getattr(cur, "filename", None):
            return os.fspath(cur.filename)
        cur = cur.__cause__ or cur.__context__
    return None


def _cache_fix(err: BaseException) -> LatentgateError | None:
    """An OSError on a cache folder (under ~/.cache, ~/.config, or a cache variable's folder): the fix names that
    folder and the variable that moves it, not run.output_dir."""
    home = Path(os.path.expanduser("~"))
    roots = {home / ".cache": "XDG_CACHE_HOME", home / ".config": "MPLCONFIGDIR / XDG_CONFIG_HOME"}
    roots.update({Path(os.environ[v]): v for v in CACHE_VARS if os.environ.get(v)})
    cur, seen = err, set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.filename:
            where = Path(os.fspath(cur.filename))
            for root, var in roots.items():
                if where == root or root in where.parents:
                    return StoreError(f"cannot write the cache folder {where}: {cur.strerror or cur}",
                                      f"make {root} writable, or set {var} to a writable folder")
        cur = cur.__cause__ or cur.__context__
    return None


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def as_user_error(err: BaseException) -> LatentgateError | None:
    """Map an unexpected exception to a user-actionable one when its cause is clear (disk full, read-only, ...)."""
    mapped = os_error_in_chain(err)
    if mapped is not None:
        return _cache_fix(err) or mapped
    text = str(err).lower()
    if text.startswith("api request to ") and " failed with " in text:  # the tracking server is gone
        from latentgate.tracking.secrets import mask_secrets

        reason = next((shown for needle, shown in _SERVER_GONE if needle in text), "no answer")
        uri = mask_secrets(os.environ.get("MLFLOW_TRACKING_URI", "the tracking server"))
        return StoreError(f"tracking server {uri} stopped answering ({reason})", "restart it (or fix "
                          "MLFLOW_TRACKING_URI); the next latentgate command on it ends the runs left open FAILED, "
                          "and `latentgate resume <run_id>` continues a training phase from its last checkpoint")
    if _STORE_LOCKED in text:
        from latentgate.tracking.runs import store_wait_seconds

        return StoreError(f"the tracking store stayed locked by another process for {store_wait_seconds():g} s "
                          f"({_STORE_LOCKED})", "stop the process holding the lock (a sqlite3 shell, a stuck "
                          "writer), then resume; LATENTGATE_STORE_WAIT_S sets how long to wait")
    for needle in _DISK_FULL:
        if needle in text:
            where = _named_file(err)
            return StoreError(f"a write failed ({needle}){f': {where}' if where else ''}", "free disk space (or "
                              "raise `ulimit -f`) where run.output_dir and the artifact store are, then resume")
    for needle in _STORE_WRITE_FAILURES:
        if needle in text:
            from latentgate.tracking.secrets import mask_secrets  # lazy: the CLI starts without MLflow

            uri = mask_secrets(os.environ.get("MLFLOW_TRACKING_URI", "mlflow.db"))
            return StoreError(f"the tracking store refused a write ({needle}): {uri}",
                              "free disk space or make the store's folder writable (check MLFLOW_TRACKING_URI), "
                              "then rerun")
    return None


def guarded(fn):
    """Turn LatentgateError into a one-line message and its exit code; other errors into one line too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        from latentgate.tracking.secrets import mask_secrets

        try:
            prepare_runtime(debug)  # inside: a signal may arrive as soon as its handler is installed
            return fn(*args, **kwargs)
        except LatentgateError as err:
            if debug:
                traceback.print_exc()
            if getattr(err, "quiet", False):  # another process (rank 0) already printed the line
                sys.exit(err.exit_code)
            _fail(mask_secrets(str(err)), err.exit_code)
        except KeyboardInterrupt as interrupt:
            if debug:
                traceback.print_exc()
            err = Interrupted(signal.SIGINT)
            err.runs_killed = getattr(interrupt, "runs_killed", False)
            _fail(str(err), err.exit_code)
        except Exception as err:  # noqa: BLE001 - last resort: still one line, unless --debug
            if debug:
                traceback.print_exc()
            mapped = as_user_error(err)
            if mapped is not None:
                _fail(mask_secrets(str(mapped)), mapped.exit_code)
            first = (str(err).splitlines() or [""])[0][:300]
            _fail(f"{type(err).__name__}: {mask_secrets(first)} (rerun with --debug for the traceback)", 1)

    return wrapper


class OneLineErrorsGroup(click.Group):
    """The root command group. Click's own usage errors (unknown option or command, missing or invalid value) are
    printed in the one-line format of every other error, instead of click's usage block."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # a bare `latentgate` / `latentgate data`: the help
            click.echo(err.format_message(), err=True)
            sys.exit(err.exit_code)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx else (prog_name or "latentgate")
            _fail(f"{err.format_message().rstrip('.')} (fix: see `{where} --help`)", err.exit_code)
        except click.ClickException as err:
            _fail(f"{err.format_message().rstrip('.')} (fix: check the command line)", err.exit_code)
        except click.Abort:
            _fail("aborted (fix: rerun the command)", 1)
        sys.exit(code if isinstance(code, int) else 0)  # ctx.exit(n) / --help / --version return their code


def config_options(fn):
    """--preset / --set / --overrides: the one way every subcommand takes config."""
    fn = click.option("--overrides", default="", help="space-separated key=value overrides (MLproject parameter)")(fn)
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                      help="override a config field, e.g. --set stage_b.lr=1e-4 (see `latentgate config --list`)")(fn)
    fn = click.option("--preset", default=None, help="preset name from presets/ or a YAML path")(fn)
    return fn


def resolve_config(preset: str | None, sets, overrides: str, default_preset: str):
    from latentgate import config

    return config.resolve(preset or default_preset, config.cli_overrides(sets, overrides))
