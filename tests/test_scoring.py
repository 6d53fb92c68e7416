"""Scoring: official SQuAD v1.1 EM/F1 (hand-computed table), error modes, report helpers, and the bundled
offline `evaluate` metric, which must agree with `latentgate.eval.scoring` exactly (x100)."""

from __future__ import annotations

import importlib.util
import math
import sys
from fractions import Fraction

import pytest

from latentgate.eval import scoring
from latentgate.eval.scoring import (
    error_mode,
    exact_match,
    f1,
    f1_buckets,
    first_nonzero_index,
    is_repetitive,
    normalize_answer,
    score_each,
    score_many,
    wilson_interval,
)

# (prediction, references, expected EM, expected F1), worked out by hand with v1.1 rules:
# lower -> strip string.punctuation -> \b(a|an|the)\b -> " " -> fold whitespace; F1 on token multisets.
CASES = [
    # case + article
    ("The Eiffel Tower", ["eiffel tower"], 1, Fraction(1)),
    # trailing punctuation
    ("Paris.", ["paris"], 1, Fraction(1)),
    # whitespace: tabs, newlines, runs of spaces
    ("  New   York\tCity \n", ["new york city"], 1, Fraction(1)),
    # partial: "big red dog" (3) vs "red dog" (2): P=2/3, R=1 -> F1=4/5
    ("the big red dog", ["red dog"], 0, Fraction(4, 5)),
    # best reference is not the first (EM found on the 2nd)
    ("Denver Broncos", ["Broncos", "the Denver Broncos", "Carolina"], 1, Fraction(1)),
    # best F1 on the 2nd reference: "red dog" vs "big red dog": P=1, R=2/3 -> 4/5 (1st ref gives 0)
    ("red dog", ["cat", "big red dog"], 0, Fraction(4, 5)),
    # best F1 on the 2nd ref; the 1st gives 1/2: "red dog barked" vs "red dog barked loudly": P=1, R=3/4 -> 6/7
    ("the red dog barked", ["dog", "red dog barked loudly"], 0, Fraction(6, 7)),
    # multiset: 3x paris vs 1x paris -> common 1, P=1/3, R=1 -> 1/2
    ("paris paris paris", ["paris"], 0, Fraction(1, 2)),
    # multiset: "new york new york" vs "new york": common 2, P=2/4, R=1 -> 2/3
    ("new york new york", ["new york"], 0, Fraction(2, 3)),
    # bag of words: same multiset, different order -> EM 0, F1 1
    ("run run fast", ["run fast run"], 0, Fraction(1)),
    # numbers: the comma is punctuation -> "1000"
    ("1,000", ["1000"], 1, Fraction(1)),
    # v1.1 quirk: the decimal point is punctuation too -> "35 million"
    ("3.5 million", ["35 million"], 1, Fraction(1)),
    # empty prediction
    ("", ["Paris"], 0, Fraction(0)),
    # prediction that normalises to empty (article + punctuation)
    ("The.", ["Paris"], 0, Fraction(0)),
    # v1.1 quirk: both normalise to "" -> EM 1 but F1 0 (no common token)
    ("", ["The"], 1, Fraction(0)),
    # articles are whole words only: "another" keeps its "an"; common "answer": P=R=1/2 -> 1/2
    ("Another answer", ["other answer"], 0, Fraction(1, 2)),
    # several articles removed, word order kept
    ("an apple a day", ["apple day"], 1, Fraction(1)),
    # hyphen removed without a space: "wellknown" == "wellknown" ...
    ("well-known", ["wellknown"], 1, Fraction(1)),
    # ... but != "well known" (1 token vs 2, nothing in common)
    ("well-known", ["well known"], 0, Fraction(0)),
    # punctuation goes before articles, so "the-cat" -> "thecat" (no article left to strip)
    ("the-cat", ["cat"], 0, Fraction(0)),
    # only ASCII punctuation: curly quotes survive -> "“paris”" != "paris"
    ("\u201cParis\u201d", ["Paris"], 0, Fraction(0)),
    # upper case, two references
    ("BARACK OBAMA", ["Barack Obama", "Obama"], 1, Fraction(1)),
    # wrong entity against several references
    ("London", ["Paris", "Lyon"], 0, Fraction(0)),
    # Roman numerals: "henry iii" vs "henry viii": P=R=1/2 -> 1/2
    ("Henry III", ["Henry VIII"], 0, Fraction(1, 2)),
]
CASE_IDS = [f"{i:02d}:{p!r}" for i, (p, *_rest) in enumerate(CASES)]


