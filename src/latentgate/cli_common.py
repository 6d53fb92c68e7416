"""Helpers every CLI module shares: config options, and the guard that turns errors into one line + exit code.
Top-level imports: click only, so `latentgate --help` stays fast."""

from __future__ import annotations

import functools
import sys
import traceback

import click

from latentgate.errors import LatentgateError


def _fail(message: str, code: int) -> None:
    click.echo(f"latentgate: error: {message}", err=True)
    sys.exit(code)


def guarded(fn):
    """Turn LatentgateError into a one-line message and its exit code; other errors into one line too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except LatentgateError as err:
            if debug:
                traceback.print_exc()
            from latentgate.tracking.secrets import mask_secrets

            _fail(mask_secrets(str(err)), err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as err:  # noqa: BLE001 - last resort: still one line, unless --debug
            if debug:
                traceback.print_exc()
            from latentgate.tracking.secrets import mask_secrets

            first = (str(err).splitlines() or [""])[0][:300]
            _fail(f"{type(err).__name__}: {mask_secrets(first)} (rerun with --debug for the traceback)", 1)

    return wrapper


def config_options(fn):
    """--preset / --set / --overrides: the one way every subcommand takes config."""
    fn = click.option("--overrides", default="", help="space-separated key=value overrides (MLproject parameter)")(fn)
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                      help="override a config field, e.g. --set stage_b.lr=1e-4 (see `latentgate config --list`)")(fn)
    fn = click.option("--preset", default=None, help="preset name from presets/ or a YAML path")(fn)
    return fn


def resolve_config(preset: str | None, sets, overrides: str, default_preset: str):
    from latentgate import config

    pairs = config.parse_set_args(list(sets) + ([overrides] if overrides.strip() else []))
    return config.resolve(preset or default_preset, pairs)
