"""Checkpoints that cannot be half-written, silently partial, or silently ignored.

A checkpoint is one directory::

    <dir>/<name>.safetensors   one per module in `modules` (its own state_dict, nothing else)
    <dir>/lora/                peft `save_pretrained` output (standard adapter format, `PeftModel.from_pretrained`)
    <dir>/optimizer.pt         torch.save(optimizer.state_dict())   (read back with weights_only=True)
    <dir>/scheduler.pt         torch.save(scheduler.state_dict())   (read back with weights_only=True)
    <dir>/rng.json             python / numpy / torch (+cuda) RNG state at save time
    <dir>/manifest.json        every file above with its sha256, every module with its parameter count,
                               the trainer state, the resolved config and the data contract, and the sha256 of
                               the manifest itself (`manifest_sha256`: an edited manifest fails verification)

Writes go to a sibling temp directory that is renamed into place only when complete, so `<dir>` is either the
old checkpoint or the new one, never a mixture. Loads verify every hash first, then require that the modules the
caller passes and the modules in the manifest are the same set (a module missing from the checkpoint is an error,
never a fresh random init), load strictly, and check LoRA weights really landed in the given PeftModel.
"""

from __future__ import annotations

import base64
import errno
import glob
import hashlib
import json
import os
import random
import re
import secrets
import shutil
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from latentgate.errors import CheckpointError
from latentgate.safety import check_relative, ensure_inside


class _LazyTorch:
    """`torch`, imported on first use: reading and verifying a manifest (`latentgate checkpoint verify`) needs no
    torch, and importing it costs ~2 s of CLI start-up."""

    def __getattr__(self, name: str) -> Any:
        import torch as _torch

        return getattr(_torch, name)


torch = _LazyTorch()

MANIFEST = "manifest.json"
FORMAT = 1
LORA_DIR = "lora"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.json"

MANIFEST_DIGEST = "manifest_sha256"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_CHUNK = 1 << 20

__all__ = [
    "MANIFEST",
    "capture_rng_state",
    "check_compat",
    "load_checkpoint",
    "read_manifest",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]


# --------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------


def _check_name(name: Any, what: str = "module name") -> str:
    """A name that becomes a file name must be a plain identifier-like string, never a path."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise CheckpointError(
            f"invalid {what} {name!r}: it becomes a file name in the checkpoint",
            "use letters, digits, '_', '-' or '.' only (no '/', no '..', not absolute)",
        )
    return name


def _check_relpath(rel: Any, directory: Path) -> str:
    """A path read from a manifest must stay inside the checkpoint directory (no '..', not absolute)."""
    return check_relative(rel, f"the manifest of checkpoint {directory} lists the unsafe file path",
                          fix="re-save the checkpoint; never edit a manifest by hand")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own `manifest_sha256` entry."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=_json_default).encode("utf-8")).hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Rewrite a checkpoint's manifest (an export that drops files), sealed with its new hash."""
    manifest = {k: v for k, v in _to_json(manifest, "manifest").items() if k != MANIFEST_DIGEST}
    _write_json(Path(directory) / MANIFEST, {**manifest, MANIFEST_DIGEST: manifest_digest(manifest)})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item) and type(obj).__module__ == "numpy":
        return item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _to_json(obj: Any, what: str) -> Any:
    """Normalise to plain JSON types (tuples -> lists, Path -> str); error naming the field otherwise."""
    try:
        return json.loads(json.dumps(obj, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot store {what} in the checkpoint manifest: {exc}",
            f"pass {what} as plain JSON values (str, int, float, bool, list, dict)",
        ) from None


@contextmanager
def _disk_errors(path: Path):
    """A failed write raises OSError naming `path`. torch's zip writer and safetensors raise RuntimeError /
    SafetensorError on a full disk (the OSError, if any, is only their context) and never name the file."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except Exception as err:
        cause, seen = err.__cause__ or err.__context__, 0
        while cause is not None and not isinstance(cause, OSError) and seen < 8:
            cause, seen = cause.__cause__ or cause.__context__, seen + 1
        if isinstance(cause, OSError) and cause.errno:
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from err
        text = str(err).lower()
        for needle, code in (("no space left", errno.ENOSPC), ("os error 28", errno.ENOSPC),
                             ("file too large", errno.EFBIG), ("os error 27", errno.EFBIG)):
            if needle in text:
                raise OSError(code, os.strerror(code), str(path)) from err
        raise


def _torch_save(obj: Any, path: Path) -> None:
    with _disk_errors(path), open(path, "wb") as f:  # a file object: a full disk surfaces as OSError(ENOSPC)
        torch.save(obj, f)


def _write_json(path: Path, obj: Any) -> None:
    with _disk_errors(path), open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def _state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unaliased tensors: tied/shared weights and views become separate copies (safetensors
    refuses shared storage). Loading a tied pair writes the same values into the shared parameter twice."""
    out: dict[str, torch.Tensor] = {}
    ptrs: set[int] = set()
    for key, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor",
                "keep only tensors in the module's state_dict",
            )
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            storage = t.untyped_storage()
            if storage.data_ptr() in ptrs or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
            ptrs.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_peft_model(obj: Any) -> bool:
    return hasattr(obj, "peft_config") and hasattr(obj, "save_pretrained")


