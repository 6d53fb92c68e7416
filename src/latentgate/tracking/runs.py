"""Run lifecycle: the tracking store, provenance tags, and runs that always end FINISHED, FAILED or KILLED."""

from __future__ import annotations

import atexit
import errno
import fcntl
import functools
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
from mlflow.utils.file_utils import local_file_uri_to_path

from latentgate import distributed as dist
from latentgate.errors import ConfigError, Interrupted, LatentgateError, StoreError  # noqa: F401 (Interrupted: re-exported)
from latentgate.schema import Artifact, MlflowTag, Tag
from latentgate.tracking.processes import PROCESS_TAGS, close_orphaned_runs, process_tags  # noqa: F401 (re-exported)
from latentgate.tracking.secrets import mask_secrets
from latentgate.tracking.tracker import MlflowTracker, NullTracker
from latentgate.tracking.uris import RunUri

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PACKAGES = ("torch", "transformers", "peft", "mlflow", "optuna", "accelerate", "datasets", "evaluate")


def tracking_uri(create: bool = False) -> str:
    """MLFLOW_TRACKING_URI, or the embedded default: a SQLite file in the working directory.

    Refused in one line: an in-memory SQLite store (nothing would persist), an unreachable server or database,
    and, unless `create` (the commands that start runs), a SQLite file that does not exist: reading commands
    (monitor, resume, verify, ...) never leave an empty mlflow.db behind. A locked SQLite store is waited for
    (`store_wait_seconds`), then fails cleanly."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith("sqlite:"):
        db = sqlite_path(uri)
        if db is None:
            raise StoreError(f"tracking store {mask_secrets(uri)} is an in-memory SQLite database: nothing would "
                             "persist after this command", "use a file: MLFLOW_TRACKING_URI=sqlite:///mlflow.db")
        if not create and not db.exists():
            raise StoreError(f"no tracking store at {db} (MLFLOW_TRACKING_URI={mask_secrets(uri)})",
                             "run the command where the store is, or set MLFLOW_TRACKING_URI to it")
        wait_on_locked_sqlite()
    else:
        _check_reachable_once(uri)
    if not create:  # a reading command: the store exists (a creating one sweeps in `setup_experiment`)
        _close_orphaned_once(uri)
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative, or absolute with four slashes; query string dropped);
    None for an in-memory database (`sqlite://`, `sqlite:///:memory:`)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


def store_wait_seconds() -> float:
    """How long a command waits for a SQLite store that another process holds locked (LATENTGATE_STORE_WAIT_S)."""
    try:
        return max(0.0, float(os.environ.get("LATENTGATE_STORE_WAIT_S", "60")))
    except ValueError:
        return 60.0


@functools.lru_cache(maxsize=1)
def wait_on_locked_sqlite() -> None:
    """Every SQLite connection of this process (MLflow's store, Optuna's storage) waits up to
    `store_wait_seconds` for a lock held by another process; past that the write fails with 'database is
    locked', which the CLI reports in one line (exit 2). SQLite's default is 5 s, and MLflow sets 20 s on every
    session (`PRAGMA busy_timeout = 20000`): both are replaced by this one bound."""
    from sqlalchemy import event  # lazy: keeps latentgate checkpoint verify free of sqlalchemy
    from sqlalchemy.engine import Engine  # lazy: keeps latentgate checkpoint verify free of sqlalchemy
    from sqlalchemy.pool import Pool  # lazy: keeps latentgate checkpoint verify free of sqlalchemy

    def pragma() -> str:
        return f"PRAGMA busy_timeout = {int(store_wait_seconds() * 1000)}"

    def on_connect(dbapi_conn, _record):
        if isinstance(dbapi_conn, sqlite3.Connection):
            dbapi_conn.execute(pragma())

    def before_execute(_conn, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().upper().startswith("PRAGMA BUSY_TIMEOUT"):
            statement = pragma()
        return statement, parameters

    event.listen(Pool, "connect", on_connect)
    event.listen(Engine, "before_cursor_execute", before_execute, retval=True)


@functools.lru_cache(maxsize=8)
def _check_reachable_once(uri: str) -> None:
    check_reachable(uri)


DB_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before any training, if a tracking server or database server does not answer.

    HTTP(S) URIs must answer `/health`; database URIs (`postgresql://`, `mysql://`, ...) must accept a TCP
    connection on their host and port. Local stores (sqlite, file) are not checked here. The URI in the
    message has its password masked."""
    shown = mask_secrets(uri)
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/health"  # credentials never go into the URL
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-configured URI)
                if resp.status >= 400:
                    raise StoreError(f"tracking server {shown} answered HTTP {resp.status}",
                                     "check MLFLOW_TRACKING_URI and the server's logs")
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):  # alive, and asking for credentials: MLflow itself will send them
                return
            raise StoreError(f"tracking server {shown} answered HTTP {err.code}",
                             "check MLFLOW_TRACKING_URI and the server's logs") from None
        except (urllib.error.URLError, OSError) as err:
            reason = mask_secrets(str(getattr(err, "reason", err)))
            raise StoreError(f"tracking server {shown} is unreachable ({reason})",
                             "start the server or fix MLFLOW_TRACKING_URI") from None
        return
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in DB_DEFAULT_PORTS:
        parts = urlsplit(uri)
        host = parts.hostname or "localhost"
        try:
            port = parts.port or DB_DEFAULT_PORTS[scheme]
        except ValueError:
            raise StoreError(f"tracking store {shown} has an invalid port", "fix MLFLOW_TRACKING_URI") from None
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as err:
            raise StoreError(f"tracking database {shown} is unreachable ({err.strerror or err})",
                             "start the database server or fix MLFLOW_TRACKING_URI") from None


