"""When a calibration chain may be reused instead of trained again: the reuse key.

A finished chain stands for a new one only when everything that decides its result is the same: the entry point
(the chain's role), the resolved config, its input (none: a chain starts from scratch), the code (git commit), the
data content (the digests of the train and eval splits, as MLflow's dataset digest of the eval split is pinned by
the checklist) and the base LM's weights (the builtin LM by its base run's config hash; an external one by name and
revision, plus a fingerprint of its weight files when it is a local folder). Each chain is tagged with the key's
digest (latentgate.calibrate.reuse_key), and `find_chain` looks for that tag.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from latentgate.config import Config, config_hash
from latentgate.model.base_lm import base_reference
from latentgate.registry.calibration import base_identity
from latentgate.tracking.runs import git_commit
from latentgate.tracking.tracker import dataset_digest
from latentgate.train.workspace import load_splits


@dataclass(frozen=True)
class ReuseKey:
    """Everything that decides a chain's result."""

    entry_point: str  # the chain's role: gate | hero
    config_hash: str  # the resolved config
    input_uri: str  # what the chain starts from ("" : from scratch)
    git_commit: str
    train_digest: str  # dataset digest of the train split
    eval_digest: str  # dataset digest of the eval split (what the checklist pins)
    base_weights: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def any_commit(self) -> str:
        """The digest of this key with the commit left out: what `calibrate --allow-other-commit` matches, for a
        change of code that the user vouches does not touch training or eval (a docs or judging change)."""
        return replace(self, git_commit="").digest()

    def to_dict(self) -> dict:
        return {**asdict(self), "digest": self.digest()}


def base_weights(cfg: Config) -> str:
    """The base LM's identity (registry.calibration.base_identity); a local external LM adds its weights'
    fingerprint (model.base_lm.base_reference), so replaced weights in the same folder are not reused."""
    ident = base_identity(cfg)
    if cfg.base.name != "builtin" and Path(cfg.base.name).is_dir():
        return f"{ident}:{base_reference(cfg.base.name, cfg)['fingerprint']}"
    return ident


def reuse_key(role: str, cfg: Config, input_uri: str = "") -> ReuseKey:
    splits = load_splits(cfg)
    return ReuseKey(role, config_hash(cfg), input_uri, git_commit()[0], dataset_digest(splits["train"]),
                    dataset_digest(splits["eval"]), base_weights(cfg))
