"""Checks of one record at a time (fields, answers inside the context, unique ids, the context-length cut): every
problem is a `DataError` whose one line names the file, the line or record, and the field."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from latentgate.data.records import Example
from latentgate.errors import DataError

_WORD = re.compile(r"\S+")
MISSING = object()  # a field that is absent, not null
MAX_RECORD_DEPTH = 16  # nested lists/objects in a record or a SQuAD document (SQuAD v1.1 itself nests 9)


@dataclass(frozen=True)
class Where:
    """Where a record came from: `prefix` starts error messages, `short` names it inside another message."""

    prefix: str
    short: str
    auto_id: str


class Counters:
    def __init__(self) -> None:
        self.reanchored = 0


def validate_examples(examples: Iterable[Example], source: str) -> list[Example]:
    """Split-level checks: the split is not empty, ids are unique, every example has answers whose offsets
    (when given) point at their text. Returns the examples as a list; raises a one-line `DataError`."""
    name = one_line(str(source))
    examples = list(examples)
    if not examples:
        raise DataError(f"{name}: no examples (empty split)", fix="add at least one example or pick another file")
    first_index: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise DataError(f"{name}: item {i} is a {type(ex).__name__}, not an Example", fix="build Example records")
        label = f"{name}: example {i} (id {show(ex.id)})"
        if ex.id in first_index:
            raise DataError(
                f"{name}: duplicate id {show(ex.id)} (examples {first_index[ex.id]} and {i})",
                fix="give every example a unique id",
            )
        first_index[ex.id] = i
        if not ex.answers:
            raise DataError(f"{label}: field 'answers' is empty", fix="give every example at least one answer")
        if ex.answer_starts and len(ex.answer_starts) != len(ex.answers):
            raise DataError(
                f"{label}: {len(ex.answer_starts)} answer_starts for {len(ex.answers)} answers",
                fix="give one answer_start per answer, or none",
            )
        for j, answer in enumerate(ex.answers):
            if not answer.strip():
                raise DataError(f"{label}: field 'answers' has an empty answer (answers[{j}])", fix="remove it")
            if ex.answer_starts:
                s = ex.answer_starts[j]
                if ex.context[s : s + len(answer)] != answer:
                    raise DataError(
                        f"{label}: answer_starts[{j}]={s} does not point at answer {show(answer)}",
                        fix="fix the offset or drop answer_starts",
                    )
            elif answer not in ex.context:
                raise DataError(f"{label}: answer {show(answer)} does not occur in the context", fix="fix the answer")
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Record checks


def check_depth(obj: object, label: str) -> None:
    """Raise `too_deep(label)` if `obj` nests lists/objects more than MAX_RECORD_DEPTH levels (walked without
    recursion, so a value nested 100,000 deep is one DataError line, not a RecursionError)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_RECORD_DEPTH:
                raise too_deep(label)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def too_deep(label: str) -> DataError:
    return DataError(f"{label}: a value nested more than {MAX_RECORD_DEPTH} levels deep",
                     fix="write each record as {context, question, answers} with a flat list of answers")



def normalize_record(obj: object, where: Where, counters: Counters) -> dict:
    """Validate one raw record (or a datasets row) and return {id, context, question, answers, answer_starts}."""
    if not isinstance(obj, dict):
        raise DataError(
            f"{where.prefix}: record must be a JSON object, got {kind_of(obj)}", fix="write one object per record"
        )
    context = _text_field(obj, "context", where)
    question = _text_field(obj, "question", where)
    rid = obj.get("id")
    if rid is None:
        rid = where.auto_id
    elif isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    elif not isinstance(rid, str) or not rid.strip():
        raise DataError(
            f"{where.prefix}: field 'id' must be a non-empty string, got {kind_of(rid)}", fix="use string ids"
        )

    texts, starts = _answer_parts(obj, where)
    fix_answer = "every answer must be a non-empty span copied exactly from the context"
    out_starts = []
    for j, text in enumerate(texts):
        label = f"answers[{j}]"
        if not isinstance(text, str):
            raise DataError(
                f"{where.prefix}: field 'answers': {label} must be a string, got {kind_of(text)}", fix=fix_answer
            )
        if not text.strip():
            raise DataError(f"{where.prefix}: field 'answers' has an empty answer ({label})", fix=fix_answer)
        if len(text) > len(context):
            raise DataError(
                f"{where.prefix}: field 'answers': {label} ({len(text)} characters) is longer than the context "
                f"({len(context)} characters)",
                fix=fix_answer,
            )
        start = starts[j] if starts is not None else None
        if start is not None and (not isinstance(start, int) or isinstance(start, bool) or start < 0):
            raise DataError(
                f"{where.prefix}: field 'answers': answer_start of {label} must be a non-negative integer, "
                f"got {show(start)}",
                fix="give character offsets as integers, or leave them out",
            )
        if start is not None and context[start : start + len(text)] == text:
            out_starts.append(start)
            continue
        found = _nearest(context, text, start)
        if found < 0:
            raise DataError(
                f"{where.prefix}: field 'answers': {label} {show(text)} does not occur in the context", fix=fix_answer
            )
        if start is not None:
            counters.reanchored += 1
        out_starts.append(found)
    return {"id": rid, "context": context, "question": question, "answers": list(texts), "answer_starts": out_starts}


