"""Sources with named splits (hub names and local dataset folders): train comes from split `train`, eval and
probe from `data.eval_split`. Real files in tmp_path; no network (a hub name is served from a local folder)."""

from __future__ import annotations

import json

import pytest

from latentgate import config
from latentgate.data.readers import has_splits, load_examples
from latentgate.errors import DataError
from latentgate.train.workspace import load_splits


def _rows(split: str, n: int) -> list[dict]:
    return [{"id": f"{split}-{i}", "context": f"The {split} city number {i} lies by the river.",
             "question": f"Which {split} city is number {i}?", "answers": {"text": [f"city number {i}"],
                                                                        "answer_start": [len(split) + 5]}}
            for i in range(n)]


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture()
def folder(tmp_path):
    """A local copy of a hub dataset: one data file per split."""
    root = tmp_path / "squadlike"
    root.mkdir()
    for split, n in (("train", 30), ("validation", 12), ("test", 7)):
        _write_jsonl(root / f"{split}.jsonl", _rows(split, n))
    return root


def _cfg(**data):
    pairs = {f"data.{k}": str(v) for k, v in data.items()}
    pairs.update({"base.name": "some-hf-lm", "data.n_eval": "5", "data.n_probe": "4"})
    return config.resolve("micro", pairs)


def _ids(examples) -> list[str]:
    return [e.id for e in examples]


def test_a_dataset_folder_reads_train_from_train_and_eval_probe_from_eval_split(folder):
    splits = load_splits(_cfg(source=folder))  # data.eval_split defaults to validation
    assert _ids(splits["train"]) == [f"train-{i}" for i in range(30)]  # the whole train split: nothing held out
    assert _ids(splits["eval"]) == [f"validation-{i}" for i in range(5)]
    assert _ids(splits["probe"]) == [f"validation-{i}" for i in range(5, 9)]
    splits = load_splits(_cfg(source=folder, eval_split="test"))
    assert _ids(splits["eval"]) == [f"test-{i}" for i in range(5)]
    assert _ids(splits["probe"]) == ["test-5", "test-6"]


def test_eval_split_train_holds_out_the_tail_of_train(folder):
    splits = load_splits(_cfg(source=folder, eval_split="train"))
    assert _ids(splits["train"]) == [f"train-{i}" for i in range(21)]
    assert _ids(splits["eval"]) == [f"train-{i}" for i in range(21, 26)]
    assert _ids(splits["probe"]) == [f"train-{i}" for i in range(26, 30)]


def test_a_hub_name_reads_its_eval_split(folder, monkeypatch):
    """The hub is replaced by the local folder at the `datasets.load_dataset` call: which splits are asked for."""
    import datasets

    real = datasets.load_dataset
    calls = []

    def local_hub(path, *args, split=None, **kwargs):
        calls.append((path, split))
        return real(str(folder), *args, split=split, **kwargs)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # whatever happens, never the network
    monkeypatch.setattr(datasets, "load_dataset", local_hub)
    assert has_splits("owner/squadlike")
    splits = load_splits(_cfg(source="owner/squadlike", eval_split="test"))
    assert calls == [("owner/squadlike", "train"), ("owner/squadlike", "test")]
    assert _ids(splits["train"])[:2] == ["train-0", "train-1"] and len(splits["train"]) == 30
    assert _ids(splits["eval"]) == [f"test-{i}" for i in range(5)]


def test_a_dataset_folder_as_eval_source_reads_eval_split_and_the_file_source_stays_whole(folder, tmp_path):
    train_file = tmp_path / "train.jsonl"
    _write_jsonl(train_file, _rows("own", 10))
    assert not has_splits(train_file)
    splits = load_splits(_cfg(source=train_file, eval_source=folder))
    assert _ids(splits["train"]) == [f"own-{i}" for i in range(10)]
    assert _ids(splits["eval"]) == [f"validation-{i}" for i in range(5)]


def test_a_save_to_disk_folder_has_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({s: Dataset.from_list(_rows(s, 3)) for s in ("train", "validation")}).save_to_disk(str(saved))
    assert _ids(load_examples(saved, split="validation")) == ["validation-0", "validation-1", "validation-2"]
    assert _ids(load_examples(saved)) == ["train-0", "train-1", "train-2"]


def test_an_unknown_eval_split_is_one_line_naming_the_fix(folder):
    with pytest.raises(DataError) as info:
        load_splits(_cfg(source=folder, eval_split="dev"))
    message = str(info.value)
    assert message.startswith(f"{folder} is a directory, but datasets cannot load split 'dev' from it: ")
    assert message.endswith("(fix: pick one of the dataset's splits (data.eval_split for eval and probe questions))")
    assert "\n" not in message


def test_bad_rows_of_a_split_name_the_split_and_row(folder):
    rows = _rows("validation", 3)
    rows[2]["answers"] = {"text": ["not in the context"], "answer_start": [0]}
    _write_jsonl(folder / "validation.jsonl", rows)
    with pytest.raises(DataError, match=r"squadlike\[validation\] row 2: field 'answers': answers\[0\] "
                                        r"'not in the context' does not occur in the context"):
        load_splits(_cfg(source=folder))