@pytest.mark.parametrize(("pred", "refs", "em", "f1_expected"), CASES, ids=CASE_IDS)
def test_table_em_f1(pred, refs, em, f1_expected):
    assert exact_match(pred, refs) == float(em)
    assert f1(pred, refs) == pytest.approx(float(f1_expected), abs=1e-12)


def test_table_is_big_enough_and_varied():
    assert len(CASES) >= 15
    assert {c[2] for c in CASES} == {0, 1}
    assert len({c[3] for c in CASES}) >= 5


def test_normalize_answer_official_order():
    assert normalize_answer("  The  QUICK, brown fox!\n") == "quick brown fox"
    assert normalize_answer("A an THE") == ""
    assert normalize_answer("theatre an-t") == "theatre ant"


def test_max_over_all_references_not_just_first():
    # The original bug scored only references[0].
    assert exact_match("Lyon", ["Paris", "Lyon"]) == 1.0
    assert f1("Lyon", ["Paris", "Lyon"]) == 1.0
    assert f1("Lyon city", ["Paris", "Lyon"]) == pytest.approx(2 / 3)


def test_bare_string_reference_is_one_reference_and_empty_refs_rejected():
    assert exact_match("a", "a") == 1.0  # both normalise to "" -> equal
    assert exact_match("p", "paris") == 0.0  # not iterated char by char
    assert f1("p", "paris") == 0.0
    with pytest.raises(ValueError):
        f1("paris", [])
    with pytest.raises(ValueError):
        exact_match("paris", [])


def test_score_many_fractions_and_each():
    preds = [c[0] for c in CASES]
    refs = [c[1] for c in CASES]
    got = score_many(preds, refs)
    assert got["n"] == len(CASES)
    assert got["em"] == pytest.approx(sum(c[2] for c in CASES) / len(CASES), abs=1e-12)
    assert got["f1"] == pytest.approx(float(sum(c[3] for c in CASES) / len(CASES)), abs=1e-12)
    assert 0.0 <= got["em"] <= 1.0 and 0.0 <= got["f1"] <= 1.0
    each = score_each(preds, refs)
    assert [e["em"] for e in each] == [float(c[2]) for c in CASES]
    with pytest.raises(ValueError):
        score_many(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        score_many([], [])


# --- error modes ----------------------------------------------------------------------------------------

ERROR_CASES = [
    ("thethethe", ["Paris"], "repetition"),
    ("kindkindkind", ["kind"], "repetition"),
    ("kind kind kind", ["Paris"], "repetition"),
    ("the the the", ["Paris"], "repetition"),  # normalises to "" but is repetition, not "empty"
    ("paris paris paris", ["paris"], "repetition"),  # F1 1/2, still degenerate
    ("new york new york new york", ["Boston"], "repetition"),  # 2-gram loop
    ("the cat the dog the", ["mouse"], "repetition"),  # "the" is 3/5 of the tokens
    ("", ["Paris"], "empty"),
    ("The.", ["Paris"], "empty"),
    ("London", ["Paris", "Lyon"], "wrong_entity"),
    ("one by one", ["gradually"], "wrong_entity"),  # idiom, not degenerate
    ("the big red dog", ["red dog"], "partial"),
    ("Henry III", ["Henry VIII"], "partial"),  # "iii" is not a repeated unit
    ("The Eiffel Tower", ["eiffel tower"], "correct"),
    ("Lyon", ["Paris", "Lyon"], "correct"),
    ("Paris Paris Paris", ["paris paris paris"], "correct"),  # correct beats repetition
]


@pytest.mark.parametrize(("pred", "refs", "mode"), ERROR_CASES, ids=[repr(c[0]) for c in ERROR_CASES])
def test_error_mode(pred, refs, mode):
    assert error_mode(pred, refs) == mode
    assert mode in scoring.ERROR_MODES


def test_error_modes_cover_every_label():
    assert {c[2] for c in ERROR_CASES} == set(scoring.ERROR_MODES)


@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        ("thethethe", True),
        ("kindkindkind", True),
        ("Kind, kind, KIND!", True),
        ("a b c d e e e", True),
        ("x y x z x", True),  # 3/5 = 60%
        ("x y x z x w", False),  # 3/6 = 50%
        ("one by one", False),  # 2/3 but only 2 occurrences
        ("kind kind", False),
        ("bonbon", False),  # unit repeated only twice
        ("iii", False),  # one-char unit (Roman numeral)
        ("111222", False),
        ("121212", False),  # no letter in the unit
        ("Mississippi", False),
        ("Tower of London", False),
        ("", False),
    ],
)
def test_is_repetitive(pred, expected):
    assert is_repetitive(pred) is expected


