"""`runs:/` and `models:/` URIs as types: the one place such a URI is built (`str(RunUri(...))`) or parsed. Pure
string work, no store access (tracking/lineage.py resolves them against the store)."""

from __future__ import annotations

import re
from dataclasses import dataclass

RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # an MLflow run id


@dataclass(frozen=True)
class RunUri:
    run_id: str
    path: str = ""

    def __str__(self) -> str:
        return f"runs:/{self.run_id}/{self.path}" if self.path else f"runs:/{self.run_id}"


@dataclass(frozen=True)
class ModelUri:
    name: str
    alias: str = ""
    version: str = ""

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_uri(uri: str) -> RunUri | ModelUri | None:
    """A `runs:/` or `models:/` URI parsed; None for anything else (a local folder, a store URI)."""
    uri = uri or ""
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        return RunUri(run_id, path)
    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return ModelUri(name, alias=alias.strip("/"))
        name, _, version = ref.rstrip("/").partition("/")
        return ModelUri(name, version=version)
    return None


def run_in_uri(uri: str, strict: bool = False) -> str | None:
    """The run id a `runs:/` URI names, read from the URI alone (no store access); None for any other form, and,
    with `strict`, for an id that is not 32 hex digits."""
    parsed = parse_uri(uri)
    if not isinstance(parsed, RunUri) or not parsed.run_id or (strict and not RUN_ID.match(parsed.run_id)):
        return None
    return parsed.run_id
