"""Bytes per token of one transformer layer: activations kept for backward (with or without gradient checkpointing,
LoRA, autocast) and the no-grad and backward temporaries. Formulas checked against measured peaks in
tests/test_memory_plan.py."""

from __future__ import annotations

from dataclasses import dataclass

from latentgate.model.memory_arch import Arch

QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


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
