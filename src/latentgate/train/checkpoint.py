"""Checkpoints that cannot be half-written, silently partial, or silently ignored.

A checkpoint is one directory::

    <dir>/<name>.safetensors   one per module in `modules` (its own state_dict, nothing else)
    <dir>/lora/                peft `save_pretrained` output (standard adapter format, `PeftModel.from_pretrained`)
    <dir>/optimizer.pt         torch.save(optimizer.state_dict())   (read back with weights_only=True)
    <dir>/scheduler.pt         torch.save(scheduler.state_dict())   (read back with weights_only=True)
    <dir>/rng.json             python / numpy / torch (+cuda) RNG state at save time
    <dir>/manifest.json        every file above with its sha256, every module with its parameter count, the trainer
                               state, the resolved config, the data contract and the base LM, sealed by its own hash

It is written to a sibling temp directory renamed into place only when complete, so `<dir>` is the old checkpoint
or the new one, never a mixture. A load verifies every hash, requires that the modules given and the modules saved
are the same set (a missing module is an error, never a fresh random init), checks every key and shape before
changing anything, loads strictly, and checks that the LoRA weights really landed. The manifest half (reading,
verifying, the swap) is in `manifest.py`, which does not import torch.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from latentgate.errors import CheckpointError
from latentgate.safety import fsync_dir, swap_into_place
from latentgate.train.manifest import (
    FORMAT,
    check_base,
    check_compat,
    check_name,
    json_bytes,
    read_manifest,
    sha256_file,
    to_json,
    verify_checkpoint,
    write_file,
    write_manifest,
)

LORA_DIR = "lora"
LORA_WEIGHTS = f"{LORA_DIR}/adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.json"
_REBUILD = "build the model with the config the checkpoint was trained with"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng_state() -> dict:
    """Python `random`, numpy, torch CPU and every CUDA device, as plain JSON values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "torch": _b64(torch.get_rng_state()),
            "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`. CUDA state is restored for the devices present (none on a CPU machine)."""
    py, n = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"][: torch.cuda.device_count()]])


def save_checkpoint(directory: str | os.PathLike, *, modules: dict[str, torch.nn.Module], lora_model: Any = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    trainer_state: dict | None = None, config: dict | None = None, contract: dict | None = None,
                    rng_state: dict | None = None, base_lm: dict | None = None) -> Path:
    """Write a complete checkpoint to `directory` atomically and return its path.

    `config` is flat (`config.flatten`). `rng_state` defaults to `capture_rng_state()` now. An existing checkpoint
    is replaced only once the new one is complete; on any exception it is left intact and no temp directory remains.
    """
    target = Path(directory).absolute()
    for name in modules:
        check_name(name)
    # the JSON parts first: a bad value fails before anything touches the disk
    manifest: dict[str, Any] = {
        "format": FORMAT, "modules": {}, "lora": None, "files": {}, "sizes": {},
        "trainer_state": to_json(trainer_state or {}, "trainer_state"), "config": to_json(config or {}, "config"),
        "contract": to_json(contract or {}, "contract"), "base_lm": to_json(base_lm or {}, "base_lm"),
        "created": datetime.now(UTC).isoformat(timespec="seconds")}
    rng = to_json(rng_state if rng_state is not None else capture_rng_state(), "rng_state")

    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.with_name(f"{target.name}.tmp-{tag}")
    tmp.mkdir()

    def put(rel: str, data: bytes) -> str:
        manifest["sizes"][rel] = len(data)
        return write_file(tmp / rel, data)

    try:
        for name, module in modules.items():
            # copies: tied or view-sharing tensors become separate, contiguous CPU tensors, as safetensors requires
            sd = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                  for k, v in module.state_dict().items()}
            data = safetensors.torch.save(sd, metadata={"format": "pt", "module": name})
            manifest["modules"][name] = {"file": f"{name}.safetensors", "sha256": put(f"{name}.safetensors", data),
                                         "params": sum(p.numel() for p in module.parameters())}
        if lora_model is not None:
            manifest["lora"] = _save_lora(tmp, lora_model, modules, manifest["sizes"])
        for rel, obj in ((OPTIMIZER_FILE, optimizer), (SCHEDULER_FILE, scheduler)):
            if obj is not None:
                buf = io.BytesIO()
                torch.save(obj.state_dict(), buf)
                manifest["files"][rel] = put(rel, buf.getvalue())
        manifest["files"][RNG_FILE] = put(RNG_FILE, json_bytes(rng))
        write_manifest(tmp, manifest)
        fsync_dir(tmp)
        swap_into_place(tmp, target, tag)
    except OSError as err:  # name the checkpoint's file, not the temp folder that is removed now
        shutil.rmtree(tmp, ignore_errors=True)
        shown = str(err.filename).replace(str(tmp), str(target)) if err.filename else None
        raise OSError(err.errno, err.strerror or str(err), shown) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _single_adapter(lora_model) -> None:
    if list(lora_model.peft_config) != ["default"]:
        raise CheckpointError(f"lora_model has adapters {sorted(lora_model.peft_config)}; a checkpoint holds one, "
                              "'default'", "attach one LoRA adapter (peft's default name)")


