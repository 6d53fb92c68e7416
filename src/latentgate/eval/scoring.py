"""Answer scoring: the single source of truth for EM / F1 and for the error-mode labels in eval reports.

Pure Python on purpose (no evaluate, no torch): importing this module is instant.

Semantics are exactly those of the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``):

* ``normalize_answer``: lower-case -> drop every character of ``string.punctuation`` (ASCII only, so
  "1,000" -> "1000", "well-known" -> "wellknown", but curly quotes survive) -> replace the whole words
  a / an / the by a space -> fold whitespace.
* EM: normalised strings are equal. F1: token F1 over *multisets* (``Counter`` intersection), so
  "paris paris paris" vs "paris" has precision 1/3, and word order does not matter.
* Both are the **max over all references** (the old system's bug was to score only the first one).
* v1.1 quirk, kept on purpose: F1 is 0 whenever the prediction and the reference share no token, and that
  includes the case where both normalise to the empty string (e.g. prediction "" vs reference "The"),
  even though EM is 1 there. (SQuAD v2.0's script returns F1 = 1 for that case; v1.1 does not.)

Our own API reports fractions in [0, 1] (``score_many`` -> ``{"em", "f1", "n"}``); the bundled
``evaluate`` metric (``latentgate/eval/squad_v1``) reports the official percentages (0-100).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

from latentgate.schema import EvalKey

__all__ = [
    "ERROR_MODES",
    "F1_BUCKETS",
    "error_mode",
    "exact_match",
    "f1",
    "f1_buckets",
    "first_nonzero_index",
    "is_repetitive",
    "normalize_answer",
    "score_each",
    "score_many",
    "wilson_interval",
]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

ERROR_MODES = ("correct", "empty", "repetition", "partial", "wrong_entity")
F1_BUCKETS = ("0", "(0,0.1]", "(0.1,0.5]", "(0.5,1)", "1")


# ---------------------------------------------------------------------------------------------------------
# Official SQuAD v1.1 semantics (keep in sync with squad_v1/squad_v1.py; tests/test_scoring.py checks it)
# ---------------------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (SQuAD v1.1, same order)."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact_match_one(prediction: str, ground_truth: str) -> float:
    return 1.0 if normalize_answer(prediction) == normalize_answer(ground_truth) else 0.0


def _f1_one(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:  # also covers empty-vs-empty: 0, exactly like v1.1
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _as_references(references: str | Iterable[str]) -> list[str]:
    # A bare string would otherwise be iterated character by character and "match" single letters.
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is needed to score a prediction")
    return refs


def exact_match(prediction: str, references: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals the normalised form of ANY reference, else 0.0."""
    return max(_exact_match_one(prediction, ref) for ref in _as_references(references))


def f1(prediction: str, references: str | Iterable[str]) -> float:
    """Best token F1 (multiset overlap) of the prediction against ANY reference, in [0, 1]."""
    return max(_f1_one(prediction, ref) for ref in _as_references(references))


