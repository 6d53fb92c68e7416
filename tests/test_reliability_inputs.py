"""Reliability, third catalogue (issue 27): small inputs that exhaust memory or time (class 1), an unusual but
legitimate environment (class 5: a read-only HOME) and errors that name their real cause (class 6).

Each test is named after its class. Where the user-facing behaviour is the point, the real CLI runs in a subprocess
and the test asserts exit code 2 and a single `latentgate: error: ... (fix: ...)` line without a traceback.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, run_cli

CHECKLIST = ROOT / "src" / "latentgate" / "registry" / "hero.yaml"
RECORD = '{{"id": "a", "context": "ravi lives in rome .", "question": "where does ravi live ?", "answers": {answers}}}'


def error_line(proc) -> str:
    """The one error line of a failed command (exit 2, no traceback, nothing else but warnings / progress)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines()
             if ln.strip() and not ln.startswith(("latentgate: warning:", "latentgate: progress:"))]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert proc.returncode == 2, (proc.returncode, lines[0])
    assert lines[0].startswith("latentgate: error: ") and "(fix: " in lines[0], lines[0]
    return lines[0]


def alias_bomb() -> str:
    """A 1 KB YAML whose aliases expand to 10**6 strings (a real bomb of this shape goes to 10**9)."""
    lines = ['a0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 6)]
    return "\n".join(lines) + "\nmodel:\n  stop_strings: *l5\n"


# ---- class 1: a small input that exhausts memory or time --------------------------------------------------------

def test_class1_yaml_alias_bomb_refused_fast(tmp_path):
    preset = tmp_path / "bomb.yaml"
    preset.write_text(alias_bomb())
    assert preset.stat().st_size < 1024
    start = time.monotonic()
    line = error_line(run_cli("config", "--preset", str(preset), timeout=60))
    assert time.monotonic() - start < 20
    assert str(preset) in line and "aliases" in line

    from latentgate.errors import ConfigError
    from latentgate.registry.checklist import load_checklist

    checklist = tmp_path / "hero.yaml"  # the checklist goes through the same loader
    checklist.write_text(CHECKLIST.read_text() + "\n" + alias_bomb().split("\nmodel:")[0] + "\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_checklist(checklist)


@pytest.mark.parametrize("where", ["preset", "override", "record"])
def test_class1_value_nested_deep_is_one_line(where, tmp_path):
    """A value nested 100,000 deep (30,000 on the command line: one argument holds at most 128 KiB)."""
    if where == "preset":
        preset = tmp_path / "deep.yaml"
        preset.write_text("model:\n  stop_strings: " + "[" * 100_000 + "]" * 100_000 + "\n")
        line = error_line(run_cli("config", "--preset", str(preset)))
        assert "nested more than 32 levels" in line
    elif where == "override":
        for depth, needle in ((30_000, "nested"), (50, "holds a nested list")):
            value = "[" * depth + "]" * depth
            line = error_line(run_cli("config", "--preset", "micro", "--set", f"model.stop_strings={value}"))
            assert "model.stop_strings" in line and needle in line and len(line) < 400  # the value is not echoed
    else:
        from latentgate import config  # a list as text is bounded too, before it is parsed
        from latentgate.errors import ConfigError

        with pytest.raises(ConfigError, match="more than its limit"):
            config.resolve("micro", {"model.stop_strings": "a," * (config.MAX_LIST_TEXT // 2 + 1)})
        data = tmp_path / "deep.jsonl"
        data.write_text(RECORD.format(answers="[" * 100_000 + '"rome"' + "]" * 100_000) + "\n")
        line = error_line(run_cli("data", "check", str(data)))
        assert f"{data}:1" in line and "nested more than 16 levels" in line


def test_class1_huge_anchor_refused_with_its_limit(tmp_path):
    preset = tmp_path / "anchor.yaml"  # under the YAML file limit, over the field's
    preset.write_text("extends: micro\nmodel:\n  anchor: " + "x" * 200_000 + "\n")
    line = error_line(run_cli("config", "--preset", str(preset)))
    assert "model.anchor has 200000 characters" in line and "1024" in line

    from latentgate import config
    from latentgate.errors import ConfigError

    with pytest.raises(ConfigError, match="limit of 1024"):  # 10 MB, one word: within the builtin LM's positions
        config.resolve("micro", {"model.anchor": "x" * 10_000_000})
    with pytest.raises(ConfigError, match="limit of 1024"):  # a Config built in code is checked by validate()
        cfg = config.resolve("micro")
        cfg.model.anchor = "x" * 2000
        cfg.validate()


def _limit_memory(nbytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return apply


def test_class1_data_check_huge_file_never_read_whole(tmp_path):
    """A sparse 20 GiB file: refused by its size at once, and with the limit raised, read as a stream (a process
    capped at 2 GiB of address space gets the record-size error, not a MemoryError)."""
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(20 << 30)
    line = error_line(run_cli("data", "check", str(big), preexec_fn=_limit_memory(2 << 30)))
    assert "21474836480 bytes" in line and "1073741824" in line and "LATENTGATE_MAX_DATA_BYTES" in line
    raised = {"LATENTGATE_MAX_DATA_BYTES": str(100 << 30)}
    line = error_line(run_cli("data", "check", str(big), env=raised, preexec_fn=_limit_memory(2 << 30)))
    assert f"{big}:1: line longer than" in line

    ok = tmp_path / "ok.jsonl"  # a normal file still passes, and a file over a lowered limit is refused
    ok.write_text(RECORD.format(answers='["rome"]') + "\n")
    assert run_cli("data", "check", str(ok)).returncode == 0
    line = error_line(run_cli("data", "check", str(ok), env={"LATENTGATE_MAX_DATA_BYTES": "10"}))
    assert "limit of 10 bytes" in line


# ---- class 5: an unusual but legitimate environment ------------------------------------------------------------

def test_class5_read_only_home_caches_fall_back(tmp_path, monkeypatch):
    """HOME that cannot be written (here: a path through a regular file, so the test needs no mount and holds for
    root too): every cache moves to a private temporary folder, matplotlib stays silent, and an error on a cache
    folder names that folder and its variable, not run.output_dir."""
    from latentgate.cli_common import CACHE_VARS, as_user_error, fall_back_caches

    home = tmp_path / "not-a-folder"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))
    for var in CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    moved = fall_back_caches()
    assert set(moved) == set(CACHE_VARS)
    for var, folder in moved.items():
        assert os.environ[var] == folder and Path(folder).is_dir() and os.access(folder, os.W_OK)
        assert str(home) not in folder

    probe = "import matplotlib; matplotlib.get_configdir(); matplotlib.get_cachedir()"
    quiet = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ), capture_output=True, text=True)
    assert quiet.returncode == 0 and not quiet.stderr.strip(), quiet.stderr

    err = OSError(errno.EROFS, "Read-only file system", str(home / ".cache" / "huggingface" / "modules"))
    for var in CACHE_VARS:
        monkeypatch.delenv(var)
    mapped = str(as_user_error(err))
    assert f"make {home / '.cache'} writable" in mapped and "XDG_CACHE_HOME" in mapped
    assert "run.output_dir" not in mapped


@pytest.mark.slow
def test_class5_smoke_runs_with_a_read_only_home(tmp_path, mlflow_store):
    home = tmp_path / "not-a-folder"
    home.write_text("")
    env = cli_env({"HOME": str(home), "TMPDIR": str(tmp_path)})
    for var in ("XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR"):  # unset (an empty value would mean the cwd)
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "latentgate", "smoke", "--preset", "micro", "--set",
                           f"run.output_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    noise = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("latentgate: progress:")]
    assert not noise, noise


# ---- class 6: records that differ from what ran ----------------------------------------------------------------

def test_class6_long_experiment_name_reported_as_such(mlflow_store):
    line = error_line(run_cli("config", "--preset", "micro", "--set", "run.experiment=" + "e" * 600))
    assert "run.experiment has 600 characters, more than its limit of 500" in line

    from latentgate.errors import ConfigError
    from latentgate.tracking.runs import setup_experiment

    try:  # a name that skips the config (tracking is set up with it directly): still the name, not the store
        with pytest.raises(ConfigError, match="experiment name .* too long") as info:
            setup_experiment("e" * 600)
        assert "unusable" not in str(info.value)
    finally:
        setup_experiment("latentgate")


def test_class6_disk_full_in_final_checkpoint_names_the_file(tmp_path, monkeypatch):
    """safetensors reports a full disk naming no file (and removes its partial file): the error names the adapter
    weights the LoRA checkpoint was writing, at the checkpoint's path (not its temp folder)."""
    import peft.peft_model
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import SafetensorError
    from transformers import LlamaConfig, LlamaForCausalLM

    from latentgate.cli_common import as_user_error
    from latentgate.train.checkpoint import save_checkpoint

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    lora = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"]))
    target = tmp_path / "checkpoints" / "stage_b"
    with pytest.raises(OSError) as info:
        save_checkpoint(target, modules={"adapter": torch.nn.Linear(2, 2)}, lora_model=lora)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target / "lora" / "adapter_model.safetensors")
    assert f"cannot write {target / 'lora' / 'adapter_model.safetensors'}: no space left" in str(as_user_error(
        info.value))
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_class6_disk_full_without_an_os_error_names_the_file_or_store(tmp_path, monkeypatch):
    """Writers that report a full disk in a message (torch's zip writer, SQLite) still get the file or store named."""
    from latentgate.cli_common import as_user_error

    target = tmp_path / "stage_a" / "optimizer.pt"
    try:
        try:
            raise OSError(errno.EIO, "Input/output error", str(target))
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from None
    except RuntimeError as err:
        assert str(target) in str(as_user_error(err))
    uri = f"sqlite:///{tmp_path / 'full' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mapped = str(as_user_error(RuntimeError("(sqlite3.OperationalError) database or disk is full")))
    assert "the tracking store refused a write" in mapped and uri in mapped


def test_class6_checklist_duplicate_key_refused(tmp_path):
    from latentgate.errors import ConfigError
    from latentgate.registry.checklist import load_checklist

    text = CHECKLIST.read_text()
    assert "\nalias: " in text
    checklist = tmp_path / "hero.yaml"
    checklist.write_text(text + "\nalias: champion\n")  # YAML alone would let the last one win
    with pytest.raises(ConfigError, match=r"duplicate key 'alias' \(first on line \d+\)") as info:
        load_checklist(checklist)
    assert str(checklist) in str(info.value)

    preset = tmp_path / "dup.yaml"  # the same loader reads presets (and sweep studies, calibration sets)
    preset.write_text("extends: micro\nstage_a:\n  steps: 5\n  steps: 500\n")
    line = error_line(run_cli("config", "--preset", str(preset)))
    assert "line 4: duplicate key 'steps'" in line


@pytest.mark.parametrize("what", ["data", "preset", "checklist", "checkpoint", "study", "calibration set"])
def test_class6_symlink_loop_named_as_such(what, tmp_path):
    loop = tmp_path / f"loop.{'jsonl' if what == 'data' else 'yaml'}"
    other = tmp_path / f"other{loop.suffix}"
    os.symlink(other, loop)
    os.symlink(loop, other)
    if what == "checklist":
        from latentgate.errors import ConfigError
        from latentgate.registry.checklist import load_checklist

        with pytest.raises(ConfigError, match="symlink loop") as info:
            load_checklist(loop)
        line = str(info.value)
    elif what == "checkpoint":  # in-process: `checkpoint verify` imports MLflow (seconds); both checks of a path
        from latentgate.errors import CheckpointError
        from latentgate.tracking.lineage import resolve_checkpoint
        from latentgate.train.manifest import read_manifest

        for check in (resolve_checkpoint, read_manifest):
            with pytest.raises(CheckpointError, match="symlink loop") as info:
                check(str(loop))
        line = str(info.value)
    elif what in ("study", "calibration set"):
        from latentgate.calibrate.spec import set_path
        from latentgate.errors import ConfigError
        from latentgate.sweep.study import study_path

        with pytest.raises(ConfigError, match="symlink loop") as info:
            (study_path if what == "study" else set_path)(str(loop))
        line = str(info.value)
    else:
        args = ("data", "check", str(loop)) if what == "data" else ("config", "--preset", str(loop))
        line = error_line(run_cli(*args))
    assert "symlink loop" in line and str(loop) in line and "not exist" not in line and "not found" not in line


def test_class6_symlink_loop_inside_a_checkpoint(tmp_path):
    import torch

    from latentgate.errors import CheckpointError
    from latentgate.train.checkpoint import save_checkpoint
    from latentgate.train.manifest import verify_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt", modules={"adapter": torch.nn.Linear(2, 2)})
    weights = ckpt / "adapter.safetensors"
    weights.unlink()
    os.symlink(weights, weights)
    with pytest.raises(CheckpointError, match="symlink loop"):
        verify_checkpoint(ckpt)
    shutil.rmtree(ckpt)
