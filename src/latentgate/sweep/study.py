"""Declarative studies: `sweeps/defaults.yaml` + `sweeps/<study>.yaml` -> a validated `StudySpec`.

Every search-space key must be a real config key (`latentgate.config.fields_table()`) that a trial may change:
a trial is Stage B resumed from a Stage A checkpoint, so only `stage_b.*` and the LoRA keys of `model.*` can vary.
Bounds and choices are checked against the config's own validation before anything trains.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from latentgate import config
from latentgate.config_parse import coerce, load_yaml_mapping
from latentgate.errors import ConfigError, did_you_mean
from latentgate.safety import refuse_loop
from latentgate.schema import EvalKey, EvalPath, Probe, Summary
from latentgate.sweep.stopping import check_stop

SWEEP_DIR = Path(__file__).with_name("studies")  # package data; sweeps/ in a checkout links here
DEFAULTS = "defaults"

TOP_KEYS = ("study_name", "preset", "overrides", "resume_from", "objective", "n_trials", "sampler", "pruner",
            "heartbeat", "artifact_dir", "search_space", "stop")
OPTIONAL_KEYS = ("stop",)  # absent: no stopping rule (so studies stored before it existed load unchanged)
OBJECTIVE_KEYS = ("metric", "tie_break", "tie_weight")
OBJECTIVE_METRICS = {Summary.LATENT_F1: (EvalPath.LATENT, EvalKey.F1), Summary.LATENT_EM: (EvalPath.LATENT, EvalKey.EM),
                     Summary.LATENT_FIRST_TOP1: (EvalPath.LATENT, EvalKey.FIRST_TOP1),
                     Summary.LATENT_FIRST_TOP5: (EvalPath.LATENT, EvalKey.FIRST_TOP5)}
HEARTBEAT_KEYS = ("interval", "grace_period", "max_retry")
# A trial resumes Stage A's encoder + adapter: only Stage B and its LoRA may vary.
SEARCHABLE_PREFIXES = ("stage_b.", "model.lora_")
DIST_KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
             "categorical": {"choices"}}

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler", "qmc": "QMCSampler",
            "cmaes": "CmaEsSampler"}
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner", "wilcoxon": "WilcoxonPruner",
           "hyperband": "HyperbandPruner", "successive_halving": "SuccessiveHalvingPruner",
           "threshold": "ThresholdPruner", "patient": "PatientPruner", "none": "NopPruner"}
# WilcoxonPruner tests, per instance, whether a trial's scores are worse than the best trial's on the same instances
# (steps = instance ids). A trial here is a training run: its probe re-scores the same examples as the model
# changes, and reports one average per optimizer step, not per-example scores keyed by example id.
WILCOXON_REFUSED = ("pruner wilcoxon needs per-example scores keyed by example id, but a trial reports one probe "
                    "average per optimizer step (the probe gives no per-example first-token correctness)")


@dataclass
class Param:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None
    when: dict = field(default_factory=dict)


@dataclass
class StudySpec:
    name: str
    path: str
    preset: str
    overrides: dict
    resume_from: str
    objective: dict
    n_trials: int
    sampler: dict
    pruner: dict
    heartbeat: dict
    artifact_dir: str
    search_space: dict[str, Param]
    raw: dict = field(repr=False, default_factory=dict)
    stop: dict = field(default_factory=lambda: {"rule": "none"})  # sweep/stopping.py

    def to_dict(self) -> dict:
        """The resolved study (defaults merged): stored in the Optuna study so hand-started workers need only
        the storage and the study name."""
        return {**copy.deepcopy(self.raw), "study_name": self.name}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def with_changes(self, where: str, **changes) -> "StudySpec":
        """The same study with some top-level keys replaced (validated again), e.g. the study name, the Stage A
        checkpoint, or the preset and overrides a pipeline runs the sweep with."""
        return spec_from_dict({**self.to_dict(), **changes}, where)

    def trial_config(self, params: dict, extra: dict | None = None):
        return config.resolve(self.preset, {**self.overrides, **params, **(extra or {})})

    def score(self, metrics: dict) -> tuple[float, float, float]:
        """(value, metric, tie_break) from an eval's metrics["paths"]: value = metric + tie_weight * tie_break."""
        path, k = OBJECTIVE_METRICS[self.objective["metric"]]
        main = float(metrics[path][k])
        tie = 0.0
        if self.objective.get("tie_break"):
            tp, tk = OBJECTIVE_METRICS[self.objective["tie_break"]]
            tie = float(metrics[tp][tk])
        return main + float(self.objective.get("tie_weight", 0.0)) * tie, main, tie

    def probe_value(self, probe: dict) -> float:
        """The intermediate value at a probe: probe f1 + tie_weight * probe first-token accuracy."""
        tie = float(self.objective.get("tie_weight", 0.0))
        return float(probe.get(Probe.F1) or 0.0) + tie * float(probe[Probe.FIRST_ACC])


