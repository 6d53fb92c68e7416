"""The torch-free half of a checkpoint: its manifest, the checks that read it, and the atomic swap.

The manifest lists every file with its sha256 and is sealed by the hash of its own canonical JSON
(its `manifest_sha256` entry), so an edited manifest fails verification like an edited file. That seal catches
accidents only: whoever rewrites a file can reseal it. So `verify_checkpoint` also parses every safetensors header
against its file (`check_safetensors`), and `manifest_sha256(dir)` (the hash of the manifest file's bytes) is what a
promoted model version pins. `latentgate checkpoint verify` needs only this module, so it starts without torch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import struct
from math import prod
from pathlib import Path
from typing import Any

from latentgate.errors import CheckpointError
from latentgate.safety import check_relative, ensure_inside, refuse_loop
from latentgate.schema import Artifact

MANIFEST = Artifact.MANIFEST
MANIFEST_DIGEST = "manifest_sha256"
FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_RESAVE = "re-save the checkpoint or use an earlier one"
_ABSENT = object()
# what a checkpoint and the config that resumes, evaluates or serves it must share (`check_compat`)
COMPAT_KEYS = ("model.num_latents", "model.d_z", "model.encoder", "model.encoder_lora_r", "model.prompt_format",
               "base.name", "base.layers", "base.hidden")
# bytes per element of each safetensors dtype; the header's JSON is at most 100 MB (the safetensors library's bound)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100_000_000


def check_name(name: Any, what: str = "module name") -> str:
    """A name that becomes a file name must be a plain identifier-like string, never a path."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise CheckpointError(f"invalid {what} {name!r}: it becomes a file name in the checkpoint",
                              "use letters, digits, '_', '-' or '.' only (no '/', no '..', not absolute)")
    return name


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if callable(getattr(obj, "item", None)):  # one-element tensors, numpy scalars
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_json(obj: Any, what: str) -> Any:
    """Plain JSON values (tuples -> lists, Path -> str), so the digest of what is written equals the digest of what
    is read back; CheckpointError naming `what` otherwise."""
    try:
        return json.loads(json.dumps(obj, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot store {what} in the checkpoint manifest: {exc}",
                              f"pass {what} as plain JSON values (str, int, float, bool, list, dict)") from None


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_file(path: Path, data: bytes) -> str:
    """Write and fsync `data`; return its sha256. A failed write raises OSError naming `path` (a bare write error
    names no file)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own `manifest_sha256` entry."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """(Re)write a checkpoint's manifest sealed with its hash (also used by an export that drops files)."""
    body = {k: v for k, v in to_json(manifest, "manifest").items() if k != MANIFEST_DIGEST}
    write_file(Path(directory) / MANIFEST, json_bytes({**body, MANIFEST_DIGEST: manifest_digest(body)}))


def read_manifest(directory: str | os.PathLike) -> dict:
    """Parse and sanity-check `<directory>/manifest.json` (no hashing; see `verify_checkpoint`)."""
    d = Path(directory)
    refuse_loop(d, "checkpoint path", CheckpointError)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"checkpoint path {d} is not a directory", "pass the checkpoint directory")
    if not d.exists():
        left = sorted(d.parent.glob(f"{glob.escape(d.name)}.old-*")) if d.parent.is_dir() else []
        hint = (f"a save was interrupted mid-swap; the previous checkpoint is in {left[-1].name} beside it" if left
                else "check the path, or train first so that a checkpoint is written there")
        raise CheckpointError(f"checkpoint directory {d} does not exist", hint)
    mpath = d / MANIFEST
    refuse_loop(mpath, "checkpoint manifest", CheckpointError)
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {d} has no {MANIFEST}",
                              "it is incomplete or not a latentgate checkpoint; re-save it with save_checkpoint")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath} is not valid JSON ({exc})", "the checkpoint is corrupted; re-save it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{mpath} has format {fmt!r}, expected {FORMAT}",
                              "re-save the checkpoint with this version of latentgate")
    mods, files, lora = manifest.get("modules"), manifest.get("files"), manifest.get("lora")
    if not (isinstance(mods, dict) and isinstance(files, dict) and (lora is None or isinstance(lora, dict))
            and all(isinstance(i, dict) and {"file", "params", "sha256"} <= set(i) for i in mods.values())
            and (lora is None or isinstance(lora.get("files"), dict) and "params" in lora)):
        raise CheckpointError(f"{mpath} is malformed (modules/files/lora)", "re-save the checkpoint")
    for name in mods:
        check_name(name)
    for rel in _all_files(manifest):  # checked before the manifest's hash, so the message names the path
        check_relative(rel, f"the manifest of checkpoint {d} lists the unsafe file path",
                       fix="re-save the checkpoint; never edit a manifest by hand")
    return manifest


def _all_files(manifest: dict) -> dict[str, str]:
    files = {info["file"]: info["sha256"] for info in manifest["modules"].values()}
    files.update((manifest.get("lora") or {}).get("files", {}))
    files.update(manifest["files"])
    return files


def manifest_sha256(checkpoint_dir: str | os.PathLike) -> str:
    """sha256 of the manifest file's bytes: what a promoted model version pins (a resealed manifest changes it)."""
    path = Path(checkpoint_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint_dir} has no {MANIFEST}", "pass a checkpoint folder")
    return sha256_file(path)


