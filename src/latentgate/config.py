"""The one config schema: typed, validated, with help text per field.

It feeds the CLI (`--set section.key=value`), the presets (YAML files in `presets/`), the MLproject parameters
(`overrides`), and the logged run params (`flatten(cfg)`). Unknown keys, wrong types, out-of-range and contradictory
values are rejected here, before anything trains. Turning text into values (overrides, presets, coercion) and the
per-value size and range checks live in `config_parse.py`; the names other modules use are re-exported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentgate.config_parse import (  # noqa: F401 - re-exported, so `from latentgate.config import X` still works
    MAX_LIST_ITEMS,
    MAX_LIST_TEXT,
    MAX_TEXT_CHARS,
    PRESET_DIR,
    check_range,
    check_size,
    cli_overrides,
    coerce,
    load_yaml_mapping,
    parse_set_args,
    preset_names,
    preset_overrides,
)
from latentgate.errors import ConfigError, did_you_mean
from latentgate.schema import EvalPath


def opt(default, help: str, **check):
    """A config field with its help text and optional checks: range (ge, gt, le, lt), choices, and max_len (the
    most characters of a string; every string field has at most MAX_TEXT_CHARS, every list MAX_LIST_ITEMS plain
    items)."""
    meta = {"help": help, **check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = opt("synthetic", "'synthetic' (built-in generator), a SQuAD v1.1 JSON/JSONL path, or a hub name")
    eval_source: str = opt("", "separate eval file for a file source (empty: split the source)")
    eval_split: str = opt("validation", "hub source: the split eval and probe questions come from")
    facts_per_context: int = opt(3, "synthetic: facts in each context (difficulty)", ge=1, le=12)
    num_entities: int = opt(120, "synthetic: invented entity names (vocabulary size)", ge=4)
    values_per_attribute: int = opt(16, "synthetic: values per attribute (vocabulary size)", ge=2)
    answer_length: int = opt(2, "synthetic: max words in an answer", ge=1, le=4)
    n_train: int = opt(20000, "training examples", ge=1)
    n_eval: int = opt(200, "held-out eval examples", ge=1)
    n_probe: int = opt(128, "fixed probe examples for first-token accuracy during training", ge=1)
    max_context_words: int = opt(512, "longer contexts are truncated (answer kept) or rejected", ge=8)
    seed: int = opt(1234, "data seed (splits use derived seeds)")


@dataclass
class BaseConfig:
    name: str = opt("builtin", "'builtin' (tiny Llama trained here) or a Hugging Face causal LM id / local path")
    trust_remote_code: bool = opt(False, "allow custom model code from the hub (off unless you ask)")
    revision: str = opt("", "hub id: branch, tag or commit to load (empty: the default branch)")
    dtype: str = opt("auto", "frozen LM weights dtype (auto: bfloat16 on CUDA, float32 on CPU); what trains is fp32",
                     choices=("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = opt("sdpa", "attention kernel", choices=("eager", "sdpa", "flash_attention_2"))
    gradient_checkpointing: bool = opt(False, "recompute LM activations in backward (less memory, ~30% more time)")
    layers: int = opt(4, "builtin: transformer layers", ge=1)
    hidden: int = opt(128, "builtin: hidden size", ge=8)
    heads: int = opt(4, "builtin: attention heads", ge=1)
    intermediate: int = opt(384, "builtin: MLP width", ge=8)
    steps: int = opt(1000, "builtin: optimizer steps of text-task training", ge=1)
    batch_size: int = opt(64, "builtin: batch size", ge=1)
    lr: float = opt(3e-3, "builtin: peak learning rate", gt=0)
    warmup_steps: int = opt(100, "builtin: warm-up optimizer steps", ge=0)
    min_lr_ratio: float = opt(0.05, "builtin: the cosine schedule ends at base.lr x this", ge=0, le=1)
    weight_decay: float = opt(0.01, "builtin: AdamW weight decay", ge=0)
    beta1: float = opt(0.9, "builtin: AdamW beta1", ge=0, lt=1)
    beta2: float = opt(0.98, "builtin: AdamW beta2", ge=0, lt=1)
    clip_norm: float = opt(1.0, "builtin: clip the LM's grad norm (0: off)", ge=0)
    eval_every: int = opt(250, "builtin: text F1 check every N steps (0: only at the end)", ge=0)
    gate_min_f1: float = opt(0.5, "sanity gate (per LM): text-teacher F1 on eval must reach this", ge=0, le=1)
    gate_max_nll: float = opt(2.0, "sanity gate (per LM): text-teacher answer NLL/token must stay below this", gt=0)
    seed: int = opt(0, "builtin: init and batching seed")


@dataclass
class ModelConfig:
    encoder: str = opt("auto", "latent encoder: lm_self (the frozen LM encodes, with an encoder-only LoRA), lm_copy "
                       "(trainable copy of the LM body), scratch, or frozen MiniLM; auto: lm_copy for the builtin LM, "
                       "lm_self for any other", choices=("auto", "lm_self", "lm_copy", "scratch", "minilm"))
    encoder_lora_r: int = opt(16, "lm_self: rank of the encoder-only LoRA", ge=1)
    encoder_lora_alpha: int = opt(32, "lm_self: alpha of the encoder-only LoRA", ge=1)
    encoder_layers: int = opt(2, "scratch encoder: layers", ge=1)
    num_latents: int = opt(8, "M: soft tokens in the prefix", ge=1, le=4096)
    d_z: int = opt(128, "latent width", ge=1)
    anchor: str = opt("answer :", "anchor text between latent slots and the answer (part of the prefix contract); "
                      "at most 1024 characters (a few hundred tokens)", max_len=1024)
    prompt_format: str = opt("plain", "plain ('context : ... question : ... answer :') or chat (the tokenizer's chat "
                             "template around the same text); part of the prefix contract", choices=("plain", "chat"))
    answer_end: str = opt("auto", "what ends an answer target: eos (the end token: the chat template's end of turn "
                          "with chat prompts, else the tokenizer's EOS), none (nothing: the "
                          "LM is never scored on an end token it would not emit); auto: eos for the builtin LM and "
                          "chat prompts, none for a plain prompt on any other LM", choices=("auto", "eos", "none"))
    stop_strings: list = opt(["\n"], "generation also stops at a token containing one of these (and the text is cut "
                             "there); end-token ids come from the tokenizer and generation_config")
    lora_r: int = opt(8, "Stage B LoRA rank", ge=1)
    lora_alpha: int = opt(16, "Stage B LoRA alpha", ge=1)
    lora_dropout: float = opt(0.0, "Stage B LoRA dropout", ge=0, lt=1)
    lora_targets: list = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "module names LoRA attaches to")
    lora_layers: list = opt([], "layer indices LoRA attaches to (empty: all)")


@dataclass
class StageConfig:
    steps: int = opt(200, "budget in OPTIMIZER steps (micro-steps = steps x grad_accum)", ge=1)
    batch_size: int = opt(32, "micro-batch size", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    lr: float = opt(1e-3, "peak learning rate", gt=0)
    schedule: str = opt("cosine", "LR schedule", choices=("constant", "cosine"))
    warmup_steps: int = opt(20, "warm-up optimizer steps", ge=0)
    min_lr: float = opt(1e-5, "cosine: final learning rate", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    clip_norm: float = opt(1.0, "clip the grad norm of ALL trainable params (0: off)", ge=0)
    tf_weight: float = opt(1.0, "teacher-forced CE on the whole answer", ge=0)
    first_token_ce_weight: float = opt(3.0, "extra CE on the first answer token", ge=0)
    k: int = opt(4, "K: answer tokens in the K-token CE", ge=1)
    kce_weight: float = opt(0.5, "K-token CE weight", ge=0)
    kd_weight: float = opt(0.5, "KD from the text teacher (same LM reading the full text)", ge=0)
    kd_temperature: float = opt(1.0, "KD temperature", gt=0)
    scheduled_sampling: bool = opt(False, "mix model predictions into the answer inputs (exposure bias fix)")
    p_gold_floor: float = opt(0.5, "scheduled sampling: p(gold) anneals from 1.0 to this", ge=0, le=1)
    probe_every: int = opt(25, "probe first-token accuracy every N optimizer steps", ge=1)
    checkpoint_every: int = opt(0, "checkpoint every N optimizer steps (0: only at the end)", ge=0)
    seed: int = opt(0, "init, batching and sampling seed")


@dataclass
class EvalConfig:
    max_new_tokens: int = opt(8, "generation cap (never taken from the gold answer)", ge=1)
    batch_size: int = opt(200, "generation batch size", ge=1)
    paths: list = opt(list(EvalPath.ALL), "paths to score")


@dataclass
class RunConfig:
    experiment: str = opt("latentgate", "MLflow experiment name (at most 500 characters, MLflow's limit)",
                          max_len=500)
    threads: int = opt(2, "torch intra-op threads (0: torch default)", ge=0)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (cuda must be present where the run trains)")
    output_dir: str = opt("runs", "local folder for run outputs (checkpoints, jsonl)")
    registry_base: str = opt("latentgate-base", "registered model name of the base LM")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage_a: StageConfig = field(default_factory=StageConfig)
    stage_b: StageConfig = field(default_factory=lambda: StageConfig(lr=5e-4))
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        """Refuse out-of-range and contradictory values; returns self. Pure: it changes nothing (`resolve_auto`
        turns `auto` into a value) and reads nothing of this machine (`check_machine` does), so a logged config
        validates anywhere."""
        builtin = self.base.name == "builtin"
        if builtin and self.model.prompt_format == "chat":
            raise ConfigError("model.prompt_format=chat needs a tokenizer with a chat template; the builtin LM has "
                              "none",
                              "use model.prompt_format=plain, or set base.name to a chat model")
        if self.base.dtype == "float16":  # training runs no GradScaler: fp16 gradients would underflow unseen
            raise ConfigError("base.dtype=float16 needs a gradient scaler, which training does not use",
                              "set base.dtype=bfloat16 (or auto, float32)")
        for section in dataclasses.fields(self):
            obj = getattr(self, section.name)
            for f in dataclasses.fields(obj):
                check_range(f"{section.name}.{f.name}", getattr(obj, f.name), f.metadata)
        for name in ("stage_a", "stage_b"):
            stage: StageConfig = getattr(self, name)
            if stage.warmup_steps >= stage.steps and stage.warmup_steps > 0:
                raise ConfigError(f"{name}.warmup_steps={stage.warmup_steps} is not below {name}.steps={stage.steps}",
                                  f"lower {name}.warmup_steps or raise {name}.steps")
            if stage.schedule == "cosine" and stage.min_lr > stage.lr:
                raise ConfigError(f"{name}.min_lr={stage.min_lr} exceeds {name}.lr={stage.lr}",
                                  f"set {name}.min_lr <= lr")
            if stage.k > self.eval.max_new_tokens:
                raise ConfigError(f"{name}.k={stage.k} exceeds the answer budget eval.max_new_tokens="
                                  f"{self.eval.max_new_tokens}", f"lower {name}.k")
        if builtin and self.base.hidden % self.base.heads:
            raise ConfigError(f"base.hidden={self.base.hidden} is not divisible by base.heads={self.base.heads}",
                              "pick base.heads dividing base.hidden")
        if self.data.source != "synthetic" and builtin:
            raise ConfigError("the builtin base LM only knows the synthetic task's vocabulary",
                              "use data.source=synthetic, or set base.name to a Hugging Face model")
        unknown = set(self.eval.paths) - set(EVAL_PATHS)
        if unknown:
            raise ConfigError(f"unknown eval path(s) {sorted(unknown)}", f"choose from {list(EVAL_PATHS)}")
        if not self.eval.paths:
            raise ConfigError("eval.paths is empty: eval would score nothing", "list at least 'latent' in eval.paths")
        if EvalPath.LATENT not in self.eval.paths:
            raise ConfigError(f"eval.paths={self.eval.paths} lacks 'latent', the path every eval scores",
                              f"list 'latent' in eval.paths (choose from {list(EVAL_PATHS)})")
        _check_model_bounds(self)
        return self


EVAL_PATHS = EvalPath.ALL
BUILTIN_MAX_POSITIONS = 1024  # model/base_lm.py: the builtin Llama's max_position_embeddings
BYTES_PER_EXAMPLE = 4096  # generous: a synthetic example, its tokens and batches, as Python objects
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# MLflow refuses '/' and ':' in registered model names; '@' separates the alias in models:/<name>@<alias>
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


def _check_model_bounds(cfg: Config) -> None:
    """Bounds that follow from the model and the registry, the same on every machine (a value past them would
    exceed the LM's positions or fail late in the registry)."""
    if not _DEVICE.fullmatch(cfg.run.device):
        raise ConfigError(f"run.device={cfg.run.device!r} is not auto, cpu, cuda or cuda:N", "set run.device=auto")
    if cfg.base.name == "builtin":
        need = cfg.model.num_latents + len(cfg.model.anchor.split()) + cfg.eval.max_new_tokens + 2
        if need > BUILTIN_MAX_POSITIONS:
            raise ConfigError(f"model.num_latents={cfg.model.num_latents} soft tokens plus the anchor and "
                              f"eval.max_new_tokens={cfg.eval.max_new_tokens} need {need} positions; the builtin "
                              f"LM has {BUILTIN_MAX_POSITIONS}", "lower model.num_latents")
    for key in ("registry_base",):
        name = getattr(cfg.run, key)
        if not _MODEL_NAME.fullmatch(name):
            raise ConfigError(f"run.{key}={name!r} is not a valid registered model name",
                              "use letters, digits, '_', '-' and '.' only (no '/', ':', '@' or spaces)")
    if not cfg.run.experiment.strip():
        raise ConfigError("run.experiment is empty", "set run.experiment to an MLflow experiment name")


# ---- auto values and the machine a run starts on ------------------------------------------------------------

def resolve_auto(cfg: Config) -> Config:
    """A new Config whose `model.encoder` and `model.answer_end` say what `auto` means for this base LM and prompt
    format; `cfg` is left as it was. (`base.dtype` and `run.device` stay `auto` in the config: they follow the
    device, and are resolved where the model is loaded.)"""
    builtin = cfg.base.name == "builtin"
    model = cfg.model
    encoder = ("lm_copy" if builtin else "lm_self") if model.encoder == "auto" else model.encoder
    answer_end = model.answer_end
    if answer_end == "auto":
        answer_end = "eos" if builtin or model.prompt_format == "chat" else "none"
    return dataclasses.replace(cfg, model=dataclasses.replace(model, encoder=encoder, answer_end=answer_end))


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return 1 << 40


@dataclass(frozen=True)
class Machine:
    """What a run may use where it starts: CPU cores and physical memory."""
    cores: int
    ram_bytes: int

    @classmethod
    def this(cls) -> Machine:
        return cls(os.cpu_count() or 1, _ram_bytes())


def check_machine(cfg: Config, machine: Machine) -> None:
    """Bounds that follow from the machine a run starts on (a value past them would exhaust its threads or
    memory), checked before anything is tracked or trained. Never called on a logged config being rebuilt: that
    run was sized for the machine it ran on."""
    if cfg.run.threads > 4 * machine.cores:
        raise ConfigError(f"run.threads={cfg.run.threads} exceeds 4 x the {machine.cores} CPU cores of this machine",
                          f"set run.threads <= {4 * machine.cores} (0: torch's default)")
    n = cfg.data.n_train + cfg.data.n_eval + cfg.data.n_probe
    most = machine.ram_bytes // BYTES_PER_EXAMPLE
    if n > most:
        room = max(1, most - cfg.data.n_eval - cfg.data.n_probe)
        raise ConfigError(f"data.n_train + n_eval + n_probe = {n} examples would not fit this machine's memory "
                          f"(at most {most})", f"lower data.n_train (<= {room})")
    out = Path(cfg.run.output_dir).expanduser()
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"run.output_dir={cfg.run.output_dir!r}: {folder} is a file, not a folder",
                                  "point run.output_dir at a folder (it is created if missing)")
            break


