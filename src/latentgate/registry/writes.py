"""Registry writes of the gate: the lock that serialises them, the alias holder, and what `promote` and `demote`
record on a model version (one `hero.check.<name>` tag per criterion, dated events, the JSON report artifact).

The lock is a file lock next to the SQLite store; for other stores a per-URI lock file in the temp folder, which
serialises promotions from one machine only. Concurrent promotions then apply one after the other: the registry
always reads as a sequence of complete promotions. Every writer here expects its caller to hold the lock.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException

from latentgate.errors import StoreError
from latentgate.registry.checklist import Checklist
from latentgate.registry.gate_report import CheckRow, Report, format_value
from latentgate.schema import Artifact, VersionTag
from latentgate.tracking.lineage import RunUri

TAG_MAX = 4900
SHOWN_ONLY = " (shown, not deciding)"  # in a check tag: the criterion is judged but the verdict does not read it


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _lock_path(name: str) -> Path:
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return db.with_name(f"{db.name}.{name}.registry.lock")
    key = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"latentgate-registry-{key}-{name}.lock"


@contextmanager
def registry_lock(name: str, timeout: float = 300.0):
    """Serialise registry writes for one registered model (threads and processes alike)."""
    lock = FileLock(_lock_path(name))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise StoreError(f"registry lock {lock.lock_file} is held for over {timeout:.0f} s",
                         "another promote/demote is running; retry when it ends") from None
    try:
        yield
    finally:
        lock.release()


def alias_holder(c, name: str, alias: str) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def tag_refuses(value: str) -> bool:
    """Does a `hero.check.<name>` tag value record a failure that refuses (a deciding criterion that failed)?"""
    return not value.startswith("pass") and not value.startswith("fail" + SHOWN_ONLY)


def check_tag_value(row: CheckRow) -> str:
    state = ("pass" if row.passed else "fail") + ("" if row.decides else SHOWN_ONLY)
    if row.missing:
        return f"{state} missing: {'; '.join(row.missing)}"[:TAG_MAX]
    why = f"; {row.detail}" if not row.passed and row.detail else ""
    return f"{state} observed={format_value(row.observed)} {row.op} {format_value(row.threshold)}{why}"[:TAG_MAX]


def write_check_tags(c, mv, report: Report, cl: Checklist) -> None:
    """One `hero.check.<criterion>` tag per row of the report (promote, and the sweep's record of its best trial);
    tags of criteria the checklist no longer has are removed. The caller holds the registry lock."""
    for key in [k for k in mv.tags if k.startswith(VersionTag.CHECK_PREFIX)]:
        if key.removeprefix(VersionTag.CHECK_PREFIX) not in cl.names():
            c.delete_model_version_tag(mv.name, mv.version, key)
    for row in report.rows:
        c.set_model_version_tag(mv.name, mv.version, f"{VersionTag.CHECK_PREFIX}{row.name}", check_tag_value(row))


def add_event(c, name: str, version: str, text: str) -> None:
    """A dated `hero.event.<time>` tag on the version: its history of promotions, refusals and demotions."""
    c.set_model_version_tag(name, version, f"{VersionTag.EVENT_PREFIX}{_stamp()}", text[:TAG_MAX])


def log_report_artifact(c, mv, report: Report) -> str:
    """The JSON report, logged to the version's run (hero_reports/); returns its URI ('' without a run)."""
    if not mv.run_id:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"v{mv.version}-{_stamp()}.json"
        path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str))
        c.log_artifact(mv.run_id, str(path), Artifact.HERO_REPORTS)
    return str(RunUri(mv.run_id, f"{Artifact.HERO_REPORTS}/{path.name}"))
