"""Stage B LoRA through peft, with per-layer / per-module trainable counts (the predecessor's "first N layers"
option matched nothing and nobody noticed)."""

from __future__ import annotations

import re
from collections import defaultdict

from peft import LoraConfig, get_peft_model

from latentgate.config import Config
from latentgate.errors import ConfigError

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def attach_lora(lm, cfg: Config):
    lcfg = LoraConfig(
        r=cfg.model.lora_r,
        lora_alpha=cfg.model.lora_alpha,
        lora_dropout=cfg.model.lora_dropout,
        target_modules=list(cfg.model.lora_targets),
        layers_to_transform=list(cfg.model.lora_layers) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(lm, lcfg)
    except ValueError as err:
        raise ConfigError(f"LoRA matched no module: {str(err).splitlines()[0]}",
                          "check model.lora_targets / model.lora_layers against the LM's module names") from None
    counts = lora_param_counts(model)
    if not counts["total"]:
        raise ConfigError("LoRA attached no trainable parameters", "check model.lora_targets / model.lora_layers")
    return model, counts


def lora_param_counts(model) -> dict:
    """Trainable LoRA parameters per layer and per target module, plus the total."""
    per_layer, per_module = defaultdict(int), defaultdict(int)
    total = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or "lora_" not in name:
            continue
        total += p.numel()
        m = _LAYER.search(name)
        per_layer[int(m.group(1)) if m else -1] += p.numel()
        module = name.split(".lora_")[0].rsplit(".", 1)[-1]
        per_module[module] += p.numel()
    return {"total": total, "per_layer": dict(sorted(per_layer.items())), "per_module": dict(per_module)}