def score_each(predictions: Sequence[str], references: Sequence[str | Iterable[str]]) -> list[dict[str, float]]:
    """Per-example ``{EvalKey.EM, EvalKey.F1}`` (fractions), aligned with ``predictions``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    return [{EvalKey.EM: exact_match(p, r), EvalKey.F1: f1(p, r)} for p, r in zip(predictions, references)]


def score_many(predictions: Sequence[str], references: Sequence[str | Iterable[str]]) -> dict[str, float]:
    """Mean EM and F1 as fractions in [0, 1]: ``{EvalKey.EM: ..., EvalKey.F1: ..., "n": ...}``.

    Multiply by 100 to get the numbers the official script / the ``squad_v1`` evaluate metric report.
    """
    each = score_each(predictions, references)
    if not each:
        raise ValueError("no predictions to score")
    n = len(each)
    return {key: sum(e[key] for e in each) / n for key in (EvalKey.EM, EvalKey.F1)} | {"n": n}


# ---------------------------------------------------------------------------------------------------------
# Error modes for eval reports
# ---------------------------------------------------------------------------------------------------------

# A single word that is a short unit (>= 2 chars, containing a letter) repeated >= 3 times:
# "thethethe", "kindkindkind", "newyorknewyorknewyork". Units of one char are excluded so Roman numerals
# ("iii" in "Henry III") and numbers ("111") are not flagged.
_REPEATED_UNIT_WORD = re.compile(r"^(.{2,}?)\1{2,}$")
_MAX_LOOP_NGRAM = 4
_DOMINANT_SHARE = 0.6
_DOMINANT_MIN_COUNT = 3


def _raw_tokens(prediction: str) -> list[str]:
    """Lower-cased, punctuation-free tokens WITHOUT article removal (so "the the the" stays visible)."""
    return "".join(ch for ch in prediction.lower() if ch not in _PUNCT).split()


def _has_ngram_loop(tokens: list[str]) -> bool:
    """True if some n-gram (n <= 4) occurs >= 3 times back to back ("kind kind kind", "new york" x3)."""
    for n in range(1, _MAX_LOOP_NGRAM + 1):
        for start in range(0, len(tokens) - 3 * n + 1):
            unit = tokens[start : start + n]
            if tokens[start + n : start + 2 * n] == unit and tokens[start + 2 * n : start + 3 * n] == unit:
                return True
    return False


def is_repetitive(prediction: str) -> bool:
    """Degenerate repetition, the typical failure of a collapsed generator. True when any of:

    * a token (or an n-gram of up to 4 tokens) is repeated >= 3 times in a row: "the the the", "kind kind kind";
    * a single word is a short unit (>= 2 chars, with a letter) repeated >= 3 times: "thethethe";
    * one token makes up >= 60% of the tokens and occurs >= 3 times: "the cat the dog the".
      (The ">= 3 times" guard keeps idioms such as "one by one" / "side by side" out.)

    Tokens are lower-cased with ASCII punctuation removed but articles kept.
    """
    tokens = _raw_tokens(prediction)
    if not tokens:
        return False
    if _has_ngram_loop(tokens):
        return True
    for tok in tokens:
        m = _REPEATED_UNIT_WORD.match(tok)
        if m and any(ch.isalpha() for ch in m.group(1)):
            return True
    _, top = Counter(tokens).most_common(1)[0]
    return top >= _DOMINANT_MIN_COUNT and top / len(tokens) >= _DOMINANT_SHARE


def error_mode(prediction: str, references: str | Iterable[str]) -> str:
    """One of ``ERROR_MODES``, decided in this order:

    1. "correct": EM == 1 against some reference;
    2. "repetition": ``is_repetitive(prediction)`` (checked before "empty" so "the the the", which
       normalises to "", and before "partial" so "paris paris paris" vs "paris" count as degenerate);
    3. "empty": the normalised prediction is empty ("", "The.", "  ");
    4. "partial": 0 < F1 < 1;
    5. "wrong_entity": F1 == 0, non-empty, not repetitive.
    """
    refs = _as_references(references)
    if exact_match(prediction, refs) == 1.0:
        return "correct"
    if is_repetitive(prediction):
        return "repetition"
    if not normalize_answer(prediction):
        return "empty"
    if f1(prediction, refs) > 0.0:
        return "partial"
    return "wrong_entity"


# ---------------------------------------------------------------------------------------------------------
# Report helpers
# ---------------------------------------------------------------------------------------------------------


def f1_buckets(f1s: Iterable[float]) -> dict[str, int]:
    """Histogram of per-example F1: keys "0", "(0,0.1]", "(0.1,0.5]", "(0.5,1)", "1" (all always present)."""
    counts = dict.fromkeys(F1_BUCKETS, 0)
    for value in f1s:
        v = float(value)
        if not 0.0 <= v <= 1.0:  # also rejects NaN
            raise ValueError(f"F1 values must lie in [0, 1], got {value!r}")
        if v == 0.0:
            counts["0"] += 1
        elif v <= 0.1:
            counts["(0,0.1]"] += 1
        elif v <= 0.5:
            counts["(0.1,0.5]"] += 1
        elif v < 1.0:
            counts["(0.5,1)"] += 1
        else:
            counts["1"] += 1
    return counts


def first_nonzero_index(f1s: Iterable[float]) -> int | None:
    """Index of the first example with F1 > 0, or None if every F1 is 0 (or there are none)."""
    for i, value in enumerate(f1s):
        if value > 0:
            return i
    return None


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (e.g. probe accuracy). n == 0 -> (0.0, 1.0)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))
