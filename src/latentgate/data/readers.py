"""Readers for SQuAD v1.1 JSON, JSONL and hub datasets, with validation that names file, line and field.

Accepted inputs (`load_examples(source)`):

* **SQuAD v1.1 JSON** (``.json``): ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
  "answers": [{"text", "answer_start"}]}]}]}]}``. Every answer of a question becomes a reference.
* **JSONL** (``.jsonl``/``.ndjson``, or a ``.json`` file that holds one object per line): one object per line with
  ``context``, ``question``, ``answers`` and optionally ``id``. ``answers`` may be a list of strings (optionally
  with a parallel ``answer_starts`` list, the layout `write_jsonl` writes), a list of ``{"text", "answer_start"}``
  objects, or the Hugging Face squad layout ``{"text": [...], "answer_start": [...]}``. A JSON array of such
  objects is accepted too. A missing ``id`` becomes ``"<file stem>-<line>"``.
* **A hub dataset name** (e.g. ``"squad"`` or ``"owner/name"``): a source that does not exist locally, has no
  ``.json``/``.jsonl`` suffix and no other path separator is loaded with ``datasets.load_dataset(source,
  split=split)``; offline or on failure this is a `DataError` telling to pass a local file.
* **A dataset folder**: a local copy of a hub dataset (data files named by split, e.g. ``train.jsonl`` and
  ``validation.jsonl``, or ``data/train-*.parquet``) or a ``DatasetDict.save_to_disk`` folder, loaded the same way
  (``datasets.load_dataset(folder, split=split)``), so it stands in for a hub name offline.

Hub names and dataset folders have splits (`has_splits`); a file is one split.

Local files are parsed here, so every error is one line naming the file, the line (JSONL) or the
paragraph/question (SQuAD JSON), and the field; hub names and dataset folders go through Hugging Face
``datasets``. The errors: undecodable UTF-8 (with the byte offset), invalid
JSON, missing or non-string ``context``/``question``, missing or empty ``answers``, an empty answer, an answer
longer than the context or not occurring in it, duplicate ids (both places named) and an empty split.

``answer_start`` offsets that do not point at their text are re-anchored to the nearest occurrence of the text
(one warning per file). When no offset is given the first occurrence is used.

**Huge contexts.** A context longer than ``max_context_words`` whitespace-separated words is cut after its
``max_context_words``-th word if every answer of the record still lies entirely inside the kept part (one
`warnings.warn` per file says how many contexts were cut); otherwise the record is rejected with a `DataError`
naming its line and this rule.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from latentgate.data.records import Example
from latentgate.data.validation import (
    MISSING,
    Counters,
    Where,
    apply_context_limit,
    check_depth,
    check_unique_ids,
    kind_of,
    normalize_record,
    one_line,
    show,
    too_deep,
    validate_examples,
)
from latentgate.errors import ConfigError, DataError, os_error_in_chain
from latentgate.safety import refuse_loop

MAX_DATA_BYTES_ENV = "LATENTGATE_MAX_DATA_BYTES"
DEFAULT_MAX_DATA_BYTES = 1 << 30  # 1 GiB: SQuAD v1.1 train is 30 MB; every example is held in memory
MAX_LINE_BYTES = 64 << 20  # one JSONL record
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
_BOM = b"\xef\xbb\xbf"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ---------------------------------------------------------------------------------------------------------------
# Public API


def load_examples(source: str | os.PathLike, *, max_context_words: int = 512, split: str = "train") -> list[Example]:
    """Load and validate examples from a SQuAD v1.1 JSON file, a JSONL file or a hub dataset name.

    See the module docstring for the accepted layouts. Contexts longer than `max_context_words` words are cut
    to that many words (with one warning per file) when every answer stays inside the kept part; otherwise the
    record is rejected with a `DataError`. `split` is used for hub names and dataset folders (see `has_splits`).
    Every problem raises a `DataError` whose message is one line naming the file, the line or record, and the
    field.
    """
    if not isinstance(max_context_words, int) or isinstance(max_context_words, bool) or max_context_words < 1:
        raise ConfigError(
            f"max_context_words must be a positive integer, got {max_context_words!r}",
            fix="set max_context_words to e.g. 512",
        )
    if _is_hub_name(source):
        return _load_hub(str(source), split, max_context_words)

    name = one_line(os.fspath(source))
    path = Path(source)
    refuse_loop(path, "data file", DataError)
    if not path.exists():
        raise DataError(
            f"data file not found: {name}",
            fix="check the path; pass a SQuAD JSON (.json) or JSONL (.jsonl) file, or a hub dataset name like 'squad'",
        )
    if path.is_dir():
        return _load_folder(path, name, split, max_context_words)
    if not path.is_file():  # a FIFO, socket or device: reading it may wait forever
        raise DataError(f"{name} is not a regular file (a pipe, socket or device)",
                        fix="save the data to a file first, then pass that file")
    _check_file_size(path, name)
    counters = Counters()
    try:  # parsed here, not by datasets: errors name the line or question
        if path.suffix.lower() in JSONL_SUFFIXES:  # a stream: one line in memory at a time, records checked as read
            raws = [(where, normalize_record(obj, where, counters)) for where, obj in _stream_jsonl(path, name)]
        else:  # one JSON document, at most max_data_bytes() long
            _, payload = _detect(path, _decode(path.read_bytes(), name), name)
            raws = [(where, normalize_record(obj, where, counters)) for where, obj in payload]
    except OSError as err:
        raise DataError(
            f"cannot read {name}: {one_line(err.strerror or str(err))}", fix="check the file's permissions"
        ) from None
    records = [record for _, record in raws]
    check_unique_ids(raws, name, records)
    if counters.reanchored:
        warnings.warn(
            f"{name}: {counters.reanchored} answer_start offset(s) did not point at their answer text and were "
            "moved to the nearest occurrence of the text",
            stacklevel=2,
        )
    wheres = [where for where, _ in raws]
    examples = apply_context_limit(records, wheres, name, max_context_words)
    return validate_examples(examples, name)


def has_splits(source: str | os.PathLike) -> bool:
    """True for a source with named splits (a hub name or a dataset folder), False for a single data file."""
    return _is_hub_name(source) or Path(source).is_dir()


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> None:
    """Write examples as JSONL (one `Example.to_dict()` per line, UTF-8), atomically; `load_examples` reads it back."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise DataError(f"cannot write {one_line(str(path))}: it is a directory or not a regular file",
                        fix="pass the path of a .jsonl file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result gets the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for ex in examples:
                fh.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a signal: the old file (if any) stays, no temp file is left
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------------------------------------------
# Raw file checks


