"""Calibration sets: `calibrations/<name>.yaml` (or any YAML path) -> a validated `CalibrationSet`.

    name: cpu                 # plain name; the parent run is `calibrate <name>`
    preset: smoke             # default preset of every configuration
    hero_scale: 10            # the hero-scale run: registry/hero_recipe.hero_plan(gate config, hero_scale), the
                              # hero `latentgate hero` would run: steps, warm-up, probe and checkpoint cadence x this
    overrides: {}             # dotted config keys applied to every configuration, before its own
    configurations:
      - name: lr-high         # plain name, unique in the set
        expect: broken        # good | marginal | broken: what the author expects (shown, never used to judge)
        preset: smoke         # optional: replaces the set's preset
        overrides: {stage_a.lr: 3.0e-2}
        holdout: true         # optional: held out from the threshold proposal, to judge it on

Every configuration is resolved (both scales) when the file is loaded: an unknown key or a bad value fails in one
line naming the configuration, before anything trains.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from latentgate import config
from latentgate.errors import ConfigError, did_you_mean
from latentgate.registry.hero_recipe import hero_plan
from latentgate.safety import refuse_loop

CALIBRATION_DIR = Path(__file__).with_name("sets")  # package data; calibrations/ in a checkout links here
TOP_KEYS = ("name", "preset", "hero_scale", "overrides", "configurations")
ENTRY_KEYS = ("name", "expect", "preset", "overrides", "holdout")
EXPECT = ("good", "marginal", "broken")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Configuration:
    name: str
    expect: str
    preset: str
    overrides: dict
    holdout: bool
    gate: config.Config = field(repr=False)
    hero: config.Config = field(repr=False)

    @property
    def split(self) -> str:
        return "holdout" if self.holdout else "fit"


@dataclass(frozen=True)
class CalibrationSet:
    name: str
    path: Path
    sha256: str
    hero_scale: int
    configurations: tuple[Configuration, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "hero_scale": self.hero_scale,
                "configurations": [{"name": c.name, "expect": c.expect, "preset": c.preset, "split": c.split,
                                    "overrides": c.overrides,
                                    "steps": {"gate": [c.gate.stage_a.steps, c.gate.stage_b.steps],
                                              "hero": [c.hero.stage_a.steps, c.hero.stage_b.steps]},
                                    "config_hash": {"gate": config.config_hash(c.gate),
                                                    "hero": config.config_hash(c.hero)}}
                                   for c in self.configurations]}


def set_names(directory: Path = CALIBRATION_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def set_path(name_or_path: str, directory: Path = CALIBRATION_DIR) -> Path:
    path = Path(name_or_path)
    refuse_loop(path, "calibration set")
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"calibration set {path} does not exist", f"choose one of {set_names(directory)} "
                              "(calibrations/) or pass the path of a .yaml file")
        return path
    path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown calibration set {name_or_path!r}",
                          did_you_mean(name_or_path, set_names(directory), f"choose one of {set_names(directory)}"))
    return path


def _mapping(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"{where}: overrides must be a mapping of dotted config keys", "write overrides: {k: v}")
    return dict(raw)


def _resolve(where: str, preset: str, overrides: dict) -> config.Config:
    try:
        return config.resolve(preset, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err.problem}", err.fix) from None


def load_set(name_or_path: str, extra: dict | None = None, preset: str | None = None) -> CalibrationSet:
    """Load and validate a set. `extra`: overrides from the command line, applied last to every configuration;
    `preset`: replaces the set's default preset (not a configuration's own)."""
    path = set_path(name_or_path)
    raw = config.load_yaml_mapping(path)
    where = str(path)
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}", f"use {list(TOP_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: name {name!r} is not a plain name", "use letters, digits, '.', '-' and '_'")
    scale = raw.get("hero_scale", 10)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"{where}: hero_scale={scale!r} must be a positive integer", "write hero_scale: 10")
    default_preset = preset or raw.get("preset") or "smoke"
    shared = _mapping(raw.get("overrides"), where)
    entries = raw.get("configurations")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: no configurations", "list at least one under configurations:")
    out: list[Configuration] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: configuration #{i + 1} is not a mapping", "write {name: ..., overrides: ...}")
        bad = sorted(set(entry) - set(ENTRY_KEYS))
        if bad:
            raise ConfigError(f"{where}: configuration #{i + 1}: unknown key {bad[0]!r}", f"use {list(ENTRY_KEYS)}")
        cname = entry.get("name")
        if not isinstance(cname, str) or not _NAME.fullmatch(cname):
            raise ConfigError(f"{where}: configuration #{i + 1}: name {cname!r} is not a plain name",
                              "use letters, digits, '.', '-' and '_'")
        if any(c.name == cname for c in out):
            raise ConfigError(f"{where}: configuration name {cname!r} is used twice", "give each its own name")
        expect = entry.get("expect", "good")
        if expect not in EXPECT:
            raise ConfigError(f"{where}: configuration {cname}: expect={expect!r}", f"choose one of {list(EXPECT)}")
        holdout = entry.get("holdout", False)
        if not isinstance(holdout, bool):
            raise ConfigError(f"{where}: configuration {cname}: holdout={holdout!r} is not true/false",
                              "write holdout: true")
        cpreset = entry.get("preset") or default_preset
        own = _mapping(entry.get("overrides"), f"{where}: configuration {cname}")
        overrides = {**shared, **own, **(extra or {})}
        here = f"{where}: configuration {cname}"
        gate = _resolve(here, cpreset, overrides)
        try:  # the hero of this recipe, as `latentgate hero` and the pipeline build it from an approved version
            hero = hero_plan(gate, scale).config
        except ConfigError as err:
            raise ConfigError(f"{here} (hero scale): {err.problem}", err.fix) from None
        out.append(Configuration(cname, expect, cpreset, overrides, holdout, gate, hero))
    return CalibrationSet(name=name, path=path.resolve(), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                          hero_scale=scale, configurations=tuple(out))
