"""Everything a stage needs, built from the config in one place: device, data splits, LM, tokenizer, contract,
encoder and adapter. Training, evaluation, the pyfunc model and the benchmarks all start from here."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentgate import distributed as dist
from latentgate.config import Config
from latentgate.data.readers import has_splits, load_examples
from latentgate.data.records import Example
from latentgate.data.synthetic import SyntheticSpec, make_splits
from latentgate.errors import ConfigError
from latentgate.model.base_lm import base_reference, embedding_rms, freeze, load_lm
from latentgate.model.contract import PrefixContract
from latentgate.model.latent import build_latent_modules


def resolve_device(name: str) -> torch.device:
    """run.device as a torch device; a CUDA device this machine does not have is a ConfigError (exit 2).

    Under torchrun / accelerate launch each rank takes its own GPU: `cuda` (or `auto` where CUDA is present) means
    cuda:LOCAL_RANK, and `cuda:N` is refused, since it would put every rank on GPU N."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if dist.launched():
        if device.index is not None:
            raise ConfigError(f"run.device={name} would put every rank of this multi-process run on one GPU",
                              "set run.device=cuda (each rank takes cuda:LOCAL_RANK)")
        device = torch.device("cuda", dist.local_rank())
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        where = f" (LOCAL_RANK={device.index})" if dist.launched() else ""
        raise ConfigError(f"run.device={name}{where} but this machine has {have}",
                          "set run.device=auto (CUDA when present, else CPU) or cpu, or start at most one process "
                          "per GPU")
    return device


def set_threads(n: int) -> None:
    """On 2 shared cores torch's default threading oversubscribes: set it deliberately."""
    if n > 0:
        torch.set_num_threads(n)


def load_splits(cfg: Config) -> dict[str, list[Example]]:
    """train / eval / probe. Train comes from the source (split `train` of a hub name or dataset folder); eval and
    probe from data.eval_source, else from data.eval_split of a hub name or dataset folder, else from the tail."""
    if cfg.data.source == "synthetic":
        d = cfg.data
        return make_splits(SyntheticSpec.of(d), d.seed, d.n_train, d.n_eval, d.n_probe)
    data = cfg.data

    def read(source: str, split: str = "train"):  # `split` matters for hub names and dataset folders only
        return load_examples(source, max_context_words=data.max_context_words, split=split)

    examples = read(data.source)
    if data.eval_source:
        held = read(data.eval_source, data.eval_split)
    elif has_splits(data.source) and data.eval_split != "train":  # the dataset's own held-out split
        held = read(data.source, data.eval_split)
    else:  # deterministic split of one file (or of the train split): eval and probe from the tail
        n_hold = data.n_eval + data.n_probe
        examples, held = examples[:-n_hold] if len(examples) > n_hold else examples, examples[-n_hold:]
    return {"train": examples[: data.n_train], "eval": held[: data.n_eval],
            "probe": held[data.n_eval : data.n_eval + data.n_probe] or held[: data.n_probe]}


@dataclass
class Workspace:
    cfg: Config
    device: torch.device
    lm: torch.nn.Module
    tokenizer: object
    contract: PrefixContract
    splits: dict[str, list[Example]] = field(default_factory=dict)
    encoder: torch.nn.Module | None = None
    adapter: torch.nn.Module | None = None
    enc_tok: object = None
    lora_counts: dict | None = None
    base_ref: dict | None = None  # name, revision, fingerprint: recorded in checkpoints, checked on load

    @property
    def embed(self) -> torch.nn.Embedding:
        return self.lm.get_input_embeddings()

    def latents(self, examples: list[Example]) -> torch.Tensor:
        """Encoder + adapter: [B, M, H] soft tokens for these examples."""
        ids, mask = self.enc_tok(examples, self.device)
        return self.adapter(self.encoder(ids, mask))

    @property
    def is_peft(self) -> bool:
        return hasattr(self.lm, "disable_adapter")

    def teacher(self):
        """Context in which the LM reads as the text teacher: LoRA disabled (the student keeps it)."""
        return self.lm.disable_adapter() if self.is_peft else nullcontext()


def build_workspace(cfg: Config, base_dir: str | Path, splits: dict | None = None,
                    with_latent: bool = True) -> Workspace:
    set_threads(cfg.run.threads)
    lm, tok = load_lm(str(base_dir), cfg, resolve_device(cfg.run.device))
    ws = workspace_from_lm(cfg, lm, tok, splits, with_latent)
    ws.base_ref = base_reference(str(base_dir), cfg, lm)
    return ws


def workspace_from_lm(cfg: Config, lm, tok, splits: dict | None = None, with_latent: bool = True) -> Workspace:
    """Freeze the LM, build the contract (and encoder + adapter) around it."""
    device = next(lm.parameters()).device
    freeze(lm)
    contract = PrefixContract.for_config(cfg, tok, getattr(lm, "generation_config", None))
    ws = Workspace(cfg, device, lm, tok, contract, splits if splits is not None else load_splits(cfg))
    if with_latent:
        ws.encoder, ws.adapter, ws.enc_tok = build_latent_modules(cfg, lm, tok, embedding_rms(lm))
        ws.encoder.to(device)
        ws.adapter.to(device)
    if cfg.base.gradient_checkpointing:
        enable_gradient_checkpointing(lm, ws.encoder)
    return ws


def enable_gradient_checkpointing(lm, encoder=None) -> None:
    """Non-reentrant checkpointing (gradients reach the soft prefix and the hooks' LoRA through a frozen LM). An
    lm_self encoder's hooks are re-entered in the mode each layer ran in, so recomputation is exact."""
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "checkpoint_context"):
        kwargs["context_fn"] = encoder.checkpoint_context
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def autocast(ws: "Workspace"):
    """Mixed precision where the frozen LM runs in half precision on CUDA; a no-op in fp32 (the CPU default)."""
    dtype = ws.embed.weight.dtype
    return torch.autocast(ws.device.type, dtype=dtype, enabled=ws.device.type == "cuda" and dtype != torch.float32)

