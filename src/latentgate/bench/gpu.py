"""Comparison 6, on a GPU: a Stage B step of a 1B-class Llama (tokens/s, MFU) and the eval generation rate."""

from __future__ import annotations

import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from latentgate.bench.generation import batched_generate, latent_prefixes
from latentgate.bench.report import INFO, Row, judge, not_measured
from latentgate.config import Config, resolve
from latentgate.errors import ConfigError
from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer, embedding_rms, freeze, resolve_dtype
from latentgate.model.contract import PrefixContract
from latentgate.model.latent import build_latent_modules
from latentgate.model.lora import attach_lora
from latentgate.train.flops import step_flops
from latentgate.train.trainer import batch_indices, build_optimizer, set_training_modes, stage_step
from latentgate.train.workspace import Workspace, enable_gradient_checkpointing, load_splits, set_threads

# ---- 6. GPU ---------------------------------------------------------------------------------------------------

GPU_STEP = ("GPU: Stage B step of a 1B-class Llama (random init, bf16): tokens/s and MFU", "-", "MFU >= 40%")
GPU_GEN = ("GPU: eval generation rate (batched greedy, 1B-class Llama)", "-", "report answers/s")
LLAMA_1B = {"base.hidden": 2048, "base.layers": 16, "base.heads": 16, "base.intermediate": 8192,
            "base.dtype": "bfloat16",
            "stage_b.batch_size": 64, "data.n_train": 4096, "data.n_eval": 200, "data.n_probe": 16}
LLAMA_1B_VOCAB = 128256
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def direct_workspace(cfg: Config, device: torch.device, vocab_size: int | None = None, stage: str = "stage_b",
                     shape: dict | None = None):
    """A Workspace built in memory on `device` (a 1B model is not worth a round trip through disk): the builtin
    tokenizer, a Llama from config in base.dtype (`shape`: LlamaConfig fields of another shape, e.g.
    `memory_arch.SHAPES["llama-3-8b"]`, created directly in that dtype), the encoder/adapter, gradient checkpointing
    when the config asks, and LoRA for Stage B."""
    set_threads(cfg.run.threads)
    tok = builtin_tokenizer(cfg)
    dtype = resolve_dtype(cfg.base.dtype, device)
    with torch.device(device):
        if shape is None:
            lm = build_builtin_lm(cfg, vocab_size or len(tok), tok)
        else:
            lm = shaped_lm(shape, tok, dtype)
    lm = freeze(lm.to(dtype))
    contract = PrefixContract.for_config(cfg, tok)
    ws = Workspace(cfg, device, lm, tok, contract, load_splits(cfg))
    ws.encoder, ws.adapter, ws.enc_tok = build_latent_modules(cfg, lm, tok, embedding_rms(lm))
    ws.encoder.to(device)
    ws.adapter.to(device)
    if cfg.base.gradient_checkpointing:
        enable_gradient_checkpointing(lm, ws.encoder)
    if stage == "stage_b":
        ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
    return ws


def shaped_lm(shape: dict, tok, dtype: torch.dtype):
    """A randomly initialised Llama of `shape` (LlamaConfig fields), its parameters created in `dtype` (an 8B model
    never exists in fp32), on the current default device. The tokenizer's ids must fit the shape's vocabulary."""
    lcfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    if lcfg.vocab_size < len(tok):
        raise ConfigError(f"shape vocabulary {lcfg.vocab_size} is smaller than the tokenizer's {len(tok)}",
                          "use a larger vocab_size in the shape")
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        return LlamaForCausalLM(lcfg)
    finally:
        torch.set_default_dtype(before)


def check_placement(ws) -> dict:
    """Every parameter and buffer on the workspace's device; the frozen LM's weights in base.dtype. Raises on a
    misplaced tensor, returns dtype counts."""
    want = resolve_dtype(ws.cfg.base.dtype, ws.device)
    dtypes: dict[str, int] = {}
    for owner, module in (("lm", ws.lm), ("encoder", ws.encoder), ("adapter", ws.adapter)):
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.device.type != ws.device.type:
                raise AssertionError(f"{owner}.{name} is on {t.device}, expected {ws.device}")
            if owner == "lm" and "lora_" not in name and t.is_floating_point() and t.dtype != want \
                    and name.endswith("weight"):
                raise AssertionError(f"lm.{name} is {t.dtype}, expected {want}")
            key = f"{owner}:{'lora' if 'lora_' in name else 'base'}:{str(t.dtype).removeprefix('torch.')}"
            dtypes[key] = dtypes.get(key, 0) + t.numel()
    return dtypes