# --- report helpers ---------------------------------------------------------------------------------------


def test_f1_buckets_boundaries():
    got = f1_buckets([0.0, 0.05, 0.1, 0.1000001, 0.5, 0.5000001, 0.99, 1.0, 1.0, 0])
    assert got == {"0": 2, "(0,0.1]": 2, "(0.1,0.5]": 2, "(0.5,1)": 2, "1": 2}
    assert list(got) == ["0", "(0,0.1]", "(0.1,0.5]", "(0.5,1)", "1"]


def test_f1_buckets_empty_and_invalid():
    assert f1_buckets([]) == {"0": 0, "(0,0.1]": 0, "(0.1,0.5]": 0, "(0.5,1)": 0, "1": 0}
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            f1_buckets([0.5, bad])


def test_f1_buckets_from_table():
    f1s = [e["f1"] for e in score_each([c[0] for c in CASES], [c[1] for c in CASES])]
    got = f1_buckets(f1s)
    assert sum(got.values()) == len(CASES)
    assert got["1"] == sum(1 for c in CASES if c[3] == 1)
    assert got["0"] == sum(1 for c in CASES if c[3] == 0)
    assert got["(0.5,1)"] == sum(1 for c in CASES if Fraction(1, 2) < c[3] < 1)


def test_first_nonzero_index():
    assert first_nonzero_index([0.0, 0.0, 0.4, 0.0, 1.0]) == 2
    assert first_nonzero_index([1.0]) == 0
    assert first_nonzero_index([0.0, 0.0]) is None
    assert first_nonzero_index([]) is None
    assert first_nonzero_index(iter([0, 0, 0, 0.01])) == 3


def _wilson_by_quadratic(k, n, z):
    # Independent derivation: bounds solve (p_hat - p)^2 = z^2 p (1 - p) / n for p.
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


