"""Data layer: the synthetic generator and the SQuAD/JSONL readers (real files in tmp_path, no mocks)."""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import replace

import pytest

from latentgate.data.readers import load_examples, validate_examples, write_jsonl
from latentgate.data.records import Example
from latentgate.data.synthetic import SyntheticSpec, entities, generate, make_splits, vocabulary
from latentgate.errors import ConfigError, DataError

SPECS = {
    "default": SyntheticSpec(),
    "one_word": SyntheticSpec(answer_length=1),
    "hard": SyntheticSpec(facts_per_context=8, num_entities=500, values_per_attribute=60),
    "tiny": SyntheticSpec(facts_per_context=1, num_entities=3, values_per_attribute=2),
}
NUMERIC_QUESTIONS = ("how old is ", "how tall is ")


# ---------------------------------------------------------------------------------------------------------------
# Synthetic generator


def test_generate_is_deterministic_and_leaves_global_rng_alone():
    spec = SyntheticSpec()
    random.seed(1234)
    state = random.getstate()
    a = generate(200, 7, spec)
    assert random.getstate() == state  # only random.Random(seed) is used
    assert a == generate(200, 7, spec)
    assert a[:50] == generate(50, 7, spec)  # a shorter run is a prefix of a longer one
    b = generate(200, 8, spec)
    assert sum(x.context == y.context for x, y in zip(a, b, strict=True)) < 5
    assert [ex.id for ex in a[:3]] == ["syn-7-0", "syn-7-1", "syn-7-2"]
    assert generate(2, 7, spec, id_prefix="toy")[1].id == "toy-7-1"
    assert generate(0, 7, spec) == []


@pytest.mark.parametrize("name", sorted(SPECS))
def test_answers_are_exact_spans_of_well_formed_text(name):
    spec = SPECS[name]
    examples = generate(300, 3, spec)
    repeated_value_seen = False
    for ex in examples:
        assert isinstance(ex, Example)
        for text in (ex.context, ex.question):
            assert text == " ".join(text.split()) and text == text.lower()  # single spaces, lower case
        assert ex.question.endswith(" ?") and ex.context.endswith(" .")
        assert ex.context.count(" . ") + 1 == spec.facts_per_context
        assert len(ex.answers) == len(ex.answer_starts) >= 1
        for answer, start in zip(ex.answers, ex.answer_starts, strict=True):
            assert answer and ex.context[start : start + len(answer)] == answer
            # a span covers whole words only
            assert start == 0 or ex.context[start - 1] == " "
            assert ex.context[start + len(answer)] == " "
        repeated_value_seen |= ex.context.find(ex.answer) != ex.answer_starts[0]
        assert len(ex.answer.split()) <= spec.answer_length
    if name in ("default", "hard"):  # the same value said of two entities: the offset, not find(), is the truth
        assert repeated_value_seen
    assert validate_examples(examples, name) == examples


def test_number_unit_answers_carry_the_bare_number_as_extra_reference():
    examples = generate(400, 5, SyntheticSpec(answer_length=2))
    numeric = [ex for ex in examples if ex.question.startswith(NUMERIC_QUESTIONS)]
    assert len(numeric) > 40
    for ex in numeric:
        number, unit = ex.answers[0].split()
        assert number.isdigit() and unit in ("years", "centimeters")
        assert ex.answers == (ex.answers[0], number)
        assert ex.context[ex.answer_starts[1] : ex.answer_starts[1] + len(number)] == number
    others = [ex for ex in examples if not ex.question.startswith(NUMERIC_QUESTIONS)]
    assert others and all(len(ex.answers) == 1 for ex in others)
    # with one-word answers the unit moves into the template and only the number is the answer
    for ex in generate(200, 5, SyntheticSpec(answer_length=1)):
        if ex.question.startswith("how old is "):
            assert ex.answers[0].isdigit() and f"{ex.answers[0]} years old ." in ex.context


@pytest.mark.parametrize("name", sorted(SPECS))
def test_vocabulary_covers_every_generated_word(name):
    spec = SPECS[name]
    vocab = vocabulary(spec)
    assert vocab == sorted(set(vocab)) and vocab == vocabulary(spec)
    assert {".", "?"} <= set(vocab)
    used = set()
    for ex in generate(500, 11, spec) + generate(500, 12, spec):
        used.update(ex.context.split())
        used.update(ex.question.split())
    assert used <= set(vocab)


