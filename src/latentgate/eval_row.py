"""One eval_detailed.jsonl row as a frozen dataclass: its field names (the file's), how it is written and read.

eval/evaluate.py writes the rows; the gate, the pipeline, the sweep and analysis read them back with `EvalRow.read`.
A row that is not what the file should hold is a one-line DataError naming the file, the line and the field. Pure
Python, beside schema.py (kept apart so schema.py stays a catalogue of names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from latentgate.errors import DataError
from latentgate.schema import Artifact

_ROW_FIX = "the file is truncated, edited or not written by `latentgate eval`: re-run the eval to write it again"
_ROW_TYPES = {  # what a field of each JSON type accepts (a bool is no number here, though Python says so)
    "a string": lambda v: isinstance(v, str),
    "a string or null": lambda v: v is None or isinstance(v, str),
    "a number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "an integer or null": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "true or false": lambda v: isinstance(v, bool),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


@dataclass(frozen=True)
class EvalRow:
    """One eval_detailed.jsonl row: one question scored on one path. eval/evaluate.py writes them (`to_json`); the
    gate, the pipeline, the sweep and analysis read them back (`read`). The upper-case names are the file's field
    names (hero.yaml's eval_example_max / eval_share criteria name them as data); each field has the same name."""

    ID = "id"
    PATH = "path"
    QUESTION = "question"
    REFERENCES = "references"
    PREDICTION = "prediction"
    FIRST_TOKEN = "first_token"
    EM = "em"
    F1 = "f1"
    FIRST_TOKEN_CORRECT = "first_token_correct"
    ERROR_MODE = "error_mode"
    EXAMPLE_SHA256 = "example_sha256"  # sha256 of the scored example's dataset record: the gate recomputes the
    # eval set's digest from the rows it judges (tracking/tracker.py digest_of_hashes)
    FIELDS = (ID, PATH, QUESTION, REFERENCES, PREDICTION, FIRST_TOKEN, EM, F1, FIRST_TOKEN_CORRECT, ERROR_MODE,
              EXAMPLE_SHA256)  # in file order
    TYPES = {ID: "a string", PATH: "a string", QUESTION: "a string", REFERENCES: "a list of strings",
             PREDICTION: "a string", FIRST_TOKEN: "an integer or null", EM: "a number", F1: "a number",
             FIRST_TOKEN_CORRECT: "true or false", ERROR_MODE: "a string", EXAMPLE_SHA256: "a string or null"}

    id: str  # the example's id
    path: str  # an EvalPath
    question: str
    references: tuple[str, ...]  # every gold answer (scoring takes the best)
    prediction: str  # the generated answer, decoded
    first_token: int | None  # the first generated token id; None when nothing was generated
    em: float  # SQuAD exact match against the best reference, 0.0 or 1.0
    f1: float  # SQuAD token F1 against the best reference
    first_token_correct: bool  # the greedy first token is the gold answer's first token
    error_mode: str  # eval/scoring.py ERROR_MODES
    example_sha256: str | None = None  # None in rows scored before rows carried it (the gate asks to re-run)

    def value(self, name: str):
        """The field a file field name names (`EvalRow.F1`, a checklist's `field:`), as the file holds it."""
        if name not in self.FIELDS:
            raise KeyError(name)
        return list(self.references) if name == self.REFERENCES else getattr(self, name)

    def to_json(self) -> dict:
        """The row as eval_detailed.jsonl holds it: `json.dumps` of this is its line."""
        return {name: self.value(name) for name in self.FIELDS}

    @classmethod
    def from_json(cls, obj, where: str | None = None) -> EvalRow:
        """The row a parsed JSON line holds. `where` (file:line) names it in the DataError that a missing field or a
        wrong type raises. A row without example_sha256 (scored by an older latentgate) loads with None; fields
        this version does not know are ignored."""
        where = where or Artifact.EVAL_DETAILED
        if not isinstance(obj, dict):
            raise DataError(f"{where}: an eval row must be a JSON object, got {_short(obj)}", _ROW_FIX)
        missing = [n for n in cls.FIELDS if n not in obj and n != cls.EXAMPLE_SHA256]
        if missing:
            raise DataError(f"{where}: eval row: missing field {', '.join(map(repr, missing))}", _ROW_FIX)
        wrong = [f"field {n!r} must be {t}, got {_short(obj[n])}" for n, t in cls.TYPES.items()
                 if n in obj and not _ROW_TYPES[t](obj[n])]
        if wrong:
            raise DataError(f"{where}: eval row: {'; '.join(wrong)}", _ROW_FIX)
        return cls(**{n: obj.get(n) for n in cls.FIELDS} | {
            cls.REFERENCES: tuple(obj[cls.REFERENCES]), cls.EM: float(obj[cls.EM]), cls.F1: float(obj[cls.F1])})

    @classmethod
    def read(cls, file) -> list[EvalRow]:
        """Every row of an eval_detailed.jsonl file, in file order (blank lines skipped). A line that is not a row
        is a DataError naming the file and the line."""
        rows = []
        with open(file, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{file}:{n}: not valid JSON ({err.msg})", _ROW_FIX) from None
                rows.append(cls.from_json(obj, f"{file}:{n}"))
        return rows


def _short(value) -> str:
    """A value for a one-line message: its JSON, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