def test_wilson_interval_known_values():
    low, high = wilson_interval(2, 24)
    assert (round(low, 4), round(high, 4)) == (0.0232, 0.2585)
    assert (low, high) == pytest.approx(_wilson_by_quadratic(2, 24, 1.96), abs=1e-12)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = wilson_interval(12, 24)
    assert low + high == pytest.approx(1.0)  # symmetric around 1/2
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # a larger z widens the interval
    l99, h99 = wilson_interval(2, 24, z=2.576)
    assert l99 < 0.0232 and h99 > 0.2585
    for bad in ((3, 2), (-1, 5), (0, -1)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


# --- the offline evaluate metric ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squad_metric():
    pytest.importorskip("evaluate")
    from latentgate.eval.squad_metric import load_squad_metric

    metric = load_squad_metric()
    assert metric is not None  # NB: bool(metric) is False while empty (len == 0)
    assert len(metric) == 0 and not bool(metric)
    return metric


def _metric_inputs(cases, prefix="q"):
    preds = [{"id": f"{prefix}{i}", "prediction_text": p} for i, (p, *_r) in enumerate(cases)]
    refs = [
        {"id": f"{prefix}{i}", "answers": {"text": list(r), "answer_start": [0] * len(r)}}
        for i, (_p, r, *_x) in enumerate(cases)
    ]
    return preds, refs


def test_metric_loaded_by_path_delegates_to_scoring(squad_metric):
    module = sys.modules[type(squad_metric).__module__]
    assert module.IMPLEMENTATION == "latentgate.eval.scoring"
    assert module.f1 is scoring.f1 and module.exact_match is scoring.exact_match


def test_metric_aggregate_is_100x_scoring(squad_metric):
    preds, refs = _metric_inputs(CASES)
    got = squad_metric.compute(predictions=preds, references=refs)
    ours = score_many([c[0] for c in CASES], [c[1] for c in CASES])
    assert set(got) == {"exact_match", "f1"}
    assert got["exact_match"] == pytest.approx(100 * ours["em"], rel=1e-12)
    assert got["f1"] == pytest.approx(100 * ours["f1"], rel=1e-12)
    assert got["f1"] == pytest.approx(100 * float(sum(c[3] for c in CASES) / len(CASES)), rel=1e-12)


def test_metric_per_case_matches_table(squad_metric):
    for i, (pred, refs, em, f1_expected) in enumerate(CASES):
        p, r = _metric_inputs([(pred, refs)], prefix=f"c{i}-")
        got = squad_metric.compute(predictions=p, references=r)
        assert got["exact_match"] == pytest.approx(100.0 * em, abs=1e-9), CASE_IDS[i]
        assert got["f1"] == pytest.approx(100.0 * float(f1_expected), abs=1e-9), CASE_IDS[i]


def test_metric_add_batch_then_compute(squad_metric):
    preds, refs = _metric_inputs(CASES)
    whole = squad_metric.compute(predictions=preds, references=refs)
    half = len(CASES) // 2
    squad_metric.add_batch(predictions=preds[:half], references=refs[:half])
    squad_metric.add_batch(predictions=preds[half:], references=refs[half:])
    assert len(squad_metric) == len(CASES)
    assert squad_metric.compute() == pytest.approx(whole, rel=1e-12)
    # compute() consumed the batches: the next computation starts from scratch
    p, r = _metric_inputs([("London", ["Paris"])], prefix="z")
    assert squad_metric.compute(predictions=p, references=r) == {"exact_match": 0.0, "f1": 0.0}


def test_metric_unanswered_reference_scores_zero_and_empty_answer_start_ok(squad_metric):
    # evaluate needs equal counts; an id mismatch leaves reference "b" unanswered (official: scores 0)
    preds = [{"id": "a", "prediction_text": "Paris"}, {"id": "x", "prediction_text": "lyon"}]
    refs = [
        {"id": "a", "answers": {"text": ["paris"], "answer_start": []}},
        {"id": "b", "answers": {"text": ["lyon"], "answer_start": []}},
    ]
    assert squad_metric.compute(predictions=preds, references=refs) == {"exact_match": 50.0, "f1": 50.0}


def _load_bundled_module(monkeypatch):
    """Import squad_v1.py standalone with latentgate.eval.scoring made unimportable (as in evaluate's cache)."""
    from latentgate.eval.squad_metric import SQUAD_V1_DIR

    monkeypatch.setitem(sys.modules, "latentgate.eval.scoring", None)  # -> ImportError on import
    spec = importlib.util.spec_from_file_location("_squad_v1_bundled", SQUAD_V1_DIR / "squad_v1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_copy_agrees_with_scoring(monkeypatch):
    pytest.importorskip("evaluate")
    module = _load_bundled_module(monkeypatch)
    assert module.IMPLEMENTATION == "bundled"
    assert module.f1 is module._bundled_f1
    extra = [("kindkindkind", ["kind"]), ("  ", ["a"]), ("The the", ["the"]), ("x, y; z", ["z y x"])]
    for pred, refs, *_ in CASES + extra:
        assert module._bundled_normalize_answer(pred) == normalize_answer(pred)
        assert module.exact_match(pred, refs) == exact_match(pred, refs)
        assert module.f1(pred, refs) == f1(pred, refs)
    refs = [(f"q{i}", c[1]) for i, c in enumerate(CASES)]
    preds = {f"q{i}": c[0] for i, c in enumerate(CASES)}
    ours = score_many([c[0] for c in CASES], [c[1] for c in CASES])
    got = module.compute_score(preds, refs)
    assert got["exact_match"] == pytest.approx(100 * ours["em"], rel=1e-12)
    assert got["f1"] == pytest.approx(100 * ours["f1"], rel=1e-12)