def _is_hub_name(source: object) -> bool:
    if not isinstance(source, str) or os.path.exists(source):
        return False
    if source.lower().endswith(JSON_SUFFIXES + JSONL_SUFFIXES) or "\\" in source:
        return False
    if not _HUB_NAME.match(source):
        return False
    owner = source.split("/", 1)[0]
    return "/" not in source or not os.path.exists(owner)


def max_data_bytes() -> int:
    """The largest data file read (bytes): LATENTGATE_MAX_DATA_BYTES, default DEFAULT_MAX_DATA_BYTES (1 GiB)."""
    raw = os.environ.get(MAX_DATA_BYTES_ENV, "")
    try:
        return int(raw) if raw.strip() else DEFAULT_MAX_DATA_BYTES
    except ValueError:
        raise ConfigError(f"{MAX_DATA_BYTES_ENV}={raw!r} is not a whole number of bytes",
                          f"set {MAX_DATA_BYTES_ENV} to e.g. {DEFAULT_MAX_DATA_BYTES}") from None


def _check_file_size(path: Path, name: str) -> None:
    size, limit = path.stat().st_size, max_data_bytes()
    if size > limit:
        raise DataError(f"{name} is {size} bytes, more than the data file limit of {limit} bytes",
                        fix=f"raise the limit with {MAX_DATA_BYTES_ENV}=<bytes> (the examples are held in memory), "
                            "or split the file")