# ---- loading ---------------------------------------------------------------------------------------------------

def study_names(directory: Path = SWEEP_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml") if p.stem != DEFAULTS)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k in ("sampler", "pruner") and isinstance(v, dict) and v.get("name") != (out.get(k) or {}).get("name"):
            out[k] = copy.deepcopy(v)  # another sampler/pruner: the default's kwargs do not apply
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "search_space":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def study_path(name_or_path: str, directory: Path = SWEEP_DIR) -> Path:
    path = Path(name_or_path)
    refuse_loop(path, "study file")
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = Path(directory) / f"{name_or_path}.yaml"
    if not path.exists():
        names = study_names(directory)
        raise ConfigError(f"unknown study {name_or_path!r}",
                          did_you_mean(name_or_path, names, f"choose one of {names} (files in {directory})"))
    return path


def load_study(name_or_path: str, directory: Path = SWEEP_DIR) -> StudySpec:
    """Read defaults + the study file and validate everything (keys, types, bounds, sampler and pruner)."""
    path = study_path(name_or_path, directory)
    defaults_path = path.parent / f"{DEFAULTS}.yaml"
    defaults = load_yaml_mapping(defaults_path) if defaults_path.exists() else {}
    raw = _merge(defaults, load_yaml_mapping(path))
    raw.setdefault("study_name", path.stem)
    return spec_from_dict(raw, str(path))


def spec_from_dict(raw: dict, where: str = "<study>") -> StudySpec:
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}",
                          did_you_mean(unknown[0], TOP_KEYS, f"use keys from {list(TOP_KEYS)}"))
    missing = [k for k in TOP_KEYS if k not in raw and k not in OPTIONAL_KEYS]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}", "add them (sweeps/defaults.yaml sets every one)")
    name = str(raw["study_name"])
    if not name or any(c in name for c in "/\\ "):
        raise ConfigError(f"{where}: study_name {name!r} is not a plain name", "use letters, digits, - and _")
    overrides = raw["overrides"] or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides must be a mapping of dotted config keys", "write overrides: {k: v}")
    table = config.fields_table()
    for k in overrides:
        _check_key(k, table, where, "overrides")
    try:
        base_cfg = config.resolve(raw["preset"], overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err.problem}", err.fix) from None
    objective = _check_objective(raw["objective"], where)
    n_trials = raw["n_trials"]
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigError(f"{where}: n_trials={n_trials!r} must be a positive integer", "set n_trials: 24")
    heartbeat = _check_heartbeat(raw["heartbeat"], where)
    sampler = _check_factory(raw["sampler"], SAMPLERS, "samplers", where, "sampler")
    pruner = _check_factory(raw["pruner"], PRUNERS, "pruners", where, "pruner")
    space = _check_space(raw["search_space"], table, where, raw["preset"], overrides)
    stop = check_stop(raw.get("stop"), where)
    resume = str(raw["resume_from"] or "")
    if not resume:
        raise ConfigError(f"{where}: resume_from is empty", "name a Stage A checkpoint URI, or write `auto`")
    spec = StudySpec(name=name, path=where, preset=str(raw["preset"]), overrides=overrides, resume_from=resume,
                     objective=objective, n_trials=n_trials, sampler=sampler, pruner=pruner, heartbeat=heartbeat,
                     artifact_dir=str(raw["artifact_dir"]), search_space=space, raw=copy.deepcopy(raw), stop=stop)
    del base_cfg
    return spec


def _check_key(key: str, table: dict, where: str, what: str) -> None:
    if key not in table:
        raise ConfigError(f"{where}: {what} key {key!r} is not a config key",
                          did_you_mean(key, table, "see `latentgate config --list`", 0.5, dotted=True))