def _adapter_subdir(adapter: str) -> str:
    # peft's save_pretrained layout: "default" at the top level, other adapters in a sub-folder of their name
    return LORA_DIR if adapter == "default" else f"{LORA_DIR}/{adapter}"


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# --------------------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict:
    """Python `random`, numpy (if installed), torch CPU and every CUDA device, as plain JSON values."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "torch": _b64(torch.get_rng_state()),
        "numpy": None,
        "cuda": None,
    }
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`. CUDA state is restored for the devices present (none on a CPU machine)."""
    if not isinstance(state, dict) or "python" not in state or "torch" not in state:
        raise CheckpointError(
            "RNG state is malformed (expected keys 'python' and 'torch')",
            "pass the dict returned by capture_rng_state()",
        )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("numpy") is not None:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            pass
        else:
            n = state["numpy"]
            np.random.set_state(
                (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
            )
    if state.get("cuda") and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        for i, s in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=i)


# --------------------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    modules: dict[str, torch.nn.Module],
    lora_model: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainer_state: dict | None = None,
    config: dict | None = None,
    contract: dict | None = None,
    rng_state: dict | None = None,
    base_lm: dict | None = None,
) -> Path:
    """Write a complete checkpoint to `directory` atomically and return its path.

    `rng_state` defaults to `capture_rng_state()` at the time of the call. If `directory` already holds a
    checkpoint it is replaced only after the new one is complete; on any exception the old one is left intact
    and no temp directory remains.
    """
    target = Path(directory).absolute()
    if not isinstance(modules, dict):
        raise CheckpointError(
            "modules must be a dict of name -> torch.nn.Module", "pass modules={'encoder': encoder, ...}"
        )
    for name, module in modules.items():
        _check_name(name)
        if not isinstance(module, torch.nn.Module):
            raise CheckpointError(
                f"module {name!r} is a {type(module).__name__}, not a torch.nn.Module",
                "pass torch.nn.Module objects in modules=",
            )
    if not modules and lora_model is None:
        raise CheckpointError(f"nothing to save in checkpoint {target}", "pass modules= and/or lora_model=")
    if lora_model is not None and not _is_peft_model(lora_model):
        raise CheckpointError(
            f"lora_model is a {type(lora_model).__name__}, not a peft PeftModel",
            "pass the model returned by peft.get_peft_model(...)",
        )
    if target.exists() and not target.is_dir():
        raise CheckpointError(
            f"checkpoint path {target} exists and is not a directory", "choose another path or remove the file"
        )
    # JSON parts first: a bad value fails before anything touches the disk
    meta = {
        "trainer_state": _to_json(trainer_state or {}, "trainer_state"),
        "config": _to_json(config or {}, "config"),
        "contract": _to_json(contract or {}, "contract"),
        "base_lm": _to_json(base_lm or {}, "base_lm"),
    }
    rng = _to_json(rng_state if rng_state is not None else capture_rng_state(), "rng_state")

    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.with_name(f"{target.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        manifest = _write_contents(tmp, modules, lora_model, optimizer, scheduler, rng)
        manifest.update(meta)
        manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        manifest = _to_json(manifest, "manifest")
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
        _write_json(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        swap_into_place(tmp, target, tag)
    except OSError as err:  # name the checkpoint's file, not the temp folder that is removed now
        shutil.rmtree(tmp, ignore_errors=True)
        shown = str(err.filename).replace(str(tmp), str(target)) if err.filename else None
        raise OSError(err.errno, err.strerror or str(err), shown) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_contents(tmp: Path, modules, lora_model, optimizer, scheduler, rng) -> dict:
    from safetensors.torch import save_file

    manifest: dict[str, Any] = {"format": FORMAT, "modules": {}, "lora": None, "files": {}, "sizes": {}}

    def record(rel: str) -> str:
        path = tmp / rel
        _fsync_file(path)
        manifest["sizes"][rel] = path.stat().st_size
        return _sha256(path)

    for name, module in modules.items():
        rel = f"{name}.safetensors"
        with _disk_errors(tmp / rel):
            save_file(_state_dict_for_save(module), str(tmp / rel), metadata={"format": "pt", "module": name})
        manifest["modules"][name] = {"file": rel, "params": _param_count(module), "sha256": record(rel)}

    if lora_model is not None:
        manifest["lora"] = _save_lora(tmp, lora_model, modules, record)

    if optimizer is not None:
        _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        manifest["files"][OPTIMIZER_FILE] = record(OPTIMIZER_FILE)
    if scheduler is not None:
        _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        manifest["files"][SCHEDULER_FILE] = record(SCHEDULER_FILE)
    _write_json(tmp / RNG_FILE, rng)
    manifest["files"][RNG_FILE] = record(RNG_FILE)
    return manifest


def _save_lora(tmp: Path, lora_model, modules: dict[str, torch.nn.Module], record) -> dict:
    from peft import get_peft_model_state_dict

    adapters = list(lora_model.peft_config.keys())
    for a in adapters:
        _check_name(a, "adapter name")
    saved_params = 0
    adapter_info: dict[str, dict] = {}
    for a in adapters:
        sd = get_peft_model_state_dict(lora_model, adapter_name=a)
        n = sum(t.numel() for t in sd.values() if isinstance(t, torch.Tensor))
        adapter_info[a] = {"dir": _adapter_subdir(a), "params": n}
        saved_params += n
    # A trainable parameter the adapter does not save (and no module in `modules` owns) would be trained and
    # then lost: refuse instead of writing a checkpoint that cannot reproduce the model.
    owned = {id(p) for m in modules.values() for p in m.parameters()}
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad and id(p) not in owned)
    if trainable > saved_params:
        raise CheckpointError(
            f"lora_model has {trainable} trainable parameters but its adapter saves only {saved_params}",
            "add the extra trainable modules to LoraConfig(modules_to_save=...) or pass them in modules=",
        )
    lora_dir = tmp / LORA_DIR
    with _disk_errors(lora_dir):
        lora_model.save_pretrained(str(lora_dir), safe_serialization=True)
    files: dict[str, str] = {}
    for path in sorted(p for p in lora_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp).as_posix()
        files[rel] = record(rel)
    for a, info in adapter_info.items():
        weights = f"{info['dir']}/adapter_model.safetensors"
        if weights not in files:
            raise CheckpointError(
                f"peft save_pretrained wrote no {weights} for adapter {a!r}",
                "check the peft version; safetensors adapters are required",
            )
        info["weights"] = weights
        _fsync_dir(tmp / info["dir"])
    _fsync_dir(lora_dir)
    return {"files": files, "params": saved_params, "adapters": adapter_info}


def swap_into_place(tmp: Path, target: Path, tag: str) -> None:
    """Rename the complete folder `tmp` to `target`; an existing `target` is replaced only once `tmp` is in place
    (checkpoints here, copied artifact folders in tracking)."""
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return
    old = target.with_name(f"{target.name}.old-{tag}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the previous folder back
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# read / verify
# --------------------------------------------------------------------------------------------------------------


def _leftovers(target: Path) -> list[str]:
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.glob(f"{glob.escape(target.name)}.old-*"))


def read_manifest(directory: str | os.PathLike) -> dict:
    """Parse and sanity-check `<directory>/manifest.json` (no hashing; see `verify_checkpoint`)."""
    d = Path(directory)
    if not d.exists():
        left = _leftovers(d.absolute())
        hint = (
            f"a save was interrupted mid-swap; the previous checkpoint is in {left[-1]} beside it"
            if left
            else "check the path, or train first so that a checkpoint is written there"
        )
        raise CheckpointError(f"checkpoint directory {d} does not exist", hint)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint path {d} is not a directory", "pass the checkpoint directory")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(
            f"checkpoint {d} has no {MANIFEST}",
            "it is incomplete or not a latentgate checkpoint; re-save it with save_checkpoint",
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath} is not valid JSON ({exc})", "the checkpoint is corrupted; re-save it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"{mpath} has format {fmt!r}, expected {FORMAT}", "re-save the checkpoint with this version of latentgate"
        )
    mods = manifest.get("modules")
    files = manifest.get("files")
    lora = manifest.get("lora")
    if not isinstance(mods, dict) or not isinstance(files, dict) or not (lora is None or isinstance(lora, dict)):
        raise CheckpointError(f"{mpath} is malformed (modules/files/lora)", "re-save the checkpoint")
    for name, info in mods.items():
        _check_name(name)
        if not isinstance(info, dict) or not {"file", "params", "sha256"} <= set(info):
            raise CheckpointError(f"{mpath} entry for module {name!r} is malformed", "re-save the checkpoint")
        _check_relpath(info["file"], d)
    for rel in files:
        _check_relpath(rel, d)
    if lora is not None:
        if not isinstance(lora.get("files"), dict) or "params" not in lora:
            raise CheckpointError(f"{mpath} 'lora' entry is malformed", "re-save the checkpoint")
        for rel in lora["files"]:
            _check_relpath(rel, d)
        for a, info in (lora.get("adapters") or {}).items():
            _check_name(a, "adapter name")
            _check_relpath(info.get("weights", ""), d)
    return manifest


