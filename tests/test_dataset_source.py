"""An eval of a SQuAD file logs its dataset with an explicit local source: MLflow resolving a bare path finds two
local sources (schemes "" and "file") and warns "can be interpreted in multiple ways", which the CLI printed as a
`latentgate: warning:` line on every eval. Real SQLite store, real SQuAD v1.1 file, the eval phase's own calls."""

from __future__ import annotations

import json
import uuid
import warnings

import mlflow
from mlflow import MlflowClient

from latentgate import config
from latentgate.data.readers import load_examples
from latentgate.tracking.tracker import MlflowTracker, dataset_source


def _squad_file(path) -> None:
    paragraphs = []
    for i in range(4):
        context = f"Person {i} lives in paris, by the river."
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": f"Where does person {i} live?",
                                                        "answers": [{"text": "paris",
                                                                     "answer_start": context.index("paris")}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}),
                    encoding="utf-8")


def test_eval_of_a_squad_file_logs_its_source_without_a_warning(mlflow_store, tmp_path):
    squad = tmp_path / "dev.json"
    _squad_file(squad)
    cfg = config.resolve("micro", {"base.name": "some-hf-lm", "data.source": str(squad),
                                   "data.eval_source": str(squad), "data.n_eval": "4", "data.n_probe": "1"})
    examples = load_examples(squad)
    client = MlflowClient()
    exp = client.create_experiment(f"source-{uuid.uuid4().hex[:8]}")  # apart from the shared experiment
    with mlflow.start_run(experiment_id=exp) as run:  # the active run, as in the eval phase (mlflow.log_input)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            MlflowTracker(run.info.run_id).log_input(examples, "eval", "evaluation", dataset_source(cfg.data, "eval"))
    assert [str(w.message) for w in caught] == []  # before the fix: "... can be interpreted in multiple ways ..."
    (logged,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.source_type == "local"
    assert json.loads(logged.dataset.source) == {"uri": str(squad.resolve())}