def _stream_jsonl(path: Path, name: str) -> Iterator[tuple[Where, object]]:
    """(where, object) per non-blank line of a JSONL file, read line by line (at most MAX_LINE_BYTES a line)."""
    with open(path, "rb") as f:
        offset = 0
        for lineno in itertools.count(1):
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES:
                raise DataError(f"{name}:{lineno}: line longer than {MAX_LINE_BYTES} bytes, the limit of one record",
                                fix="put one record on each line (a record holds one context and its question)")
            skip = len(_BOM) if lineno == 1 and line.startswith(_BOM) else 0
            try:
                text = line[skip:].decode("utf-8")
            except UnicodeDecodeError as err:
                at = offset + skip + err.start
                raise DataError(f"{name}:{lineno}: not valid UTF-8 (byte 0x{line[skip + err.start]:02x} at byte "
                                f"offset {at})", fix="re-save the file as UTF-8") from None
            offset += len(line)
            if text.strip():
                yield _parse_line(text, lineno, name, path.stem)


def _decode(raw: bytes, name: str) -> str:
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + skip
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{name}:{line}: not valid UTF-8 (byte 0x{raw[offset]:02x} at byte offset {offset})",
            fix="re-save the file as UTF-8",
        ) from None


def _detect(path: Path, text: str, name: str):
    """('jsonl', [(where, obj)]) for JSON lines, ('records', [(where, obj)]) for SQuAD JSON or a JSON array."""
    suffix = path.suffix.lower()
    stem = path.stem
    if suffix not in JSONL_SUFFIXES and text.strip():
        try:
            doc = json.loads(text)
            check_depth(doc, name)
        except RecursionError:  # json gives up past ~1000 levels
            raise too_deep(name) from None
        except json.JSONDecodeError as err:
            if err.msg != "Extra data" and suffix in JSON_SUFFIXES:
                raise DataError(
                    f"{name}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})",
                    fix="fix the JSON syntax on that line",
                ) from None
        else:
            if isinstance(doc, dict) and "data" in doc:
                return "records", _squad_records(doc, name, stem)
            if isinstance(doc, list):
                return "records", [
                    (Where(f"{name}: item {i}", f"item {i}", f"{stem}-{i}"), obj) for i, obj in enumerate(doc)
                ]
            if isinstance(doc, dict) and "context" in doc:  # a single (possibly pretty-printed) record
                return "records", [(Where(f"{name}: record 0", "record 0", f"{stem}-0"), doc)]
            if suffix in JSON_SUFFIXES:
                raise DataError(
                    f"{name}: expected SQuAD v1.1 layout: a JSON object with a 'data' list of articles",
                    fix="use SQuAD v1.1 JSON, or JSONL with one {context, question, answers} object per line",
                )
    return "jsonl", _jsonl_records(text, name, stem)


def _jsonl_records(text: str, name: str, stem: str) -> list[tuple[Where, object]]:
    return [_parse_line(line, lineno, name, stem) for lineno, line in enumerate(text.split("\n"), start=1)
            if line.strip()]


def _parse_line(line: str, lineno: int, name: str, stem: str) -> tuple[Where, object]:
    """One JSONL record, nested at most MAX_RECORD_DEPTH levels (json raises RecursionError past ~1000)."""
    where = Where(f"{name}:{lineno}", f"line {lineno}", f"{stem}-{lineno}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{name}:{lineno}: invalid JSON: {err.msg} (column {err.colno})",
            fix="put exactly one JSON object on each line",
        ) from None
    except RecursionError:  # json gives up past ~1000 levels
        raise too_deep(where.prefix) from None
    check_depth(obj, where.prefix)
    return where, obj


