"""eval_detailed.jsonl rows as a type (`eval_row.EvalRow`): what the eval writes, the gate, the sweep and analysis read
back, field for field. The file format stays the one existing runs hold: a row as written before the type existed
loads and is written again byte for byte; a row that lost a field or holds a wrong type is one line naming the file,
the line, the field and the fix."""

from __future__ import annotations

import dataclasses
import json

import pytest

from latentgate.errors import DataError
from latentgate.eval_row import EvalRow

# A row exactly as eval/evaluate.py wrote it before rows were typed (a dict, json.dumps with default settings).
OLD_LINE = ('{"id": "syn-0007", "path": "latent", "question": "Where was Ada born?", "references": ["Paris", '
            '"paris, France"], "prediction": "the the the", "first_token": 17, "em": 0.0, "f1": 0.0, '
            '"first_token_correct": false, "error_mode": "repetition", "example_sha256": "' + "ab" * 32 + '"}')


def _row(**changes) -> EvalRow:
    return dataclasses.replace(EvalRow.from_json(json.loads(OLD_LINE)), **changes)


def test_fields_are_the_file_names_in_file_order():
    assert [f.name for f in dataclasses.fields(EvalRow)] == list(EvalRow.FIELDS) == list(json.loads(OLD_LINE))
    assert set(EvalRow.TYPES) == set(EvalRow.FIELDS)


def test_round_trip_through_a_file(tmp_path):
    rows = [_row(), _row(id="q2", path="text", references=("Rome",), prediction="Rome", first_token=None, em=1.0,
                         f1=1.0, first_token_correct=True, error_mode="correct")]
    file = tmp_path / "eval_detailed.jsonl"
    file.write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows))
    assert EvalRow.read(file) == rows
    assert EvalRow.read(file)[1].first_token is None and EvalRow.read(file)[1].references == ("Rome",)


def test_a_row_written_today_loads_and_is_written_back_byte_for_byte(tmp_path):
    file = tmp_path / "eval_detailed.jsonl"
    file.write_text(OLD_LINE + "\n\n")  # a trailing blank line is skipped
    (row,) = EvalRow.read(file)
    assert (row.id, row.path, row.prediction, row.first_token, row.f1) == ("syn-0007", "latent", "the the the", 17, 0.0)
    assert row.references == ("Paris", "paris, France") and row.first_token_correct is False
    assert json.dumps(row.to_json()) == OLD_LINE
    assert row.value(EvalRow.REFERENCES) == ["Paris", "paris, France"] and row.value(EvalRow.ERROR_MODE) == "repetition"


def test_a_row_scored_before_rows_carried_their_example_hash_loads_without_it():
    old = json.loads(OLD_LINE)
    del old[EvalRow.EXAMPLE_SHA256]
    old["extra_from_a_newer_version"] = 1  # ignored
    assert EvalRow.from_json(old).example_sha256 is None


def test_integral_scores_load_as_floats():
    row = EvalRow.from_json({**json.loads(OLD_LINE), EvalRow.EM: 1, EvalRow.F1: 0})
    assert row.em == 1.0 and isinstance(row.em, float) and isinstance(row.f1, float)


DROP = object()