def setup_experiment(name: str) -> str:
    """Point MLflow at the store and experiment; local stores keep artifacts in an ignored folder. Under torchrun
    only rank 0 creates anything; the other ranks point at the same store, to read from it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(create=True)
    mlflow.set_tracking_uri(uri)
    return dist.main_only(lambda: _setup_experiment(uri, name))


def _setup_experiment(uri: str, name: str) -> str:
    try:
        if os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run`: children go where the project's run is
            mlflow.set_experiment(experiment_id=mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id)
            return uri
        with _creation_lock(uri):
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                location = None
                if uri.startswith("sqlite:"):
                    location = (sqlite_path(uri).parent / DEFAULT_ARTIFACTS).resolve().as_uri()
                mlflow.create_experiment(name, artifact_location=location)
        mlflow.set_experiment(name)
        close_orphaned_runs(uri)
    except LatentgateError:
        raise
    except Exception as err:  # an unusable store: one line naming it, not a traceback
        first = (str(err).splitlines() or [""])[0][:200]
        if "'name' exceeds the maximum length" in first:  # the name is the problem, not the store
            raise ConfigError(f"the experiment name ({len(name)} characters) is too long for MLflow: {first}",
                              "shorten run.experiment") from None
        raise StoreError(f"tracking store {mask_secrets(uri)} is unusable: {mask_secrets(first)}",
                         "check MLFLOW_TRACKING_URI (and that the folder is writable)") from None
    return uri


@contextmanager
def _creation_lock(uri: str):
    """Two processes creating the same fresh SQLite store at once crash MLflow's schema migration ('duplicate
    column name'), and two creating one experiment collide: the first creates both while the others wait on a
    lock of the store's folder (flock: released when the process ends, whatever the way; no lock file left)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    folder = db.absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)  # the code a process runs is the code it started with