def _check_objective(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: objective must be a mapping", "write objective: {metric: latent_f1}")
    bad = [k for k in obj if k not in OBJECTIVE_KEYS]
    if bad:
        raise ConfigError(f"{where}: unknown objective key {bad[0]!r}", f"use {list(OBJECTIVE_KEYS)}")
    for k in ("metric", "tie_break"):
        if obj.get(k) and obj[k] not in OBJECTIVE_METRICS:
            raise ConfigError(f"{where}: objective.{k}={obj[k]!r} is not a known metric",
                              f"choose from {list(OBJECTIVE_METRICS)}")
    if not obj.get("metric"):
        raise ConfigError(f"{where}: objective.metric is missing", "set objective.metric: latent_f1")
    w = obj.get("tie_weight", 0.0)
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w < 0.1:
        raise ConfigError(f"{where}: objective.tie_weight={w!r} must be a number in [0, 0.1)",
                          "a tie-break weight must not outweigh the metric (e.g. 0.001)")
    return {"metric": obj["metric"], "tie_break": obj.get("tie_break") or "", "tie_weight": float(w)}


def _check_heartbeat(hb, where: str) -> dict:
    if not isinstance(hb, dict):
        raise ConfigError(f"{where}: heartbeat must be a mapping", "write heartbeat: {interval: 10, ...}")
    bad = [k for k in hb if k not in HEARTBEAT_KEYS]
    if bad:
        raise ConfigError(f"{where}: unknown heartbeat key {bad[0]!r}", f"use {list(HEARTBEAT_KEYS)}")
    out = {"interval": hb.get("interval", 10), "grace_period": hb.get("grace_period", 60),
           "max_retry": hb.get("max_retry", 2)}
    for k, v in out.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "max_retry" else 1):
            raise ConfigError(f"{where}: heartbeat.{k}={v!r} must be a positive integer", f"fix heartbeat.{k}")
    if out["grace_period"] <= out["interval"]:
        raise ConfigError(f"{where}: heartbeat.grace_period={out['grace_period']} must exceed the interval "
                          f"{out['interval']}", "use grace_period of a few intervals")
    return out


