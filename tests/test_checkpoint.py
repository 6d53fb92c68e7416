"""Checkpoints: save -> load gives identical logits, resume continues exactly, damage and mismatches are errors.

Real tiny modules and a real peft LoRA on a tiny Llama built from a config; no mocks (monkeypatch is used only to
inject a failure into the final rename).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from latentgate.errors import CheckpointError
from latentgate.train import manifest as mf
from latentgate.train.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from latentgate.train.manifest import MANIFEST, read_manifest, verify_checkpoint

# transformers' own deprecation inside peft's calls; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
CONFIG = {"model.num_latents": 8, "model.d_z": 16, "base.name": "tiny-llama", "train.lr": 1e-3}  # as config.flatten


def make_encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def make_lora(seed: int, perturb: bool = False) -> PeftModel:
    """Same frozen base every time (as if loaded from one pretrained model); the LoRA init depends on `seed`."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if perturb:  # fresh LoRA has B = 0, which would make "restored" and "not restored" indistinguishable
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5)
    return model.eval()


class Tied(torch.nn.Module):
    """Two state_dict keys sharing one storage, as with tied embeddings."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 6)
        self.b = self.a
        self.register_buffer("scale", torch.arange(6.0))


class Exploding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def state_dict(self, *args, **kwargs):
        raise RuntimeError("disk full (injected)")


TOKENS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 60, 0, 11]])
FEATS = torch.linspace(-1, 1, 3 * 16).reshape(3, 16)


def logits(enc, lora) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return enc(FEATS), lora(input_ids=TOKENS).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint with an encoder and a perturbed LoRA Llama, shared by the read-only tests."""
    enc, lora = make_encoder(1), make_lora(1, perturb=True)
    path = save_checkpoint(
        tmp_path_factory.mktemp("ck") / "step-10",
        modules={"encoder": enc},
        lora_model=lora,
        trainer_state={"step": 10, "best_f1": 0.25},
        config=CONFIG,
        contract={"train_digest": "abc"},
    )
    return path, logits(enc, lora), enc, lora


def test_save_load_gives_identical_logits(saved):
    path, (enc_out, lm_out), _, _ = saved
    enc2, lora2 = make_encoder(2), make_lora(2)
    before = logits(enc2, lora2)
    assert not torch.equal(before[0], enc_out) and not torch.equal(before[1], lm_out)  # the test can fail
    manifest = load_checkpoint(
        path,
        modules={"encoder": enc2},
        lora_model=lora2,
        expect_config=CONFIG,
        compat_keys=("model.num_latents", "base.name"),
    )
    after = logits(enc2, lora2)
    assert torch.equal(after[0], enc_out)
    assert torch.equal(after[1], lm_out)
    assert manifest["trainer_state"] == {"step": 10, "best_f1": 0.25}
    assert manifest["contract"] == {"train_digest": "abc"}


def test_lora_dir_is_standard_peft_format(saved):
    path, (_, lm_out), _, _ = saved
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (path / "lora").iterdir()}
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(LlamaForCausalLM(LlamaConfig(**LLAMA)), str(path / "lora")).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=TOKENS).logits, lm_out)


