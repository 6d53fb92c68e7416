"""The memory plan against measured memory: live tensor bytes of real steps on CPU (not process RSS, which is
allocator noise), the activation formula layer by layer, the Llama-3-8B shape's figures, the refusal, the CLI."""

from __future__ import annotations

import copy
import inspect
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from latentgate import config
from latentgate.errors import ConfigError
from latentgate.model import memory_fit as fit
from latentgate.model import memory_layers as layers
from latentgate.model import memory_plan as mp
from latentgate.model.memory_arch import arch_from_hf_config, lm_arch


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages: those registered with `track` plus every op output seen inside the mode
    (forward, backward and optimizer ops alike); a storage counts until it is freed. `peak` is the maximum.
    torch's MemTracker does the same but refuses frozen parameters (it hooks every parameter's gradient)."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def track(self, *objs) -> "LiveBytes":
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                tensors = [*obj.parameters(), *obj.buffers()]
            elif isinstance(obj, torch.optim.Optimizer):
                tensors = [v for state in obj.state.values() for v in state.values() if torch.is_tensor(v)]
            else:
                tensors = [obj]
            for t in tensors:
                self._add(t)
        return self

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key, size = id(st), st.nbytes()
        if key not in self.sizes:
            self.refs[key] = weakref.ref(st, lambda _, k=key: self._drop(k))
            self.sizes[key] = 0
        self.current += size - self.sizes[key]
        self.sizes[key] = size
        self.peak = max(self.peak, self.current)

    def _drop(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out


def _resolve(*sets: str, preset: str = "smoke") -> config.Config:
    return config.resolve(preset, config.parse_set_args(list(sets)))


# ---- the architecture on the meta device ------------------------------------------------------------------------

def test_builtin_arch_on_meta_matches_the_real_build(micro_cfg):
    from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer

    tok = builtin_tokenizer(micro_cfg)
    real = build_builtin_lm(micro_cfg, len(tok), tok)
    arch = lm_arch(copy.deepcopy(micro_cfg))
    assert arch.vocab == len(tok)
    assert arch.total_params == sum(p.numel() for p in real.parameters())
    assert arch.tied and arch.head_params == 0


def test_llama_3_8b_shape():
    arch = lm_arch(_resolve("base.name=shape:llama-3-8b"))
    assert arch.total_params == 8_030_261_248  # Meta-Llama-3-8B's published count
    assert arch.head_params == 128256 * 4096 and not arch.tied
    assert (arch.kv_dim, arch.intermediate, arch.layers) == (1024, 14336, 32)
    assert arch.lora_params(16, ["q_proj", "k_proj", "v_proj", "o_proj"], []) == 32 * 16 * (8192 + 5120 + 5120 + 8192)


def test_unknown_shape_and_missing_folder_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model shape"):
        lm_arch(_resolve("base.name=shape:llama-9"))
    with pytest.raises(ConfigError, match="offline"):
        lm_arch(_resolve(f"base.name={tmp_path / 'nowhere'}"))


# ---- the per-layer formula against a bare Llama's saved activations ---------------------------------------------

LAYER_CASES = [  # (mode, dtype, attention, kv heads, checkpointing, autocast)
    ("frozen", torch.float32, "sdpa", 4, False, False),
    ("frozen", torch.bfloat16, "sdpa", 4, False, False),
    ("frozen", torch.float32, "sdpa", 2, False, False),  # GQA: heads repeated because of the padding mask
    ("frozen", torch.bfloat16, "eager", 4, False, False),
    ("train", torch.float32, "sdpa", 4, False, False),
    ("train", torch.float32, "eager", 4, False, False),
    ("train", torch.float32, "sdpa", 4, False, True),  # an fp32 body under bf16 autocast (+ its weight casts)
    ("lora", torch.float32, "sdpa", 4, False, False),
    ("lora", torch.bfloat16, "sdpa", 4, False, False),
    ("lora", torch.bfloat16, "sdpa", 4, False, True),
    ("lora", torch.bfloat16, "sdpa", 4, True, False),
    ("frozen", torch.float32, "sdpa", 4, True, False),
]


@pytest.mark.parametrize("mode,dtype,attn,kv_heads,ckpt,autocast", LAYER_CASES)
def test_layer_formula_equals_measured_saved_activations(mode, dtype, attn, kv_heads, ckpt, autocast):
    """After the forward, what the body keeps equals `body_activations` (without the layer recomputed in
    backward); the forward + backward peak stays within 15% of max(activations, grads) + backward temporaries.
    CPU autocast stands in for the CUDA autocast `train.workspace.autocast` uses with a half-precision LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    batch, s, lora = 4, 64, layers.Lora(4, ("q_proj", "k_proj", "v_proj", "o_proj"), ())
    hcfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=kv_heads, attn_implementation=attn)
    lm = LlamaForCausalLM(hcfg).to(dtype)
    arch = arch_from_hf_config(hcfg)
    if mode == "train":
        lm = lm.float()
    else:
        lm.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=lora.r, target_modules=list(lora.targets), task_type="CAUSAL_LM"))
    if ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train(mode == "train" or ckpt)  # HF checkpoints only in train mode; dropout is 0 either way
    body = lm.get_decoder() if mode != "lora" else lm.base_model.model.model
    mask = torch.ones(batch, s, dtype=torch.long)
    mask[0, -5:] = 0  # right padding, as training batches have
    ids = torch.randint(0, 300, (batch, s))
    x = torch.randn(batch, s, 128, dtype=dtype).mul(0.02).requires_grad_(mode != "train")
    tracker = LiveBytes().track(lm, x, ids, mask)
    with tracker:
        start = tracker.current
        kwargs = {"input_ids": ids} if mode == "train" else {"inputs_embeds": x}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = body(attention_mask=mask, **kwargs).last_hidden_state
        kept = tracker.current - start
        out.float().pow(2).mean().backward()
    act = 2 if autocast else 4 if mode == "train" else torch.finfo(dtype).bits // 8
    common = dict(act=act, ckpt=ckpt, trainable=mode == "train", attn=attn, embeds_in=False, autocast=autocast,
                  loras=(lora,) if mode == "lora" else ())
    planned = layers.body_activations(arch, batch, s, **common)
    if autocast and mode == "train":  # autocast's half copies of the trainable Linear weights, kept for backward
        planned += 2 * arch.layers * sum(i * o for _, i, o in arch.layer_linears)
    recompute = 0
    if ckpt:  # the layer recomputed in backward is not there yet after the forward
        loras = [lora] if mode == "lora" else []
        recompute = batch * s * (layers.layer_bytes_per_token(arch, s, act, attn=attn)
                                 + layers.lora_bytes_per_token(arch, loras, act, False, attn))
    # checkpointing also keeps each layer's rotary cos/sin (a few bytes per token, not modelled)
    assert kept == pytest.approx(planned - recompute, rel=0.05 if ckpt else 0.01)
    grads = 4 * sum(p.numel() for p in lm.parameters() if p.requires_grad)
    expected_peak = max(planned, grads) + batch * s * layers.backward_temp_per_token(arch, act)
    assert tracker.peak - start == pytest.approx(expected_peak, rel=0.15)


# ---- (a) a real stage step on CPU: planned peak vs measured peak ------------------------------------------------

def _lm_self_available() -> bool:
    from latentgate.model import latent

    return "lm_self" in inspect.getsource(latent)


def _long_examples(examples, n: int, words: int):
    """n examples whose contexts are `words` words long (real task words), so a batch is n x ~128 tokens."""
    from latentgate.data.records import Example

    stream = " ".join(e.context for e in examples).split()
    return [Example(f"long{i}", " ".join(stream[7 * i : 7 * i + words]), e.question, e.answers)
            for i, e in enumerate(examples[:n])]


_NO_LM_SELF = pytest.mark.skipif(not _lm_self_available(), reason="the lm_self encoder is not in model/latent.py")
STEP_CASES = [("lm_copy", "stage_a", False), ("scratch", "stage_a", False), ("lm_copy", "stage_b", False),
              pytest.param("lm_self", "stage_a", False, marks=_NO_LM_SELF),
              pytest.param("lm_self", "stage_b", False, marks=_NO_LM_SELF),
              pytest.param("lm_self", "stage_a", True, marks=_NO_LM_SELF)]


@pytest.mark.parametrize("encoder,stage,ckpt", STEP_CASES)
def test_plan_matches_measured_peak_of_a_real_step(encoder, stage, ckpt, capsys):
    """A 4-layer, hidden-256 builtin Llama (fp32), batch 8 x ~128 tokens, KD on: one real `stage_step` + backward +
    clip + AdamW step, measured in steady state (the AdamW states exist: a first step runs before measuring)."""
    from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer
    from latentgate.train.trainer import build_optimizer, stage_step
    from latentgate.train.workspace import load_splits, workspace_from_lm

    cfg = _resolve("base.layers=4", "base.hidden=256", "base.heads=4", "base.intermediate=768", "model.d_z=64",
                   f"{stage}.batch_size=8", f"model.encoder={encoder}", "run.device=cpu",
                   f"base.gradient_checkpointing={ckpt}", preset="micro")
    torch.manual_seed(0)
    tok = builtin_tokenizer(cfg)
    splits = load_splits(cfg)
    ws = workspace_from_lm(cfg, build_builtin_lm(cfg, len(tok), tok), tok, splits)
    if stage == "stage_b":
        from latentgate.model.lora import attach_lora

        ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
    if stage == "stage_b" or ckpt:  # as train_stage does: HF checkpoints layers only in train mode
        ws.lm.train()
    st = getattr(cfg, stage)
    assert st.kd_weight > 0  # the teacher pass is part of the step
    batch = _long_examples(splits["train"], 8, 110)
    ws.encoder.train()
    ws.adapter.train()
    opt, sched, groups = build_optimizer(ws, st)
    trainable = [p for ps in groups.values() for p in ps]
    gen = torch.Generator().manual_seed(0)
    calls = []  # (is the LM's own body, sequence length) of every Llama body forward, in order
    lm_body = ws.lm.get_decoder() if hasattr(ws.lm, "get_decoder") else None
    for module in {id(m): m for m in [*ws.lm.modules(), *ws.encoder.modules()]}.values():
        if type(module).__name__ == "LlamaModel":
            module.register_forward_pre_hook(
                lambda mod, args, kw: calls.append((mod is lm_body, (kw.get("inputs_embeds") if kw.get(
                    "inputs_embeds") is not None else kw["input_ids"]).shape[1])), with_kwargs=True)

    def step():
        out = stage_step(ws, batch, st, 0, gen)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, st.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    step()
    calls.clear()
    tracker = LiveBytes().track(ws.lm, ws.encoder, ws.adapter, opt)
    with tracker:
        step()
    m = cfg.model.num_latents
    seq_len = calls[0][1] - (m if encoder == "lm_self" else 0)  # the encoder's pass comes first
    prefix = ws.contract.prefix_len - m
    plan = mp.plan_memory(cfg, seq_len, device="cpu", prefix_tokens=prefix,
                          answer_tokens=calls[-1][1] - ws.contract.prefix_len, stages=(stage,))
    planned, measured = plan.stage(stage).peak, tracker.peak
    with capsys.disabled():
        print(f"\n[memory plan] {encoder} {stage}{' ckpt' if ckpt else ''}: batch 8 x {seq_len} tokens, "
              f"planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB ({planned / measured - 1:+.1%})")
    assert planned == pytest.approx(measured, rel=0.20)


def test_logit_bytes_per_answer_logit_are_measured():
    """LOGIT_BYTES: the loss's peak over the gathered answer logits, without and with KD, in fp32 and bf16."""
    from latentgate.config import StageConfig
    from latentgate.train.losses import compute_losses

    b, t, v = 4, 3, 5000
    for dtype in (torch.float32, torch.bfloat16):
        for kd in (False, True):
            logits = torch.randn(b, t, v, dtype=dtype, requires_grad=True)
            targets, mask = torch.randint(0, v, (b, t)), torch.ones(b, t, dtype=torch.bool)
            tracker = LiveBytes().track(logits, targets, mask)
            with tracker:
                start = tracker.current
                gathered = logits * 1  # stands for answer_logits' gather: a new [B, T, V] tensor
                teacher = torch.randn(b, t, v, dtype=dtype) if kd else None
                out = compute_losses(gathered, targets, mask, StageConfig(kd_weight=0.5 if kd else 0.0), teacher, 3)
                del gathered, teacher
                out.total.backward()
            per_logit = (tracker.peak - start) / (b * t * v)
            assert per_logit <= mp.LOGIT_BYTES[kd] * 1.01, (dtype, kd, per_logit)


# ---- (b) Llama-3-8B: what fits -----------------------------------------------------------------------------------

def _llama3(*sets: str) -> config.Config:
    return _resolve("base.name=shape:llama-3-8b", "stage_a.batch_size=8", "stage_b.batch_size=8", *sets)


@pytest.fixture(scope="module")
def llama3_arch():
    return lm_arch(_llama3())


def test_llama_3_8b_lm_self_bf16_checkpointed_fits_in_40_gb_not_24_gb(llama3_arch):
    """Batch 8, 512 text tokens, the default 128-example probe. Each stage peaks at its probe's encoder pass (the
    whole probe set through the LM at once): ~23.3 GiB of live tensors + ~2.8 GiB of CUDA overhead. So a 24 GB card
    is refused at the probe and a 40 GB card holds both stages; eval at its default batch 200 needs ~44 GiB (text
    generation: KV cache + prefill) and is refused there, batch 64 fits."""
    cfg = _llama3("model.encoder=lm_self", "base.gradient_checkpointing=true", "base.dtype=bfloat16")
    plan = mp.plan_memory(cfg, 512, device="cuda", arch=llama3_arch, world_size=1)
    for stage, gib in (("stage_a", 26.1), ("stage_b", 26.2)):
        sp = plan.stage(stage)
        assert sp.parts["frozen"] == 8_030_261_248 * 2
        assert sp.peak / mp.GiB == pytest.approx(gib, rel=0.03), (stage, sp.peak / mp.GiB)
        assert sp.at == "probe encoder" and sp.phases["probe encoder"] > 1.5 * sp.phases["loss"]
        assert sp.peak - sp.live_peak == mp.cuda_overhead(sp.live_peak)  # context + allocator margin
        assert sp.peak_alt > sp.peak  # without checkpointing it needs more
    assert plan.stage("eval").peak / mp.GiB == pytest.approx(44.3, rel=0.03)
    assert plan.stage("eval").at == "text generation"
    training = ("stage_a", "stage_b")
    fit.check_fits(cfg, "cuda", memory_bytes=int(40e9), stages=training, arch=llama3_arch, world_size=1)  # no error
    with pytest.raises(ConfigError, match=r"^Stage A needs 26\.1 GiB \(peak at its probe encoder, CUDA overhead "
                                          r"2\.8 GiB included\), the device has 22\.4 GiB") as err:
        fit.check_fits(cfg, "cuda", memory_bytes=int(24e9), stages=training, arch=llama3_arch, world_size=1)
    assert "data.n_probe" in err.value.fix
    with pytest.raises(ConfigError, match=r"^eval needs 44\.3 GiB .*the device has 37\.3 GiB"):
        fit.check_fits(cfg, "cuda", memory_bytes=int(40e9), stages=("eval",), arch=llama3_arch, world_size=1)
    smaller = _llama3("model.encoder=lm_self", "base.gradient_checkpointing=true", "base.dtype=bfloat16",
                      "eval.batch_size=64")
    fit.check_fits(smaller, "cuda", memory_bytes=int(40e9), stages=("eval",), arch=llama3_arch, world_size=1)


def test_each_rank_plans_its_share_of_the_batch(llama3_arch, monkeypatch):
    """Eight ranks at global batch 64 run 8 rows each: the training moments equal one rank at batch 8; the probe and
    eval (the whole probe set on each rank, eval on rank 0) do not shrink. WORLD_SIZE (torchrun's) is the default."""
    sets = ("model.encoder=lm_self", "base.gradient_checkpointing=true", "base.dtype=bfloat16")
    one = mp.plan_memory(_llama3(*sets), 512, device="cuda", arch=llama3_arch, world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "8")
    eight = mp.plan_memory(_llama3(*sets, "stage_a.batch_size=64", "stage_b.batch_size=64"), 512, device="cuda",
                           arch=llama3_arch)
    alone = mp.plan_memory(_llama3(*sets, "stage_a.batch_size=64", "stage_b.batch_size=64"), 512, device="cuda",
                           arch=llama3_arch, world_size=1)
    assert eight.target.world_size == 8
    for stage in ("stage_a", "stage_b", "eval"):
        assert eight.stage(stage).phases == one.stage(stage).phases
    assert alone.stage("stage_a").phases["loss"] > 7 * one.stage("stage_a").phases["loss"]


def test_llama_3_8b_lm_copy_fp32_is_refused_on_an_80_gb_device(llama3_arch):
    cfg = _llama3("model.encoder=lm_copy", "base.gradient_checkpointing=false", "base.dtype=float32")
    plan = mp.plan_memory(cfg, 512, device="cuda", arch=llama3_arch)
    sp = plan.stage("stage_a")
    body = 8_030_261_248 - 128256 * 4096
    assert sp.parts["trainable"] >= 4 * body and sp.parts["adam"] >= 8 * body
    for stage in ("stage_a", "stage_b"):
        assert plan.stage(stage).peak > 80e9
    with pytest.raises(ConfigError) as err:
        fit.check_fits(cfg, "cuda", memory_bytes=int(80e9), arch=llama3_arch)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("Stage A needs ") and "the device has 74.5 GiB" in message
    assert "model.encoder=lm_self" in err.value.fix


def test_device_memory_on_cpu_is_available_ram():
    available = fit.device_memory_bytes("cpu")
    assert 0 < available <= 1 << 50


# ---- (c) the command ---------------------------------------------------------------------------------------------

def _invoke(*args: str):
    from click.testing import CliRunner

    from latentgate.cli import main

    return CliRunner().invoke(main, list(args))


def test_plan_command_prints_one_table():
    result = _invoke("plan", "--set", "base.name=shape:llama-3-8b", "--set", "run.device=cuda", "--set",
                     "base.gradient_checkpointing=true", "--set", "stage_a.batch_size=8", "--set",
                     "stage_b.batch_size=8", "--dtype", "bfloat16", "--device-memory-gib", "80")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum(line.startswith("stage ") for line in lines) == 1
    rows = [line for line in lines if line.startswith(("Stage A ", "Stage B ", "eval "))]
    assert [row[:7] for row in rows] == ["Stage A", "Stage B", "eval   "]
    assert "lm_self" in lines[0] and "bfloat16 on cuda" in lines[0]


def test_plan_command_refuses_what_does_not_fit():
    result = _invoke("plan", "--set", "base.name=shape:llama-3-8b", "--set", "model.encoder=lm_copy",
                     "--set", "run.device=cuda", "--dtype", "float32", "--device-memory-gib", "80")
    assert result.exit_code == 2
    assert "Stage A needs" in result.output and "(fix: " in result.output


# ---- (d) the phases check before they run ------------------------------------------------------------------------

def test_eval_is_memory_checked_before_it_loads_anything(bpe_lm_dir, tmp_path, monkeypatch):
    """run_eval refuses an eval batch the machine cannot hold before it opens a run or reads the checkpoint (which
    does not exist here), naming the eval, the moment of its peak and both figures; the stage check covers the probe."""
    from latentgate.phases.stages import check_memory, run_eval
    from latentgate.tracking.lineage import BaseLM
    from latentgate.train.workspace import load_splits

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # were a run opened after all
    cfg = config.resolve("micro", {"base.name": str(bpe_lm_dir), "eval.batch_size": 10**7, "run.device": "cpu"})
    splits = load_splits(cfg)
    with pytest.raises(ConfigError, match=r"^eval needs [\d.]+ GiB \(peak at its \w[\w ]+\), the device has") as err:
        run_eval(cfg, BaseLM(str(bpe_lm_dir), "no-run", "external"), tmp_path / "missing", tmp_path, splits)
    assert err.value.fix == "lower eval.batch_size"
    check_memory(cfg, "stage_a", str(bpe_lm_dir), splits)  # the stage (probe included) fits
    sp = mp.plan_memory(cfg, 64, device="cpu", stages=("stage_a",)).stage("stage_a")
    assert {"probe encoder", "probe scoring", "probe generation"} <= set(sp.phases)