def _check_factory(spec, table: dict, module: str, where: str, what: str) -> dict:
    """`{name: tpe, seed: 0, ...}`: a known name, and keyword arguments the class really accepts."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: {what} must be a mapping with a name", f"choose a name from {list(table)}")
    name = spec["name"]
    if name not in table:
        raise ConfigError(f"{where}: unknown {what} {name!r}", did_you_mean(name, table, f"choose from {list(table)}"))
    if module == "pruners" and name == "wilcoxon":
        raise ConfigError(f"{where}: {WILCOXON_REFUSED}", "use pruner median, percentile, successive_halving or "
                                                          "patient (and a stop rule to end a study early)")
    if module == "pruners" and name == "patient" and spec.get("wrapped") is not None:
        _check_factory(spec["wrapped"], table, module, where, f"{what}.wrapped")
    cls = getattr(getattr(optuna, module), table[name])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if name == "patient":  # the wrapped pruner is a mapping of its own (no wrapped: prune on patience alone)
        accepted = accepted - {"wrapped_pruner"} | {"wrapped"}
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    bad = [k for k in kwargs if k not in accepted]
    if bad:
        raise ConfigError(f"{where}: {what} {name} takes no argument {bad[0]!r}",
                          f"{table[name]} accepts {sorted(accepted)}")
    try:
        build(spec, table, module)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {what} {spec}: {err}", f"fix the {what} arguments") from None
    return dict(spec)


def build(spec: dict, table: dict, module: str, seed_offset: int = 0):
    cls = getattr(getattr(optuna, module), table[spec["name"]])
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] == "patient" and module == "pruners":  # PatientPruner(wrapped_pruner, patience, min_delta)
        wrapped = kwargs.pop("wrapped", None)
        kwargs["wrapped_pruner"] = build(wrapped, table, module) if wrapped is not None else None
    if "seed" in kwargs and kwargs["seed"] is not None:
        kwargs["seed"] = int(kwargs["seed"]) + seed_offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of some samplers/pruners
        return cls(**kwargs)


def build_sampler(spec: StudySpec, worker_index: int = 0):
    """Each worker offsets the seed by its index, so parallel workers do not propose identical trials."""
    return build(spec.sampler, SAMPLERS, "samplers", seed_offset=worker_index)


def build_pruner(spec: StudySpec):
    return build(spec.pruner, PRUNERS, "pruners")


def _check_space(space, table: dict, where: str, preset: str, overrides: dict) -> dict[str, Param]:
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: search_space is empty", "name at least one config key to search")
    out: dict[str, Param] = {}
    for key, d in space.items():
        _check_key(key, table, where, "search_space")
        if not key.startswith(SEARCHABLE_PREFIXES):
            raise ConfigError(f"{where}: search_space key {key!r} cannot vary across trials: every trial resumes "
                              "the same Stage A checkpoint", "search stage_b.* or model.lora_* keys only")
        if not isinstance(d, dict) or d.get("type") not in DIST_KEYS:
            raise ConfigError(f"{where}: search_space.{key} needs type float, int or categorical",
                              f"write {key}: {{type: float, low: ..., high: ...}}")
        typ = d["type"]
        extra = set(d) - DIST_KEYS[typ] - {"type", "when"}
        if extra:
            raise ConfigError(f"{where}: search_space.{key} has unknown field(s) {sorted(extra)}",
                              f"a {typ} takes {sorted(DIST_KEYS[typ])} (+ when)")
        field_type = table[key][0]
        p = Param(key, typ, when=dict(d.get("when") or {}))
        if typ == "categorical":
            choices = d.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: search_space.{key}.choices must be a non-empty list", "list the values")
            p.choices = [coerce(key, field_type, c) for c in choices]
            values = p.choices
        else:
            want = float if typ == "float" else int
            if field_type is not want:
                raise ConfigError(f"{where}: search_space.{key} is {typ} but {key} is "
                                  f"{getattr(field_type, '__name__', field_type)}", f"use type {field_type.__name__}")
            try:
                p.low, p.high = want(d["low"]), want(d["high"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{where}: search_space.{key} needs numeric low and high",
                                  "write low: <n>, high: <n>") from None
            p.log = bool(d.get("log", False))
            p.step = want(d["step"]) if d.get("step") is not None else None
            if p.low > p.high:
                raise ConfigError(f"{where}: search_space.{key}: low {p.low} > high {p.high}", "swap them")
            if p.log and (p.low <= 0 or p.step is not None):
                raise ConfigError(f"{where}: search_space.{key}: a log range needs low > 0 and no step",
                                  "raise low or drop log/step")
            values = [p.low, p.high]
        for v in values:  # every bound and choice must pass the config's own validation
            try:
                config.resolve(preset, {**overrides, key: v})
            except ConfigError as err:
                raise ConfigError(f"{where}: search_space.{key}={v!r} is rejected by the config: {err.problem}",
                                  err.fix) from None
        out[key] = p
    for key, p in out.items():  # a condition names an unconditional categorical key (sampled first)
        for cond_key, cond_val in p.when.items():
            if cond_key not in out or out[cond_key].type != "categorical" or out[cond_key].when:
                raise ConfigError(f"{where}: search_space.{key}.when names {cond_key!r}, which is not an "
                                  "unconditional categorical key of the search space", "condition on such a key")
            if coerce(cond_key, table[cond_key][0], cond_val) not in out[cond_key].choices:
                raise ConfigError(f"{where}: search_space.{key}.when: {cond_val!r} is not a choice of {cond_key}",
                                  f"use one of {out[cond_key].choices}")
    out = {k: p for k, p in out.items() if not p.when} | {k: p for k, p in out.items() if p.when}
    # the two corners of the numeric ranges together (catches e.g. warm-up >= steps, min_lr > lr)
    for side in ("low", "high"):
        corner = {k: (getattr(p, side) if p.type != "categorical" else p.choices[0 if side == "low" else -1])
                  for k, p in out.items() if not p.when}
        try:
            config.resolve(preset, {**overrides, **corner})
        except ConfigError as err:
            raise ConfigError(f"{where}: the search space's {side} corner is rejected by the config: {err.problem}",
                              "narrow the ranges so every combination is valid") from None
    return out


def suggest(trial, space: dict[str, Param]) -> dict[str, Any]:
    """The trial's config overrides (keys are config keys). A `when` key keeps the preset's value (and is not
    sampled) unless its condition holds."""
    params: dict[str, Any] = {}
    for key, p in space.items():
        if p.when and any(params.get(k) != v and str(params.get(k)) != str(v) for k, v in p.when.items()):
            continue
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "float":
            params[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
        else:
            params[key] = trial.suggest_int(key, p.low, p.high, log=p.log, step=p.step or 1)
    return params


def validate_all(directory: Path = SWEEP_DIR) -> dict[str, StudySpec]:
    return {name: load_study(name, directory) for name in study_names(directory)}