def test_manifest_lists_files_counts_and_hashes(saved):
    path, _, _, lora = saved
    m = read_manifest(path)
    assert m["format"] == 1 and m["config"] == CONFIG and m["created"]
    assert m["modules"]["encoder"]["file"] == "encoder.safetensors"
    assert m["modules"]["encoder"]["params"] == 16 * 32 + 32 + 32 * 8 + 8
    assert m["lora"]["params"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert m["lora"]["params"] == 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers x (q, v) x (A + B)
    assert "lora/adapter_model.safetensors" in m["lora"]["files"]
    assert "rng.json" in m["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    listed = {"encoder.safetensors", MANIFEST} | set(m["lora"]["files"]) | set(m["files"])
    assert on_disk == listed
    assert verify_checkpoint(path)["modules"] == m["modules"]
    assert not list(path.parent.glob("*.tmp-*"))


def test_resume_continues_exactly(tmp_path):
    """Two steps, save, one more step == two steps, resume into fresh objects, one more step."""

    def setup(seed):
        enc, lora = make_encoder(seed), make_lora(seed, perturb=True)
        lora.train()
        params = list(enc.parameters()) + [p for p in lora.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return enc, lora, opt, sched

    def step(enc, lora, opt, sched):
        opt.zero_grad()
        out = lora(input_ids=TOKENS, labels=TOKENS)
        loss = out.loss + enc(FEATS).pow(2).mean() + torch.rand(()) * 0  # touches the RNG, too
        loss.backward()
        opt.step()
        sched.step()

    enc, lora, opt, sched = setup(1)
    step(enc, lora, opt, sched)
    step(enc, lora, opt, sched)
    save_checkpoint(
        tmp_path / "ck",
        modules={"encoder": enc},
        lora_model=lora,
        optimizer=opt,
        scheduler=sched,
        trainer_state={"step": 2},
    )
    step(enc, lora, opt, sched)
    ref = logits(enc, lora.eval())

    enc2, lora2, opt2, sched2 = setup(2)
    m = load_checkpoint(
        tmp_path / "ck", modules={"encoder": enc2}, lora_model=lora2, optimizer=opt2, scheduler=sched2, restore_rng=True
    )
    assert m["trainer_state"]["step"] == 2
    assert sched2.get_last_lr() == pytest.approx([5e-3])
    step(enc2, lora2, opt2, sched2)
    got = logits(enc2, lora2.eval())
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_rng_restore_reproduces_draws(tmp_path):
    state = capture_rng_state()
    state = json.loads(json.dumps(state))  # JSON-serialisable
    first = (torch.rand(5), random.random(), np.random.rand(3))
    restore_rng_state(state)
    again = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])

    save_checkpoint(tmp_path / "ck", modules={"m": torch.nn.Linear(2, 2)})
    expected = torch.rand(4)
    torch.rand(100)
    m = load_checkpoint(tmp_path / "ck", modules={"m": torch.nn.Linear(2, 2)}, restore_rng=True)
    assert torch.equal(torch.rand(4), expected)
    assert m["rng_state"]["torch"]


def test_tied_weights_and_buffers_round_trip(tmp_path):
    src = Tied()
    with torch.no_grad():
        src.a.weight.normal_()
        src.scale.mul_(3)
    save_checkpoint(tmp_path / "ck", modules={"tied": src})
    dst = Tied()
    load_checkpoint(tmp_path / "ck", modules={"tied": dst})
    assert torch.equal(dst.a.weight, src.a.weight) and torch.equal(dst.scale, src.scale)
    assert dst.a is dst.b
    assert read_manifest(tmp_path / "ck")["modules"]["tied"]["params"] == 6 * 6 + 6  # shared counted once


def test_missing_and_extra_modules_are_errors(saved, tmp_path):
    path, _, _, _ = saved
    with pytest.raises(CheckpointError, match=f"checkpoint {path} has no module 'refiner'"):
        load_checkpoint(
            path, modules={"encoder": make_encoder(3), "refiner": torch.nn.Linear(2, 2)}, lora_model=make_lora(3)
        )
    # an extra module in the checkpoint that nobody loads is an error unless allowed on purpose
    save_checkpoint(tmp_path / "two", modules={"encoder": make_encoder(1), "refiner": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match="refiner"):
        load_checkpoint(tmp_path / "two", modules={"encoder": make_encoder(3)})
    enc = make_encoder(3)
    load_checkpoint(tmp_path / "two", modules={"encoder": enc}, allow_extra=True)
    assert torch.equal(enc[0].weight, make_encoder(1)[0].weight)


def test_lora_presence_must_match(saved, tmp_path):
    path, _, _, _ = saved
    with pytest.raises(CheckpointError, match="has LoRA weights but no lora_model"):
        load_checkpoint(path, modules={"encoder": make_encoder(3)})
    save_checkpoint(tmp_path / "nolora", modules={"encoder": make_encoder(1)})
    with pytest.raises(CheckpointError, match="has no LoRA weights"):
        load_checkpoint(tmp_path / "nolora", modules={"encoder": make_encoder(3)}, lora_model=make_lora(3))
    with pytest.raises(CheckpointError, match="no optimizer state"):
        enc = make_encoder(3)
        load_checkpoint(tmp_path / "nolora", modules={"encoder": enc}, optimizer=torch.optim.SGD(enc.parameters()))


def test_shape_mismatch_names_module_key_and_shapes(tmp_path):
    save_checkpoint(tmp_path / "ck", modules={"proj": torch.nn.Linear(4, 8)})
    dst = torch.nn.Linear(4, 6)
    before = dst.weight.clone()
    with pytest.raises(CheckpointError, match=r"'proj' key 'weight' has shape \[8, 4\] .*\[6, 4\]"):
        load_checkpoint(tmp_path / "ck", modules={"proj": dst})
    assert torch.equal(dst.weight, before)


def test_lora_rank_mismatch_is_an_error(saved):
    path, _, _, _ = saved
    torch.manual_seed(0)
    other = get_peft_model(LlamaForCausalLM(LlamaConfig(**LLAMA)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(CheckpointError, match=r"LoRA adapter 'default' key .* has shape \[4, 32\] .*\[2, 32\]"):
        load_checkpoint(path, modules={"encoder": make_encoder(3)}, lora_model=other)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_a_hash_error(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "ck")
    f = path / "encoder.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"hash mismatch for .*encoder\.safetensors.*truncated"):
        load_checkpoint(path, modules={"encoder": make_encoder(3)}, lora_model=make_lora(3))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        verify_checkpoint(path)


@pytest.mark.parametrize("rel", ["encoder.safetensors", "lora/adapter_model.safetensors"])
def test_flipped_byte_is_a_hash_error(saved, tmp_path, rel):
    path = _copy(saved[0], tmp_path / "ck")
    f = path / rel
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: the file still parses, only the hash can tell
    f.write_bytes(bytes(data))
    enc = make_encoder(3)
    before = enc[0].weight.clone()
    with pytest.raises(CheckpointError, match=f"hash mismatch for .*{rel}"):
        load_checkpoint(path, modules={"encoder": enc}, lora_model=make_lora(3))
    assert torch.equal(enc[0].weight, before)  # nothing was loaded


def test_missing_file_dir_and_manifest(saved, tmp_path):
    path = _copy(saved[0], tmp_path / "ck")
    (path / "lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing lora/adapter_model.safetensors"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"does not exist \(fix: "):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no manifest.json \(fix: "):
        load_checkpoint(tmp_path / "empty", modules={})


def test_incompatible_config_names_the_key(saved):
    path, _, _, _ = saved
    other = {**CONFIG, "model.num_latents": 16}
    with pytest.raises(CheckpointError, match=f"incompatible checkpoint: model.num_latents is 8 in {path}, 16 in this"):
        load_checkpoint(
            path,
            modules={"encoder": make_encoder(3)},
            lora_model=make_lora(3),
            expect_config=other,
            compat_keys=("model.num_latents", "model.d_z"),
        )
    # keys not listed in compat_keys may differ (e.g. the learning rate of a fine-tuning run)
    load_checkpoint(
        path,
        modules={"encoder": make_encoder(3)},
        lora_model=make_lora(3),
        expect_config={**CONFIG, "train.lr": 1.0},
        compat_keys=("model.num_latents",),
    )


def test_failed_save_leaves_old_checkpoint_and_no_temp(tmp_path):
    target = tmp_path / "ck"
    old = torch.nn.Linear(3, 3)
    save_checkpoint(target, modules={"encoder": old}, trainer_state={"step": 1})
    # failure while writing module files: no temp dir, old checkpoint untouched
    with pytest.raises(RuntimeError, match="injected"):
        save_checkpoint(
            target, modules={"encoder": torch.nn.Linear(3, 3), "boom": Exploding()}, trainer_state={"step": 2}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert verify_checkpoint(target)["trainer_state"] == {"step": 1}
    dst = torch.nn.Linear(3, 3)
    load_checkpoint(target, modules={"encoder": dst})
    assert torch.equal(dst.weight, old.weight)
    # failure when no checkpoint existed: no target, no temp
    with pytest.raises(RuntimeError, match="injected"):
        save_checkpoint(tmp_path / "fresh", modules={"boom": Exploding()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failed_final_rename_restores_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    save_checkpoint(target, modules={"encoder": torch.nn.Linear(3, 3)}, trainer_state={"step": 1})
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("injected rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(mf.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(target, modules={"encoder": torch.nn.Linear(3, 3)}, trainer_state={"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert verify_checkpoint(target)["trainer_state"] == {"step": 1}


def test_successful_overwrite_replaces_old(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, modules={"a": torch.nn.Linear(2, 2)}, trainer_state={"step": 1})
    save_checkpoint(target, modules={"b": torch.nn.Linear(2, 2)}, trainer_state={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    m = verify_checkpoint(target)
    assert m["trainer_state"] == {"step": 2} and set(m["modules"]) == {"b"}
    assert not (target / "a.safetensors").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "..", ""])
def test_unsafe_module_names_are_rejected(tmp_path, name):
    with pytest.raises(CheckpointError, match="invalid module name"):
        save_checkpoint(tmp_path / "ck", modules={name: torch.nn.Linear(2, 2)})
    assert not list(tmp_path.iterdir())


def test_unsafe_path_in_manifest_is_rejected(tmp_path):
    save_checkpoint(tmp_path / "ck", modules={"m": torch.nn.Linear(2, 2)})
    mpath = tmp_path / "ck" / MANIFEST
    m = json.loads(mpath.read_text())
    m["files"]["../../etc/passwd"] = "0" * 64
    mpath.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="unsafe file path"):
        verify_checkpoint(tmp_path / "ck")


def test_untrained_but_trainable_params_outside_adapter_refused(tmp_path):
    lora = make_lora(1)
    lora.base_model.model.lm_head.weight.requires_grad_(True)  # trained, but peft would not save it
    with pytest.raises(CheckpointError, match="trainable parameters but its adapter saves only"):
        save_checkpoint(tmp_path / "ck", modules={}, lora_model=lora)
    assert not list(tmp_path.iterdir())


def test_compat_keys_compare_flat_dotted_configs(tmp_path):
    flat = {"model.num_latents": 8, "base.name": "tiny-llama", "model.tied": True}
    save_checkpoint(tmp_path / "ck", modules={"m": torch.nn.Linear(2, 2)}, config=flat)
    load_checkpoint(tmp_path / "ck", modules={"m": torch.nn.Linear(2, 2)}, expect_config=dict(flat),
                    compat_keys=("model.num_latents", "base.name"))
    # a nested config has none of the dotted keys: refused, never compared as "absent == absent"
    nested = {"model": {"num_latents": 8}, "base": {"name": "tiny-llama"}}
    with pytest.raises(CheckpointError, match=r"model.num_latents is not in the config .*config.flatten"):
        load_checkpoint(tmp_path / "ck", modules={"m": torch.nn.Linear(2, 2)}, expect_config=nested,
                        compat_keys=("model.num_latents",))
    with pytest.raises(CheckpointError, match=r"model.tied is true in .*, 1 in this config"):  # True == 1 in Python
        load_checkpoint(tmp_path / "ck", modules={"m": torch.nn.Linear(2, 2)}, expect_config={**flat, "model.tied": 1},
                        compat_keys=("model.tied",))
    with pytest.raises(CheckpointError, match=r'base.name is "tiny-llama" in .*, "other" in this config'):
        load_checkpoint(
            tmp_path / "ck",
            modules={"m": torch.nn.Linear(2, 2)},
            expect_config={**flat, "base.name": "other"},
            compat_keys=("base.name",),
        )


def test_cli_verify_does_not_import_torch(saved):
    """`latentgate checkpoint verify` reads and re-hashes with train/manifest.py alone: no torch start-up cost."""
    import subprocess
    import sys

    code = ("import sys\nfrom latentgate.cli import main\n"
            f"try:\n    main(['checkpoint', 'verify', {str(saved[0])!r}], standalone_mode=False)\n"
            "finally:\n    print(sorted(m for m in ('torch', 'safetensors', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "every hash verified" in out.stdout and out.stdout.strip().endswith("[]"), out.stdout
