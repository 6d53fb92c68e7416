"""Paths taken from configs, manifests or URIs never leave their directory; folders are swapped in whole.

`safe_join(root, rel)` is the one way to turn an untrusted relative path (a file listed in a checkpoint manifest,
an artifact path inside a `runs:/` URI, a name that becomes a folder) into a path under `root`. It rejects

* absolute paths (`/etc/passwd`, `C:\\x`, `\\\\server\\share`) and backslashes,
* `..` segments (and empty or `.` segments, so one file has one spelling),
* symlinks anywhere along the way that resolve outside `root` (a link inside `root` pointing inside it is fine).

Failures raise the `error` class given (default `CheckpointError`) with one line naming the path and the fix.

`existing(path)` tells a missing path from a symlink loop, and `load_yaml(path)` is the one bounded loader of a
user's YAML file (no aliases, no duplicate keys, limited size and nesting).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from latentgate.errors import CheckpointError, ConfigError, LatentgateError


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


# ---- paths that must exist, and user YAML files -----------------------------------------------------------------

def refuse_loop(path: str | os.PathLike, what: str = "file", error: type[LatentgateError] = ConfigError) -> None:
    """Raise `error` if `path` is a symlink loop (ELOOP), which `Path.exists()` reports as "not found"; call it
    before a check of your own that says "not found"."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise error(f"{what} {os.fspath(path)} is a symlink loop (a link that leads back to itself)",
                        "replace the link with the real file or folder") from None


def existing(path: str | os.PathLike, what: str = "file", error: type[LatentgateError] = ConfigError,
             fix: str = "check the path") -> Path:
    """`path` if it exists; else `error` saying why: a symlink loop, a missing path, or the OS's reason."""
    refuse_loop(path, what, error)
    try:
        os.stat(path)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise error(f"{what} {os.fspath(path)} does not exist", fix) from None
        raise error(f"cannot read {what} {os.fspath(path)}: {err.strerror or err}", fix) from None
    return Path(path)


YAML_MAX_BYTES = 1 << 20  # presets, checklists, calibration sets and sweep studies are a few KB
YAML_MAX_DEPTH = 32  # the deepest shipped file nests 4 levels


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (an alias bomb of 1 KB expands to GBs), duplicate keys (the last value
    would win silently) and nesting deeper than YAML_MAX_DEPTH (no RecursionError)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(f"line {mark.line + 1}: aliases (*name) are not accepted",
                           "write the value out in full instead of an anchor (&name) and alias (*name)")
        self._depth += 1
        if self._depth > YAML_MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _Refused(f"line {mark.line + 1}: nested more than {YAML_MAX_DEPTH} levels deep",
                           "flatten the file (presets, checklists, sets and studies nest a few levels)")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeConstructor reports it
                break
            if first is not None:
                raise _Refused(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on line {first})",
                               "keep one of them (YAML would silently use the last)")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def load_yaml(path: str | os.PathLike, what: str = "YAML file", error: type[LatentgateError] = ConfigError) -> Any:
    """The one loader for a user's YAML file (presets, overrides, checklists, calibration sets, sweep studies):
    bounded in size (YAML_MAX_BYTES), nesting (YAML_MAX_DEPTH), without aliases or duplicate keys. Every problem is
    one `error` line naming the file, the limit and the fix."""
    path = existing(path, what, error)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a YAML file", "pass the path of a .yaml file")
    if not path.is_file():  # a FIFO or device: reading it may wait forever
        raise error(f"{what} {path} is not a regular file (a pipe, socket or device)", "save it to a file first")
    try:
        with open(path, "rb") as f:
            raw = f.read(YAML_MAX_BYTES + 1)
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}", "check the path and its permissions") from None
    if len(raw) > YAML_MAX_BYTES:
        raise error(f"{what} {path} is larger than {YAML_MAX_BYTES} bytes, the limit for a YAML file here",
                    "shorten it (presets, checklists, sets and studies are a few KB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not valid UTF-8 (byte 0x{err.object[err.start]:02x} at byte offset {err.start})",
                    "re-save the file as UTF-8") from None
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as err:
        raise error(f"{path}: {err.problem}", err.fix) from None
    except yaml.YAMLError as err:
        raise error(f"{path}: invalid YAML ({str(err).splitlines()[0]})", "fix the file's syntax") from None
    finally:
        loader.dispose()
