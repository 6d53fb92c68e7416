"""The one reuse key (tracking/reuse.py): every caller that reuses a finished run builds the same key from the same
inputs, a changed input (config, commit, data) changes it, and the pipeline finds a real phase run by it."""

from __future__ import annotations

import dataclasses

import pytest

from latentgate.config import resolve
from latentgate.tracking.reuse import BASE, SWEEP_STAGE_A, config_key, reuse_key
from latentgate.train.workspace import load_splits


@pytest.fixture(scope="module")
def stage_a_phase(mlflow_store, tmp_path_factory):
    """A real `stage_a` entry-point run (micro, after its `base`) in the shared store: (its config, its run)."""
    from latentgate.phases.entry import run_entry
    from latentgate.tracking import lineage

    cfg = resolve("micro", {"run.output_dir": str(tmp_path_factory.mktemp("reuse-runs"))})
    run_entry("base", cfg, "micro")
    run_id = run_entry("stage_a", cfg, "micro").run_id
    return cfg, lineage.client().get_run(run_id)


def test_calibrate_sweep_lineage_and_phases_build_the_same_key():
    from latentgate.calibrate import reuse as calibrate_reuse
    from latentgate.phases.entry import step_key
    from latentgate.tracking.lineage import base_hash

    cfg = resolve("micro")
    splits = load_splits(cfg)
    # the calibration's key is the one key, with its base weights: same fields, same digest
    chain = calibrate_reuse.reuse_key("gate", cfg)
    assert chain == reuse_key("gate", cfg, "", splits, calibrate_reuse.base_weights(cfg))
    assert chain.digest() == reuse_key("gate", resolve("micro"), "", load_splits(resolve("micro")),
                                       chain.base_weights, commit=chain.git_commit).digest()
    # the registered base LM, the phase runs' step key and the pipeline's lookup hash the config one way
    assert base_hash(cfg) == config_key(BASE, cfg) == step_key("base", cfg) == reuse_key(BASE, cfg).config_hash
    assert step_key("stage_a", cfg) == reuse_key("stage_a", cfg).config_hash
    # the sweep's shared Stage A ignores LoRA (its trials search it), and nothing else of the model
    assert config_key(SWEEP_STAGE_A, resolve("micro", {"model.lora_r": 2})) == config_key(SWEEP_STAGE_A, cfg)
    assert config_key(SWEEP_STAGE_A, resolve("micro", {"stage_a.steps": 3})) != config_key(SWEEP_STAGE_A, cfg)


def test_a_changed_config_commit_or_data_changes_the_key():
    cfg = resolve("micro")
    splits = load_splits(cfg)
    key = reuse_key("stage_a", cfg, "", splits, commit="a" * 40)
    assert key == reuse_key("stage_a", resolve("micro"), "", load_splits(cfg), commit="a" * 40)
    other_config = reuse_key("stage_a", resolve("micro", {"stage_a.lr": 0.5}), "", splits, commit="a" * 40)
    other_commit = reuse_key("stage_a", cfg, "", splits, commit="b" * 40)
    # the same config, one answer of the data changed (a data file edited in place)
    edited = dict(splits, train=[dataclasses.replace(splits["train"][0], answers=("changed",)), *splits["train"][1:]])
    other_data = reuse_key("stage_a", cfg, "", edited, commit="a" * 40)
    other_input = reuse_key("stage_a", cfg, "runs:/x/checkpoints/stage_a", splits, commit="a" * 40)
    assert other_config.config_hash != key.config_hash
    assert other_data.train_digest != key.train_digest and other_data.eval_digest == key.eval_digest
    assert len({k.digest() for k in (key, other_config, other_commit, other_data, other_input)}) == 5
    # the base LM's key does not see a Stage A change, but does see a data one
    assert config_key(BASE, resolve("micro", {"stage_a.lr": 0.5})) == config_key(BASE, cfg)
    assert config_key(BASE, resolve("micro", {"data.seed": 7})) != config_key(BASE, cfg)


def test_the_pipeline_finds_the_phase_run_by_the_key_it_recorded(stage_a_phase):
    from latentgate.pipeline.run import already_ran
    from latentgate.tracking.runs import git_commit

    cfg, run = stage_a_phase
    exp, commit = run.info.experiment_id, run.data.tags["latentgate.git_commit"]
    assert commit == git_commit()[0]
    assert already_ran("stage_a", cfg, "", commit, exp) == run.info.run_id
    key = reuse_key("stage_a", cfg, "", load_splits(cfg), commit=commit)
    assert key.recorded_by(run.data.tags)
    assert run.data.tags["dataset.train.digest"] == key.train_digest  # the run logged its data: it is compared
    assert run.data.tags["dataset.eval.digest"] == key.eval_digest
    # any changed part of the key: not that run
    assert already_ran("stage_a", cfg, "", "0" * 40, exp) is None
    assert already_ran("stage_a", cfg, "runs:/x/checkpoints/stage_a", commit, exp) is None
    assert already_ran("stage_a", dataclasses.replace(cfg, stage_a=dataclasses.replace(cfg.stage_a, lr=0.5)), "",
                       commit, exp) is None
    for field in ("train_digest", "eval_digest"):  # data edited in place: same config, other content
        assert not dataclasses.replace(key, **{field: "0" * 16}).recorded_by(run.data.tags)


def test_the_sweep_tags_and_reuses_its_stage_a_by_the_key(mlflow_store, tmp_path):
    from latentgate.schema import SweepTag
    from latentgate.sweep.runner import ensure_stage_a
    from latentgate.sweep.study import load_study
    from latentgate.tracking import lineage
    from latentgate.tracking.uris import run_in_uri

    spec = load_study("micro")
    cfg = resolve("micro", {"run.output_dir": str(tmp_path)})
    lines: list[str] = []
    uri = ensure_stage_a(spec, cfg, echo=lines.append)
    run = lineage.client().get_run(run_in_uri(uri))
    assert run.data.tags[SweepTag.STAGE_A_KEY] == reuse_key(SWEEP_STAGE_A, cfg, splits=load_splits(cfg)).digest()
    # another LoRA (what the trials search) finds the same Stage A, trains nothing
    again = ensure_stage_a(spec, resolve("micro", {"run.output_dir": str(tmp_path), "model.lora_r": 4}),
                           echo=lines.append)
    assert again == uri and lines[-1] == f"resume_from: reusing Stage A run {run.info.run_id}"