def _text_field(obj: dict, field: str, where: Where) -> str:
    value = obj.get(field, MISSING)
    if value is MISSING or value is None:
        raise DataError(f"{where.prefix}: missing field '{field}'", fix=f"give every record a string '{field}'")
    if not isinstance(value, str):
        raise DataError(
            f"{where.prefix}: field '{field}' must be a string, got {kind_of(value)}", fix=f"make '{field}' a string"
        )
    if not value.strip():
        raise DataError(f"{where.prefix}: field '{field}' is empty", fix=f"give every record a non-empty '{field}'")
    return value


def _answer_parts(obj: dict, where: Where) -> tuple[list, list | None]:
    """(texts, starts or None) from any accepted `answers` layout."""
    fix = 'use "answers": ["text", ...] or [{"text", "answer_start"}, ...] or {"text": [...], "answer_start": [...]}'
    answers = obj.get("answers", MISSING)
    if answers is MISSING or answers is None:
        raise DataError(f"{where.prefix}: missing field 'answers'", fix=fix)
    if isinstance(answers, dict):
        texts = answers.get("text", MISSING)
        starts = answers.get("answer_start")
        if isinstance(texts, str):
            texts, starts = [texts], None if starts is None else [starts]
        if not isinstance(texts, list) or (starts is not None and not isinstance(starts, list)):
            raise DataError(
                f"{where.prefix}: field 'answers' must hold a 'text' list and an 'answer_start' list", fix=fix
            )
        if starts is not None and len(starts) != len(texts):
            raise DataError(
                f"{where.prefix}: field 'answers' has {len(texts)} texts but {len(starts)} answer_start values", fix=fix
            )
    elif isinstance(answers, list):
        if answers and all(isinstance(a, dict) for a in answers):
            texts, starts = [], []
            for j, a in enumerate(answers):
                if "text" not in a:
                    raise DataError(f"{where.prefix}: field 'answers': answers[{j}] has no 'text'", fix=fix)
                texts.append(a["text"])
                starts.append(a.get("answer_start"))
        else:
            texts = answers
            starts = obj.get("answer_starts")
            if starts is not None and not isinstance(starts, list):
                raise DataError(f"{where.prefix}: field 'answer_starts' must be a list, got {kind_of(starts)}", fix=fix)
            if starts == []:
                starts = None
            if starts is not None and len(starts) != len(texts):
                raise DataError(
                    f"{where.prefix}: field 'answer_starts' has {len(starts)} values for {len(texts)} answers",
                    fix="give one answer_start per answer, or none",
                )
    else:
        raise DataError(f"{where.prefix}: field 'answers' must be a list, got {kind_of(answers)}", fix=fix)
    if not texts:
        raise DataError(
            f"{where.prefix}: field 'answers' is empty",
            fix="give every question at least one answer (unanswerable SQuAD v2 questions are not supported)",
        )
    return texts, starts


def _nearest(context: str, text: str, hint: int | None) -> int:
    """Offset of the occurrence of `text` nearest to `hint` (first occurrence without a hint), -1 if none."""
    first = context.find(text)
    if first < 0 or hint is None:
        return first
    best, pos = first, first
    while pos >= 0:
        if abs(pos - hint) < abs(best - hint):
            best = pos
        if pos > hint:
            break
        pos = context.find(text, pos + 1)
    return best


def check_unique_ids(raws: Sequence[tuple[Where, dict]], name: str, records: Sequence[dict]) -> None:
    if not raws:
        raise DataError(f"{name}: no records found (empty split)", fix="add at least one example or pick another file")
    seen: dict[str, Where] = {}
    for (where, _), record in zip(raws, records, strict=True):
        rid = record["id"]
        if rid in seen:
            raise DataError(
                f"{where.prefix}: duplicate id {show(rid)} (first used at {seen[rid].short}, again at {where.short})",
                fix="give every record a unique id",
            )
        seen[rid] = where


# ---------------------------------------------------------------------------------------------------------------
# Context limit and helpers


def apply_context_limit(records: list[dict], wheres: list[Where], name: str, max_words: int) -> list[Example]:
    examples = []
    cut_count = 0
    for rec, where in zip(records, wheres, strict=True):
        context = rec["context"]
        answers, starts = tuple(rec["answers"]), tuple(rec["answer_starts"])
        if len(context.split()) > max_words:
            n_words = len(context.split())
            end = 0
            for k, m in enumerate(_WORD.finditer(context), start=1):
                if k == max_words:
                    end = m.end()
                    break
            outside = [a for a, s in zip(answers, starts, strict=True) if s + len(a) > end]
            if outside:
                raise DataError(
                    f"{where.prefix}: field 'context' has {n_words} words, more than max_context_words={max_words}, "
                    f"and answer {show(outside[0])} lies beyond word {max_words}, so the context cannot be cut",
                    fix=f"raise max_context_words above {max_words} or shorten the context so its answers stay inside",
                )
            context = context[:end]
            cut_count += 1
        examples.append(Example(str(rec["id"]), context, rec["question"], answers, starts))
    if cut_count:
        warnings.warn(
            f"{name}: truncated {cut_count} context(s) longer than {max_words} words to their first {max_words} words",
            stacklevel=3,
        )
    return examples


def one_line(text: str) -> str:
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


def show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def kind_of(value: object) -> str:
    if value is MISSING:
        return "nothing"
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(value), type(value).__name__
    )
