"""Run lifecycle: the tracking store, provenance tags, and runs that always end FINISHED, FAILED or KILLED."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from latentgate.errors import Interrupted, LatentgateError, StoreError  # noqa: F401 (Interrupted: re-exported)
from latentgate.tracking.secrets import mask_secrets
from latentgate.tracking.tracker import MlflowTracker, NullTracker

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PACKAGES = ("torch", "transformers", "peft", "mlflow", "optuna", "accelerate", "datasets", "evaluate")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the embedded default: a SQLite file in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


DB_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before any training, if a tracking server or database server does not answer.

    HTTP(S) URIs must answer `/health`; database URIs (`postgresql://`, `mysql://`, ...) must accept a TCP
    connection on their host and port. Local stores (sqlite, file) are not checked here. The URI in the
    message has its password masked."""
    import socket
    from urllib.parse import urlsplit

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
    import mlflow

    from latentgate import distributed as dist

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return dist.main_only(lambda: _setup_experiment(uri, name))


def _setup_experiment(uri: str, name: str) -> str:
    import mlflow

    check_reachable(uri)
    try:
        if os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run`: children go where the project's run is
            mlflow.set_experiment(experiment_id=mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id)
            return uri
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            location = None
            if uri.startswith("sqlite:"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / DEFAULT_ARTIFACTS).resolve().as_uri()
            mlflow.create_experiment(name, artifact_location=location)
        mlflow.set_experiment(name)
    except LatentgateError:
        raise
    except Exception as err:  # an unusable store: one line naming it, not a traceback
        first = (str(err).splitlines() or [""])[0][:200]
        raise StoreError(f"tracking store {mask_secrets(uri)} is unusable: {mask_secrets(first)}",
                         "check MLFLOW_TRACKING_URI (and that the folder is writable)") from None
    return uri


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
    tags = {"latentgate.git_commit": commit, "latentgate.git_dirty": str(dirty).lower(),
            "latentgate.python": platform.python_version()}
    if os.environ.get("MLFLOW_GIT_COMMIT") is None and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    for pkg in PACKAGES:
        try:
            tags[f"latentgate.version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def _end(tracker, status: str, tags: dict) -> None:
    """Best effort: the original error is what the user must see, even when the store also fails now."""
    import mlflow

    for action in (tracker.flush, lambda: tracker.set_tags(tags), lambda: mlflow.end_run(status=status)):
        try:
            action()
        except Exception:  # noqa: BLE001
            pass


def adopt_project_run() -> str | None:
    """Inside `mlflow run`, MLFLOW_RUN_ID names the project's run. The entry point's top-level run adopts it, and
    it is removed from the environment so that nested runs become real children instead of re-attaching."""
    return os.environ.pop("MLFLOW_RUN_ID", None)


@contextmanager
def tracked_run(name: str, *, nested: bool = True, tags: dict | None = None, run_id: str | None = None):
    """Start (or re-open) a run and yield its tracker. The run ends FINISHED; or FAILED with the error in the tags
    `latentgate.error` (one line, secrets masked) and `latentgate.error_type`; or KILLED on SIGTERM/SIGINT:
    never stuck RUNNING."""
    import mlflow

    from latentgate import distributed as dist

    started = dist.main_only(lambda: mlflow.start_run(run_id=run_id, run_name=None if run_id else name,
                                                      nested=nested).info.run_id)
    if not dist.owns_store():  # ranks > 0 of a multi-process run: rank 0's run id, and nothing logged
        yield NullTracker(started)
        return
    run = mlflow.active_run()
    tracker = MlflowTracker(run.info.run_id)
    try:
        # a run adopted from `mlflow run` gets the phase's name instead of a random one
        named = {"mlflow.runName": name} if run_id and run.data.tags.get("mlflow.project.entryPoint") else {}
        tracker.set_tags({"latentgate.phase": name, **named, **provenance_tags(), **(tags or {})})
        yield tracker
    except (Interrupted, KeyboardInterrupt) as err:
        message = str(err) or "interrupted by SIGINT"
        tags = {"latentgate.error": mask_secrets(message)[:500], "latentgate.error_type": type(err).__name__}
        checkpoint = getattr(err, "checkpoint", None)
        if checkpoint and not getattr(err, "logged", False):  # the final checkpoint, resumable by runs:/ URI
            err.logged = True  # the innermost run (the stage that trained) owns it, not its parents
            tags["latentgate.final_checkpoint"] = f"runs:/{tracker.run_id}/checkpoints/{name}"
            try:
                tracker.log_artifacts(checkpoint, f"checkpoints/{name}")
            except Exception:  # noqa: BLE001 - the local checkpoint is still there, and named in the error
                tags.pop("latentgate.final_checkpoint")
        _end(tracker, "KILLED", tags)
        raise
    except BaseException as err:
        message = " ".join(f"{type(err).__name__}: {err}".split())
        _end(tracker, "FAILED", {"latentgate.error": mask_secrets(message)[:500],
                                 "latentgate.error_type": type(err).__name__})
        raise
    else:
        tracker.flush()
        mlflow.end_run(status="FINISHED")