def _all_files(manifest: dict) -> dict[str, str]:
    files = {info["file"]: info["sha256"] for info in manifest["modules"].values()}
    if manifest.get("lora"):
        files.update(manifest["lora"]["files"])
    files.update(manifest["files"])
    return files


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """Re-hash the manifest and every file it lists; CheckpointError naming the first missing or altered one."""
    d = Path(directory)
    manifest = read_manifest(d)
    if manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        why = "has no manifest hash" if MANIFEST_DIGEST not in manifest else "does not match its own hash (edited?)"
        raise CheckpointError(f"{d / MANIFEST} {why}: its config, trainer state and file hashes cannot be trusted",
                              "re-save the checkpoint or use an earlier one; never edit a manifest by hand")
    sizes = manifest.get("sizes") or {}
    for rel, digest in _all_files(manifest).items():
        path = d / rel
        if path.is_symlink() or path.exists():  # a symlink (or linked folder) pointing outside is never followed
            ensure_inside(d, path, f"checkpoint file {rel}")
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {d} is missing {rel} (listed in {MANIFEST})",
                "the checkpoint is incomplete; re-save it or use an earlier one",
            )
        if _sha256(path) != digest:
            size = path.stat().st_size
            detail = (
                f"; it is {size} bytes, {sizes[rel]} expected (truncated?)"
                if rel in sizes and sizes[rel] != size
                else ""
            )
            raise CheckpointError(
                f"hash mismatch for {path}: the file is corrupted{detail}",
                "re-save the checkpoint or use an earlier one",
            )
    return manifest


