"""Run lifecycle: the tracking store, provenance tags, and runs that always end FINISHED, FAILED or KILLED."""

from __future__ import annotations

import os
import platform
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from latentgate.errors import LatentgateError, StoreError
from latentgate.tracking.secrets import mask_secrets
from latentgate.tracking.tracker import MlflowTracker

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PACKAGES = ("torch", "transformers", "peft", "mlflow", "optuna", "accelerate", "datasets", "evaluate")


class Interrupted(LatentgateError):
    """SIGTERM/SIGINT during training: a final checkpoint was written and the run is marked KILLED."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum} at optimizer step {step}; checkpoint saved to {checkpoint}",
                         "resume with `latentgate resume <run_id>`")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the embedded default: a SQLite file in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before any training, if an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-configured URI)
            if resp.status >= 400:
                raise StoreError(f"tracking server {mask_secrets(uri)} answered HTTP {resp.status}",
                                 "check MLFLOW_TRACKING_URI and the server's logs")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StoreError(f"tracking server {mask_secrets(uri)} is unreachable ({reason})",
                         "start the server or fix MLFLOW_TRACKING_URI") from None


def setup_experiment(name: str) -> str:
    """Point MLflow at the store and experiment; local stores keep artifacts in an ignored folder."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
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
        raise StoreError(f"tracking store {mask_secrets(uri)} is unusable: {str(err).splitlines()[0][:200]}",
                         "check MLFLOW_TRACKING_URI (and that the folder is writable)") from None
    return uri


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


@contextmanager
def tracked_run(name: str, *, nested: bool = True, tags: dict | None = None, run_id: str | None = None):
    """Start (or re-open) a run and yield its tracker. The run ends FINISHED, or FAILED with the error as a tag,
    or KILLED on a signal: never stuck RUNNING."""
    import mlflow

    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=nested)
    tracker = MlflowTracker(run.info.run_id)
    tracker.set_tags({"latentgate.phase": name, **provenance_tags(), **(tags or {})})
    try:
        yield tracker
    except Interrupted as err:
        tracker.flush()
        tracker.set_tags({"latentgate.error": str(err)})
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as err:
        try:
            tracker.flush()
        except Exception:
            pass
        tracker.set_tags({"latentgate.error": f"{type(err).__name__}: {str(err)[:500]}"})
        mlflow.end_run(status="FAILED")
        raise
    else:
        tracker.flush()
        mlflow.end_run(status="FINISHED")
