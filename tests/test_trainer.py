"""The trainer's modes and devices: only what trains is in train mode (the frozen LM never drops out, the KD teacher
included), and under torchrun each rank takes its own GPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from latentgate.errors import ConfigError
from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer
from latentgate.model.lora import attach_lora
from latentgate.tracking.tracker import NullTracker
from latentgate.train.trainer import set_training_modes, train_stage
from latentgate.train.workspace import load_splits, resolve_device, workspace_from_lm


def _dropout_ws(micro_cfg, stage: str, checkpointing: bool = False, lora_dropout: float = 0.0):
    """A micro workspace whose tiny Llama has attention dropout 0.5 (Stage B: LoRA attached, as run_stage does)."""
    cfg = copy.deepcopy(micro_cfg)
    cfg.base = dataclasses.replace(cfg.base, gradient_checkpointing=checkpointing)
    cfg.model = dataclasses.replace(cfg.model, lora_dropout=lora_dropout)
    setattr(cfg, stage, dataclasses.replace(getattr(cfg, stage), steps=2, probe_every=2, kd_weight=0.5,
                                            warmup_steps=0))
    tok = builtin_tokenizer(cfg)
    torch.manual_seed(0)
    lm = build_builtin_lm(cfg, len(tok), tok)
    for module in lm.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    ws = workspace_from_lm(cfg, lm, tok, load_splits(cfg))
    if stage == "stage_b":
        ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
    return ws, lm.get_decoder()


@pytest.mark.parametrize("stage,checkpointing", [("stage_b", False), ("stage_a", True)])
def test_the_frozen_lm_gives_the_same_output_twice_in_the_training_loop(micro_cfg, tmp_path, stage, checkpointing):
    """Every pass of the frozen LM during training (student, KD teacher, probe) is run a second time on the same
    inputs, in the mode it ran in: with dropout active (the LM switched to train(), as for LoRA or gradient
    checkpointing before) the two differ; in eval mode they agree to rounding."""
    ws, decoder = _dropout_ws(micro_cfg, stage, checkpointing)
    diffs: list[float] = []
    busy = []

    def again(module, args, kwargs, output):
        if busy:  # the second pass itself
            return
        busy.append(True)
        with torch.no_grad():
            second = module(*args, **kwargs).last_hidden_state
        busy.clear()
        diffs.append(float((second - output.last_hidden_state.detach()).abs().max()))

    decoder.register_forward_hook(again, with_kwargs=True)
    train_stage(ws, getattr(ws.cfg, stage), NullTracker(), tmp_path, name=stage)
    assert len(diffs) >= 4  # at least the student and teacher passes of both steps
    assert max(diffs) < 1e-5, diffs  # kernels with and without autograd may round apart; dropout 0.5 moves ~1


def test_only_the_trainable_modules_train(micro_cfg):
    """Encoder, adapter and LoRA's dropout train; every other module of the LM stays in eval mode. With gradient
    checkpointing the decoder layers alone are flagged training (HF recomputes only then), not their children."""
    ws, _ = _dropout_ws(micro_cfg, "stage_b", checkpointing=True, lora_dropout=0.1)
    set_training_modes(ws)
    assert ws.encoder.training and ws.adapter.training
    training = {name for name, m in ws.lm.named_modules() if m.training}
    lora_dropout = {name for name in training if ".lora_dropout" in name}
    layers = {name for name in training if name.split(".")[-1].isdigit() and ".layers." in name}
    assert lora_dropout and len(layers) == ws.cfg.base.layers
    assert training - lora_dropout - layers <= {"base_model.model.model"}, training  # the decoder's own flag
    assert not any(m.training for name, m in ws.lm.named_modules() if ".self_attn" in name and "lora" not in name)


def test_each_rank_takes_its_own_gpu_and_cuda_n_is_refused(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) run.device=cuda:N would put every rank on GPU N: refused in one line; `cuda`
    means cuda:LOCAL_RANK. Alone, cuda:N keeps its meaning."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="would put every rank of this multi-process run on one GPU"):
        resolve_device("cuda:0")
    if torch.cuda.device_count() >= 2:
        assert resolve_device("cuda") == torch.device("cuda", 1)
    else:
        with pytest.raises(ConfigError, match=r"run.device=cuda \(LOCAL_RANK=1\) but this machine has"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    if torch.cuda.device_count() >= 1:
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
    else:
        with pytest.raises(ConfigError, match=r"run.device=cuda:0 but this machine has no CUDA device"):
            resolve_device("cuda:0")
