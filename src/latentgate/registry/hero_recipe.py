"""The one definition of "the hero of a version": the approved recipe with only the hero budget applied.

`latentgate hero`, the pipeline's Phase 4 and `latentgate calibrate` all build the hero here, so the run the gate
approved, the run that is launched and the run the calibration measured are the same recipe:

    hero config = the approved config (the Stage B run's logged params)
                  with stage_a/stage_b steps, warm-up, probe and checkpoint cadence x `scale`
                  (cadence scales with the steps, so the hero records as many probes as its gate did; a run
                  that checkpointed only at its end checkpoints every approved-run length, so the hero resumes)
                  plus runtime keys the user sets (device, threads, output folder: the same recipe elsewhere)
                  plus recipe keys the user names AND allows (`allow_recipe_change`), recorded as a deviation.

Data and eval sizes stay the approved ones: they identify the base LM (lineage.base_hash) and the eval set the
checklist pinned. Pure: no store, no torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from latentgate.config import Config, apply_overrides, flatten
from latentgate.errors import ConfigError

STAGES = ("stage_a", "stage_b")
BUDGET_FIELDS = ("steps", "warmup_steps", "probe_every", "checkpoint_every")
BUDGET_KEYS = tuple(f"{s}.{f}" for s in STAGES for f in BUDGET_FIELDS)
# Where and how fast it runs, not what it learns: a hero on a GPU sets these without deviating from the recipe.
RUNTIME_KEYS = ("run.experiment", "run.threads", "run.device", "run.output_dir", "base.attn_implementation",
                "base.gradient_checkpointing", "eval.batch_size")
BUDGET, RUNTIME, RECIPE = "budget", "runtime", "recipe"


@dataclass(frozen=True)
class ConfigChange:
    """One key whose hero value differs from the approved one."""

    key: str
    approved: object
    hero: object
    kind: str  # budget | runtime | recipe

    def as_text(self) -> str:
        return f"{self.key}: {self.approved!r} -> {self.hero!r} ({self.kind})"


@dataclass(frozen=True)
class HeroPlan:
    """The hero's resolved config and how it differs from the approved recipe."""

    config: Config
    scale: float
    changes: tuple[ConfigChange, ...]

    def of_kind(self, kind: str) -> list[ConfigChange]:
        return [c for c in self.changes if c.kind == kind]

    def diff_json(self) -> str:
        """The diff as recorded on the hero run (tag latentgate.hero_diff)."""
        return json.dumps([dataclasses.asdict(c) for c in self.changes], sort_keys=True, default=str)

    def diff_text(self) -> str:
        return "\n".join(c.as_text() for c in self.changes) or "(no difference)"


def key_kind(key: str) -> str:
    return BUDGET if key in BUDGET_KEYS else RUNTIME if key in RUNTIME_KEYS else RECIPE


def config_diff(approved: Config, hero: Config) -> tuple[ConfigChange, ...]:
    """Every key whose value differs, with its kind."""
    a, h = flatten(approved), flatten(hero)
    return tuple(ConfigChange(k, a[k], h[k], key_kind(k)) for k in sorted(a) if a[k] != h[k])


def scaled_budget(approved: Config, scale: float) -> dict[str, int]:
    """The budget keys times `scale` (at least 1 step). A checkpoint cadence of 0 (only at the end) becomes the
    approved run's length, so a long hero can be resumed; a warm-up of 0 stays 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ConfigError(f"hero scale must be a number > 0, got {scale!r}", "pass e.g. --scale 10")
    out = {}
    for stage in STAGES:
        section = getattr(approved, stage)
        for name in BUDGET_FIELDS:
            value = getattr(section, name)
            if name == "checkpoint_every" and not value:
                out[f"{stage}.{name}"] = section.steps if scale > 1 else 0
            else:
                floor = 0 if name == "warmup_steps" else 1
                out[f"{stage}.{name}"] = max(floor, round(value * scale)) if value else value
    return out


def hero_plan(approved: Config, scale: float, overrides: dict | None = None,
              allow_recipe_change: bool = False) -> HeroPlan:
    """The hero of `approved`: budget x scale, then the user's overrides. A recipe key among the overrides is
    refused unless `allow_recipe_change`; then it is part of the plan's diff (kind `recipe`)."""
    overrides = dict(overrides or {})
    recipe = sorted(k for k in overrides if key_kind(k) == RECIPE)
    if recipe and not allow_recipe_change:
        raise ConfigError(f"the hero would not be the approved recipe: {', '.join(recipe)} differ",
                          "drop them, or pass --allow-recipe-change to run (and record) a deviating hero")
    cfg = dataclasses.replace(approved, **{s.name: dataclasses.replace(getattr(approved, s.name))
                                           for s in dataclasses.fields(approved)})  # a copy; approved stays as is
    apply_overrides(cfg, {**scaled_budget(approved, scale), **overrides})
    cfg = cfg.validate()
    return HeroPlan(config=cfg, scale=float(scale), changes=config_diff(approved, cfg))