def test_entities_are_distinct_invented_names_that_collide_with_nothing():
    spec = SyntheticSpec(num_entities=300)
    names = entities(spec)
    assert len(names) == len(set(names)) == 300
    assert all(n.isalpha() and n.islower() for n in names)
    assert entities(SyntheticSpec(num_entities=10)) == names[:10]  # seed-free, a prefix of a larger spec
    non_entity = set(vocabulary(spec)) - set(names)
    assert len(vocabulary(spec)) == len(non_entity) + 300  # no entity equals a template or value word
    # growing only the entity list adds exactly the new names to the vocabulary
    bigger = replace(spec, num_entities=350)
    assert set(vocabulary(bigger)) - set(vocabulary(spec)) == set(entities(bigger)[300:])


def test_contexts_reuse_entities_and_attributes_so_both_must_be_matched():
    spec = SyntheticSpec()
    names = set(entities(spec))
    reused_entity = shared_attribute = 0
    for ex in generate(300, 2, spec):
        mentioned = [w for w in ex.context.split() if w in names]
        assert len(mentioned) == spec.facts_per_context
        assert [w for w in ex.question.split() if w in names][0] in mentioned
        reused_entity += len(set(mentioned)) < len(mentioned)
        shared_attribute += ex.context.count(" lives in ") >= 2
        sentences = ex.context[:-2].split(" . ")
        assert len(set(sentences)) == len(sentences)
    assert reused_entity > 100 and shared_attribute > 0


def test_knobs_change_the_output():
    base = SyntheticSpec(facts_per_context=2)
    many = replace(base, facts_per_context=6)
    assert all(ex.context.count(" .") == 2 for ex in generate(50, 1, base))
    assert all(ex.context.count(" .") == 6 for ex in generate(50, 1, many))

    one = generate(300, 1, SyntheticSpec(answer_length=1))
    assert all(len(a.split()) == 1 for ex in one for a in ex.answers)
    two = generate(300, 1, SyntheticSpec(answer_length=2))
    assert sum(len(ex.answer.split()) == 2 for ex in two) > 60

    few = generate(400, 1, SyntheticSpec(values_per_attribute=3))
    cities = {ex.answer for ex in few if ex.question.startswith("where does ")}
    assert 1 < len(cities) <= 3
    small = SyntheticSpec(num_entities=5)
    assert {w for ex in generate(100, 1, small) for w in ex.context.split()} & set(entities(small))
    assert len(vocabulary(small)) < len(vocabulary(SyntheticSpec()))


def test_make_splits_are_deterministic_and_disjoint():
    spec = SyntheticSpec(facts_per_context=1, num_entities=3, values_per_attribute=2)  # only 54 possible contexts
    splits = make_splits(spec, 4, n_train=30, n_eval=12, n_probe=6)
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "eval": 12, "probe": 6}
    assert splits == make_splits(spec, 4, n_train=30, n_eval=12, n_probe=6)
    contexts = {k: {ex.context for ex in v} for k, v in splits.items()}
    assert not contexts["train"] & contexts["eval"]
    assert not (contexts["train"] | contexts["eval"]) & contexts["probe"]
    ids = [ex.id for v in splits.values() for ex in v]
    assert len(ids) == len(set(ids))
    assert splits["train"][0].id.startswith("syn-train-") and splits["probe"][0].id.startswith("syn-probe-")
    # with the same derived seed, train equals a plain generate() run
    assert [ex.context for ex in splits["train"]] == [ex.context for ex in generate(30, 12, spec)]


def test_make_splits_refuses_when_the_task_is_too_small_for_disjoint_splits():
    spec = SyntheticSpec(facts_per_context=1, num_entities=1, values_per_attribute=2)  # 18 possible contexts
    with pytest.raises(ConfigError) as info:
        make_splits(spec, 0, n_train=300, n_eval=1, n_probe=0)
    assert "\n" not in str(info.value) and "num_entities" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"facts_per_context": 0}, "facts_per_context"),
        ({"facts_per_context": 10, "num_entities": 1}, "facts_per_context"),
        ({"num_entities": 0}, "num_entities"),
        ({"values_per_attribute": 1}, "values_per_attribute"),
        ({"values_per_attribute": 101}, "values_per_attribute"),
        ({"answer_length": 3}, "answer_length"),
        ({"answer_length": 1.5}, "answer_length"),
        ({"num_entities": True}, "num_entities"),
    ],
)
def test_spec_rejects_bad_knobs(kwargs, field):
    with pytest.raises(ConfigError) as info:
        SyntheticSpec(**kwargs)
    message = str(info.value)
    assert field in message and "\n" not in message and "fix:" in message


