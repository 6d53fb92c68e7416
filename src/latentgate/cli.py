"""`latentgate`: one subcommand per MLproject entry point. Imports are lazy so `--help` starts fast (no torch,
no mlflow). Errors the user can act on print one line and exit non-zero; `--debug` shows the traceback."""

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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show Python tracebacks on errors")
@click.version_option(package_name="latentgate")
def main(debug: bool) -> None:
    """Staged latent-prefix LLM experiments, tracked in MLflow, searched with Optuna, gated in the registry."""


@main.command()
@click.option("--list", "list_keys", is_flag=True, help="list every config key with its type, default and help")
@config_options
@guarded
def config(list_keys, preset, sets, overrides):
    """Print the resolved config (preset + overrides) as JSON, or list every key."""
    from latentgate import config as cfgmod

    if list_keys:
        for key, (typ, default, help_) in cfgmod.fields_table().items():
            click.echo(f"{key:32s} {getattr(typ, '__name__', str(typ)):6s} {default!r:>12}  {help_}")
        return
    click.echo(cfgmod.dumps(resolve_config(preset, sets, overrides, "smoke")))


@main.command()
@config_options
@guarded
def smoke(preset, sets, overrides):
    """Base LM (trained or reused) -> Stage A -> Stage B -> eval, as one parent run with child runs."""
    cfg = resolve_config(preset, sets, overrides, "smoke")
    from latentgate.phases.smoke import format_summary, run_smoke

    summary = run_smoke(cfg, preset or "smoke")
    click.echo(format_summary(summary))


@main.command()
@config_options
@guarded
def base(preset, sets, overrides):
    """Train (or reuse) the base LM and run the text-teacher sanity gate."""
    cfg = resolve_config(preset, sets, overrides, "smoke")
    from latentgate.phases.entry import run_base_entry

    res = run_base_entry(cfg)
    click.echo(f"base LM {res['source']}: text F1 {res['text']['f1']:.3f}, run {res['run_id']}")


if __name__ == "__main__":  # pragma: no cover
    main()