# --------------------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------------------


def _check_compat(d: Path, manifest: dict, expect_config: dict | None, compat_keys: tuple[str, ...]) -> None:
    if not compat_keys:
        return
    if expect_config is None:
        raise CheckpointError(
            "compat_keys were given without expect_config", "pass expect_config=<the resolved config of this run>"
        )
    saved = _flatten(manifest.get("config") or {})
    expected = _flatten(_to_json(expect_config, "expect_config"))
    missing = object()
    for key in compat_keys:
        a, b = saved.get(key, missing), expected.get(key, missing)
        if a != b or isinstance(a, bool) != isinstance(b, bool):
            sa = "absent" if a is missing else json.dumps(a)
            sb = "absent" if b is missing else json.dumps(b)
            raise CheckpointError(
                f"incompatible checkpoint: {key} is {sa} in {d}, {sb} in this config",
                f"use a checkpoint trained with {key}={sb}, or set {key}={sa}",
            )


def check_base(d: Path, manifest: dict, expect_base: dict | None) -> None:
    """A checkpoint holds only what trains, so it is meaningless on another base LM: refuse a fingerprint that
    differs from the one it was trained on (both must be known to compare)."""
    saved = (manifest.get("base_lm") or {}).get("fingerprint")
    want = (expect_base or {}).get("fingerprint")
    if saved and want and saved != want:
        raise CheckpointError(
            f"checkpoint {d} was trained on base LM {manifest['base_lm'].get('name')!r} (fingerprint {saved[:12]}), "
            f"this run loads {expect_base.get('name')!r} (fingerprint {want[:12]})",
            "load the base LM the checkpoint was trained on (base.name / base.revision)",
        )