# ---- flattening, overrides, presets ---------------------------------------------------------------------------

def fields_table() -> dict[str, tuple[type, Any, str]]:
    """Every dotted key -> (type, default, help). The CLI help, the MLproject test and the docs read this."""
    out = {}
    root = Config()
    for section in dataclasses.fields(Config):
        obj = getattr(root, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            out[f"{section.name}.{f.name}"] = (hints[f.name], getattr(obj, f.name), f.metadata.get("help", ""))
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """The resolved config as one flat dict of dotted keys: logged as run params in full."""
    return {f"{s}.{k}": v for s, sec in dataclasses.asdict(cfg).items() for k, v in sec.items()}


def config_hash(cfg: Config, sections: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> str:
    """Short sha256 of the resolved config (or of some sections, minus keys starting with `exclude`)."""
    flat = flatten(cfg)
    if sections:
        flat = {k: v for k, v in flat.items() if k.split(".")[0] in sections}
    if exclude:
        flat = {k: v for k, v in flat.items() if not k.startswith(exclude)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-key overrides; an unknown key gets a did-you-mean."""
    table = fields_table()
    for key, raw in overrides.items():
        if key not in table:
            raise ConfigError(f"unknown config key {key!r}",
                              did_you_mean(key, table, "see `latentgate config --list`", 0.5, dotted=True))
        section, name = key.split(".", 1)
        obj = getattr(cfg, section)
        meta = next(f.metadata for f in dataclasses.fields(obj) if f.name == name)
        if isinstance(raw, str):  # before parsing it (and before an error could echo it)
            text_limit = meta if table[key][0] is str else {"max_len": MAX_LIST_TEXT} if table[key][0] is list else {}
            check_size(key, raw, text_limit)
        value = coerce(key, table[key][0], raw)
        check_size(key, value, meta)
        setattr(obj, name, value)
    return cfg


def resolve(preset: str | None = "smoke", overrides: dict[str, Any] | None = None,
            machine: Machine | None = None) -> Config:
    """Preset + overrides -> the Config of a run that starts on `machine` (default: this one): validated, `auto`
    resolved, checked against the machine. This is the only way a new run gets its config."""
    cfg = Config()
    if preset:
        apply_overrides(cfg, preset_overrides(preset))
    apply_overrides(cfg, overrides or {})
    cfg = resolve_auto(cfg.validate())
    check_machine(cfg, machine or Machine.this())
    return cfg


def from_flat(flat: dict[str, Any]) -> Config:
    """Rebuild a Config from logged params or a manifest (strings are coerced back to field types): validated and
    `auto` resolved, but never checked against this machine (resume, evidence and serving read configs of runs that
    may have run elsewhere)."""
    table = fields_table()
    return resolve_auto(apply_overrides(Config(), {k: v for k, v in flat.items() if k in table}).validate())


def dumps(cfg: Config) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)

