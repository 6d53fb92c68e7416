"""User-facing errors: one line naming the problem and the fix, never a traceback (unless --debug)."""

from __future__ import annotations

import difflib
import errno


class LatentgateError(Exception):
    """An error the user can act on. `str(err)` is the one-line message printed by the CLI."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} (fix: {fix})")


class ConfigError(LatentgateError):
    """Unknown key, wrong type, out-of-range or contradictory config values."""


class DataError(LatentgateError):
    """A malformed, missing or inconsistent data file."""


class CheckpointError(LatentgateError):
    """A missing, corrupted or incompatible checkpoint or model URI."""


class StoreError(LatentgateError):
    """An unreachable or unusable tracking store, registry or Optuna storage."""


class TrainingFault(LatentgateError):
    """Training stopped because something went numerically wrong (NaN/inf loss or gradient)."""

    exit_code = 3


class GateRefused(LatentgateError):
    """The readiness checklist did not pass, so a promotion or a hero run was refused."""

    exit_code = 4


SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 15: "SIGTERM"}
# The signals every command turns into `Interrupted` (SIGHUP: what a closed terminal or ssh session sends).
STOP_SIGNALS = tuple(SIGNAL_NAMES)


class Interrupted(LatentgateError):
    """SIGTERM/SIGINT/SIGHUP: open runs are marked KILLED and the exit code is 128 + the signal number (143 / 130 /
    129).

    Raised by the trainer at an optimizer-step boundary after it wrote a final checkpoint (`checkpoint` names it),
    or by the CLI's signal handler outside training (`checkpoint` is None: nothing was checkpointed). `tracked_run`
    sets `runs_killed` when it marked a run KILLED, so the message only says so when it is true."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        self.runs_killed = False
        self.name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        if checkpoint:
            super().__init__(f"interrupted by {self.name} at optimizer step {step}; final checkpoint saved to "
                             f"{checkpoint}", "resume from that checkpoint (it is complete and verified by its "
                             "manifest)")
        else:
            super().__init__(f"interrupted by {self.name} outside a training step", "rerun the command (finished "
                             "stages are reused or resumable from their checkpoints)")

    def __str__(self) -> str:
        if self.checkpoint or not self.runs_killed:
            return super().__str__()
        return (f"interrupted by {self.name} outside a training step; the run is marked KILLED (fix: rerun the "
                "command (finished stages are reused or resumable from their checkpoints))")


def os_error_in_chain(err: BaseException) -> LatentgateError | None:
    """`describe_os_error` of the first OSError in `err`'s cause/context chain (libraries often wrap it)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError):
            mapped = describe_os_error(cur)
            if mapped is not None:
                return mapped
        cur = cur.__cause__ or cur.__context__
    return None


def describe_os_error(err: OSError, doing: str = "write") -> LatentgateError | None:
    """An OSError a user can act on (disk full, file-size limit, read-only, permission) as one StoreError line;
    None for other errors."""
    where = err.filename or "a file"
    fixes = {
        errno.ENOSPC: ("no space left on the device", "free disk space or point run.output_dir / the artifact "
                       "location at a bigger disk, then resume"),
        errno.EDQUOT: ("disk quota exceeded", "free space within your quota, then resume"),
        errno.EFBIG: ("file too large (file-size limit or full disk)", "raise the limit (`ulimit -f`) or free disk "
                      "space, then resume"),
        errno.EROFS: ("the file system is read-only", "point run.output_dir / the artifact location at a writable "
                      "folder"),
        errno.EACCES: ("permission denied", "make the folder writable, or point run.output_dir / the artifact "
                       "location elsewhere"),
        errno.EPERM: ("operation not permitted", "make the folder writable, or point run.output_dir / the artifact "
                      "location elsewhere"),
        errno.EISDIR: ("it is a directory, not a file", "pass a file path, not a folder"),
        errno.ELOOP: ("a symlink loop (a link that leads back to itself)", "replace the link with the real file or "
                      "folder"),
        errno.ENOTDIR: ("a part of the path is a file, not a folder", "point run.output_dir (or the path given) "
                        "at a folder"),
    }
    if err.errno not in fixes:
        return None
    problem, fix = fixes[err.errno]
    return StoreError(f"cannot {doing} {where}: {problem}", fix)


def did_you_mean(word: str, choices, otherwise: str, cutoff: float = 0.6, dotted: bool = False) -> str:
    """The fix hint for an unknown name: the closest choice ("did you mean x?"), else `otherwise`. `dotted`: a bare
    field name also matches a dotted key ending in it (stage_b.lr for lr)."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=cutoff)
    if not close and dotted:
        close = [c for c in choices if c.endswith("." + str(word))][:1]
    return f"did you mean {close[0]}?" if close else otherwise
