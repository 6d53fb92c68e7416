"""Reuse a finished run instead of running it again: the one reuse key.

A finished run stands for a new one only when everything that decides its result is the same:

    entry_point    what ran (an MLproject entry point, a calibration chain's role, the sweep's shared Stage A)
    config_hash    the resolved config, or the part of it the entry point depends on (SCOPES)
    input_uri      what it started from (a checkpoint or model URI; "" for a run that starts from scratch)
    git_commit     the code
    train_digest   the data's content: tracker.dataset_digest of the train and eval splits
    eval_digest
    base_weights   the base LM's weights where the config alone does not pin them (calibrate: a local folder's
                   fingerprint); "" where the config hash does

Every caller builds its key with `reuse_key` and looks runs up with it: the pipeline's steps (field by field
against the tags a phase run records, `find_phase_run`), a calibration chain and the sweep's shared Stage A (one
tag holding `ReuseKey.digest`), and the registered base LM (its config hash, `config_key("base", cfg)`, across
commits: a registered base LM is meant to serve later code).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from latentgate.config import Config, config_hash, flatten
from latentgate.schema import Tag
from latentgate.tracking.runs import git_commit
from latentgate.tracking.tracker import dataset_digest

BASE = "base"
SWEEP_STAGE_A = "sweep_stage_a"  # the Stage A every trial of a study with `resume_from: auto` starts from


@dataclass(frozen=True)
class Scope:
    """The part of the resolved config a run depends on: these sections (all when empty), minus keys starting
    with `exclude`."""

    sections: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


SCOPES = {
    # the base LM: its data and base config; the sanity-gate thresholds and memory settings give the same weights
    BASE: Scope(("base", "data"), ("base.gate_", "base.gradient_checkpointing", "base.attn_implementation")),
    # a study's trials share one Stage A whatever their LoRA (Stage B) settings
    SWEEP_STAGE_A: Scope(("data", "base", "stage_a", "model"), ("model.lora_",)),
}


def config_key(entry_point: str, cfg: Config) -> str:
    """The hash of the config a run of `entry_point` depends on (its SCOPES entry; the whole config otherwise)."""
    scope = SCOPES.get(entry_point, Scope())
    return config_hash(cfg, scope.sections or None, exclude=scope.exclude)


@dataclass(frozen=True)
class ReuseKey:
    """Everything that decides a run's result (the module's docstring)."""

    entry_point: str
    config_hash: str
    input_uri: str
    git_commit: str
    train_digest: str
    eval_digest: str
    base_weights: str

    def digest(self) -> str:
        """One tag value for the whole key (calibrate's chains, the sweep's Stage A)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def any_commit(self) -> str:
        """The digest of this key with the commit left out: what `calibrate --allow-other-commit` matches, for a
        change of code that the user vouches does not touch training or eval (a docs or judging change)."""
        return replace(self, git_commit="").digest()

    def to_dict(self) -> dict:
        return {**asdict(self), "digest": self.digest()}

    def recorded_by(self, tags: Mapping[str, str]) -> bool:
        """Whether a phase run's tags (phases/entry.py phase_tags, the provenance tags, tracker.log_input) record
        this key: entry point, step key, input URI, git commit, and the digest of each split the run logged (a run
        that logged no split, e.g. a base run that reused a registered base LM, is judged by its config)."""
        if (tags.get(Tag.ENTRY_POINT), tags.get(Tag.STEP_KEY), tags.get(Tag.INPUT_URI, ""),
                tags.get(Tag.GIT_COMMIT)) != (self.entry_point, self.config_hash, self.input_uri, self.git_commit):
            return False
        return all(tags.get(Tag.dataset_digest(split), digest) == digest
                   for split, digest in (("train", self.train_digest), ("eval", self.eval_digest)))


def reuse_key(entry_point: str, cfg: Config, input_uri: str = "", splits: Mapping[str, list] | None = None,
              base_weights: str = "", commit: str | None = None) -> ReuseKey:
    """The key of a run of `entry_point` on `cfg` and `input_uri`, with the data `splits` (train / eval, as
    train.workspace.load_splits returns them) and this checkout's git commit unless `commit` is given."""
    splits = splits or {}
    digests = [dataset_digest(splits[s]) if s in splits else "" for s in ("train", "eval")]
    return ReuseKey(entry_point, config_key(entry_point, cfg), input_uri, commit or git_commit()[0], *digests,
                    base_weights)


def find_phase_run(client, experiment_id: str, key: ReuseKey, cfg: Config) -> str | None:
    """The newest FINISHED phase run that records `key` (`ReuseKey.recorded_by`) and whose logged params agree
    with the resolved config `cfg`; None when there is none."""
    runs = client.search_runs(
        [experiment_id], order_by=["attributes.start_time DESC"], max_results=50,
        filter_string=(f"tags.`{Tag.ENTRY_POINT}` = '{key.entry_point}' and "
                       f"tags.`{Tag.STEP_KEY}` = '{key.config_hash}' and attributes.status = 'FINISHED'"))
    flat = {k: str(v) for k, v in flatten(cfg).items()}
    for run in runs:
        if not key.recorded_by(run.data.tags):
            continue
        if any(run.data.params.get(k, flat[k]) != flat[k] for k in flat):  # the logged resolved config agrees
            continue
        return run.info.run_id
    return None
