"""Every shipped preset loads, validates, opens with the command that runs it, and means what its name says."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import ROOT
from latentgate import config
from latentgate.config import PRESET_DIR, flatten, preset_names, resolve
from latentgate.errors import ConfigError
from latentgate.train.manifest import COMPAT_KEYS

PHASE_PRESETS = {"extend": "extend", "fix": "fix", "smoke": "smoke"}


def _compute(cfg) -> int:
    """Stage examples seen (optimizer steps x micro-batches x batch size), the training compute that scales."""
    return sum(getattr(cfg, s).steps * getattr(cfg, s).grad_accum * getattr(cfg, s).batch_size
               for s in ("stage_a", "stage_b"))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name):
    cfg = resolve(name)
    assert cfg.validate() is cfg
    raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    table = config.fields_table()
    for section, values in raw.items():  # every key in the file is a real config key (no silent typos)
        if section == "extends":
            assert values in preset_names()
            continue
        for key in values:
            assert f"{section}.{key}" in table, f"{name}.yaml: unknown key {section}.{key}"


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_opens_with_the_command_that_runs_it(name):
    first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# "), first
    assert "latentgate" in first or "mlflow run" in first, first
    if name in PHASE_PRESETS:
        assert re.search(rf"(-e {name}\b|latentgate {name}\b)", first), first


def test_phase_presets_extend_the_smoke():
    for name in ("extend", "fix", "micro"):
        assert yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())["extends"] == "smoke"


def test_extend_doubles_stage_b_in_optimizer_steps_and_changes_nothing_else_that_trains():
    smoke, ext = resolve("smoke"), resolve("extend")
    assert ext.stage_b.steps == 2 * smoke.stage_b.steps
    assert ext.stage_b.grad_accum == smoke.stage_b.grad_accum  # doubled in updates, not in micro-batches
    assert ext.stage_b.batch_size == smoke.stage_b.batch_size
    diff = {k for k, v in flatten(ext).items() if flatten(smoke)[k] != v}
    assert diff == {"stage_b.steps", "stage_b.checkpoint_every"}


def test_fix_is_scheduled_sampling_down_to_half_gold():
    smoke, fix = resolve("smoke"), resolve("fix")
    assert fix.stage_b.scheduled_sampling is True and fix.stage_b.p_gold_floor == 0.5
    assert fix.stage_b.steps == resolve("extend").stage_b.steps  # Phase 1's budget: only the fix differs
    assert not smoke.stage_b.scheduled_sampling


def test_the_hero_of_the_smoke_is_about_ten_times_its_compute_and_keeps_its_architecture():
    """No hero preset: the hero of an approved smoke is the smoke's recipe at the checklist's hero.scale."""
    from latentgate.registry.checklist import load_checklist
    from latentgate.registry.hero_recipe import hero_plan

    smoke = resolve("smoke")
    hero = hero_plan(smoke, load_checklist().hero_scale()).config
    ratio = _compute(hero) / _compute(smoke)
    assert 8 <= ratio <= 12, ratio
    for key in COMPAT_KEYS:  # the hero scales the approved model; it does not change it
        assert flatten(hero)[key] == flatten(smoke)[key], key
    assert hero.stage_a.checkpoint_every and hero.stage_b.checkpoint_every  # a long run must be resumable
    assert not (PRESET_DIR / "hero.yaml").exists()


def test_a_preset_with_an_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: smoke\nstage_b:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="did you mean stage_b.steps"):
        resolve(str(bad))


def test_mlproject_preset_defaults_exist():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    for name, ep in spec["entry_points"].items():
        default = ep.get("parameters", {}).get("preset", {})
        if isinstance(default, dict) and "default" in default:
            if name == "sweep":  # empty: the study file's preset (sweeps/<study>.yaml names one)
                assert default["default"] == "", name
                continue
            assert default["default"] in preset_names(), name