def test_generate_is_fast():
    start = time.perf_counter()
    examples = generate(20_000, 0, SyntheticSpec())
    elapsed = time.perf_counter() - start
    assert len(examples) == 20_000
    assert elapsed < 2.5, f"20k examples took {elapsed:.2f}s"  # ~0.3 s normally; loose for a shared CPU


# ---------------------------------------------------------------------------------------------------------------
# Readers: good files


def test_write_jsonl_round_trips_through_load_examples(tmp_path):
    examples = generate(60, 9, SyntheticSpec(values_per_attribute=2))
    # some primary answers are not the first occurrence of their text: the stored offset must survive
    assert any(ex.context.find(ex.answer) != ex.answer_starts[0] for ex in examples)
    path = tmp_path / "sub" / "train.jsonl"
    write_jsonl(examples, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 60
    assert set(json.loads(lines[0])) == {"id", "context", "question", "answers", "answer_starts"}
    assert load_examples(str(path)) == examples


SQUAD_SAMPLE = {
    "version": "1.1",
    "data": [
        {
            "title": "Zorvak",
            "paragraphs": [
                {
                    "context": "zorvak lives in paris . miltra lives in paris too .",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "where does miltra live ?",
                            "answers": [
                                {"text": "paris", "answer_start": 40},
                                {"text": "paris too", "answer_start": 40},
                            ],
                        },
                        {
                            "id": "q2",
                            "question": "who lives in paris ?",
                            "answers": [{"text": "zorvak", "answer_start": 0}],
                        },
                    ],
                }
            ],
        },
        {
            "title": "Café",
            "paragraphs": [
                {
                    "context": "the café opened in 1999 in lyon .",
                    "qas": [
                        {
                            "id": "q3",
                            "question": "when did the café open ?",
                            "answers": [
                                {"text": "1999", "answer_start": 19},
                                {"text": "in 1999", "answer_start": 16},
                                {"text": "1999", "answer_start": 19},
                            ],
                        }
                    ],
                }
            ],
        },
    ],
}


def test_squad_json_loads_with_all_references(tmp_path):
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(SQUAD_SAMPLE, ensure_ascii=False, indent=2), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to truncate or re-anchor here
        examples = load_examples(str(path))
    assert [ex.id for ex in examples] == ["q1", "q2", "q3"]
    q1, q2, q3 = examples
    assert q1.answers == ("paris", "paris too") and q1.answer_starts == (40, 40)
    assert q1.context == SQUAD_SAMPLE["data"][0]["paragraphs"][0]["context"]
    assert q2.answers == ("zorvak",) and q2.question == "who lives in paris ?"
    assert q3.answers == ("1999", "in 1999", "1999") and q3.answer_starts == (19, 16, 19)
    for ex in examples:
        for a, s in zip(ex.answers, ex.answer_starts, strict=True):
            assert ex.context[s : s + len(a)] == a


def test_jsonl_accepts_every_answers_layout_blank_lines_and_missing_ids(tmp_path):
    ctx = "kelvu plays the harp . kelvu lives in oslo ."
    rows = [
        {"id": "a", "context": ctx, "question": "where does kelvu live ?", "answers": ["oslo"]},
        {
            "id": "b",
            "context": ctx,
            "question": "q ?",
            "answers": {"text": ["harp", "the harp"], "answer_start": [16, 12]},
        },
        {"context": ctx, "question": "q ?", "answers": [{"text": "kelvu", "answer_start": 23}], "title": "t"},
    ]
    text = json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n   \n" + json.dumps(rows[2]) + "\n"
    path = tmp_path / "mixed.jsonl"
    path.write_text(text, encoding="utf-8")
    a, b, c = load_examples(path)
    assert (a.id, a.answers, a.answer_starts) == ("a", ("oslo",), (38,))
    assert (b.answers, b.answer_starts) == (("harp", "the harp"), (16, 12))
    assert c.id == "mixed-5" and c.answers == ("kelvu",) and c.answer_starts == (23,)  # id from file stem + line


def test_wrong_answer_start_is_reanchored_with_one_warning(tmp_path):
    ctx = "a b c b c"
    path = tmp_path / "offsets.jsonl"
    rows = [
        {"id": "x", "context": ctx, "question": "q ?", "answers": {"text": ["b c"], "answer_start": [5]}},
        {"id": "y", "context": ctx, "question": "q ?", "answers": {"text": ["c"], "answer_start": [7]}},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"offsets\.jsonl: 2 answer_start") as record:
        x, y = load_examples(str(path))
    assert len([w for w in record if "answer_start" in str(w.message)]) == 1
    assert x.answer_starts == (6,) and y.answer_starts == (8,)  # nearest occurrence to the given offset


