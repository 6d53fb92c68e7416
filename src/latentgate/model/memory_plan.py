"""Memory plan: the peak memory of Stage A, Stage B and eval, from the config alone, and a refusal of runs that will
not fit (`check_fits`).

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
    peak        = frozen + trainable + AdamW states + max(teacher, loss, backward, optimizer)

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
real steps on CPU in tests/test_memory_plan.py. Not counted: the CUDA context, cuBLAS workspaces and the caching
allocator's fragmentation, which is why `check_fits` keeps CUDA_HEADROOM of a CUDA device free.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace

import torch

from latentgate.config import Config
from latentgate.errors import ConfigError
from latentgate.model.memory_arch import Arch, lm_arch, scratch_encoder_arch
from latentgate.tracking.schema import EvalPath

GiB = 2**30
DEFAULT_SEQ_LEN = 512
DEFAULT_ANSWER_TOKENS = 32  # a real LM's answers: a few words of BPE tokens, plus the end token
PREFIX_TOKENS = {"plain": 8, "chat": 48}  # head + anchor ids of a real tokenizer (BOS + " answer :" / chat template)
LOGIT_BYTES = {False: 12, True: 32}  # per answer logit, at the loss (kd off / on): tests/test_memory_plan.py measures
CUDA_HEADROOM = 0.10  # planned bytes are live tensors; the caching allocator's fragmentation and the CUDA context
# take more, so a CUDA stage fits only within 90% of the device
MINILM = dict(hidden=384, layers=6, heads=12, intermediate=1536, params=22_713_216)  # all-MiniLM-L6-v2, fp32
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
STAGE_LABELS = {"stage_a": "Stage A", "stage_b": "Stage B", "eval": "eval"}


# ---- per-layer activations --------------------------------------------------------------------------------------

def layer_bytes_per_token(a: Arch, s: int, act: int, trainable: bool = False, autocast: bool = False,
                          attn: str = "sdpa") -> int:
    """Bytes one Llama decoder layer keeps for backward, per token (the input needs grad; `s` keys per query).

    With h = hidden, q = heads x head_dim, kv = the key/value width that reaches attention (q when GQA heads are
    repeated, which sdpa does whenever a padding mask is passed), I = intermediate, n = heads, b = `act` (bytes of
    the layer's matmul outputs: the frozen dtype, or 4 / 2 for a trainable fp32 body without / with autocast):

        both RMSNorms keep their input in fp32 (+ its rsqrt):       2 x (4h + 4)
        MLP: SiLU input, SiLU output, up projection:                3I x b
        sdpa / flash: q, k, v, output, logsumexp:                   (2q + 2kv) x b + 4n
          sdpa with a padding mask: the mask as a float bias:       + s x b
        eager: q, k, v, softmax output (fp32) and its cast:         (q + 2kv) x b + 4ns (+ ns x b when b != 4)
      trainable weights (lm_copy / scratch bodies) add what the weight gradients need:
        each norm's normalised input (fp32):                        2 x 4h
        fp32: the norm outputs feeding q/k/v and gate/up, down's input:        8h + 4I
        autocast: a half copy of the input per Linear (q, k, v, gate, up), down's input:  10h + 2I
        eager: o_proj's input:                                      q x b

    Measured on CPU (tests/test_memory_plan.py): exact for eager / sdpa, fp32 / bf16, frozen / trainable.
    Gradient checkpointing keeps only each layer's input (h x residual bytes) and recomputes one layer at a time in
    backward (`body_activations`).
    """
    h, i, q, n = a.hidden, a.intermediate, a.q_dim, a.heads
    kv = q if a.kv_heads < a.heads and attn != "flash_attention_2" else a.kv_dim
    total = 2 * (4 * h + 4) + 3 * i * act
    if attn == "eager":
        total += (q + 2 * kv) * act + 4 * n * s + (n * s * act if act != 4 else 0)
    else:
        total += (2 * q + 2 * kv) * act + 4 * n + (s * act if attn == "sdpa" else 0)
    if trainable:
        total += 2 * 4 * h + (10 * h + 2 * i if autocast else 8 * h + 4 * i) + (q * act if attn == "eager" else 0)
    return total


@dataclass(frozen=True)
class Lora:
    r: int
    targets: tuple
    layers: tuple  # empty: every layer
    dropout: float = 0.0


def lora_bytes_per_token(a: Arch, loras, act: int, autocast: bool, attn: str) -> int:
    """What LoRAs on one frozen layer add per token: the input of each targeted Linear (for lora_A's weight grad)
    and lora_A's output. In fp32 the targeted Linears share their inputs, across LoRAs too (q/k/v the first norm's
    output, gate/up the second's, o_proj the attention output sdpa keeps anyway); with a half-precision LM each
    LoRA casts the input to its fp32 weights per module (a 4-byte copy each: peft, and the lm_self encoder's hooks),
    and under autocast each module keeps a half cast (2 bytes each)."""
    low = 2 if autocast else 4
    shared, total = {}, 0
    for lo in loras:
        for name, width in a.lora_inputs(lo.targets):
            if act == 4 and not autocast:
                key = "qkv" if name in QKV else "gate_up" if name in GATE_UP else name
                shared[key] = 0 if (name == "o_proj" and attn != "eager") else 4 * width
            else:
                total += low * width
            total += lo.r * low + (width * (low + 1) if lo.dropout > 0 else 0)  # lora_A's output; dropout's + mask
    return total + sum(shared.values())


def body_activations(a: Arch, batch: int, s: int, *, act: int, ckpt: bool, trainable: bool = False,
                     autocast: bool = False, attn: str = "sdpa", loras: tuple[Lora, ...] = (),
                     embeds_in: bool = True) -> int:
    """Bytes a decoder body keeps for backward over batch x s tokens (input needs grad), plus its non-layer parts:
    the final norm (fp32 input, output; a trainable norm also its normalised input), the boolean 4-D mask, and the
    input embeddings when the caller builds them (`embeds_in`). With checkpointing: each layer's input, plus one
    layer recomputed in backward."""
    resid = 4 if trainable else act
    per_layer = layer_bytes_per_token(a, s, act, trainable, autocast, attn)
    per_layer_lora = [lora_bytes_per_token(a, [lo for lo in loras if not lo.layers or i in lo.layers], act,
                                           autocast, attn) for i in range(a.layers)]
    lora_total, lora_one = sum(per_layer_lora), max(per_layer_lora, default=0)
    if ckpt:
        layers = a.layers * a.hidden * resid + per_layer + lora_one
    else:
        layers = a.layers * per_layer + lora_total
    h = a.hidden
    nonlayer = 4 * h + 4 + h * resid + s + (4 * h if trainable else 0)
    if not trainable:  # the input embeddings are layer 0's input: kept by it in fp32 or as its checkpoint
        in_layers = ckpt or act == 4
        nonlayer += (h * act if embeds_in and not in_layers else 0) - (h * act if in_layers and not embeds_in else 0)
    return batch * s * (layers + nonlayer)


def nograd_bytes_per_token(a: Arch, s: int, act: int, attn: str = "sdpa") -> int:
    """Working set of a no-grad forward, per token: one layer's MLP (gate, up, SiLU output) and a few hidden-size
    tensors, plus the attention mask (float bias and boolean). Measured ~(3I + 2.6h) x b on CPU."""
    extra = 4 * a.heads * s if attn == "eager" else 0
    return (3 * a.intermediate + 3 * a.hidden) * act + s * (act + 1) + extra


def backward_temp_per_token(a: Arch, act: int) -> int:
    """Gradients in flight while one layer runs backward (measured ~(3I + h) x b)."""
    return (3 * a.intermediate + a.hidden) * act


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

    @property
    def act(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def autocast(self) -> bool:  # train.workspace.autocast: half-precision LM on CUDA
        return self.device_type == "cuda" and self.act != 4


def target_for(cfg: Config, device: str | torch.device | None = None, dtype: str | None = None) -> Target:
    """The device a run of `cfg` uses (run.device; auto: CUDA when present), and its frozen dtype (base.dtype, or
    `dtype`; auto: bfloat16 on CUDA, float32 on CPU). A CUDA target can be planned on a CPU-only host."""
    name = str(device) if device is not None else cfg.run.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(name).type
    dname = dtype or cfg.base.dtype
    if dname == "auto":
        if device_type != "cuda":
            resolved = torch.float32
        elif torch.cuda.is_available():
            from latentgate.model.base_lm import resolve_dtype

            resolved = resolve_dtype("auto", torch.device(name))
        else:  # planning a GPU run from a CPU host: any current GPU runs bf16
            resolved = torch.bfloat16
    else:
        resolved = getattr(torch, dname)
    return Target(device_type, resolved, cfg.base.gradient_checkpointing)


@dataclass
class StagePlan:
    stage: str  # stage_a, stage_b, eval
    parts: dict[str, int]  # frozen, trainable, grads, adam, activations, logits (bytes)
    phases: dict[str, int]  # bytes above the static parts at each moment of the step
    static: int
    activations_alt: int = 0  # saved activations with checkpointing toggled
    peak_alt: int = 0  # the peak with checkpointing toggled

    @property
    def peak(self) -> int:
        return self.static + max(self.phases.values())

    @property
    def at(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def label(self) -> str:
        return STAGE_LABELS[self.stage]


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
    eval_bytes: int  # no-grad working set over the eval batch


def head_params(he: int, m: int, d_z: int) -> int:
    """latent.LatentEncoder around a body of width he: LayerNorm, M queries, MultiheadAttention, Linear to d_z."""
    return 2 * he + m * he + (4 * he * he + 4 * he) + he * d_z + d_z


def adapter_params(d_z: int, hidden: int) -> int:
    return d_z * hidden + hidden + hidden * hidden + hidden + 1


def _linear_params(a: Arch) -> int:
    return a.layers * sum(i * o for _, i, o in a.layer_linears)


def encoder_cost(cfg: Config, a: Arch, t: Target, batch: int, eval_batch: int, shapes: Shapes,
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
                           eval_batch * (s + m) * nograd_bytes_per_token(a, s + m, t.act, attn))
    if kind == "minilm":
        he = MINILM["hidden"]
        mini = replace(a, hidden=he, intermediate=MINILM["intermediate"], heads=MINILM["heads"],
                       kv_heads=MINILM["heads"], head_dim=he // MINILM["heads"])
        head_acts = batch * s * (4 * he + _head_bytes_per_token(he, mini.heads, 4))
        return EncoderCost(head_params(he, m, d_z), 4 * MINILM["params"], max(he * he * 3, m * he), head_acts,
                           batch * s * 8 * he, 0, eval_batch * s * nograd_bytes_per_token(mini, s, 4, attn))
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
                       eval_batch * s * nograd_bytes_per_token(body, s, 4, attn))


def _head_bytes_per_token(he: int, heads: int, act: int) -> int:
    """LatentEncoder head per encoder token: LayerNorm output (fp32), the packed key/value projection (and its
    contiguous copy, which attention keeps), the key-padding mask as a float bias per head."""
    return 4 * he + 2 * he * act + 2 * he * act + 4 * heads


# ---- the plan ---------------------------------------------------------------------------------------------------

def plan_memory(cfg: Config, seq_len: int = DEFAULT_SEQ_LEN, *, device: str | torch.device | None = None,
                dtype: str | None = None, answer_tokens: int | None = None, prefix_tokens: int | None = None,
                arch: Arch | None = None, stages=("stage_a", "stage_b", "eval")) -> MemoryPlan:
    """Peak memory of each stage of `cfg` (validated here: `model.encoder=auto` resolves)."""
    cfg.validate()
    a = arch or lm_arch(cfg)
    t = target_for(cfg, device, dtype)
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
    b, m, attn = st.batch_size, cfg.model.num_latents, cfg.base.attn_implementation
    stage_lora = (Lora(cfg.model.lora_r, tuple(cfg.model.lora_targets), tuple(cfg.model.lora_layers),
                       cfg.model.lora_dropout),) if stage == "stage_b" else ()
    # Stage B's LoRA is on the LM itself, so it is active in an lm_self encoding pass too (conservative)
    enc = encoder_cost(cfg, a, t, b, cfg.eval.batch_size, shapes, stage_lora, ckpt)
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
    }
    parts = {"frozen": a.total_params * t.act + enc.frozen_bytes, "trainable": 4 * n_train, "grads": grads,
             "adam": 8 * n_train, "activations": acts, "logits": logits}
    return StagePlan(stage, parts, phases, static=parts["frozen"] + parts["trainable"] + parts["adam"])


def _eval_plan(cfg: Config, a: Arch, t: Target, shapes: Shapes) -> StagePlan:
    """No grads: weights, plus the larger of the encoder's no-grad pass and text-path generation (KV cache over
    the prompt + the generated tokens, the prefill's working set, one row of logits per example)."""
    b, attn = cfg.eval.batch_size, cfg.base.attn_implementation
    enc = encoder_cost(cfg, a, t, cfg.stage_a.batch_size, b, shapes, (), False)
    lora_n = a.lora_params(cfg.model.lora_r, cfg.model.lora_targets, cfg.model.lora_layers)
    n_fp32 = enc.trainable + adapter_params(cfg.model.d_z, a.hidden) + lora_n
    phases = {"encoder": enc.eval_bytes}
    if set(EvalPath.TEACHER) & set(cfg.eval.paths):
        s = shapes.prefix_tokens + shapes.seq_len + cfg.eval.max_new_tokens
        kv_cache = 2 * a.layers * a.kv_dim * t.act * b * s
        phases["generation"] = kv_cache + b * s * nograd_bytes_per_token(a, s, t.act, attn) + b * a.vocab * (t.act + 4)
    parts = {"frozen": a.total_params * t.act + enc.frozen_bytes, "trainable": 4 * n_fp32, "grads": 0, "adam": 0,
             "activations": max(phases.values()), "logits": 0}
    plan = StagePlan("eval", parts, phases, static=parts["frozen"] + parts["trainable"])
    plan.activations_alt, plan.peak_alt = parts["activations"], plan.peak
    return plan


# ---- device capacity, the check, the table ----------------------------------------------------------------------

def device_memory_bytes(device: str | torch.device) -> int:
    """Total memory of a CUDA device; on CPU the RAM available now (MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fixes(plan: MemoryPlan, stage: str, capacity: int) -> str:
    """The settings that lower this stage's peak (each re-planned alone; kept when it saves 5% or more), as one
    clause; plus what the stage would still need with all of them, when that is still too much."""
    cfg, t = plan.cfg, plan.target
    if stage == "eval":
        return "lower eval.batch_size"
    batch = getattr(cfg, stage).batch_size
    candidates = []
    if not t.ckpt:
        candidates.append(("base.gradient_checkpointing=true", {"base.gradient_checkpointing": True}))
    if t.act == 4 and t.device_type == "cuda":
        candidates.append(("base.dtype=bfloat16", {"base.dtype": "bfloat16"}))
    if cfg.model.encoder in ("lm_copy", "scratch"):
        candidates.append(("model.encoder=lm_self", {"model.encoder": "lm_self"}))
    if batch > 1:
        candidates.append((f"lower {stage}.batch_size (and raise {stage}.grad_accum)",
                           {f"{stage}.batch_size": batch // 2}))
    before = plan.stage(stage).peak
    useful = [(text, change) for text, change in candidates if _replan(plan, stage, change) < 0.95 * before]
    if not useful:
        return f"use a device with more than {before / GiB:.1f} GiB"
    sets = [text for text, _ in useful if "=" in text and not text.startswith("lower")]
    lower = [text for text, _ in useful if text.startswith("lower")]
    clause = (f"set {', '.join(sets)}" if sets else "") + (" or " if sets and lower else "") + "".join(lower)
    combined = _replan(plan, stage, {k: v for _, change in useful for k, v in change.items()})
    if combined > capacity:
        clause += f"; with all of them it still needs {combined / GiB:.1f} GiB"
    return clause


def _replan(plan: MemoryPlan, stage: str, change: dict) -> int:
    from latentgate.config import apply_overrides

    cfg = apply_overrides(copy.deepcopy(plan.cfg), change)
    dtype = None if "base.dtype" in change else str(plan.target.dtype).removeprefix("torch.")
    new = plan_memory(cfg, plan.shapes.seq_len, device=plan.target.device_type, dtype=dtype,
                      answer_tokens=plan.shapes.answer_tokens, prefix_tokens=plan.shapes.prefix_tokens,
                      arch=plan.arch, stages=(stage,))
    return new.stage(stage).peak


def check_fits(cfg: Config, device: str | torch.device, seq_len: int = DEFAULT_SEQ_LEN,
               memory_bytes: int | None = None, stages=("stage_a", "stage_b", "eval"), **kwargs) -> MemoryPlan:
    """Refuse a run that will not fit: ConfigError naming the first stage over the device's memory (on CUDA, 90% of
    it: CUDA_HEADROOM), both figures, and the settings that lower it. Returns the plan when every stage fits.
    For the training entry, before anything is loaded; `kwargs` go to `plan_memory` (dtype, answer_tokens,
    prefix_tokens, arch)."""
    plan = plan_memory(cfg, seq_len, device=device, stages=stages, **kwargs)
    refuse_if_over(plan, memory_bytes if memory_bytes is not None else device_memory_bytes(device))
    return plan


def usable_bytes(plan: MemoryPlan, capacity: int) -> int:
    """What a stage may plan for on a device of `capacity` bytes (CUDA keeps CUDA_HEADROOM free)."""
    return int(capacity * (1 - CUDA_HEADROOM)) if plan.target.device_type == "cuda" else capacity


def refuse_if_over(plan: MemoryPlan, capacity: int | None) -> None:
    if not capacity:
        return
    usable = usable_bytes(plan, capacity)
    for sp in plan.stages:
        if sp.peak > usable:
            kept = f" ({usable / GiB:.1f} GiB usable: {CUDA_HEADROOM:.0%} stays free for the allocator)" \
                if usable < capacity else ""
            raise ConfigError(f"{sp.label} needs {sp.peak / GiB:.1f} GiB, the device has {capacity / GiB:.1f} GiB"
                              f"{kept}", _fixes(plan, sp.stage, usable))


def plan_capacity(plan: MemoryPlan, memory_gib: float | None = None) -> int | None:
    """The memory to check a plan against: `memory_gib` if given, else the planned device's when it is this
    machine's (a CUDA plan made on a CPU-only host has none: nothing to check)."""
    if memory_gib is not None:
        return int(memory_gib * GiB)
    if plan.target.device_type == "cuda" and not torch.cuda.is_available():
        return None
    device = plan.cfg.run.device if plan.cfg.run.device != "auto" else plan.target.device_type
    return device_memory_bytes(device)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plan: MemoryPlan, capacity: int | None = None) -> str:
    """One header line and one table (GiB): the parts of each stage's peak, activations and peak with checkpointing
    off and on (the configured one marked *), where the peak happens, and whether it fits."""
    a, t, sh, cfg = plan.arch, plan.target, plan.shapes, plan.cfg
    head = (f"{a.name}: {a.total_params / 1e9:.3f}B params, {a.layers} layers, hidden {a.hidden}; frozen "
            f"{str(t.dtype).removeprefix('torch.')} on {t.device_type}; encoder {cfg.model.encoder}; "
            f"{sh.seq_len} text tokens, M={cfg.model.num_latents}, prefix {sh.prefix_tokens}, answer "
            f"{sh.answer_tokens}; gradient checkpointing {'on' if t.ckpt else 'off'}"
            + (f"; device {capacity / GiB:.1f} GiB" if capacity else ""))
    cols = ["stage", "batch", "frozen LM", "trainable", "grads", "AdamW", "logits", "acts ckpt off", "acts ckpt on",
            "peak ckpt off", "peak ckpt on", "at", "fits"]
    rows = []
    for sp in plan.stages:
        p = sp.parts
        on = (sp.activations_alt, p["activations"]) if t.ckpt else (p["activations"], sp.activations_alt)
        peaks = (sp.peak_alt, sp.peak) if t.ckpt else (sp.peak, sp.peak_alt)
        mark = (" ", "*") if t.ckpt else ("*", " ")
        batch = cfg.eval.batch_size if sp.stage == "eval" else getattr(cfg, sp.stage).batch_size
        fits = "-" if not capacity else ("yes" if sp.peak <= usable_bytes(plan, capacity) else "NO")
        rows.append([sp.label, str(batch), _gib(p["frozen"]), _gib(p["trainable"]), _gib(p["grads"]),
                     _gib(p["adam"]), _gib(p["logits"]), _gib(on[0]), _gib(on[1]),
                     _gib(peaks[0]) + mark[0], _gib(peaks[1]) + mark[1], sp.at, fits])
    widths = [max(len(r[i]) for r in [cols] + rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i in (0, 11, 12) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [cols] + rows]
    foot = "GiB; * = the configured setting (base.gradient_checkpointing)"
    if capacity:
        foot += f"; fits: the peak is within {usable_bytes(plan, capacity) / GiB:.1f} GiB"
        foot += f" ({1 - CUDA_HEADROOM:.0%} of the device)" if plan.target.device_type == "cuda" else ""
    return "\n".join([head, "", *lines, "", foot])
