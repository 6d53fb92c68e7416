"""Memory plan: the peak memory of Stage A, Stage B and eval, from the config alone, and a refusal of runs that will
not fit (`memory_fit.check_fits`). Per-layer bytes: `memory_layers`.

The base LM's architecture comes from `memory_arch` (built on the meta device). What is counted, per stage:

* frozen LM weights, in the frozen dtype (`base.dtype`; auto: bfloat16 on CUDA, float32 on CPU);
* trainable parameters in fp32, their gradients, and AdamW's two fp32 states;
* activations kept for backward (`layer_bytes_per_token`), with and without `base.gradient_checkpointing`;
* the logits at the answer positions, and the transients of the teacher pass, backward and the optimizer step.

A training step runs, in order: the encoder forward (its activations kept), the text teacher (`kd_weight > 0`: no
grad, only its working set and its answer logits), the decoding forward over the latent prefix + answer (kept for
backprop to the latents), the losses, backward, AdamW. The peak of a stage is the largest of these moments:

    teacher     = encoder activations + teacher working set
    loss        = encoder + decoder activations + logits (12 bytes per answer logit, 32 with KD; measured)
    backward    = max(activations, grads) + one layer's gradient temporaries   (activations + grads if grad_accum > 1)
    optimizer   = grads + AdamW temporaries (CUDA foreach: one fp32 copy of the largest group; CPU: 2 x the largest
                  tensor)
    probe       = the in-training probe (`eval.probe.run_probe`, every `probe_every` steps, gradients freed): the
                  encoder's no-grad pass over the whole probe set, the scoring pass, greedy F1 (`memory_eval`)
    peak        = frozen + trainable + AdamW states + max(teacher, loss, backward, optimizer, probe ...)

Under data parallelism each rank runs 1/world of the training batch (`distributed.shard`): the plan is per rank
(`Target.world_size`, from WORLD_SIZE). The probe runs the whole probe set on every rank; eval runs on rank 0.
Eval (`memory_eval.eval_phases`): the encoder pass, then per path generation (KV cache) and the scoring pass, for the
latent paths and, when eval.paths has one, the text-teacher paths (the longest text prompt).

Encoders (`model.encoder`): `lm_copy` is a trainable fp32 copy of the LM body (everything trains);
`lm_self` has no copy: the frozen LM encodes context + question + M memory tokens with an encoder-only LoRA
(`encoder_lora_r` on `lora_targets`), the M last states go through Linear(hidden, d_z), so the LM runs twice with
grad per step; `scratch` is a small trainable Llama; `minilm` is a frozen MiniLM (no grad). Each of the three
non-`lm_self` kinds adds the LatentEncoder head (LayerNorm, M queries, cross-attention, Linear to d_z). The adapter
is Linear(d_z, hidden) -> GELU -> Linear(hidden, hidden).

On CUDA with a half-precision LM, `train.workspace.autocast` runs the step under autocast: trainable fp32 bodies
compute in half precision (their Linear inputs are kept as half copies) and autocast keeps a half copy of every
trainable Linear weight until backward. Gradient checkpointing applies to the LM's own passes (decoding, the teacher,
the lm_self encoding); the lm_copy body is copied before the workspace enables it, so it is not checkpointed.
The figures are live tensor bytes of a steady-state step (AdamW states exist), checked against measured peaks of
real steps on CPU in tests/test_memory_plan.py (training) and tests/test_memory_measured.py (probe, eval). On CUDA
the peak adds `cuda_overhead`: the CUDA context and library workspaces, and the caching allocator's fragmentation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from latentgate.config import Config, resolve_auto
from latentgate.model.base_lm import resolve_dtype
from latentgate.model.memory_arch import Arch, lm_arch, scratch_encoder_arch
from latentgate.model.memory_eval import eval_phases, probe_phases
from latentgate.model.memory_layers import (
    Lora,
    backward_temp_per_token,
    body_activations,
    nograd_bytes_per_token,
)
from latentgate.schema import EvalPath

GiB = 2**30
DEFAULT_SEQ_LEN = 512
DEFAULT_ANSWER_TOKENS = 32  # a real LM's answers: a few words of BPE tokens, plus the end token
PREFIX_TOKENS = {"plain": 8, "chat": 48}  # head + anchor ids of a real tokenizer (BOS + " answer :" / chat template)
LOGIT_BYTES = {False: 12, True: 32}  # per answer logit, at the loss (kd off / on): tests/test_memory_plan.py measures
# CUDA overhead beyond live tensors (not measured here: no GPU has run this code yet; the GPU check is to replace
# these with measured figures). The CUDA context with the kernels of torch, cuBLAS and cuDNN loaded takes about
# 300-500 MiB on an H100 with CUDA 12 lazy module loading (PyTorch "CUDA semantics" notes: the context and the
# library handles are not reported by memory_allocated(); NVIDIA's lazy-loading docs), plus cuBLAS workspaces
# (32 MiB per handle and stream on Hopper, CUBLAS_WORKSPACE_CONFIG): CUDA_CONTEXT takes the upper end.
# The caching allocator rounds blocks and splits segments, so reserved memory exceeds live tensors; with the
# varying shapes of eval and probes 10% of the live peak is a margin, not a bound (expandable_segments lowers it).
CUDA_CONTEXT = 512 * 2**20
CUDA_FRAGMENTATION = 0.10
MINILM = dict(hidden=384, layers=6, heads=12, intermediate=1536, params=22_713_216)  # all-MiniLM-L6-v2, fp32
STAGE_LABELS = {"stage_a": "Stage A", "stage_b": "Stage B", "eval": "eval"}
PROBE_BATCH = 256  # eval.probe.run_probe's batch size: the whole probe set (data.n_probe, 128 by default) at once


# ---- shapes, target, stages -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shapes:
    """Token counts of one step. Encoder reads `seq_len` text tokens (lm_self: + M memory tokens); the decoder reads
    prefix_tokens + M + answer_tokens; the teacher prefix_tokens + seq_len + answer_tokens."""

    seq_len: int
    prefix_tokens: int
    answer_tokens: int


def default_shapes(cfg: Config, seq_len: int = DEFAULT_SEQ_LEN, answer_tokens: int | None = None,
                   prefix_tokens: int | None = None) -> Shapes:
    if cfg.base.name == "builtin":  # word-level tokenizer: BOS + one token per anchor word; answer words + EOS
        prefix = 1 + len(cfg.model.anchor.split())
        answer = cfg.data.answer_length + 1
    else:
        prefix, answer = PREFIX_TOKENS[cfg.model.prompt_format], DEFAULT_ANSWER_TOKENS
    return Shapes(seq_len, prefix if prefix_tokens is None else prefix_tokens,
                  answer if answer_tokens is None else answer_tokens)


@dataclass(frozen=True)
class Target:
    """Where the run happens and how: what the memory depends on beyond the config's shapes."""

    device_type: str  # "cuda" or "cpu"
    dtype: torch.dtype  # frozen LM weights
    ckpt: bool
    world_size: int = 1  # data-parallel ranks: each runs 1/world_size of a training batch

    def per_rank(self, batch: int) -> int:
        """The rows one rank runs of a global batch (`distributed.shard` deals indices round-robin)."""
        return -(-batch // self.world_size)

    @property
    def act(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def autocast(self) -> bool:  # train.workspace.autocast: half-precision LM on CUDA
        return self.device_type == "cuda" and self.act != 4


def target_for(cfg: Config, device: str | torch.device | None = None, dtype: str | None = None,
               world_size: int | None = None) -> Target:
    """The device a run of `cfg` uses (run.device; auto: CUDA when present), and its frozen dtype (base.dtype, or
    `dtype`; auto: bfloat16 on CUDA, float32 on CPU), on `world_size` ranks (default: WORLD_SIZE, as torchrun sets
    it). A CUDA target can be planned on a CPU-only host."""
    name = str(device) if device is not None else cfg.run.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(name).type
    dname = dtype or cfg.base.dtype
    if dname == "auto":
        if device_type != "cuda":
            resolved = torch.float32
        elif torch.cuda.is_available():
            resolved = resolve_dtype("auto", torch.device(name))
        else:  # planning a GPU run from a CPU host: any current GPU runs bf16
            resolved = torch.bfloat16
    else:
        resolved = getattr(torch, dname)
    ranks = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    return Target(device_type, resolved, cfg.base.gradient_checkpointing, max(1, ranks))


@dataclass
class StagePlan:
    stage: str  # stage_a, stage_b, eval
    parts: dict[str, int]  # frozen, trainable, grads, adam, activations, logits (bytes)
    phases: dict[str, int]  # bytes above the static parts at each moment of the step
    static: int
    activations_alt: int = 0  # saved activations with checkpointing toggled
    peak_alt: int = 0  # the peak with checkpointing toggled
    cuda: bool = False  # add cuda_overhead to the peak

    @property
    def live_peak(self) -> int:
        """Live tensor bytes at the largest moment (what tests/test_memory_*.py measure on CPU)."""
        return self.static + max(self.phases.values())

    @property
    def overhead(self) -> int:
        return cuda_overhead(self.live_peak) if self.cuda else 0

    @property
    def peak(self) -> int:
        return self.live_peak + self.overhead

    @property
    def at(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def label(self) -> str:
        return STAGE_LABELS[self.stage]


def cuda_overhead(live_bytes: int) -> int:
    """What a CUDA process holds beyond its live tensors: the context + library workspaces and the caching
    allocator's fragmentation margin (CUDA_CONTEXT, CUDA_FRAGMENTATION: sources above)."""
    return CUDA_CONTEXT + int(CUDA_FRAGMENTATION * live_bytes)


@dataclass
class MemoryPlan:
    cfg: Config
    arch: Arch
    target: Target
    shapes: Shapes
    stages: list[StagePlan] = field(default_factory=list)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)


# ---- encoders ---------------------------------------------------------------------------------------------------

@dataclass
class EncoderCost:
    trainable: int  # parameters (fp32)
    frozen_bytes: int  # weights it adds that do not train
    largest: int  # largest trainable tensor (CPU AdamW temporaries)
    activations: int  # kept for backward over the step's batch
    bw_temp: int
    cast_cache: int  # autocast's half copies of trainable Linear weights
    eval_bytes: int  # no-grad pass over `nograd_batch` examples (the probe set, or an eval batch)


def head_params(he: int, m: int, d_z: int) -> int:
    """latent.LatentEncoder around a body of width he: LayerNorm, M queries, MultiheadAttention, Linear to d_z."""
    return 2 * he + m * he + (4 * he * he + 4 * he) + he * d_z + d_z


def adapter_params(d_z: int, hidden: int) -> int:
    return d_z * hidden + hidden + hidden * hidden + hidden + 1


def _linear_params(a: Arch) -> int:
    return a.layers * sum(i * o for _, i, o in a.layer_linears)


def encoder_cost(cfg: Config, a: Arch, t: Target, batch: int, nograd_batch: int, shapes: Shapes,
                 loras_in_encoding: tuple[Lora, ...], ckpt: bool) -> EncoderCost:
    m, d_z, s = cfg.model.num_latents, cfg.model.d_z, shapes.seq_len
    kind, attn = cfg.model.encoder, cfg.base.attn_implementation
    if kind == "lm_self":
        enc_lora = Lora(cfg.model.encoder_lora_r, tuple(cfg.model.lora_targets), tuple(cfg.model.lora_layers))
        trainable = a.lora_params(enc_lora.r, enc_lora.targets, enc_lora.layers) + m * a.hidden + a.hidden * d_z + d_z
        acts = body_activations(a, batch, s + m, act=t.act, ckpt=ckpt, autocast=t.autocast, attn=attn,
                                loras=(enc_lora,) + loras_in_encoding)
        return EncoderCost(trainable, 0, max(m, d_z) * a.hidden, acts,
                           batch * (s + m) * backward_temp_per_token(a, t.act), 0,
                           # + its inputs: the token embeddings and their concatenation with the memory tokens
                           nograd_batch * (s + m) * (nograd_bytes_per_token(a, s + m, t.act, attn)
                                                     + 2 * a.hidden * t.act))
    if kind == "minilm":
        he = MINILM["hidden"]
        mini = replace(a, hidden=he, intermediate=MINILM["intermediate"], heads=MINILM["heads"],
                       kv_heads=MINILM["heads"], head_dim=he // MINILM["heads"])
        head_acts = batch * s * (4 * he + _head_bytes_per_token(he, mini.heads, 4))
        return EncoderCost(head_params(he, m, d_z), 4 * MINILM["params"], max(he * he * 3, m * he), head_acts,
                           batch * s * 8 * he, 0, nograd_batch * s * nograd_bytes_per_token(mini, s, 4, attn))
    body = a if kind == "lm_copy" else scratch_encoder_arch(cfg, a)
    act = 2 if t.autocast else 4
    he = body.hidden
    # not checkpointed: the workspace enables checkpointing on the LM after build_latent_modules made the copy
    acts = body_activations(body, batch, s, act=act, ckpt=False, trainable=True, autocast=t.autocast, attn=attn,
                            embeds_in=False)
    acts += batch * s * _head_bytes_per_token(he, body.heads, act)
    largest = max(body.vocab * he, max(i * o for _, i, o in body.layer_linears), 3 * he * he)
    return EncoderCost(body.body_params + head_params(he, m, d_z), 0, largest, acts,
                       batch * s * backward_temp_per_token(body, act), 2 * _linear_params(body) if t.autocast else 0,
                       nograd_batch * s * nograd_bytes_per_token(body, s, 4, attn))


def _head_bytes_per_token(he: int, heads: int, act: int) -> int:
    """LatentEncoder head per encoder token: LayerNorm output (fp32), the packed key/value projection (and its
    contiguous copy, which attention keeps), the key-padding mask as a float bias per head."""
    return 4 * he + 2 * he * act + 2 * he * act + 4 * heads


# ---- the plan ---------------------------------------------------------------------------------------------------

def plan_memory(cfg: Config, seq_len: int = DEFAULT_SEQ_LEN, *, device: str | torch.device | None = None,
                dtype: str | None = None, answer_tokens: int | None = None, prefix_tokens: int | None = None,
                arch: Arch | None = None, stages=("stage_a", "stage_b", "eval"),
                world_size: int | None = None) -> MemoryPlan:
    """Peak memory of each stage of `cfg` on one rank (validated here: `model.encoder=auto` resolves)."""
    cfg = resolve_auto(cfg.validate())
    a = arch or lm_arch(cfg)
    t = target_for(cfg, device, dtype, world_size)
    shapes = default_shapes(cfg, seq_len, answer_tokens, prefix_tokens)
    plan = MemoryPlan(cfg, a, t, shapes)
    for stage in stages:
        if stage == "eval":
            plan.stages.append(_eval_plan(cfg, a, t, shapes))
        else:
            main = _train_plan(cfg, a, t, shapes, stage, t.ckpt)
            alt = _train_plan(cfg, a, t, shapes, stage, not t.ckpt)
            main.activations_alt, main.peak_alt = alt.parts["activations"], alt.peak
            plan.stages.append(main)
    return plan


def _train_plan(cfg: Config, a: Arch, t: Target, shapes: Shapes, stage: str, ckpt: bool) -> StagePlan:
    st = getattr(cfg, stage)
    b, m, attn = t.per_rank(st.batch_size), cfg.model.num_latents, cfg.base.attn_implementation
    probe_batch = min(cfg.data.n_probe, PROBE_BATCH)
    stage_lora = (Lora(cfg.model.lora_r, tuple(cfg.model.lora_targets), tuple(cfg.model.lora_layers),
                       cfg.model.lora_dropout),) if stage == "stage_b" else ()
    # Stage B's LoRA is on the LM itself, so it is active in an lm_self encoding pass too (conservative)
    enc = encoder_cost(cfg, a, t, b, probe_batch, shapes, stage_lora, ckpt)
    lora_n = a.lora_params(cfg.model.lora_r, cfg.model.lora_targets, cfg.model.lora_layers) if stage_lora else 0
    groups = {"encoder": enc.trainable, "adapter": adapter_params(cfg.model.d_z, a.hidden), "lora": lora_n}
    n_train = sum(groups.values())
    dec_s = shapes.prefix_tokens + m + shapes.answer_tokens
    dec = body_activations(a, b, dec_s, act=t.act, ckpt=ckpt, autocast=t.autocast, attn=attn, loras=stage_lora)
    adapter_acts = b * m * (cfg.model.d_z + 4 * a.hidden) * 4
    kd = st.kd_weight > 0
    logits = b * (shapes.answer_tokens + 1) * a.vocab * LOGIT_BYTES[kd]
    teacher_s = shapes.prefix_tokens + shapes.seq_len + shapes.answer_tokens
    teacher = b * teacher_s * nograd_bytes_per_token(a, teacher_s, t.act, attn) if kd else 0
    grads = 4 * n_train
    held = grads if st.grad_accum > 1 else 0  # earlier micro-batches' gradients stay through this one
    acts = enc.activations + dec + adapter_acts
    bw_temp = max(enc.bw_temp, b * dec_s * backward_temp_per_token(a, t.act))
    if t.device_type == "cuda":  # foreach AdamW: sqrt(exp_avg_sq) for a whole param group at once
        opt_temp = 4 * max(groups.values())
    else:  # single-tensor AdamW: sqrt and the division, one tensor at a time
        opt_temp = 2 * 4 * max(enc.largest, a.hidden * a.hidden)
    phases = {
        "teacher": enc.activations + teacher + enc.cast_cache + held,
        "loss": acts + logits + enc.cast_cache + held,
        "backward": (acts + grads if held else max(acts, grads)) + bw_temp + enc.cast_cache,
        "optimizer": grads + opt_temp,
        # after the optimizer step, gradients freed (zero_grad(set_to_none=True))
        **probe_phases(a, probe_batch, shapes.prefix_tokens + m, shapes.answer_tokens, cfg.eval.max_new_tokens,
                       t.act, attn, enc.eval_bytes),
    }
    parts = {"frozen": a.total_params * t.act + enc.frozen_bytes, "trainable": 4 * n_train, "grads": grads,
             "adam": 8 * n_train, "activations": acts, "logits": logits}
    return StagePlan(stage, parts, phases, static=parts["frozen"] + parts["trainable"] + parts["adam"],
                     cuda=t.device_type == "cuda")


def _eval_plan(cfg: Config, a: Arch, t: Target, shapes: Shapes) -> StagePlan:
    """No grads: weights, plus the largest moment of an eval batch (`memory_eval.eval_phases`): the encoder's no-grad
    pass, then for the latent paths and the text-teacher paths generation (KV cache) and the scoring pass."""
    b, attn = cfg.eval.batch_size, cfg.base.attn_implementation
    enc = encoder_cost(cfg, a, t, cfg.stage_a.batch_size, b, shapes, (), False)
    lora_n = a.lora_params(cfg.model.lora_r, cfg.model.lora_targets, cfg.model.lora_layers)
    n_fp32 = enc.trainable + adapter_params(cfg.model.d_z, a.hidden) + lora_n
    m = cfg.model.num_latents
    latents_held = b * m * a.hidden * 4  # the batch's latents, fed to every latent path
    phases = {k: v + latents_held for k, v in eval_phases(
        a, b, shapes.prefix_tokens + m, shapes.prefix_tokens + shapes.seq_len, shapes.answer_tokens,
        cfg.eval.max_new_tokens, t.act, attn, enc.eval_bytes, bool(set(EvalPath.TEACHER) & set(cfg.eval.paths))
    ).items()}
    parts = {"frozen": a.total_params * t.act + enc.frozen_bytes, "trainable": 4 * n_fp32, "grads": 0, "adam": 0,
             "activations": max(phases.values()), "logits": 0}
    plan = StagePlan("eval", parts, phases, static=parts["frozen"] + parts["trainable"], cuda=t.device_type == "cuda")
    plan.activations_alt, plan.peak_alt = parts["activations"], plan.peak
    return plan
