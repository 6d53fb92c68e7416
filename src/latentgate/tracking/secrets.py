"""Secrets (passwords in storage URLs, tokens) never reach params, tags or error messages.

`mask_secrets(text)` is applied to every logged param and tag (tracking/tracker.py), every error tag
(tracking/runs.py) and every error line the CLI prints (cli_common.guarded). It masks

* the password of any `scheme://user:password@host` URL (PostgreSQL/MySQL storages, HTTP basic auth);
* `token=`, `password=`, `secret=`, `api_key=` query or key=value pairs;
* the literal values of secrets known from the environment (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_PASSWORD,
  and the passwords inside MLFLOW_TRACKING_URI / OPTUNA_STORAGE / LATENTGATE_STORAGE URLs) wherever they appear
  bare, e.g. echoed by a driver, plus any value registered with `register_secret`.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_TOKEN = re.compile(r"(?i)\b(token|password|passwd|pwd|secret|api[_-]?key|access[_-]?key)=([^&\s]+)")
_SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN", "PGPASSWORD")
_URL_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "OPTUNA_STORAGE", "LATENTGATE_STORAGE")
_MIN_LEN = 4  # shorter "secrets" would mask ordinary words
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this literal value (and the password of it, if it is a URL) in everything logged or printed."""
    if not value:
        return
    _registered.add(value)
    for m in _URL_PASSWORD.finditer(value):
        _registered.update({m["pw"], unquote(m["pw"])})


def _known_secrets() -> set[str]:
    found = set(_registered)
    for key in _SECRET_ENV:
        if os.environ.get(key):
            found.add(os.environ[key])
    for key in _URL_ENV:
        for m in _URL_PASSWORD.finditer(os.environ.get(key, "")):
            found.update({m["pw"], unquote(m["pw"])})
    return {s for s in found if len(s) >= _MIN_LEN}


def mask_secrets(text: str) -> str:
    """`postgresql://bob:hunter2@db/x` -> `postgresql://bob:***@db/x`; `?token=abc` -> `?token=***`."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    text = _TOKEN.sub(lambda m: f"{m.group(1)}=***", text)
    for secret in sorted(_known_secrets(), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
