"""Optuna storages, kept apart from MLflow's database.

- one worker, no URL given: a SQLite file `optuna/<study>.db`;
- several workers on one machine, no URL given: a journal file `optuna/<study>.journal` (SQLite gives
  "database is locked" with parallel writers);
- several machines: an RDB URL (`postgresql://user:pw@host/db`), passed as the storage parameter.

Heartbeats: RDB storages have them built in. Optuna's journal storage has none, so `HeartbeatJournalStorage`
adds them (a trial's last beat is a trial system attribute). A trial whose worker died is failed after the grace
period by the next worker that looks, and `RetryHeartbeatStaleTrialCallback` enqueues its retry.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from latentgate.errors import ConfigError, StoreError
from latentgate.tracking.secrets import mask_secrets

DEFAULT_DIR = Path("optuna")
HEARTBEAT_ATTR = "latentgate:heartbeat"


def is_journal(url: str) -> bool:
    return url.endswith((".journal", ".log")) and "://" not in url or url.startswith("journal:")


def journal_path(url: str) -> Path:
    return Path(url.removeprefix("journal:").removeprefix("//"))


def default_storage(study: str, workers: int, directory: Path = DEFAULT_DIR) -> str:
    directory = Path(directory).resolve()
    if workers > 1:
        return str(directory / f"{study}.journal")
    return f"sqlite:///{directory / f'{study}.db'}"


def resolve_storage(study: str, storage: str, workers: int) -> str:
    """The storage URL the sweep uses: the given one (checked), or the default for the worker count."""
    storage = (storage or "").strip()
    if not storage:
        url = default_storage(study, workers)
    elif is_journal(storage):
        url = str(journal_path(storage).resolve())
    else:
        url = storage
    if url.startswith("sqlite:") and workers > 1:
        raise ConfigError(f"storage {url} is SQLite, which fails with parallel workers ('database is locked')",
                          "leave --storage empty (a journal file is used), pass a .journal path, or a PostgreSQL URL")
    if url.startswith("sqlite:///"):
        mlflow_db = (os.environ.get("MLFLOW_TRACKING_URI") or "").removeprefix("sqlite:///")
        if mlflow_db and Path(url.removeprefix("sqlite:///")).resolve() == Path(mlflow_db).resolve():
            raise ConfigError("the Optuna storage is MLflow's own database", "keep Optuna's storage in its own file")
    if not (is_journal(url) or "://" in url):
        raise ConfigError(f"storage {mask_secrets(url)!r} is neither a journal file nor a database URL",
                          "pass path/to/<study>.journal, sqlite:///<file>.db or postgresql://user:pw@host/db")
    return url


def open_storage(url: str, heartbeat: dict | None = None, on_stale=None):
    """An Optuna storage object; with `heartbeat` ({interval, grace_period}) stale trials are detected."""
    hb = heartbeat or {}
    try:
        if is_journal(url):
            path = journal_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path))
            if hb:
                return HeartbeatJournalStorage(backend, hb["interval"], hb["grace_period"], on_stale)
            return optuna.storages.JournalStorage(backend)
        url = _pg_driver(url)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"engine_kwargs": {"pool_pre_ping": True}} if not url.startswith("sqlite") else {}
        if hb:
            kwargs.update(heartbeat_interval=hb["interval"], grace_period=hb["grace_period"],
                          heartbeat_stale_trial_callback=on_stale)
        return optuna.storages.RDBStorage(url, **kwargs)
    except (ImportError, ModuleNotFoundError) as err:
        raise StoreError(f"Optuna storage {mask_secrets(url)}: a driver is missing ({err})",
                         "install it (PostgreSQL: pip install 'psycopg[binary]' or psycopg2-binary)") from None
    except Exception as err:  # noqa: BLE001 - an unusable storage: one line naming it
        raise StoreError(f"Optuna storage {mask_secrets(url)} is unusable: {str(err).splitlines()[0][:200]}",
                         "check the URL, that the server runs, and that the folder is writable") from None


def _pg_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps postgresql:// to psycopg (v3); fall back to psycopg2 when only that is installed."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Journal storage with heartbeats: each beat writes the wall-clock time into the trial's system attrs."""

    def __init__(self, backend, interval: int, grace_period: int, on_stale=None):
        super().__init__(backend)
        self._hb_interval = interval
        self._hb_grace = grace_period
        self._hb_callback = on_stale

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except Exception:  # noqa: BLE001 - the trial finished between two beats
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if HEARTBEAT_ATTR in t.system_attrs and now - t.system_attrs[HEARTBEAT_ATTR] > self._hb_grace]

    def get_heartbeat_interval(self) -> int | None:
        return self._hb_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._hb_callback


class AskLock:
    """A file lock that the workers of one machine hold from "count the trials" to "ask for a trial", so they never
    start more trials than the budget. Released by the objective as soon as the trial exists."""

    def __init__(self, url: str, study: str):
        if is_journal(url):
            path = Path(str(journal_path(url)) + f".{study}.lock")
        elif url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///") + f".{study}.lock")
        else:
            digest = hashlib.sha256(f"{url}|{study}".encode()).hexdigest()[:16]
            path = Path(tempfile.gettempdir()) / f"latentgate-optuna-{digest}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = None

    def acquire(self) -> None:
        self._fh = open(self.path, "a")  # noqa: SIM115 - held across calls
        fcntl.flock(self._fh, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def dashboard_command(url: str, artifact_dir: str | None = None) -> str:
    shown = mask_secrets(url)
    return f"optuna-dashboard {shown}" + (f" --artifact-dir {artifact_dir}" if artifact_dir else "")
