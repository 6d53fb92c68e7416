"""A trained model back from its checkpoint: the config check before anything is built, and the workspace whose
encoder, adapter and (for Stage B) LoRA come from the checkpoint."""

from __future__ import annotations

from pathlib import Path

from latentgate.config import Config, flatten
from latentgate.model.lora import attach_lora
from latentgate.train import checkpoint as ckpt
from latentgate.train.manifest import COMPAT_KEYS, check_compat, read_manifest
from latentgate.train.trainer import checkpoint_modules
from latentgate.train.workspace import build_workspace


def check_compatible(cfg: Config, checkpoint: Path, manifest: dict | None = None) -> dict:
    """Fail in one line, before anything is built or trained, if `checkpoint` was trained with a different
    M, d_z, encoder or base LM than `cfg` (manifest.COMPAT_KEYS). Returns the manifest."""
    manifest = manifest or read_manifest(checkpoint)
    check_compat(Path(checkpoint), manifest, flatten(cfg), COMPAT_KEYS)
    return manifest


def load_trained(cfg: Config, base_dir: str, checkpoint: Path, splits=None):
    """A workspace on the base LM at `base_dir` whose encoder, adapter and (if the checkpoint has one) LoRA come
    from `checkpoint`. A module missing from the checkpoint is an error, never a silent fresh init."""
    manifest = read_manifest(checkpoint)
    ws = build_workspace(cfg, base_dir, splits)
    if manifest.get("lora"):
        ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
    ckpt.load_checkpoint(checkpoint, modules=checkpoint_modules(ws), lora_model=ws.lm if ws.is_peft else None,
                         expect_config=flatten(cfg), compat_keys=COMPAT_KEYS, expect_base=ws.base_ref)
    return ws