def gpu_stage_b(cfg: Config, device: torch.device, steps: int = 8, warm: int = 2, vocab_size: int | None = None,
                gen_n: int = 200) -> dict:
    """Stage B steps through the trainer's own step function (`stage_step`, optimizer, clipping, schedule) on
    `device`, timed with device synchronisation; then the eval generation rate. Works on CPU too (tests)."""
    ws = direct_workspace(cfg, device, vocab_size)
    placement = check_placement(ws)
    st = cfg.stage_b
    opt, sched, groups = build_optimizer(ws, st)
    trainable = [p for ps in groups.values() for p in ps]
    train = ws.splits["train"]
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    set_training_modes(ws)  # as the trainer: the frozen LM stays in eval mode (no dropout)
    batches = [[train[i] for i in batch_indices(len(train), st.batch_size, k, st.seed)] for k in range(steps)]
    counted = [step_flops(ws, st, b) for b in batches[warm:]]  # outside the timed region (it tokenizes on the host)
    flops, tokens = sum(f for f, _ in counted), sum(n for _, n in counted)
    syncs = None
    for k, examples in enumerate(batches):
        if k == warm:
            sync()
            t0 = time.perf_counter()
        if device.type == "cuda" and k == warm - 1:
            syncs = _count_syncs(one_step, ws, examples, st, k, gen, opt, sched, trainable)
        else:
            one_step(ws, examples, st, k, gen, opt, sched, trainable)
    sync()
    dt = time.perf_counter() - t0
    peak = peak_flops(device)
    out = {"device": str(device), "dtype": cfg.base.dtype, "steps": steps - warm, "seconds": dt,
           "tokens_per_s": tokens / dt, "model_tflops_per_s": flops / dt / 1e12,
           "mfu": (flops / dt / peak) if peak else None, "placement": placement,
           "lm_params": sum(p.numel() for p in ws.lm.parameters()), "host_syncs_per_step": syncs,
           "batch_size": st.batch_size}
    examples = (ws.splits["eval"] * (gen_n // max(1, len(ws.splits["eval"])) + 1))[:gen_n]
    emb, mask = latent_prefixes(ws, examples)
    with torch.no_grad():
        batched_generate(ws.lm, emb[:2], mask[:2], 2, ws.contract.stop_ids, cfg.eval.batch_size)  # warm-up
        sync()
        t0 = time.perf_counter()
        batched_generate(ws.lm, emb, mask, cfg.eval.max_new_tokens, ws.contract.stop_ids, cfg.eval.batch_size)
        sync()
    out["gen_answers_per_s"] = gen_n / (time.perf_counter() - t0)
    return out


def one_step(ws, examples, st, k, gen, opt, sched, trainable) -> None:
    out = stage_step(ws, examples, st, k, gen)
    out.total.backward()
    torch.nn.utils.clip_grad_norm_(trainable, st.clip_norm if st.clip_norm > 0 else float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _count_syncs(fn, *args) -> int:
    """Host-device synchronisations during fn (torch's sync debug mode warns on each)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_gpu(overrides: dict | None = None, steps: int = 8) -> list[Row]:
    if not torch.cuda.is_available():
        return [not_measured("gpu_step", *GPU_STEP, "no GPU"), not_measured("gpu_generation", *GPU_GEN, "no GPU")]
    cfg = resolve("smoke", {**LLAMA_1B, **(overrides or {})})
    torch.backends.cuda.matmul.allow_tf32 = True
    r = gpu_stage_b(cfg, torch.device("cuda"), steps=steps, vocab_size=LLAMA_1B_VOCAB)
    mfu = r["mfu"]
    step = Row("gpu_step", *GPU_STEP[:2], f"{r['tokens_per_s']:.0f} tokens/s, {r['model_tflops_per_s']:.1f} TFLOP/s, "
               f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'} on {torch.cuda.get_device_name(0)} "
               f"({r['lm_params'] / 1e9:.2f}B LM, batch {r['batch_size']}, {r['host_syncs_per_step']} host syncs/step)",
               GPU_STEP[2], judge(mfu, ">=", 0.40), mfu, ">=", 0.40, r)
    genrow = Row("gpu_generation", *GPU_GEN[:2], f"{r['gen_answers_per_s']:.0f} answers/s", GPU_GEN[2], INFO,
                 r["gen_answers_per_s"], details={"max_new_tokens": cfg.eval.max_new_tokens})
    return [step, genrow]
