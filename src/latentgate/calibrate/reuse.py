"""When a calibration chain may be reused instead of trained again: its reuse key (tracking/reuse.py, the one key
every "reuse a finished run" uses).

A finished chain stands for a new one only when everything that decides its result is the same: the entry point
(the chain's role), the resolved config, its input (none: a chain starts from scratch), the code (git commit), the
data content (the digests of the train and eval splits, as MLflow's dataset digest of the eval split is pinned by
the checklist) and the base LM's weights (the builtin LM by its base run's config hash; an external one by name and
revision, plus a fingerprint of its weight files when it is a local folder). Each chain is tagged with the key's
digest (latentgate.calibrate.reuse_key), and `find_chain` looks for that tag.
"""

from __future__ import annotations

from pathlib import Path

from latentgate.config import Config
from latentgate.model.base_lm import base_reference
from latentgate.registry.calibration import base_identity
from latentgate.tracking import reuse
from latentgate.tracking.reuse import ReuseKey
from latentgate.train.workspace import load_splits

__all__ = ["ReuseKey", "base_weights", "reuse_key"]


def base_weights(cfg: Config) -> str:
    """The base LM's identity (registry.calibration.base_identity); a local external LM adds its weights'
    fingerprint (model.base_lm.base_reference), so replaced weights in the same folder are not reused."""
    ident = base_identity(cfg)
    if cfg.base.name != "builtin" and Path(cfg.base.name).is_dir():
        return f"{ident}:{base_reference(cfg.base.name, cfg)['fingerprint']}"
    return ident


def reuse_key(role: str, cfg: Config, input_uri: str = "") -> ReuseKey:
    """A chain's key: tracking.reuse.reuse_key with this chain's data splits and base weights."""
    return reuse.reuse_key(role, cfg, input_uri, load_splits(cfg), base_weights(cfg))
