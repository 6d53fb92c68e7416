"""Paths taken from configs, manifests or URIs never leave their directory; folders are swapped in whole.

`safe_join(root, rel)` is the one way to turn an untrusted relative path (a file listed in a checkpoint manifest,
an artifact path inside a `runs:/` URI, a name that becomes a folder) into a path under `root`. It rejects

* absolute paths (`/etc/passwd`, `C:\\x`, `\\\\server\\share`) and backslashes,
* `..` segments (and empty or `.` segments, so one file has one spelling),
* symlinks anywhere along the way that resolve outside `root` (a link inside `root` pointing inside it is fine).

Failures raise the `error` class given (default `CheckpointError`) with one line naming the path and the fix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from latentgate.errors import CheckpointError, LatentgateError


def check_relative(rel: object, what: str = "path", error: type[LatentgateError] = CheckpointError,
                   fix: str = "use a plain relative path inside the directory (no '..', not absolute, no backslashes)",
                   ) -> str:
    """`rel` as a clean relative POSIX path, or `error` if it could point outside its directory."""
    if not isinstance(rel, str) or not rel.strip():
        raise error(f"{what} {rel!r} is empty or not a string", fix)
    if "\\" in rel or "\x00" in rel or rel.startswith("/") or os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise error(f"{what} {rel!r} is absolute or uses backslashes", fix)
    parts = PurePosixPath(rel).parts
    if any(p in ("..", ".") for p in rel.split("/")) or any(p == "" for p in rel.split("/")):
        raise error(f"{what} {rel!r} contains '..', '.' or an empty segment", fix)
    return "/".join(parts)


def safe_join(root: str | os.PathLike, rel: object, what: str = "path",
              error: type[LatentgateError] = CheckpointError) -> Path:
    """`root / rel`, guaranteed (after following symlinks) to stay inside `root`."""
    clean = check_relative(rel, what, error)
    base = Path(root)
    target = base / clean
    ensure_inside(base, target, what, error)
    return target


def ensure_inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "path",
                  error: type[LatentgateError] = CheckpointError) -> Path:
    """Raise `error` if `path`, with every symlink resolved, is not `root` or below it."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise error(f"{what} {os.fspath(path)} resolves to {real}, outside {real_root} (a symlink or '..' escapes)",
                    "replace the link with the real file inside the directory, or re-save it")
    return real


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(tmp: Path, target: Path, tag: str) -> None:
    """Rename the complete folder `tmp` to `target`; an existing `target` is replaced only once `tmp` is in place
    (checkpoints here, copied artifact folders in tracking)."""
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    old = target.with_name(f"{target.name}.old-{tag}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the previous folder back
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
