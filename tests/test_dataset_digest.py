"""Dataset digests cover every record: MLflow's pandas digest hashes only the first 10,000 rows (plus the row
count), so two eval sets that differ in their tail (SQuAD dev has 10,570 questions) would share one digest."""

from __future__ import annotations

import uuid

import pandas as pd

from latentgate.data.records import Example
from latentgate.tracking.tracker import DIGEST_CHARS, MlflowTracker, dataset_digest, dataset_rows


def _split(n: int, last_answer: str = "paris") -> list[Example]:
    rows = [Example(f"q{i}", f"context {i} mentions paris and rome", f"question {i}?", ("paris",)) for i in range(n)]
    rows[-1] = Example(f"q{n - 1}", "context mentions paris and rome", "question?", (last_answer,))
    return rows


def test_splits_differing_only_after_row_10000_get_different_digests():
    import mlflow

    a, b = _split(10_001), _split(10_001, last_answer="rome")
    # the reason: MLflow's own digest is blind to row 10,001
    assert mlflow.data.from_pandas(pd.DataFrame(dataset_rows(a))).digest == \
        mlflow.data.from_pandas(pd.DataFrame(dataset_rows(b))).digest
    assert dataset_digest(a) != dataset_digest(b)


def test_digest_is_deterministic_order_sensitive_and_short_hex():
    a = _split(5)
    digest = dataset_digest(a)
    assert digest == dataset_digest(list(a)) and len(digest) == DIGEST_CHARS and int(digest, 16) >= 0
    assert dataset_digest(a[::-1]) != digest
    assert dataset_digest(a[:-1]) != digest
    moved = [a[0], Example(a[1].id, a[1].context, a[1].question, ("paris", "rome"))] + a[2:]
    assert dataset_digest(moved) != digest  # every reference counts


def test_log_input_records_the_full_digest_as_dataset_and_tag(mlflow_store):
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.create_experiment(f"digest-{uuid.uuid4().hex[:8]}")  # apart from the shared experiment
    run_id = client.create_run(exp).info.run_id
    examples = _split(12, last_answer="rome")
    MlflowTracker(run_id).log_input(examples, "eval", "evaluation")
    run = client.get_run(run_id)
    assert run.data.tags["dataset.eval.digest"] == dataset_digest(examples)
    (logged,) = run.inputs.dataset_inputs
    client.set_terminated(run_id)  # the session's store holds no run left RUNNING (the reliability tests check)
    assert logged.dataset.name == "eval" and logged.dataset.digest == dataset_digest(examples)
    assert [t.value for t in logged.tags] == ["evaluation"]