def check_safetensors(path: Path, module: str | None = None, params: int | None = None) -> dict:
    """Parse a safetensors file's header and check it against the file: header length within the file, every
    tensor's dtype and shape giving exactly its byte range, the ranges tiling the data without gap or overlap, and
    (for a module file) the module name in its metadata and at least its manifest's parameter count. Returns the
    header. A corrupted header that was resealed in the manifest fails here, naming the file."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} has a corrupted safetensors header: {why}", _RESAVE)

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"the file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise bad(f"header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_size, spans, numel = size - 8 - n, [], 0
    for name, info in header.items():
        if not (isinstance(info, dict) and info.get("dtype") in DTYPE_BYTES and isinstance(info.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])):
            raise bad(f"tensor {name!r} has no valid dtype / shape / data_offsets")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {name!r} spans bytes {begin}..{end}, outside the {data_size} data bytes")
        if end - begin != prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]:
            raise bad(f"tensor {name!r} ({info['dtype']} {info['shape']}) needs "
                      f"{prod(info['shape']) * DTYPE_BYTES[info['dtype']]} bytes, its offsets give {end - begin}")
        spans.append((begin, end, name))
        numel += prod(info["shape"])
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {at} (a gap or an overlap)")
        at = end
    if at != data_size:
        raise bad(f"the tensors cover {at} of the {data_size} data bytes")
    if module is not None and meta.get("module", module) != module:
        raise bad(f"its metadata names module {meta.get('module')!r}, the manifest {module!r}")
    if params is not None and isinstance(params, int) and numel < params:
        raise bad(f"its tensors hold {numel} values, fewer than the {params} parameters in the manifest")
    return header


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """Re-hash the manifest and every file it lists, and check every safetensors file's header against the file
    (`check_safetensors`); CheckpointError naming the first missing or altered one."""
    d = Path(directory)
    manifest = read_manifest(d)
    if manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        why = "has no manifest hash" if MANIFEST_DIGEST not in manifest else "does not match its own hash (edited?)"
        raise CheckpointError(f"{d / MANIFEST} {why}: its config, trainer state and file hashes cannot be trusted",
                              "re-save the checkpoint or use an earlier one; never edit a manifest by hand")
    sizes = manifest.get("sizes") or {}
    for rel, digest in _all_files(manifest).items():
        path = d / rel
        refuse_loop(path, f"checkpoint file {rel}", CheckpointError)
        if path.is_symlink() or path.exists():  # a symlink (or linked folder) pointing outside is never followed
            ensure_inside(d, path, f"checkpoint file {rel}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {d} is missing {rel} (listed in {MANIFEST})",
                                  f"the checkpoint is incomplete; {_RESAVE}")
        if sha256_file(path) != digest:
            size = path.stat().st_size
            detail = f"; it is {size} bytes, {sizes[rel]} expected (truncated?)" if sizes.get(rel, size) != size else ""
            raise CheckpointError(f"hash mismatch for {path}: the file is corrupted{detail}", _RESAVE)
    for name, info in manifest["modules"].items():
        check_safetensors(d / info["file"], name, info.get("params"))
    lora = manifest.get("lora") or {}
    for rel in lora.get("files", {}):
        if rel.endswith(".safetensors"):  # peft's adapter_model.safetensors holds every saved LoRA value
            check_safetensors(d / rel, params=lora.get("params") if rel.endswith("adapter_model.safetensors") else None)
    return manifest


def check_compat(d: Path, manifest: dict, expect_config: dict | None, compat_keys: tuple[str, ...]) -> None:
    """Refuse a checkpoint whose saved config differs from `expect_config` at any of `compat_keys`. Both are flat
    dicts of dotted keys (`config.flatten`)."""
    saved, expected = manifest.get("config") or {}, to_json(expect_config or {}, "expect_config")
    for key in compat_keys:
        if key not in expected:  # also catches a nested config, which would otherwise compare absent == absent
            raise CheckpointError(f"{key} is not in the config the checkpoint {d} is checked against",
                                  "pass the resolved config as config.flatten(cfg) (flat dotted keys)")
        a, b = saved.get(key, _ABSENT), expected[key]
        if a != b or isinstance(a, bool) != isinstance(b, bool):  # true == 1 in Python, not here
            sa, sb = "absent" if a is _ABSENT else json.dumps(a), json.dumps(b)
            raise CheckpointError(f"incompatible checkpoint: {key} is {sa} in {d}, {sb} in this config",
                                  f"use a checkpoint trained with {key}={sb}, or set {key}={sa}")


def check_base(d: Path, manifest: dict, expect_base: dict | None) -> None:
    """A checkpoint holds only what trains, so it is meaningless on another base LM: refuse a fingerprint that
    differs from the one it was trained on (both must be known to compare)."""
    saved = (manifest.get("base_lm") or {}).get("fingerprint")
    want = (expect_base or {}).get("fingerprint")
    if saved and want and saved != want:
        raise CheckpointError(
            f"checkpoint {d} was trained on base LM {manifest['base_lm'].get('name')!r} (fingerprint {saved[:12]}), "
            f"this run loads {expect_base.get('name')!r} (fingerprint {want[:12]})",
            "load the base LM the checkpoint was trained on (base.name / base.revision)")
