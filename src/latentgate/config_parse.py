"""Config values from text, and the checks every value passes: the `--set` and MLproject overrides, the presets
(YAML files in `presets/`, `extends:` chains), the coercion of a string to a field's type, and the size and range
checks that refuse a value in one line before it reaches a run. The typed schema they serve is `config.py`.
"""

from __future__ import annotations

import ast
import math
import os
import typing
from pathlib import Path
from typing import Any

from latentgate.errors import ConfigError, did_you_mean
from latentgate.safety import load_yaml, refuse_loop

PRESET_DIR = Path(__file__).parent / "presets"
MAX_TEXT_CHARS = 4096  # any string value (a field's max_len may be lower); below MLflow's 6000-character param limit
MAX_LIST_ITEMS = 1024  # any list value: plain items only (no nesting)
# a list given as text (a logged param, --set): as long as the longest valid list, so every list a preset may hold
# rebuilds from its logged param (resume, the gate); still bounded before it is parsed
MAX_LIST_TEXT = MAX_LIST_ITEMS * (MAX_TEXT_CHARS + 4)

# ---- value checks ---------------------------------------------------------------------------------------------

def check_size(key: str, value, meta) -> None:
    """Strings within their max_len (default MAX_TEXT_CHARS), lists of at most MAX_LIST_ITEMS plain items: a huge
    or deeply nested value is refused here in one line, before it reaches a tokenizer, a run param or a loop."""
    if isinstance(value, str):
        most = meta.get("max_len", MAX_TEXT_CHARS)
        if len(value) > most:
            raise ConfigError(f"{key} has {len(value)} characters, more than its limit of {most}",
                              f"shorten {key} to at most {most} characters")
    elif isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS:
            raise ConfigError(f"{key} has {len(value)} items, more than the limit of {MAX_LIST_ITEMS}",
                              f"list at most {MAX_LIST_ITEMS} items in {key}")
        for item in value:
            if isinstance(item, (list, dict, tuple, set)):
                raise ConfigError(f"{key} holds a nested {type(item).__name__}; its items must be plain values",
                                  f"write {key} as a flat list of strings or numbers")
            check_size(key, item, {})


def bracket_depth(text: str) -> int:
    """The deepest nesting of brackets in `text`, outside quoted strings (checked before `ast.literal_eval`, which
    raises RecursionError on a value nested thousands deep)."""
    depth = most = 0
    quote = ""
    escaped = False
    for ch in text:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
            most = max(most, depth)
        elif ch in "])}":
            depth -= 1
    return most


def check_range(key: str, value, meta) -> None:
    check_size(key, value, meta)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not a finite number", f"set {key} to a finite value")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}={value!r} is not one of {list(meta['choices'])}", f"set {key} to one of them")
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if bound in meta and not ok(value, meta[bound]):
            raise ConfigError(f"{key}={value!r} is out of range (must be {word} {meta[bound]})",
                              f"set {key} {word} {meta[bound]}")


# ---- text into values: overrides and presets ------------------------------------------------------------------

def coerce(key: str, typ, raw):
    """Turn a CLI/YAML value into the field's type, or raise a ConfigError naming the key."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.lower() in ("true", "1", "yes", "on")
    elif typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
    elif typ is list:
        if isinstance(raw, list):
            return raw
        if isinstance(raw, str):
            text = raw.strip()
            if bracket_depth(text) > 1:
                raise ConfigError(f"{key} holds a nested list; its items must be plain values",
                                  f"write {key} as a flat list, e.g. [a, b] or a,b")
            if text.startswith("["):
                try:  # JSON, or the Python repr that logged params hold
                    return list(ast.literal_eval(text))
                except (ValueError, SyntaxError):
                    pass
            else:
                items = [x.strip() for x in text.split(",") if x.strip()]
                return [int(x) if x.lstrip("-").isdigit() else x for x in items]
    name = getattr(typ, "__name__", typ)
    raise ConfigError(f"{key} expects {name}, got {raw!r}", f"pass a valid {name} for {key}")


def parse_set_args(items: typing.Iterable[str], *, keep_empty: bool = True, split: bool = True) -> dict[str, str]:
    """`key=value` strings -> dict (a later pair wins).

    split: an item holding several space-separated pairs (the MLproject `overrides` parameter, "a.b=1 c.d=2") is
    split into them; without it every item is one pair whose value may contain spaces (`--set 'k=a b'`).
    keep_empty: an empty value keeps the preset's value (an MLproject parameter left at its empty default);
    without it an empty value is an error, never silently ignored."""
    out = {}
    for item in items:
        parts = item.split() if split and " " in item.strip() and "=" in item else [item.strip()]
        for part in parts:
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(f"override {part!r} is not key=value", "write overrides as section.key=value")
            k, v = part.split("=", 1)
            if v.strip() == "":
                if keep_empty:
                    continue
                raise ConfigError(f"override {part!r} has an empty value",
                                  f"give {k.strip()} a value, or leave it out to keep the preset's value")
            out[k.strip()] = v.strip()
    return out


def cli_overrides(sets: typing.Iterable[str], overrides: str = "", *, from_mlproject: bool | None = None) -> dict:
    """The overrides of one command line: each `--set` is one pair (its value may contain spaces), `--overrides`
    holds space-separated pairs. Empty values are refused, except in a command `mlflow run` built from the
    MLproject (MLFLOW_RUN_ID set), where a parameter left at its empty default keeps the preset's value."""
    keep = bool(os.environ.get("MLFLOW_RUN_ID")) if from_mlproject is None else from_mlproject
    return {**parse_set_args(list(sets), keep_empty=keep, split=False),
            **parse_set_args([overrides] if overrides.strip() else [], keep_empty=keep)}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml_mapping(path: Path) -> dict:
    """A YAML file whose top level is a mapping (presets, sweep studies, calibration sets), read by the one bounded
    loader (`safety.load_yaml`: no aliases or duplicate keys, limited size and nesting), or a one-line ConfigError."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level", "write key: value pairs")
    return data


def preset_overrides(name_or_path: str, _seen: tuple = ()) -> dict[str, Any]:
    """A preset's flattened overrides, following `extends:` chains."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    refuse_loop(path, "preset")
    if not path.exists():
        raise ConfigError(f"unknown preset {name_or_path!r}",
                          did_you_mean(name_or_path, preset_names(), f"choose one of {preset_names()}"))
    if str(path) in _seen:
        raise ConfigError(f"preset {path} extends itself", "break the extends: cycle")
    data = load_yaml_mapping(path)
    parent = data.pop("extends", None)
    flat = preset_overrides(parent, _seen + (str(path),)) if parent else {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping", "write section: {key: value}")
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return flat