def _save_lora(tmp: Path, lora_model, modules: dict[str, torch.nn.Module], sizes: dict) -> dict:
    _single_adapter(lora_model)
    saved = sum(t.numel() for t in get_peft_model_state_dict(lora_model).values())
    # a trainable parameter neither the adapter nor `modules` saves would be trained and then lost
    owned = {id(p) for m in modules.values() for p in m.parameters()}
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad and id(p) not in owned)
    if trainable > saved:
        raise CheckpointError(f"lora_model has {trainable} trainable parameters but its adapter saves only {saved}",
                              "add the extra trainable modules to LoraConfig(modules_to_save=...) or pass them in "
                              "modules=")
    lora_dir = tmp / LORA_DIR
    try:
        lora_model.save_pretrained(str(lora_dir), safe_serialization=True)
    except Exception as err:  # safetensors reports a full disk as SafetensorError, peft's JSON writes as a bare
        if isinstance(err, OSError) and err.filename:  # OSError: neither names the file
            raise
        for code in (28, 27):  # ENOSPC, EFBIG
            if os.strerror(code).lower() in str(err).lower():
                raise OSError(code, os.strerror(code), str(_being_written(tmp, err))) from err
        raise
    files = {}
    for path in sorted(p for p in lora_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp).as_posix()
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[rel], sizes[rel] = sha256_file(path), path.stat().st_size
    if LORA_WEIGHTS not in files:
        raise CheckpointError(f"peft save_pretrained wrote no {LORA_WEIGHTS}", "use a peft version that saves "
                              "safetensors adapters")
    fsync_dir(lora_dir)
    return {"files": files, "params": saved}


def _being_written(tmp: Path, err: Exception) -> Path:
    """The file a failed adapter save was writing: the weights for a safetensors error (it removes its partial
    file), else the adapter folder (peft's JSON and README writes raise a bare OSError)."""
    return tmp / LORA_WEIGHTS if type(err).__name__ == "SafetensorError" else tmp / LORA_DIR


def _check_parts(d: Path, manifest: dict, modules: dict, lora_model, optimizer, scheduler, allow_extra: bool) -> None:
    """What is given and what was saved must match: no silent fresh init, no silently ignored weights."""
    saved = set(manifest["modules"])
    for name in modules:
        if check_name(name) not in saved:
            raise CheckpointError(f"checkpoint {d} has no module {name!r} (it has: {sorted(saved) or 'none'})",
                                  "load from a checkpoint that saved this module; it is never initialised fresh")
    extra = sorted(saved - set(modules))
    if extra and not allow_extra:
        raise CheckpointError(f"checkpoint {d} has modules {extra} that were not requested",
                              "pass them in modules= so they are loaded, or allow_extra=True to skip them on purpose")
    has_lora = manifest.get("lora") is not None
    if has_lora and lora_model is None:
        raise CheckpointError(f"checkpoint {d} has LoRA weights but no lora_model was given",
                              "pass lora_model=<the PeftModel> so the trained adapter is restored")
    if lora_model is not None and not has_lora:
        raise CheckpointError(f"checkpoint {d} has no LoRA weights but a lora_model was given",
                              "load a checkpoint saved with lora_model=, or do not attach LoRA")
    for given, rel, what in ((optimizer, OPTIMIZER_FILE, "optimizer"), (scheduler, SCHEDULER_FILE, "scheduler")):
        if given is not None and rel not in manifest["files"]:
            raise CheckpointError(f"checkpoint {d} has no {what} state but a {what} was given",
                                  f"load without {what}= (weights only), or resume from a checkpoint saved with one")


