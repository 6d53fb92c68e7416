"""User-facing errors: one line naming the problem and the fix, never a traceback (unless --debug)."""

from __future__ import annotations


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
