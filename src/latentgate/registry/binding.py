"""What binds a model version to its evidence and to its weights, read so that an edit shows.

A version's eval run is its source (register) run's param `latentgate.eval_run`: params are immutable in MLflow, so
an edited version tag is caught. Its checkpoint is pinned twice: registration records the manifest's sha256 as a
param (`latentgate.checkpoint_sha256`), and a promotion copies it to the version tag `hero.checkpoint_sha256`; a
checkpoint rewritten afterwards (even resealed) differs from both.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from latentgate.errors import LatentgateError
from latentgate.registry.model import manifest_sha256
from latentgate.schema import Tag, VersionTag
from latentgate.tracking.lineage import resolve_checkpoint
from latentgate.tracking.uris import ModelUri
from latentgate.train.manifest import verify_checkpoint


def bound_eval_run(c, mv) -> tuple[str | None, str]:
    """The eval run a version is bound to, read from its source run's params (immutable, written at registration),
    and what is wrong with the binding ("" if nothing): an edited version tag, or a version registered without it."""
    try:
        params = c.get_run(mv.run_id).data.params if mv.run_id else {}
    except MlflowException:
        params = {}
    bound, tagged = params.get(Tag.EVAL_RUN), mv.tags.get(Tag.EVAL_RUN)
    if not bound:
        return None, (f"version {mv.version}: its source run {mv.run_id or '(none)'} has no {Tag.EVAL_RUN} param, "
                      "so nothing binds it to its evidence: re-register it with `latentgate register <eval_run>`")
    if tagged and tagged != bound:
        return None, (f"version {mv.version}: tag {Tag.EVAL_RUN}={tagged} differs from its source run's param "
                      f"{bound}: the tag was edited")
    return bound, ""


def checkpoint_sha256(c, name: str, version: str) -> str:
    """The sha256 of version `version`'s registered checkpoint manifest, after checking every file against it."""
    local = resolve_checkpoint(str(ModelUri(name, version=version)))
    verify_checkpoint(local)  # CheckpointError naming the file that differs from the manifest
    return manifest_sha256(local)


def _differs(c, mv, name: str, recorded: str, when: str) -> list[str]:
    """[] when the registered checkpoint verifies and its manifest hashes to `recorded`, else why not."""
    try:
        now = checkpoint_sha256(c, name, str(mv.version))
    except LatentgateError as err:
        return [f"version {mv.version}: its checkpoint does not verify ({err})"]
    if now != recorded:
        return [f"version {mv.version}: its checkpoint manifest hashes to {now[:12]}, {when} recorded "
                f"{recorded[:12]}: the checkpoint was rewritten after {when}"]
    return []


def pin_problems(c, mv, name: str) -> list[str]:
    """Why the registered checkpoint is not the one registration recorded ([] if it is)."""
    try:
        recorded = c.get_run(mv.run_id).data.params.get(Tag.CHECKPOINT_SHA256) if mv.run_id else None
    except MlflowException:
        recorded = None
    if not recorded:
        return [f"version {mv.version}: no {Tag.CHECKPOINT_SHA256} param on its source run (re-register it)"]
    return _differs(c, mv, name, recorded, "registration")


def checkpoint_drift(c, mv, name: str) -> list[str]:
    """Why the checkpoint registered under this version is not the one its promotion pinned ([] if it is)."""
    pinned = mv.tags.get(VersionTag.CHECKPOINT_PIN)
    if not pinned:
        return []  # audit_problems names the missing pin
    return _differs(c, mv, name, pinned, "promotion")
