"""Offline loader for the bundled SQuAD v1.1 `evaluate` metric (no Hub access needed).

`evaluate` is imported lazily (it costs seconds), so importing this module is free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SQUAD_V1_DIR = Path(__file__).resolve().parent / "squad_v1"


def load_squad_metric(**kwargs: Any):
    """Return ``evaluate.load(<abs path of latentgate/eval/squad_v1>)``.

    ``keep_in_memory`` defaults to True (eval sets are small; no Arrow cache files or file locks);
    any other ``evaluate.load`` keyword is passed through. The returned module is falsy until something
    is added (``len(metric) == 0``), so check ``metric is None``, never ``not metric``.
    """
    import evaluate  # lazy: ~5 s import

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(SQUAD_V1_DIR), **kwargs)