def _squad_records(doc: dict, name: str, stem: str) -> list[tuple[Where, dict]]:
    fix = "follow the SQuAD v1.1 layout {data: [{paragraphs: [{context, qas: [{id, question, answers}]}]}]}"
    data = doc["data"]
    if not isinstance(data, list):
        raise DataError(f"{name}: field 'data' must be a list of articles, got {kind_of(data)}", fix=fix)
    out = []
    for ai, article in enumerate(data):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            got = kind_of(article.get("paragraphs", MISSING)) if isinstance(article, dict) else kind_of(article)
            raise DataError(f"{name}: data[{ai}]: field 'paragraphs' must be a list, got {got}", fix=fix)
        for pi, para in enumerate(article["paragraphs"]):
            ploc = f"data[{ai}].paragraphs[{pi}]"
            if not isinstance(para, dict):
                raise DataError(f"{name}: {ploc}: paragraph must be an object, got {kind_of(para)}", fix=fix)
            qas = para.get("qas", MISSING)
            if not isinstance(qas, list):
                raise DataError(
                    f"{name}: {ploc} (paragraph {pi}): field 'qas' must be a list, got {kind_of(qas)}", fix=fix
                )
            for qi, qa in enumerate(qas):
                qloc = f"{ploc}.qas[{qi}]"
                if not isinstance(qa, dict):
                    raise DataError(f"{name}: {qloc}: question must be an object, got {kind_of(qa)}", fix=fix)
                ident = f" (id {show(qa['id'])})" if "id" in qa else ""
                obj = {k: qa[k] for k in ("id", "question", "answers") if k in qa}
                if "context" in para:
                    obj["context"] = para["context"]
                out.append((Where(f"{name}: {qloc}{ident}", f"{qloc}{ident}", f"{stem}-{ai}-{pi}-{qi}"), obj))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Through Hugging Face datasets


class _quiet_datasets:
    """Silence datasets' progress bars for the duration of a load, restoring the caller's setting."""

    def __enter__(self):
        from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars  # lazy: light `data check`

        self._was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
        return self

    def __exit__(self, *exc):
        from datasets.utils.tqdm import enable_progress_bars  # lazy: light `data check`

        if not self._was_disabled:
            enable_progress_bars()
        return False


def _load_hub(source: str, split: str, max_context_words: int) -> list[Example]:
    from datasets import load_dataset  # lazy: light `data check`

    with _quiet_datasets():
        try:
            rows = load_dataset(source, split=split).to_list()
        except Exception as err:  # noqa: BLE001 - offline, unknown name, missing split...
            raise DataError(
                f"cannot load dataset {show(source)} from the hub: {one_line(str(err))[:200]}",
                fix=_split_fix(err, "pass a local SQuAD JSON or JSONL file, or go online"),
            ) from None
    return _split_examples(rows, source, source, split, max_context_words)


def _load_folder(path: Path, name: str, split: str, max_context_words: int) -> list[Example]:
    """A local dataset folder, read like a hub dataset; arrow caches go to a temporary folder, not HF_HOME."""
    from datasets import load_dataset  # lazy: light `data check`

    with tempfile.TemporaryDirectory(prefix="latentgate-data-") as tmp, _quiet_datasets():
        try:
            rows = load_dataset(str(path), split=split, cache_dir=tmp, keep_in_memory=True).to_list()
        except Exception as err:  # noqa: BLE001 - no data files, unknown split, unreadable file...
            disk = os_error_in_chain(err)  # a full disk / read-only temp dir is not a problem of the data
            if disk is not None:
                raise disk from None
            raise DataError(
                f"{name} is a directory, but datasets cannot load split {show(split)} from it: "
                f"{one_line(str(err))[:200]}",
                fix=_split_fix(err, "pass a .json/.jsonl file, or a dataset folder with data files named by split "
                                    "(train.jsonl, validation.jsonl) or written by save_to_disk"),
            ) from None
    return _split_examples(rows, name, path.name, split, max_context_words)


def _split_fix(err: Exception, default: str) -> str:
    if "unknown split" in str(err).lower():
        return "pick one of the dataset's splits (data.eval_split for eval and probe questions)"
    return default


def _split_examples(rows: list, name: str, stem: str, split: str, max_context_words: int) -> list[Example]:
    """Validate the rows of one split of a hub dataset or dataset folder."""
    label = f"{name}[{split}]"
    raws = [(Where(f"{label} row {i}", f"row {i}", f"{stem}-{split}-{i}"), row) for i, row in enumerate(rows)]
    counters = Counters()
    flat = [normalize_record(row, where, counters) for where, row in raws]
    check_unique_ids(raws, label, flat)
    wheres = [where for where, _ in raws]
    return validate_examples(apply_context_limit(flat, wheres, label, max_context_words), label)


