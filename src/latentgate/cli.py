"""`latentgate`: one subcommand per MLproject entry point. Imports are lazy so `--help` starts fast (no torch,
no mlflow). Errors the user can act on print one line and exit non-zero; `--debug` shows the traceback."""

from __future__ import annotations

import click

from latentgate.cli_common import config_options, guarded, resolve_config


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


# Each area owns its subcommands in its own module (top-level imports there: click only).
COMMAND_MODULES = (
    "latentgate.phases.cli",
    "latentgate.registry.cli",
    "latentgate.analysis.cli",
    "latentgate.sweep.cli",
    "latentgate.bench.cli",
)


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if not (err.name and name.startswith(err.name)):  # a real import error inside it: surface it
                raise
            continue
        for command in module.COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