def test_long_contexts_are_cut_when_answers_stay_inside(tmp_path):
    long_ctx = " ".join(f"w{i}" for i in range(40))
    rows = [
        {"id": "1", "context": long_ctx, "question": "q ?", "answers": ["w3"]},
        {"id": "2", "context": long_ctx + " end", "question": "q ?", "answers": ["w9"]},
        {"id": "3", "context": "short one", "question": "q ?", "answers": ["one"]},
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"long\.jsonl: truncated 2 context\(s\) longer than 10 words") as record:
        examples = load_examples(str(path), max_context_words=10)
    assert len([w for w in record if "truncated" in str(w.message)]) == 1
    assert [len(ex.context.split()) for ex in examples] == [10, 10, 2]
    assert examples[0].context == " ".join(f"w{i}" for i in range(10))
    assert examples[1].answer_starts == (examples[1].context.index("w9"),)


def test_validate_examples_split_level_checks():
    ex = Example("a", "x y z", "q ?", ("y",), (2,))
    assert validate_examples(iter([ex]), "mem") == [ex]
    with pytest.raises(DataError, match=r"^mem: no examples \(empty split\)"):
        validate_examples([], "mem")
    with pytest.raises(DataError, match=r"duplicate id 'a' \(examples 0 and 1\)"):
        validate_examples([ex, replace(ex, question="other ?")], "mem")
    with pytest.raises(DataError, match=r"answer_starts\[0\]=1 does not point at answer 'y'"):
        validate_examples([replace(ex, answer_starts=(1,))], "mem")


# ---------------------------------------------------------------------------------------------------------------
# Readers: bad files and sources


def _line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


GOOD = {"id": "g", "context": "ravi lives in rome .", "question": "where does ravi live ?", "answers": ["rome"]}


def _squad(qas, context="ravi lives in rome ."):
    return json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}, indent=1)


NON_UTF8_LINE = b'{"id": "h", "context": "caf\xe9"}\n'  # Latin-1 e-acute inside an otherwise fine file
NON_UTF8_OFFSET = len(_line(GOOD).encode()) + NON_UTF8_LINE.index(b"\xe9")

