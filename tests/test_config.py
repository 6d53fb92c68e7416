"""One config schema: every override reaches the resolved config and the logged params; bad values are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from latentgate import config
from latentgate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Changing these alone makes the config contradictory on purpose (covered by their own tests).
SKIP = {"data.source", "model.prompt_format"}


def _changed_value(key, typ, default, meta):
    if "choices" in meta:
        return next(c for c in meta["choices"] if c != default)
    if typ is bool:
        return not default
    if typ is int:
        return default * 2 if key in ("base.hidden", "base.heads") else default + 1
    if typ is float:
        return default / 2 if default else 0.25
    if typ is list:
        return {"eval.paths": ["latent", "text"], "model.lora_targets": ["q_proj"]}.get(key, [0])
    return {"model.anchor": "reply :", "run.device": "cpu"}.get(key, f"{default}x")


def _meta(key):
    import dataclasses

    section, name = key.split(".")
    cls = type(getattr(config.Config(), section))
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


@pytest.mark.parametrize("key", [k for k in config.fields_table() if k not in SKIP])
def test_every_override_reaches_resolved_config_and_params(key):
    typ, default, help_ = config.fields_table()[key]
    assert help_, f"{key} has no help text"
    value = _changed_value(key, typ, default, _meta(key))
    cfg = config.resolve("smoke", {key: str(value) if typ is not list else ",".join(map(str, value))})
    flat = config.flatten(cfg)
    assert flat[key] == value and flat[key] != default
    # logged params are strings: they round-trip back to the same config
    assert config.flatten(config.from_flat({k: str(v) for k, v in flat.items()})) == flat


def test_unknown_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"did you mean stage_b.lr\?"):
        config.resolve("smoke", {"stage_b.lrr": "1e-4"})
    with pytest.raises(ConfigError, match=r"did you mean .*first_token_ce_weight"):
        config.resolve("smoke", {"first_token_ce_weight": "3"})


@pytest.mark.parametrize("key,value,needle", [
    ("stage_b.lr", "0", "must be > 0"), ("stage_a.lr", "-1", "must be > 0"), ("model.num_latents", "0", ">= 1"),
    ("model.lora_r", "0", ">= 1"), ("stage_b.k", "99", "answer budget"), ("stage_b.steps", "abc", "expects int"),
    ("stage_a.warmup_steps", "500", "not below"), ("stage_b.schedule", "linear", "not one of"),
    ("data.source", "x.jsonl", "builtin base LM"),
])
def test_bad_values_are_refused_with_one_line(key, value, needle):
    with pytest.raises(ConfigError) as err:
        config.resolve("smoke", {key: value})
    assert needle in str(err.value) and "\n" not in str(err.value) and "fix:" in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'smok'.*did you mean smoke"):
        config.resolve("smok")


def test_every_preset_loads_and_opens_with_its_command():
    for name in config.preset_names():
        config.resolve(name)
        first = (config.PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and ("latentgate" in first or "mlflow run" in first), name


def test_mlproject_overrides_are_config_keys_with_matching_types():
    import yaml

    project = yaml.safe_load((ROOT / "MLproject").read_text())
    table = config.fields_table()
    seen = 0
    for name, ep in project["entry_points"].items():
        for key, param in re.findall(r"--set ([a-z_]+\.[a-z_0-9]+)=\{([a-z_0-9]+)\}", ep["command"]):
            assert key in table, f"{name}: {key} is not a config key"
            declared = ep["parameters"][param]["type"]
            assert declared == {int: "int", float: "float", str: "string", bool: "string"}[table[key][0]], key
            seen += 1
    assert seen >= 8


def test_cli_config_shows_override_and_lists_keys(tmp_path):
    from conftest import run_cli

    out = run_cli("config", "--set", "stage_b.lr=0.123", "--overrides", "stage_b.steps=77 model.num_latents=5")
    assert out.returncode == 0, out.stderr
    import json

    cfg = json.loads(out.stdout)
    assert cfg["stage_b"]["lr"] == 0.123 and cfg["stage_b"]["steps"] == 77 and cfg["model"]["num_latents"] == 5
    listing = run_cli("config", "--list")
    assert "stage_b.first_token_ce_weight" in listing.stdout


def test_auto_choices_resolve_by_base_lm_and_chat_needs_a_template():
    builtin = config.resolve("smoke")
    assert (builtin.model.encoder, builtin.model.answer_end) == ("lm_copy", "eos")
    external = config.resolve("smoke", {"base.name": "/some/hf-folder"})
    assert (external.model.encoder, external.model.answer_end) == ("lm_self", "none")
    chat = config.resolve("smoke", {"base.name": "/some/hf-folder", "model.prompt_format": "chat"})
    assert chat.model.answer_end == "eos"
    with pytest.raises(ConfigError, match="chat template"):
        config.resolve("smoke", {"model.prompt_format": "chat"})


def test_validate_changes_nothing_and_resolve_auto_returns_a_new_config():
    import copy

    cfg = config.apply_overrides(config.Config(), config.preset_overrides("smoke"))
    before = copy.deepcopy(cfg)
    assert cfg.validate() is cfg and cfg == before and cfg.model.encoder == "auto" == cfg.model.answer_end
    resolved = config.resolve_auto(cfg)
    assert (resolved.model.encoder, resolved.model.answer_end) == ("lm_copy", "eos")
    assert cfg == before  # the input is left as it was
    assert config.flatten(resolved) == config.flatten(config.resolve("smoke"))


SMALL = config.Machine(cores=1, ram_bytes=64 * config.BYTES_PER_EXAMPLE)  # room for 64 examples
BIG = config.Machine(cores=1 << 20, ram_bytes=1 << 50)


@pytest.mark.parametrize("change,machine,needle", [
    ({"run.threads": "100000"}, None, "run.threads=100000 exceeds 4 x the"),
    ({}, SMALL, "would not fit this machine's memory"),
])
def test_a_logged_config_rebuilds_anywhere_but_a_new_run_checks_its_machine(change, machine, needle, monkeypatch):
    """Resume, evidence and serving rebuild the config a run logged, maybe on another machine: `from_flat` never
    checks this one. A new run (`resolve`: the CLI, pipeline, sweep, bench) is refused before it starts."""
    logged = {k: str(v) for k, v in config.flatten(config.resolve("smoke")).items()}
    logged.update(change)
    if machine:
        monkeypatch.setattr(config.Machine, "this", classmethod(lambda cls: machine))
    assert config.flatten(config.from_flat(logged)) == {**config.flatten(config.resolve("smoke", machine=BIG)),
                                                        **{k: int(v) for k, v in change.items()}}
    with pytest.raises(ConfigError, match=needle):
        config.resolve(None, logged)
    with pytest.raises(ConfigError, match=needle):
        config.check_machine(config.from_flat(logged), config.Machine.this())


def test_base_lm_optimizer_settings_are_config_fields_the_builtin_training_uses(micro_cfg, tmp_path):
    """AdamW weight decay and betas, the cosine schedule's final LR and gradient clipping of the builtin LM are
    base.* fields (logged with the base run's params); their defaults are the values once hard-coded."""
    import copy
    import dataclasses

    from latentgate.train.base import train_builtin_base

    flat = config.flatten(micro_cfg)
    assert {k: flat[k] for k in ("base.weight_decay", "base.beta1", "base.beta2", "base.min_lr_ratio",
                                 "base.clip_norm")} == {"base.weight_decay": 0.01, "base.beta1": 0.9,
                                                        "base.beta2": 0.98, "base.min_lr_ratio": 0.05,
                                                        "base.clip_norm": 1.0}

    class Recorder:
        def __init__(self):
            self.metrics = []

        def log_metrics(self, metrics, step):
            self.metrics.append(metrics)

        def flush(self):
            pass

    def train(**base) -> list[dict]:
        cfg = copy.deepcopy(micro_cfg)
        cfg.base = dataclasses.replace(cfg.base, steps=4, **base)
        rec = Recorder()
        train_builtin_base(cfg, rec, tmp_path / f"run{len(list(tmp_path.iterdir()))}")
        return rec.metrics

    ref, decayed, high_floor = train(), train(weight_decay=0.5), train(min_lr_ratio=0.5)
    losses = [[m["base/loss"] for m in run] for run in (ref, decayed)]
    assert losses[0][0] == losses[1][0] and losses[0] != losses[1]  # same init, then the decay shows
    lr = micro_cfg.base.lr
    assert ref[-1]["base/lr"] == pytest.approx(lr * 0.05) and high_floor[-1]["base/lr"] == pytest.approx(lr * 0.5)
