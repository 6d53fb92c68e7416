"""Secrets (passwords in storage URLs, tokens) never reach params, tags or error messages."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_TOKEN = re.compile(r"(?i)\b(token|password|passwd|secret|api[_-]?key)=([^&\s]+)")


def mask_secrets(text: str) -> str:
    """`postgresql://bob:hunter2@db/x` -> `postgresql://bob:***@db/x`; `?token=abc` -> `?token=***`."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _TOKEN.sub(lambda m: f"{m.group(1)}=***", text)
