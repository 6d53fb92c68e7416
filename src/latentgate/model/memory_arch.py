"""The base LM's architecture from a config alone, built on the meta device (no weights are read or allocated).

`lm_arch(cfg)` reads `base.name`: `builtin` (the LlamaConfig `base_lm.build_builtin_lm` builds, its vocabulary from
the synthetic task), `shape:<name>` (a named shape, for planning only: no weights exist), or a local Hugging Face
folder (or a hub id already in the local cache; nothing is downloaded). The memory plan reads dimensions, parameter
counts and each layer's Linear shapes (what LoRA attaches to) from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from latentgate.config import Config
from latentgate.data.synthetic import SyntheticSpec, vocabulary
from latentgate.errors import ConfigError
from latentgate.model.base_lm import PROMPT_WORDS, SPECIALS

# Named shapes for `base.name=shape:<name>`: plan a model whose weights are not on this machine.
SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0),
}

_LAYER_LINEAR = re.compile(r"\.layers\.(\d+)\.(?:.*\.)?([^.]+)$")


@dataclass(frozen=True)
class Arch:
    """What the memory plan needs to know about a Llama-style decoder."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    total_params: int  # every parameter once (a tied head shares the embedding)
    head_params: int  # an untied lm_head (0 when tied): not part of the body an lm_copy encoder copies
    layer_linears: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every Linear in layer 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def body_params(self) -> int:
        return self.total_params - self.head_params

    def lora_params(self, r: int, targets, layers) -> int:
        """Trainable parameters of a rank-r LoRA on the Linear modules named in `targets` (the last component of the
        module name, as peft matches it) of `layers` (empty: every layer)."""
        n_layers = len({i for i in layers if 0 <= i < self.layers}) if layers else self.layers
        per_layer = sum(r * (i + o) for name, i, o in self.layer_linears if name in targets)
        return per_layer * n_layers

    def lora_inputs(self, targets) -> list[tuple[str, int]]:
        """(module name, input width) of the targeted Linear modules of one layer."""
        return [(name, i) for name, i, _ in self.layer_linears if name in targets]


def hf_config(cfg: Config):
    """The transformers config of `base.name`, without downloading anything."""
    name = cfg.base.name
    if name == "builtin":
        return builtin_llama_config(cfg)
    if name.startswith("shape:"):
        shape = name.split(":", 1)[1]
        if shape not in SHAPES:
            raise ConfigError(f"unknown model shape {shape!r}", f"use one of {sorted(SHAPES)} (base.name=shape:NAME)")
        return LlamaConfig(**SHAPES[shape])
    try:
        return AutoConfig.from_pretrained(name, revision=cfg.base.revision or None, local_files_only=True,
                                          trust_remote_code=cfg.base.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the config of base LM {name!r} offline: {str(err).splitlines()[0]}",
                          "pass a local model folder, or base.name=shape:llama-3-8b to plan a named shape") from None


def builtin_llama_config(cfg: Config):
    """The LlamaConfig `base_lm.build_builtin_lm` builds for this config (same fields; token ids do not change
    the memory, so they are left out)."""
    return LlamaConfig(vocab_size=builtin_vocab_size(cfg), hidden_size=cfg.base.hidden,
                       intermediate_size=cfg.base.intermediate, num_hidden_layers=cfg.base.layers,
                       num_attention_heads=cfg.base.heads, num_key_value_heads=cfg.base.heads,
                       max_position_embeddings=1024, tie_word_embeddings=True)


def builtin_vocab_size(cfg: Config) -> int:
    """len(build_builtin_tokenizer(vocabulary(spec))), without building the tokenizer."""
    words = SPECIALS + sorted(set(vocabulary(SyntheticSpec.of(cfg.data))) | set(PROMPT_WORDS))
    return len(dict.fromkeys(words))


def arch_from_hf_config(hcfg, name: str = "") -> Arch:
    """Instantiate the causal LM on the meta device and read its shapes."""
    dims = _dims(hcfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hcfg)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    linears = []
    for mod_name, module in model.named_modules():
        m = _LAYER_LINEAR.search(mod_name)
        if m and m.group(1) == "0" and isinstance(module, torch.nn.Linear):
            linears.append((m.group(2), module.in_features, module.out_features))
    if not linears:
        raise ConfigError(f"{name or hcfg.model_type}: no Linear modules under `.layers.N.`",
                          "the memory plan models Llama-style decoders (model.layers.N.self_attn / mlp)")
    return Arch(name=name or hcfg.model_type, tied=tied,
                total_params=total, head_params=0 if tied else head.weight.numel(),
                layer_linears=tuple(linears), **dims)


def _dims(hcfg) -> dict:
    try:
        hidden, layers, heads = hcfg.hidden_size, hcfg.num_hidden_layers, hcfg.num_attention_heads
    except AttributeError as err:
        raise ConfigError(f"{hcfg.model_type} config lacks {err.name}", "the memory plan models Llama-style decoders"
                          ) from None
    kv_heads = getattr(hcfg, "num_key_value_heads", None) or heads
    head_dim = getattr(hcfg, "head_dim", None) or hidden // heads
    intermediate = getattr(hcfg, "intermediate_size", None) or 4 * hidden
    return dict(model_type=hcfg.model_type, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, intermediate=intermediate, vocab=hcfg.vocab_size)


def lm_arch(cfg: Config) -> Arch:
    return arch_from_hf_config(hf_config(cfg), cfg.base.name)


def scratch_encoder_arch(cfg: Config, lm: Arch) -> Arch:
    """The `scratch` encoder body of latent.build_latent_modules: a small Llama of its own (hidden d_z when the LM's
    head count divides it), read the same way."""
    heads = max(1, lm.heads)
    hidden = cfg.model.d_z if cfg.model.d_z % heads == 0 else lm.hidden
    hcfg = LlamaConfig(vocab_size=lm.vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                       num_hidden_layers=cfg.model.encoder_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       tie_word_embeddings=True)
    arch = arch_from_hf_config(hcfg, "scratch encoder")
    return arch  # tied: its (unused) lm_head is the embedding, so body_params == the LlamaModel's parameters