@pytest.mark.parametrize("edit, says", [
    ({EvalRow.F1: DROP}, ["missing field 'f1'"]),
    ({EvalRow.F1: DROP, EvalRow.ERROR_MODE: DROP}, ["missing field 'f1', 'error_mode'"]),
    ({EvalRow.F1: "0.5"}, ["field 'f1' must be a number, got \"0.5\""]),
    ({EvalRow.EM: True}, ["field 'em' must be a number, got true"]),
    ({EvalRow.FIRST_TOKEN_CORRECT: 1}, ["field 'first_token_correct' must be true or false, got 1"]),
    ({EvalRow.REFERENCES: "Paris"}, ["field 'references' must be a list of strings, got \"Paris\""]),
    ({EvalRow.FIRST_TOKEN: 1.5}, ["field 'first_token' must be an integer or null, got 1.5"]),
    ({EvalRow.PATH: 7, EvalRow.QUESTION: ["x" * 200]},  # both named; a long value cut to 40 characters
     ["field 'path' must be a string, got 7; field 'question' must be a string, got [\"" + "x" * 35 + "... (fix"]),
])
def test_a_malformed_row_is_one_line_naming_the_file_line_field_and_fix(tmp_path, edit, says):
    bad = json.loads(OLD_LINE)
    for key, value in edit.items():
        if value is DROP:
            del bad[key]
        else:
            bad[key] = value
    file = tmp_path / "eval_detailed.jsonl"
    file.write_text(OLD_LINE + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        EvalRow.read(file)
    message = str(err.value)
    assert message.startswith(f"{file}:2: eval row: ") and "\n" not in message
    assert message.endswith("(fix: the file is truncated, edited or not written by `latentgate eval`: re-run the eval "
                            "to write it again)")
    for part in says:
        assert part in message, message


@pytest.mark.parametrize("line, says", [('{"id": "q1", ', "line 1: not valid JSON"),
                                         ('["a row", "as a list"]', "an eval row must be a JSON object, got [")])
def test_a_line_that_is_no_row_is_one_line(tmp_path, line, says):
    file = tmp_path / "eval_detailed.jsonl"
    file.write_text(line + "\n")
    with pytest.raises(DataError) as err:
        EvalRow.read(file)
    assert says in str(err.value).replace(f"{file}:1", "line 1") and "\n" not in str(err.value)


def test_collapse_reads_typed_rows():
    from latentgate.eval.controls import row_collapse

    rows = [_row(prediction="The Paris.", error_mode="wrong_entity"), _row(prediction="paris", error_mode="correct"),
            _row(prediction="the the the"), _row(prediction="Rome", error_mode="wrong_entity")]
    st = row_collapse(rows, top_k=2)
    assert (st.n, st.top_prediction, st.top_prediction_count, st.top_k_share, st.repetition_rate) == (
        4, "paris", 2, 0.75, 0.25)


def test_the_eval_writes_rows_that_load_back_byte_for_byte(tiny_ws, tmp_path):
    """The writer: every line of a real eval's eval_detailed.jsonl is a valid row, and writing the loaded rows again
    gives the same bytes; the eval table logged with the run reads the same rows."""
    from latentgate.eval.evaluate import evaluate
    from latentgate.phases.stages import TABLE_COLUMNS, eval_table

    examples = tiny_ws.splits["eval"][:3]
    metrics = evaluate(tiny_ws, examples, tmp_path, progress_name=None)
    file = tmp_path / "eval_detailed.jsonl"
    rows = EvalRow.read(file)
    assert len(rows) == len(examples) * len(metrics["paths"])
    assert "".join(json.dumps(r.to_json()) + "\n" for r in rows) == file.read_text()
    assert [r.id for r in rows if r.path == "latent"] == [e.id for e in examples]
    assert all(r.example_sha256 and r.references == tuple(e.answers) for r, e in zip(rows, examples * 9))
    for path, m in metrics["paths"].items():
        mine = [r for r in rows if r.path == path]
        assert m["n"] == len(mine) and m["distinct_first_tokens"] == len({r.first_token for r in mine})
    table = eval_table(file)
    assert [list(t) for t in table] == [list(TABLE_COLUMNS)] * len(rows)
    assert table[0]["references"] == " | ".join(rows[0].references) and table[0]["f1"] == rows[0].f1


def _eval_run_with(tmp_path, lines: list[str]) -> str:
    """An eval run in the session's store whose eval_detailed.jsonl artifact holds `lines`."""
    import mlflow
    from mlflow import MlflowClient

    c = MlflowClient()
    tmp_path.mkdir()
    exp = mlflow.get_experiment_by_name("latentgate").experiment_id
    run = c.create_run(exp, tags={"latentgate.phase": "eval"}).info.run_id
    (tmp_path / "eval_detailed.jsonl").write_text("".join(line + "\n" for line in lines))
    c.log_artifact(run, str(tmp_path / "eval_detailed.jsonl"))
    c.set_terminated(run)
    return run


def test_the_gate_reads_typed_rows_and_a_broken_file_is_missing_evidence(mlflow_store, tmp_path):
    from latentgate.registry.candidate import CandidateEvidence, Missing
    from latentgate.registry.checklist import Criterion
    from latentgate.registry.evidence import check_eval_example_max, check_eval_share

    good = _eval_run_with(tmp_path / "good", [OLD_LINE, json.dumps({**json.loads(OLD_LINE), "f1": 0.5, "em": 1.0})])
    ev = CandidateEvidence(good)
    assert [r.f1 for r in ev.detailed_rows("latent")] == [0.0, 0.5]
    share = Criterion("s", "eval_share", ">=", 0.5, {"path": "latent", "field": "em", "equals": 1.0})
    assert check_eval_share(ev, share, None).observed == 0.5
    top = Criterion("m", "eval_example_max", ">", 0.0, {"path": "latent", "field": "f1"})
    assert check_eval_example_max(ev, top, None).observed == 0.5
    typo = dataclasses.replace(share, params={"path": "latent", "field": "first_token_corect", "equals": True})
    with pytest.raises(Missing, match=r"rows have no field 'first_token_corect' \(fix the criterion's field: did you "
                                      r"mean first_token_correct\?\)"):
        check_eval_share(ev, typo, None)
    with pytest.raises(Missing, match=r"no field 'f2' \(fix the criterion's field: one of id, path, question, "):
        check_eval_example_max(ev, dataclasses.replace(top, params={"path": "latent", "field": "f2"}), None)

    broken = _eval_run_with(tmp_path / "bad", [OLD_LINE.replace('"f1": 0.0, ', "")])
    with pytest.raises(Missing) as err:
        CandidateEvidence(broken).detailed_rows("latent")
    assert f"eval run {broken[:8]}: eval_detailed.jsonl is unreadable" in str(err.value)
    assert ":1: eval row: missing field 'f1'" in str(err.value) and "\n" not in str(err.value)