BAD_FILES = [
    # id, file name, content (str or bytes), load kwargs, substrings the message must contain
    (
        "non_utf8",
        "bad.jsonl",
        _line(GOOD).encode() + NON_UTF8_LINE,
        {},
        [":2:", "UTF-8", f"byte offset {NON_UTF8_OFFSET}"],
    ),
    (
        "invalid_json_line",
        "bad.jsonl",
        _line(GOOD) + _line({**GOOD, "id": "x"}) + '{"id": "y", "context": \n',
        {},
        [":3:", "invalid JSON"],
    ),
    (
        "invalid_json_squad",
        "bad.json",
        '{\n  "data": [\n    {"title": "t",\n     "paragraphs": [}\n',
        {},
        [":4:", "invalid JSON"],
    ),
    ("record_not_object", "bad.jsonl", _line(GOOD) + '["a", "b"]\n', {}, [":2:", "JSON object", "list"]),
    (
        "missing_question",
        "bad.jsonl",
        _line(GOOD) + _line({"id": "2", "context": "c d", "answers": ["c"]}),
        {},
        [":2:", "missing field 'question'"],
    ),
    (
        "non_string_context",
        "bad.jsonl",
        _line({**GOOD, "context": 17}),
        {},
        [":1:", "field 'context' must be a string", "integer"],
    ),
    (
        "null_context",
        "bad.jsonl",
        _line(GOOD) + _line({**GOOD, "id": "2", "context": None}),
        {},
        [":2:", "missing field 'context'"],
    ),
    (
        "missing_answers",
        "bad.jsonl",
        _line({k: v for k, v in GOOD.items() if k != "answers"}),
        {},
        [":1:", "missing field 'answers'"],
    ),
    (
        "empty_answers",
        "bad.jsonl",
        _line(GOOD) + _line(GOOD | {"id": "2"}) + _line({**GOOD, "id": "3", "answers": []}),
        {},
        [":3:", "field 'answers' is empty"],
    ),
    (
        "empty_hf_answers",
        "bad.jsonl",
        _line({**GOOD, "answers": {"text": [], "answer_start": []}}),
        {},
        [":1:", "field 'answers' is empty"],
    ),
    (
        "empty_answer_string",
        "bad.jsonl",
        _line({**GOOD, "answers": ["rome", " "]}),
        {},
        [":1:", "empty answer", "answers[1]"],
    ),
    (
        "answer_longer_than_context",
        "bad.jsonl",
        _line({**GOOD, "context": "rome", "answers": ["rome city"]}),
        {},
        [":1:", "'answers'", "longer than the context"],
    ),
    (
        "answer_not_in_context",
        "bad.jsonl",
        _line(GOOD) + _line({**GOOD, "id": "2", "answers": ["paris"]}),
        {},
        [":2:", "'answers'", "'paris' does not occur in the context"],
    ),
    ("answers_not_list", "bad.jsonl", _line({**GOOD, "answers": 3}), {}, [":1:", "field 'answers' must be a list"]),
    (
        "duplicate_ids",
        "bad.jsonl",
        _line(GOOD) + _line({**GOOD, "id": "x"}) + "\n" + _line(GOOD),
        {},
        [":4:", "duplicate id 'g'", "line 1", "line 4"],
    ),
    ("empty_file", "bad.jsonl", "", {}, ["no records", "empty split"]),
    ("blank_lines_only", "bad.jsonl", "\n  \n\n", {}, ["no records", "empty split"]),
    ("squad_no_articles", "bad.json", json.dumps({"data": []}), {}, ["no records", "empty split"]),
    ("squad_not_squad", "bad.json", json.dumps({"rows": [GOOD]}), {}, ["'data'"]),
    (
        "squad_missing_question",
        "bad.json",
        _squad(
            [
                {"id": "q1", "question": "x ?", "answers": [{"text": "rome", "answer_start": 14}]},
                {"id": "q2", "answers": [{"text": "rome", "answer_start": 14}]},
            ]
        ),
        {},
        ["qas[1]", "id 'q2'", "missing field 'question'"],
    ),
    (
        "squad_missing_context",
        "bad.json",
        json.dumps(
            {
                "data": [
                    {
                        "paragraphs": [
                            {"qas": [{"id": "q1", "question": "x ?", "answers": [{"text": "a", "answer_start": 0}]}]}
                        ]
                    }
                ]
            }
        ),
        {},
        ["paragraphs[0]", "missing field 'context'"],
    ),
    (
        "squad_unanswerable",
        "bad.json",
        _squad([{"id": "q9", "question": "x ?", "answers": [], "is_impossible": True}]),
        {},
        ["id 'q9'", "field 'answers' is empty"],
    ),
    (
        "squad_answer_not_in_context",
        "bad.json",
        _squad([{"id": "q5", "question": "x ?", "answers": [{"text": "milan", "answer_start": 14}]}]),
        {},
        ["id 'q5'", "'milan' does not occur"],
    ),
    (
        "squad_duplicate_ids",
        "bad.json",
        _squad([{"id": "q1", "question": "x ?", "answers": [{"text": "rome", "answer_start": 14}]}] * 2),
        {},
        ["duplicate id 'q1'", "qas[0]", "qas[1]"],
    ),
    (
        "context_too_long_for_answer",
        "bad.jsonl",
        _line(GOOD) + _line({**GOOD, "id": "2", "context": "a b c d e f rome"}),
        {"max_context_words": 4},
        [":2:", "max_context_words=4", "'rome'", "context"],
    ),
]


@pytest.mark.parametrize("case, filename, content, kwargs, expected", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_raise_one_line_data_errors(tmp_path, case, filename, content, kwargs, expected):
    path = tmp_path / f"{case}-{filename}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_examples(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert path.name in message and "(fix: " in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(DataError, match=r"data file not found: .*nowhere/train\.jsonl") as info:
        load_examples(str(missing))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="is a directory"):
        load_examples(str(tmp_path))


def test_hub_name_offline_asks_for_a_local_file(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # same as HF_HUB_OFFLINE=1: never touch the network
    with pytest.raises(DataError) as info:
        load_examples("latentgate-no-such-dataset")
    message = str(info.value)
    assert message.startswith("cannot load dataset 'latentgate-no-such-dataset' from the hub: ")
    assert "pass a local SQuAD JSON or JSONL file, or go online" in message and "\n" not in message


def test_bad_max_context_words_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="max_context_words"):
        load_examples(str(tmp_path / "x.jsonl"), max_context_words=0)