def git_commit() -> tuple[str, bool]:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return (sha.stdout.strip() or "unknown"), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def provenance_tags() -> dict[str, str]:
    commit, dirty = git_commit()
    tags = {Tag.GIT_COMMIT: commit, Tag.GIT_DIRTY: str(dirty).lower(), Tag.PYTHON: platform.python_version(),
            **process_tags()}
    if os.environ.get("MLFLOW_GIT_COMMIT") is None and commit != "unknown":
        tags[MlflowTag.SOURCE_GIT_COMMIT] = commit
    for pkg in PACKAGES:
        try:
            tags[Tag.VERSION_PREFIX + pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


@functools.lru_cache(maxsize=8)
def _close_orphaned_once(uri: str) -> None:
    with _creation_lock(uri):  # never while another process creates the SQLite store
        close_orphaned_runs(uri)


def _end(tracker, status: str, tags: dict) -> None:
    """Best effort: the original error is what the user must see, even when the store also fails now. A store
    that is still locked (the usual cause of the error) is waited for once more, so that the run does not stay
    RUNNING once the lock is gone (each attempt itself waits up to `store_wait_seconds`)."""
    deadline = time.monotonic() + 2 * store_wait_seconds()
    for action in (tracker.flush, lambda: tracker.set_tags(tags), lambda: mlflow.end_run(status=status)):
        while True:
            try:
                action()
                break
            except Exception as err:  # noqa: BLE001
                if "database is locked" not in str(err).lower() or time.monotonic() > deadline:
                    break


def adopt_project_run() -> str | None:
    """Inside `mlflow run`, MLFLOW_RUN_ID names the project's run. The entry point's top-level run adopts it, and
    it is removed from the environment so that nested runs become real children instead of re-attaching."""
    return os.environ.pop("MLFLOW_RUN_ID", None)


@contextmanager
def tracked_run(name: str, *, nested: bool = True, tags: dict | None = None, run_id: str | None = None):
    """Start (or re-open) a run and yield its tracker. The run ends FINISHED; or FAILED with the error in the tags
    `latentgate.error` (one line, secrets masked) and `latentgate.error_type`; or KILLED on SIGTERM/SIGINT:
    never stuck RUNNING."""
    started = dist.main_only(lambda: mlflow.start_run(run_id=run_id, run_name=None if run_id else name,
                                                      nested=nested).info.run_id)
    if not dist.owns_store():  # ranks > 0 of a multi-process run: rank 0's run id, and nothing logged
        yield NullTracker(started)
        return
    run = mlflow.active_run()
    tracker = MlflowTracker(run.info.run_id)
    try:
        # a run adopted from `mlflow run` gets the phase's name instead of a random one
        named = {MlflowTag.RUN_NAME: name} if run_id and run.data.tags.get(MlflowTag.PROJECT_ENTRY_POINT) else {}
        tracker.set_tags({Tag.PHASE: name, **named, **provenance_tags(), **(tags or {})})
        yield tracker
    except (Interrupted, KeyboardInterrupt) as err:
        err.runs_killed = True  # the message may now say so
        message = str(err) or "interrupted by SIGINT"
        tags = {Tag.ERROR: mask_secrets(message)[:500], Tag.ERROR_TYPE: type(err).__name__}
        checkpoint = getattr(err, "checkpoint", None)
        if checkpoint and not getattr(err, "logged", False):  # the final checkpoint, resumable by runs:/ URI
            err.logged = True  # the innermost run (the stage that trained) owns it, not its parents
            tags[Tag.FINAL_CHECKPOINT] = str(RunUri(tracker.run_id, Artifact.checkpoint(name)))
            try:
                tracker.log_artifacts(checkpoint, Artifact.checkpoint(name))
            except Exception:  # noqa: BLE001 - the local checkpoint is still there, and named in the error
                tags.pop(Tag.FINAL_CHECKPOINT)
        _end(tracker, "KILLED", tags)
        raise
    except BaseException as err:
        message = " ".join(f"{type(err).__name__}: {err}".split())
        _end(tracker, "FAILED", {Tag.ERROR: mask_secrets(message)[:500], Tag.ERROR_TYPE: type(err).__name__})
        raise
    else:
        tracker.flush()
        stale = [k for k in (Tag.ERROR, Tag.ERROR_TYPE) if k in run.data.tags]
        for key in stale:  # a resumed run that now finished no longer carries the error of its interruption
            tracker.client.delete_tag(tracker.run_id, key)
        mlflow.end_run(status="FINISHED")


# ---- artifacts read back -----------------------------------------------------------------------------------------

def local_artifacts(uri: str) -> Path:
    """A local path holding the artifacts at `uri` (runs:/<id>/<path>, models:/<name>@<alias>, or a store URI).

    A local artifact store is read in place: no copy, where mlflow.artifacts.download_artifacts would copy a base
    LM (gigabytes for a real one) into $TMPDIR on every command and leave it there. A remote store is downloaded
    into a folder of this process, removed when it exits. Errors: MlflowException or OSError, as MLflow's."""
    underlying = uri
    for _ in range(4):  # models:/<name>@<alias> -> models:/m-<id> (a logged model) -> runs:/ -> the store's URI
        if underlying.startswith("runs:/"):
            underlying = RunsArtifactRepository.get_underlying_uri(underlying)
        elif underlying.startswith("models:/"):
            model, path = ModelsArtifactRepository.split_models_uri(underlying)
            underlying = ModelsArtifactRepository.get_underlying_uri(model).rstrip("/") + (f"/{path}" if path else "")
        else:
            break
    if underlying.startswith("file:") or (underlying.startswith("/") and "://" not in underlying):
        local = Path(local_file_uri_to_path(underlying))
        if not local.exists():
            raise OSError(errno.ENOENT, f"no artifact {uri}", str(local))
        return local
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(dir=_download_root())))


@functools.lru_cache(maxsize=1)
def _download_root() -> str:
    root = tempfile.mkdtemp(prefix="latentgate-artifacts-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root