def _read_state(d: Path, rel: str, want: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The tensors of `rel`, refused unless their keys and shapes are exactly those of `want`."""
    try:
        got = safetensors.torch.load_file(str(d / rel), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any read failure of a verified file becomes one clear error
        raise CheckpointError(f"cannot read {d / rel}: {exc}", "re-save the checkpoint") from None
    missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
    if missing or extra:
        raise CheckpointError(f"checkpoint {d}: {what} ({rel}) does not match the given model: missing keys "
                              f"{missing[:5]}, unexpected keys {extra[:5]}", _REBUILD)
    for k, t in want.items():
        if got[k].shape != t.shape:
            raise CheckpointError(f"checkpoint {d}: {what} key {k!r} has shape {list(got[k].shape)} in the "
                                  f"checkpoint, {list(t.shape)} in the given model", _REBUILD)
    return got


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types; all mean "unreadable"
        raise CheckpointError(f"cannot read {path}: {exc}".replace("\n", " "), "re-save the checkpoint") from None


def load_checkpoint(directory: str | os.PathLike, *, modules: dict[str, torch.nn.Module], lora_model: Any = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    expect_config: dict | None = None, compat_keys: tuple[str, ...] = (), allow_extra: bool = False,
                    restore_rng: bool = False, expect_base: dict | None = None) -> dict:
    """Verify, check and load a checkpoint into the given objects; return the manifest.

    The manifest carries `trainer_state`, `config`, `contract` and, under `rng_state`, the RNG state saved with
    the checkpoint (restored right away when `restore_rng=True`). Everything is checked before any object is
    modified, so a failed load leaves the given objects untouched.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    if compat_keys:
        check_compat(d, manifest, expect_config, tuple(compat_keys))
    check_base(d, manifest, expect_base)
    _check_parts(d, manifest, modules, lora_model, optimizer, scheduler, allow_extra)
    verify_checkpoint(d)

    states = {name: _read_state(d, manifest["modules"][name]["file"], module.state_dict(), f"module {name!r}")
              for name, module in modules.items()}
    lora_state = None
    if lora_model is not None:
        _single_adapter(lora_model)
        lora_state = _read_state(d, LORA_WEIGHTS, get_peft_model_state_dict(lora_model), "LoRA adapter 'default'")
    opt_state = _torch_load(d / OPTIMIZER_FILE) if optimizer is not None else None
    sched_state = _torch_load(d / SCHEDULER_FILE) if scheduler is not None else None
    rng_state = json.loads((d / RNG_FILE).read_text(encoding="utf-8")) if RNG_FILE in manifest["files"] else None

    if optimizer is not None:  # first: its load_state_dict checks the parameter groups before changing anything
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {d}: cannot load optimizer state: {exc}",
                                  "build the optimizer over the same parameters, in the same order, as when the "
                                  "checkpoint was saved") from None
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    for name, module in modules.items():
        module.load_state_dict(states[name], strict=True)
    if lora_state is not None:
        result = set_peft_model_state_dict(lora_model, lora_state)
        # the adapter must now hold exactly the saved weights: a silent no-op load is the failure this prevents
        now = get_peft_model_state_dict(lora_model)
        missed = list(result.unexpected_keys) + [k for k, t in lora_state.items()
                                                 if not torch.equal(now[k].detach().to("cpu", t.dtype), t)]
        if missed:
            raise CheckpointError(f"checkpoint {d}: LoRA weights {missed[:5]} did not load into the given model",
                                  "attach LoRA with the LoraConfig the checkpoint was trained with")
    if restore_rng and rng_state is not None:
        restore_rng_state(rng_state)
    manifest["rng_state"] = rng_state
    return manifest
