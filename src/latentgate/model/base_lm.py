"""The frozen LLM (and, read with the adapter disabled, its own text teacher).

Any Hugging Face causal LM loads by name or local path. The embedded default is a small Llama built from a
config, with a word-level tokenizer made by the `tokenizers` library from the synthetic task's vocabulary;
the `base` stage trains it on the text version of the task.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from latentgate.config import Config
from latentgate.data.synthetic import SyntheticSpec, vocabulary
from latentgate.errors import CheckpointError, ConfigError
from latentgate.tracking import progress

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PROMPT_WORDS = ["context", "question", "answer", ":"]


def build_builtin_tokenizer(vocab_words: list[str]):
    """Word-level tokenizer: every word of the synthetic task is one token, so answers are 1-3 tokens."""
    words = SPECIALS + sorted(set(vocab_words) | set(PROMPT_WORDS))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)


def builtin_tokenizer(cfg: Config):
    """The builtin LM's tokenizer: one token per word the synthetic task of `cfg.data` can emit."""
    return build_builtin_tokenizer(vocabulary(SyntheticSpec.of(cfg.data)))


def build_builtin_lm(cfg: Config, vocab_size: int, tokenizer):
    torch.manual_seed(cfg.base.seed)
    lcfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.base.hidden,
        intermediate_size=cfg.base.intermediate,
        num_hidden_layers=cfg.base.layers,
        num_attention_heads=cfg.base.heads,
        num_key_value_heads=cfg.base.heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(lcfg)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 for the frozen weights on a CUDA device that supports it, float32 elsewhere."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def load_lm(path_or_name: str, cfg: Config, device: torch.device):
    """Load a causal LM + tokenizer by hub id or local folder, straight onto `device` in the frozen dtype.
    No remote code unless the config asks for it."""
    dtype = resolve_dtype(cfg.base.dtype, device)
    local = Path(path_or_name)
    if not local.exists() and ("/" in path_or_name and path_or_name.startswith((".", "/"))):
        raise CheckpointError(f"base LM folder {path_or_name} does not exist", "train it with `latentgate base`")
    revision = cfg.base.revision or None
    if not local.exists():
        hub_download(path_or_name, revision, cfg.base.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path_or_name, trust_remote_code=cfg.base.trust_remote_code,
                                            revision=revision)
        lm = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=dtype, revision=revision,
                                                  attn_implementation=cfg.base.attn_implementation,
                                                  device_map={"": device},
                                                  trust_remote_code=cfg.base.trust_remote_code)
    except (OSError, ImportError) as err:
        raise ConfigError(f"cannot load base LM {path_or_name!r}: {str(err).splitlines()[0]}",
                          "pass a local model folder, or go online for a hub id") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]  # what from_pretrained reads


def hub_download(name: str, revision: str | None, remote_code: bool = False) -> None:
    """Fetch a hub LM's files into the HF cache before transformers loads them, so the download shows progress:
    tqdm's bars on a terminal (the CLI switches HF's own bars off, so plain tqdm draws them), a line at the start and
    the end without one, nothing with --quiet. Offline, or when the download fails, nothing happens here: loading
    then reports the problem (or fetches what is missing, without bars)."""
    if constants.HF_HUB_OFFLINE:
        return
    show = progress.mode()
    patterns = HUB_FILES + (["*.py"] if remote_code else [])
    bars = {}
    if show == "rich":
        bars = {"tqdm_class": tqdm}
    try:
        with progress.task(f"download {name}" if show == "plain" else None, unit="files"):
            snapshot_download(name, revision=revision, allow_patterns=patterns, **bars)
    except Exception:  # noqa: BLE001 - from_pretrained names the problem (gated, unknown id, network) in one line
        pass


FULL_HASH_LIMIT = 2 << 30  # larger weight files are fingerprinted by size + sampled chunks, not read whole
_CHUNK = 4 << 20


def base_reference(path_or_name: str, cfg: Config, lm=None) -> dict:
    """What a checkpoint records about its base LM: name, revision / commit, and a fingerprint of the weights
    (sha256 over config.json and every weight file; files over 2 GiB by size and their first, middle and last
    4 MiB, so a 16 GB LM is not re-read at every load)."""
    ref = {"name": cfg.base.name, "revision": cfg.base.revision or getattr(getattr(lm, "config", None),
                                                                            "_commit_hash", None)}
    folder = Path(path_or_name)
    if not folder.is_dir():
        return {**ref, "fingerprint": None}
    h = hashlib.sha256()
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json")
                     and p.name not in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as fh:
            if size <= FULL_HASH_LIMIT:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                for offset in (0, size // 2, max(0, size - _CHUNK)):
                    fh.seek(offset)
                    h.update(fh.read(_CHUNK))
    return {**ref, "fingerprint": h.hexdigest()}


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def embedding_rms(lm) -> float:
    """Per-element RMS of the LM's input embeddings: the scale the adapter calibrates latents to."""
    w = lm.get_input_embeddings().weight.detach().float()
    return float(w.pow(2).mean().sqrt())
