"""Workspaces for the benchmarks: the smoke preset's model sizes with a randomly initialised builtin base LM
(speed does not depend on what the weights learned), saved to a folder and loaded through the normal
`build_workspace` path, so the bench runs exactly the code a smoke runs."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from latentgate.config import Config
from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer
from latentgate.model.lora import attach_lora
from latentgate.train.workspace import build_workspace


def save_random_base(cfg: Config, out_dir: Path) -> Path:
    """A random-init builtin base LM + its tokenizer, saved like the `base` stage saves a trained one."""
    tok = builtin_tokenizer(cfg)
    lm = build_builtin_lm(cfg, len(tok), tok)
    model_dir = Path(out_dir) / "base_lm"
    lm.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    return model_dir


def smoke_workspace(cfg: Config, work_dir: Path, stage: str = "stage_a"):
    """A Workspace ready for `train_stage(ws, section, ..., name=stage)` (Stage B: LoRA attached, as `run_stage`
    does)."""
    base_dir = save_random_base(cfg, work_dir)
    ws = build_workspace(cfg, base_dir)
    if stage == "stage_b":
        ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
    return ws


class Snapshot:
    """Trainable state of a workspace, restored before each repetition so every run does the same work."""

    def __init__(self, ws):
        self.ws = ws
        self.state = {name: copy.deepcopy(m.state_dict()) for name, m in self._modules().items()}
        self.rng = torch.get_rng_state()

    def _modules(self) -> dict:
        return {"encoder": self.ws.encoder, "adapter": self.ws.adapter, "lm": self.ws.lm}

    def restore(self) -> None:
        for name, m in self._modules().items():
            m.load_state_dict(self.state[name])
        torch.set_rng_state(self.rng)