check_compat = _check_compat  # public: `latentgate checkpoint verify --preset ...` checks a config against it


def _check_state(d: Path, name: str, file: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise CheckpointError(
            f"checkpoint {d}: {name} ({file}) does not match the given model: " + ", ".join(parts),
            "build the model with the config the checkpoint was trained with",
        )
    for k, t in want.items():
        if _shape(got[k]) != _shape(t):
            raise CheckpointError(
                f"checkpoint {d}: {name} key {k!r} has shape {list(got[k].shape)} in the checkpoint, "
                f"{list(t.shape)} in the given model",
                "build the model with the config the checkpoint was trained with",
            )


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    modules: dict[str, torch.nn.Module],
    lora_model: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    expect_config: dict | None = None,
    compat_keys: tuple[str, ...] = (),
    allow_extra: bool = False,
    restore_rng: bool = False,
    expect_base: dict | None = None,
) -> dict:
    """Verify, check and load a checkpoint into the given objects; return the manifest.

    The returned manifest carries `trainer_state`, `config`, `contract` and, under `rng_state`, the RNG state
    saved with the checkpoint (restored right away when `restore_rng=True`). Everything is validated before any
    object is modified, so a failed load leaves the given modules untouched.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    manifest = read_manifest(d)
    _check_compat(d, manifest, expect_config, tuple(compat_keys))
    check_base(d, manifest, expect_base)

    # --- the set of modules must match exactly: no silent fresh init, no silently ignored weights
    if not isinstance(modules, dict):
        raise CheckpointError(
            "modules must be a dict of name -> torch.nn.Module", "pass modules={'encoder': encoder, ...}"
        )
    saved_names = set(manifest["modules"])
    for name in modules:
        _check_name(name)
        if name not in saved_names:
            raise CheckpointError(
                f"checkpoint {d} has no module {name!r} (it has: {sorted(saved_names) or 'none'})",
                "load from a checkpoint that saved this module; it is never initialised fresh",
            )
    extra = sorted(saved_names - set(modules))
    if extra and not allow_extra:
        raise CheckpointError(
            f"checkpoint {d} has modules {extra} that were not requested",
            "pass them in modules= so they are loaded, or allow_extra=True to skip them on purpose",
        )
    if manifest.get("lora") is not None and lora_model is None:
        raise CheckpointError(
            f"checkpoint {d} has LoRA weights but no lora_model was given",
            "pass lora_model=<the PeftModel> so the trained adapter is restored",
        )
    if manifest.get("lora") is None and lora_model is not None:
        raise CheckpointError(
            f"checkpoint {d} has no LoRA weights but a lora_model was given",
            "load a checkpoint saved with lora_model=, or do not attach LoRA",
        )
    if lora_model is not None and not _is_peft_model(lora_model):
        raise CheckpointError(
            f"lora_model is a {type(lora_model).__name__}, not a peft PeftModel",
            "pass the model returned by peft.get_peft_model(...)",
        )
    if optimizer is not None and OPTIMIZER_FILE not in manifest["files"]:
        raise CheckpointError(
            f"checkpoint {d} has no optimizer state but an optimizer was given",
            "load without optimizer= (weights only), or resume from a checkpoint saved with one",
        )
    if scheduler is not None and SCHEDULER_FILE not in manifest["files"]:
        raise CheckpointError(
            f"checkpoint {d} has no scheduler state but a scheduler was given",
            "load without scheduler=, or resume from a checkpoint saved with one",
        )

    # --- every byte must be what was written
    verify_checkpoint(d)

    # --- read and validate everything before modifying anything
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in modules.items():
        file = manifest["modules"][name]["file"]
        try:
            sd = load_file(str(d / file), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any read failure of a verified file becomes one clear error
            raise CheckpointError(f"cannot read {d / file}: {exc}", "re-save the checkpoint") from None
        _check_state(d, f"module {name!r}", file, sd, module.state_dict())
        states[name] = sd

    lora_states: dict[str, dict[str, torch.Tensor]] = {}
    if lora_model is not None:
        lora_states = _read_lora(d, manifest["lora"], lora_model)

    opt_state = sched_state = None
    if optimizer is not None:
        opt_state = _torch_load(d / OPTIMIZER_FILE)
        saved_groups = opt_state.get("param_groups", []) if isinstance(opt_state, dict) else []
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise CheckpointError(
                f"checkpoint {d}: optimizer parameter groups have sizes "
                f"{[len(g['params']) for g in saved_groups]}, the given optimizer has "
                f"{[len(g['params']) for g in optimizer.param_groups]}",
                "build the optimizer over the same parameters, in the same order, as when the checkpoint was saved",
            )
    if scheduler is not None:
        sched_state = _torch_load(d / SCHEDULER_FILE)

    rng_state = json.loads((d / RNG_FILE).read_text(encoding="utf-8")) if RNG_FILE in manifest["files"] else None

    # --- apply
    for name, module in modules.items():
        try:
            module.load_state_dict(states[name], strict=True)
        except RuntimeError as exc:  # pragma: no cover - pre-checked above
            raise CheckpointError(
                f"checkpoint {d}: cannot load module {name!r}: {exc}".replace("\n", " "),
                "build the model with the config the checkpoint was trained with",
            ) from None
    if lora_model is not None:
        _apply_lora(d, lora_model, lora_states)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {d}: cannot load optimizer state: {exc}",
                "build the optimizer the same way as when the checkpoint was saved",
            ) from None
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    if restore_rng and rng_state is not None:
        restore_rng_state(rng_state)

    manifest["rng_state"] = rng_state
    return manifest


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types; all mean "unreadable"
        raise CheckpointError(f"cannot read {path}: {exc}".replace("\n", " "), "re-save the checkpoint") from None


def _read_lora(d: Path, lora: dict, lora_model) -> dict[str, dict[str, torch.Tensor]]:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    adapters = lora.get("adapters") or {
        "default": {"dir": LORA_DIR, "weights": f"{LORA_DIR}/adapter_model.safetensors"}
    }
    given = set(lora_model.peft_config.keys())
    if set(adapters) != given:
        raise CheckpointError(
            f"checkpoint {d} has LoRA adapters {sorted(adapters)}, the given model has {sorted(given)}",
            "attach the same adapters (same names) before loading",
        )
    out: dict[str, dict[str, torch.Tensor]] = {}
    for a, info in adapters.items():
        weights = info["weights"]
        sd = load_file(str(d / weights), device="cpu")
        current = get_peft_model_state_dict(lora_model, adapter_name=a)
        _check_state(d, f"LoRA adapter {a!r}", weights, sd, current)
        out[a] = sd
    return out


def _apply_lora(d: Path, lora_model, lora_states: dict[str, dict[str, torch.Tensor]]) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    for a, sd in lora_states.items():
        try:
            result = set_peft_model_state_dict(lora_model, sd, adapter_name=a)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {d}: cannot load LoRA adapter {a!r}: {exc}".replace("\n", " "),
                "attach LoRA with the LoraConfig the checkpoint was trained with",
            ) from None
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointError(
                f"checkpoint {d}: LoRA adapter {a!r} keys not used by the model: {unexpected[:5]}",
                "attach LoRA with the LoraConfig the checkpoint was trained with",
            )
        # the adapter must now hold exactly the saved weights: a silent no-op load is the failure this prevents
        now = get_peft_model_state_dict(lora_model, adapter_name=a)
        for k, t in sd.items():
            if not torch.equal(now[k].detach().to("cpu", t.dtype), t):
                raise CheckpointError(
                    f"checkpoint {d}: LoRA weight {k!r} did not load into the given model",
                    "report this: the peft state dict layout may have changed",
                )
