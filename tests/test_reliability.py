"""Reliability under bad input and faults: one parametrised test per family of the catalogue (issue 8), and one
section per class of the second catalogue (issue 18: signals, locks, full disks, secrets, leftovers).

Every case runs the real CLI in a subprocess against the session's real SQLite MLflow store and asserts
* a non-zero exit code (the specific one where it is defined: 2 user error, 3 training fault, 143/130 signals);
* stderr holds exactly one line, `latentgate: error: <problem> (fix: <fix>)`, and no Python traceback
  (`latentgate: warning: ...` lines are allowed around it);
* nothing is left half-done: no MLflow run stuck RUNNING, no registry alias moved, no `*.tmp-*` left beside a
  checkpoint or output file;
* the existing data is unchanged (files hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, free_port, run_cli

MICRO = ("--preset", "micro")
OK = '{"id":"a","context":"ravi lives in rome .","question":"where does ravi live ?","answers":["rome"]}'
SECRET = "hunter2pw"
# every training run of this file carries a secret in a logged param (and shares one base LM: same data.* keys)
SECRET_SET = ("--set", f"data.eval_source=postgresql://reader:{SECRET}@db.example/squad")


# ---- helpers ---------------------------------------------------------------------------------------------------

def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single error line; fails if there is a traceback or any other non-warning line on stderr."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines()  # progress lines (stderr without a terminal) are not errors
             if ln.strip() and not ln.startswith(("latentgate: warning:", "latentgate: progress:"))]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{proc.stderr[-3000:]}"
    line = lines[0]
    assert line.startswith("latentgate: error: ") and "(fix: " in line, line
    return line


def assert_fails(proc, code: int, *needles: str) -> str:
    line = error_line(proc)
    assert proc.returncode == code, (proc.returncode, line)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def digest(paths) -> dict[str, str]:
    out = {}
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leftovers(*roots) -> list[str]:
    return [str(p) for r in roots if Path(r).exists() for p in Path(r).rglob("*") if ".tmp" in p.name]


def client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def all_runs():
    from mlflow.entities import ViewType

    cl = client()
    exps = [e.experiment_id for e in cl.search_experiments(view_type=ViewType.ALL)]
    return cl.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000)


def registry_state() -> dict:
    cl = client()
    return {m.name: (dict(m.aliases), sorted(v.version for v in cl.search_model_versions(f"name='{m.name}'")))
            for m in cl.search_registered_models()}


def assert_store_consistent(registry_before: dict) -> None:
    stuck = [(r.info.run_id, r.data.tags.get("latentgate.phase")) for r in all_runs() if r.info.status == "RUNNING"]
    assert not stuck, f"runs stuck RUNNING: {stuck}"
    after = registry_state()
    for name, (aliases, _) in registry_before.items():
        assert after[name][0] == aliases, f"registry aliases of {name} moved: {aliases} -> {after[name][0]}"


def runs_by_phase(parent_id: str) -> dict:
    cl = client()
    parent = cl.get_run(parent_id)
    kids = cl.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {"smoke": parent, **{r.data.tags["latentgate.phase"]: r for r in kids}}


def parent_of_error(store_before: set[str], output_dir) -> str:
    """The one smoke run started since `store_before` with this output folder."""
    new = [r for r in all_runs() if r.info.run_id not in store_before and r.data.tags.get("latentgate.phase") == "smoke"
           and r.data.params.get("run.output_dir") == str(output_dir)]
    assert len(new) == 1, [r.info.run_id for r in new]
    return new[0].info.run_id


@pytest.fixture(scope="module")
def store(mlflow_store):
    return mlflow_store


def popen_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "latentgate", *args], cwd=ROOT, env=cli_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path_glob: str, root: Path, n: int, proc: subprocess.Popen, timeout: float = 150) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for p in root.glob(path_glob):
            if p.exists() and len(p.read_text().splitlines()) >= n:
                return p
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training never started")


# ---- config and CLI ------------------------------------------------------------------------------------------

CONFIG_CASES = {
    "unknown key, did you mean": (["--set", "stage_a.lrr=1e-3"], "did you mean stage_a.lr?"),
    "wrong type": (["--set", "stage_a.steps=2.5"], "stage_a.steps expects int"),
    "lr <= 0": (["--set", "stage_b.lr=0"], "stage_b.lr=0.0 is out of range"),
    "lr not finite": (["--set", "stage_a.lr=inf"], "not a finite number"),
    "M = 0": (["--set", "model.num_latents=0"], "model.num_latents=0 is out of range"),
    "K > answer budget": (["--set", "stage_b.k=9"], "exceeds the answer budget eval.max_new_tokens=8"),
    "LoRA rank 0": (["--set", "model.lora_r=0"], "model.lora_r=0 is out of range"),
    "warmup >= steps": (["--set", "stage_a.warmup_steps=6"], "stage_a.warmup_steps=6 is not below stage_a.steps=6"),
    "min_lr > lr": (["--set", "stage_b.min_lr=1", "--set", "stage_b.lr=0.1"], "stage_b.min_lr=1.0 exceeds"),
    "not key=value": (["--set", "stage_a.lr"], "is not key=value"),
    "unknown choice": (["--set", "stage_a.schedule=linear"], "is not one of ['constant', 'cosine']"),
    "file data with the builtin LM": (["--set", "data.source=/tmp/x.jsonl"], "builtin base LM only knows"),
    "unknown preset": (["--preset", "mirco"], "unknown preset 'mirco' (fix: did you mean micro?)"),
    "secret in a bad value is masked": (["--set", f"stage_a.lr=postgresql://u:{SECRET}@db/x"], "postgresql://u:***@db/x"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_errors(case, store):
    args, needle = CONFIG_CASES[case]
    args = args if args[0] == "--preset" else [*MICRO, *args]
    runs_before = len(all_runs())
    proc = run_cli("config", *args, timeout=60)
    line = assert_fails(proc, 2, needle)
    assert SECRET not in proc.stderr + proc.stdout
    assert proc.stdout == ""  # no half-printed config
    assert len(all_runs()) == runs_before  # rejected before anything is tracked
    assert line.count("\n") == 0


USAGE_CASES = {
    "unknown option": (["smoke", "--bogus"], "No such option '--bogus' (fix: see `"),
    "unknown command": (["smokee"], "No such command 'smokee'. Did you mean 'smoke'?"),
    "missing required option": (["stage-b", *MICRO], "Missing option '--resume-from'"),
    "invalid choice": (["bench", "--clock", "sundial"], "'sundial' is not one of 'cpu', 'wall'"),
    "missing argument": (["data", "check"], "Missing argument 'PATH'"),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_errors_are_one_line(case):
    """click's own errors (before any of our code runs) keep the one-line format, exit 2, and point at --help."""
    args, needle = USAGE_CASES[case]
    proc = run_cli(*args, timeout=60)
    line = assert_fails(proc, 2, needle)
    assert line.endswith("--help`)") and proc.stdout == ""


def test_debug_shows_the_traceback(store):
    proc = run_cli("--debug", "config", *MICRO, "--set", "model.lora_r=0", timeout=60)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# ---- data ------------------------------------------------------------------------------------------------------

def _huge(answer_inside: bool) -> str:
    words = [f"w{i}" for i in range(600)]
    words.insert(3 if answer_inside else 599, "rome")
    return json.dumps({"id": "h", "context": " ".join(words), "question": "where ?", "answers": ["rome"]}) + "\n"


DATA_CASES = {
    "missing file": (None, "data file not found"),
    "invalid JSONL names the line": (f'{OK}\n{{"id": "b", "context": \n', "bad.jsonl:2: invalid JSON"),
    "invalid SQuAD JSON names the line": ('{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}\n',
                                          "bad.json:3: invalid JSON"),
    "missing question": (f'{OK}\n{{"id":"b","context":"x y","answers":["x"]}}\n',
                         "bad.jsonl:2: missing field 'question'"),
    "missing context": ('{"id":"b","question":"q","answers":["x"]}\n', "bad.jsonl:1: missing field 'context'"),
    "missing answers": ('{"id":"b","question":"q","context":"x y"}\n', "bad.jsonl:1: missing field 'answers'"),
    "empty answer": ('{"id":"b","question":"q","context":"x y","answers":[" "]}\n', "has an empty answer"),
    "answer longer than context": ('{"id":"b","question":"q","context":"x y","answers":["x y z"]}\n',
                                   "is longer than the context"),
    "answer not in context": ('{"id":"b","question":"q","context":"x y","answers":["z"]}\n',
                              "does not occur in the context"),
    "non-UTF-8 bytes": (OK.encode() + b'\n{"id":"c","context":"caf\xe9","question":"q","answers":["caf"]}\n',
                        "bad.jsonl:2: not valid UTF-8 (byte 0xe9"),
    "empty split": ("", "empty split"),
    "huge context, answer beyond the cut": (_huge(False), "more than max_context_words=512"),
    "duplicate ids": (f"{OK}\n{OK}\n", "duplicate id 'a' (first used at line 1, again at line 2)"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_errors(case, tmp_path):
    content, needle = DATA_CASES[case]
    name = "bad.json" if "SQuAD JSON" in case else "bad.jsonl"
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = digest([tmp_path])
    proc = run_cli("data", "check", str(path), "--write-jsonl", str(tmp_path / "out.jsonl"), timeout=60)
    assert_fails(proc, 2, needle)
    assert digest([tmp_path]) == before  # input untouched, no output written, nothing left behind


def test_huge_context_with_answer_inside_is_cut_with_one_warning(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(_huge(True))
    proc = run_cli("data", "check", str(path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"latentgate: warning: {path}: truncated 1 context(s) longer than 512 words to their first 512 words"]


# ---- stores ------------------------------------------------------------------------------------------------------

def _immutable(path: Path, on: bool) -> bool:
    """Make a folder unwritable, even for root (chattr +i), or writable again. False if impossible here."""
    if os.geteuid() != 0:
        path.chmod(0o555 if on else 0o755)
        return True
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def unwritable(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if not _immutable(folder, True):
        pytest.skip("cannot make a folder unwritable here (root without chattr)")
    yield folder
    _immutable(folder, False)


@pytest.mark.parametrize("uri", [f"http://lg:{SECRET}@127.0.0.1:9", f"postgresql://lg:{SECRET}@127.0.0.1:9/mlflow"])
def test_store_unreachable_tracking_uri_fails_fast_with_secret_masked(uri, tmp_path, store):
    t0 = time.time()
    proc = run_cli("smoke", *MICRO, "--set", f"run.output_dir={tmp_path}/runs",
                   env={"MLFLOW_TRACKING_URI": uri}, timeout=60)
    line = assert_fails(proc, 2, f"{uri.split(':')[0]}://lg:***@127.0.0.1:9", "is unreachable")
    assert time.time() - t0 < 30  # seconds, not a long retry loop (most of it is Python start-up)
    assert not (tmp_path / "runs").exists()  # failed before anything started
    assert SECRET not in proc.stderr + proc.stdout, line


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_store_full_disk_write_is_one_line_and_atomic(fmt, tmp_path):
    """`ulimit -f` makes writes past 64 KiB fail (jsonl: in the datasets cache; json: writing the output): SIGXFSZ
    must not kill the process, no partial output or temp file may remain, and the previous output must survive."""
    src = tmp_path / f"big.{fmt}"
    records = [{"id": f"q{i}", "context": "ravi lives in rome . " * 20, "question": "where ?", "answers": ["rome"]}
               for i in range(300)]
    src.write_text(json.dumps(records) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    out.write_text("previous output\n")
    before = digest([tmp_path])
    cmd = f"ulimit -f 64; exec {sys.executable} -m latentgate data check {src} --write-jsonl {out}"
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != -signal.SIGXFSZ
    assert_fails(proc, 2, "file too large")
    assert digest([tmp_path]) == before and not leftovers(tmp_path)


def test_store_read_only_artifact_location(unwritable, tmp_path, store, sigterm_run):
    """An experiment whose artifact folder cannot be written: the runs end FAILED (never RUNNING), one line."""
    name = f"ro-{tmp_path.name}"
    client().create_experiment(name, artifact_location=unwritable.as_uri())
    reg = registry_state()
    before = {r.info.run_id for r in all_runs()}
    proc = run_cli("smoke", *MICRO, *SECRET_SET, "--set", f"run.experiment={name}",
                   "--set", f"run.output_dir={tmp_path}/runs")
    assert_fails(proc, 2, "cannot write", str(unwritable))
    assert_store_consistent(reg)
    runs = runs_by_phase(parent_of_error(before, f"{tmp_path}/runs"))
    assert runs["smoke"].info.status == "FAILED" and runs["base"].info.status == "FAILED"
    assert runs["base"].data.tags["latentgate.error"]  # the cause is on the run, too
    assert not any(unwritable.iterdir())


# ---- training faults -------------------------------------------------------------------------------------------



def _signal_run(tmp_path_factory, signum: int) -> dict:
    out = tmp_path_factory.mktemp(f"sig{signum}")
    reg = registry_state()
    before = {r.info.run_id for r in all_runs()}
    proc = popen_cli("smoke", *MICRO, *SECRET_SET, "--set", "stage_a.steps=400", "--set", "stage_a.probe_every=200",
                     "--set", f"run.output_dir={out}")
    wait_for_lines("smoke-*/stage_a/diagnostics.jsonl", out, 1, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return {"proc": done, "out": out, "registry": reg, "before": before}


@pytest.fixture(scope="module")
def sigterm_run(store, tmp_path_factory):
    """A micro smoke with a long Stage A, stopped by SIGTERM once Stage A trains (shared by several families)."""
    return _signal_run(tmp_path_factory, signal.SIGTERM)


def _check_interrupted(run: dict, code: int, signame: str) -> tuple[dict, Path, int]:
    line = assert_fails(run["proc"], code, f"interrupted by {signame} at optimizer step", "final checkpoint saved")
    step = int(line.split("optimizer step ")[1].split(";")[0])
    ckpt = Path(line.split("saved to ")[1].split(" (fix:")[0])
    assert_store_consistent(run["registry"])
    runs = runs_by_phase(parent_of_error(run["before"], run["out"]))
    assert runs["base"].info.status == "FINISHED"
    assert runs["stage_a"].info.status == "KILLED" and runs["smoke"].info.status == "KILLED"
    assert runs["stage_a"].data.tags["latentgate.error_type"] == "Interrupted"
    assert "stage_b" not in runs  # nothing ran after the signal
    # the final checkpoint is complete, verified by its manifest, at the step named, and logged with the run
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["trainer_state"]["global_step"] == step > 0
    assert runs["stage_a"].data.tags["latentgate.final_checkpoint"] == (
        f"runs:/{runs['stage_a'].info.run_id}/checkpoints/stage_a")
    assert not leftovers(run["out"])
    ok = run_cli("checkpoint", "verify", str(ckpt), timeout=60)
    assert ok.returncode == 0 and "every hash verified" in ok.stdout, ok.stderr
    return runs, ckpt, step


def test_training_fault_non_finite_loss(store, tmp_path):
    reg = registry_state()
    before = {r.info.run_id for r in all_runs()}
    proc = run_cli("smoke", *MICRO, *SECRET_SET, "--set", "stage_a.lr=1e30", "--set", f"run.output_dir={tmp_path}")
    line = assert_fails(proc, 3, "stage_a: non-finite loss at optimizer step", "'tf': nan", "(fix: lower the learning")
    assert_store_consistent(reg)
    runs = runs_by_phase(parent_of_error(before, tmp_path))
    assert runs["stage_a"].info.status == "FAILED" and runs["smoke"].info.status == "FAILED"
    tags = runs["stage_a"].data.tags
    assert tags["latentgate.error_type"] == "TrainingFault"
    assert "non-finite loss at optimizer step" in tags["latentgate.error"]
    step = int(line.split("optimizer step ")[1].split(" ")[0])
    hist = client().get_metric_history(runs["stage_a"].info.run_id, "stage_a/loss")
    assert max((m.step for m in hist), default=0) == step - 1  # stopped at the bad step, never continued
    assert "stage_b" not in runs and not leftovers(tmp_path)


def test_training_fault_sigterm_writes_final_checkpoint_and_resume_continues(sigterm_run, store):
    runs, ckpt, step = _check_interrupted(sigterm_run, 143, "SIGTERM")

    # a later resume continues from the checkpoint, in the same run, without logging a step twice
    from latentgate import config
    from latentgate.phases.stages import run_stage
    from latentgate.tracking.lineage import find_registered_base, resolve_checkpoint
    from latentgate.train.workspace import load_splits

    cfg = config.resolve("micro", {"data.eval_source": f"postgresql://reader:{SECRET}@db.example/squad",
                                   "stage_a.steps": str(step + 2), "stage_a.probe_every": "200"})
    splits = load_splits(cfg)
    base = find_registered_base(cfg)
    resume_from = resolve_checkpoint(runs["stage_a"].data.tags["latentgate.final_checkpoint"])
    out = ckpt.parents[2]
    result = run_stage(cfg, "stage_a", base, out, splits,
                       resume=resume_from, run_id=runs["stage_a"].info.run_id)
    assert result.steps == step + 2
    run = client().get_run(runs["stage_a"].info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client().get_metric_history(run.info.run_id, "stage_a/loss")]
    assert sorted(steps) == list(range(1, step + 3))  # continued, no step logged twice
    assert_store_consistent(sigterm_run["registry"])


@pytest.mark.slow
def test_training_fault_sigint(store, tmp_path_factory):
    _check_interrupted(_signal_run(tmp_path_factory, signal.SIGINT), 130, "SIGINT")


# ---- checkpoints and URIs ------------------------------------------------------------------------------------

def _damage(kind: str, ckpt: Path, work: Path) -> str:
    """A damaged copy of the checkpoint (the original is never touched); returns what to pass to verify."""
    copy = work / "ckpt"
    shutil.copytree(ckpt, copy)
    if kind == "truncated":
        f = copy / "encoder.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "corrupted":
        f = copy / "adapter.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    elif kind == "missing file":
        (copy / "optimizer.pt").unlink()
    elif kind == "no manifest":
        (copy / "manifest.json").unlink()
    elif kind == "manifest escapes":
        m = json.loads((copy / "manifest.json").read_text())
        m["modules"]["encoder"]["file"] = "../outside.safetensors"
        (copy / "manifest.json").write_text(json.dumps(m))
    elif kind == "symlink escapes":
        outside = work / "outside.safetensors"
        shutil.move(copy / "encoder.safetensors", outside)
        (copy / "encoder.safetensors").symlink_to(outside)
    return str(copy)


CHECKPOINT_CASES = {
    "resume_from does not exist": (None, "/nonexistent/checkpoints/stage_a", [], "does not exist"),
    "truncated safetensors": ("truncated", None, [], "hash mismatch"),
    "corrupted safetensors": ("corrupted", None, [], "hash mismatch"),
    "file listed in manifest missing": ("missing file", None, [], "is missing optimizer.pt"),
    "no manifest": ("no manifest", None, [], "no manifest.json"),
    "manifest path with ..": ("manifest escapes", None, [], "unsafe file path '../outside.safetensors'"),
    "symlink escaping the folder": ("symlink escapes", None, [], "outside"),
    "incompatible config": ("copy", None, [*MICRO, "--set", "model.num_latents=8"],
                            "incompatible checkpoint: model.num_latents is 4"),
    "models:/ unknown alias": (None, "models:/latentgate-base@nope", [], "cannot resolve checkpoint"),
    "models:/ unknown version": (None, "models:/latentgate-base/999", [], "cannot resolve checkpoint"),
    "models:/ unknown name": (None, "models:/no-such-model@hero", [], "cannot resolve checkpoint"),
    "runs:/ unknown run": (None, "runs:/0123456789abcdef0123456789abcdef/checkpoints/stage_a", [],
                           "cannot resolve checkpoint"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_errors(case, sigterm_run, tmp_path):
    kind, uri, extra, needle = CHECKPOINT_CASES[case]
    ckpt = Path(error_line(sigterm_run["proc"]).split("saved to ")[1].split(" (fix:")[0])
    before = digest([ckpt])
    reg = registry_state()
    target = uri or _damage(kind, ckpt, tmp_path)
    proc = run_cli("checkpoint", "verify", target, *extra, timeout=90)
    assert_fails(proc, 2, needle)
    assert digest([ckpt]) == before and not leftovers(ckpt.parent)
    assert_store_consistent(reg)


# ---- security ------------------------------------------------------------------------------------------------

SRC = ROOT / "src" / "latentgate"


def _calls(name: str) -> list[tuple[str, str]]:
    """(file:line, call text up to its closing parenthesis) for every call of `name` in our sources."""
    import ast

    out = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    out.append((f"{path.relative_to(ROOT)}:{node.lineno}", ast.unparse(node)))
    return out


def _sec_torch_load(ctx):
    calls = _calls("load")
    torch_loads = [(w, c) for w, c in calls if c.startswith("torch.load(")]
    assert torch_loads, "expected the optimizer/scheduler state loads"
    for where, call in torch_loads:
        assert "weights_only=True" in call, f"{where}: {call}"


def _sec_trust_remote_code(ctx):
    from latentgate import config

    assert config.resolve("smoke").base.trust_remote_code is False
    assert config.resolve("micro").base.trust_remote_code is False
    for where, call in _calls("from_pretrained"):
        assert "trust_remote_code=True" not in call.replace(" ", ""), f"{where}: {call}"
        if "trust_remote_code" in call:
            assert "trust_remote_code=cfg.base.trust_remote_code" in call, f"{where}: {call}"


def _sec_safetensors_only(ctx):
    ckpt = Path(error_line(ctx["sigterm"]["proc"]).split("saved to ")[1].split(" (fix:")[0])
    weights = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {"encoder.safetensors", "adapter.safetensors"} <= weights
    pickled = {w for w in weights if w.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    assert pickled <= {"optimizer.pt", "scheduler.pt"}, pickled  # state only, read with weights_only=True
    base_dir = next(ctx["sigterm"]["out"].glob("smoke-*/base/base_lm"), None)
    if base_dir is not None:  # the base LM was trained in this session's store by this run
        assert any(base_dir.glob("*.safetensors")) and not any(base_dir.glob("*.bin"))


def _sec_path_escapes(ctx):
    from latentgate.errors import CheckpointError
    from latentgate.safety import safe_join

    root = ctx["tmp"] / "root"
    (root / "sub").mkdir(parents=True)
    (ctx["tmp"] / "secret.txt").write_text("x")
    (root / "sub" / "inside.txt").write_text("y")
    (root / "link_out").symlink_to(ctx["tmp"] / "secret.txt")
    (root / "dir_out").symlink_to(ctx["tmp"])
    (root / "link_in").symlink_to(root / "sub" / "inside.txt")
    for bad in ("../secret.txt", "/etc/passwd", "sub/../../secret.txt", "sub\\..\\x", "link_out", "dir_out/secret.txt",
                "", "./sub/inside.txt", "C:/x"):
        with pytest.raises(CheckpointError):
            safe_join(root, bad)
    assert safe_join(root, "sub/inside.txt") == root / "sub" / "inside.txt"
    assert safe_join(root, "link_in") == root / "link_in"  # a link that stays inside is fine


def _sec_secrets_masked(ctx):
    """No logged param, tag or run name in the store carries the password of the PostgreSQL URL this file's
    training runs were given; the masked form is what was logged."""
    runs = all_runs()
    seen_masked = False
    for r in runs:
        values = [*r.data.params.values(), *r.data.tags.values(), r.info.run_name or ""]
        assert not any(SECRET in v for v in values), r.info.run_id
        seen_masked |= "postgresql://reader:***@db.example/squad" in r.data.params.values()
    assert seen_masked, "no run logged the masked URL: the case did not exercise masking"
    from latentgate.tracking.secrets import mask_secrets

    env = {"MLFLOW_TRACKING_TOKEN": "tok-s3cr3t-value"}
    os.environ.update(env)
    try:
        assert mask_secrets("auth failed with tok-s3cr3t-value for postgresql://u:pw%40x@h/db?password=z") == (
            "auth failed with *** for postgresql://u:***@h/db?password=***")
    finally:
        os.environ.pop("MLFLOW_TRACKING_TOKEN")


SECURITY_CASES = {"torch.load uses weights_only=True": _sec_torch_load,
                  "trust_remote_code is off unless asked": _sec_trust_remote_code,
                  "weights are safetensors": _sec_safetensors_only,
                  "paths cannot escape their folder": _sec_path_escapes,
                  "secrets are masked in params, tags and errors": _sec_secrets_masked}


@pytest.mark.parametrize("case", list(SECURITY_CASES))
def test_security(case, sigterm_run, tmp_path):
    SECURITY_CASES[case]({"sigterm": sigterm_run, "tmp": tmp_path})


# ---- Optuna storage, study names and registry names (latentgate.sweep / latentgate.registry) --------------------

LATE_CASES = {
    "unknown study name": (["sweep", "--study", "nosuch", "--check"], "unknown study 'nosuch'", False),
    "registry version that does not exist": (["promote", "999"], "does not exist", False),
    "eval of an unknown registry name": (["eval", *MICRO, "--checkpoint", "models:/no-such-model@hero"],
                                         "cannot resolve checkpoint models:/no-such-model@hero", False),
    "stage-b resume_from that does not exist": (["stage-b", *MICRO, "--resume-from", "/nonexistent/ckpt"],
                                                "does not exist", False),
    "Optuna storage that cannot be opened": (["sweep", "--study", "micro", "--n-trials", "1", "--storage",
                                              f"postgresql://lg:{SECRET}@127.0.0.1:9/optuna"],
                                             "lg:***@127.0.0.1:9/optuna is unusable", True),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if LATE_CASES[c][2] else c
                                  for c in LATE_CASES])
def test_sweep_and_registry_errors(case, store, tmp_path):
    pytest.importorskip("latentgate.sweep")
    pytest.importorskip("latentgate.registry")
    args, needle, _ = LATE_CASES[case]
    reg = registry_state()
    proc = run_cli(*args, cwd=ROOT, timeout=120)
    assert_fails(proc, 2, needle)
    assert SECRET not in proc.stderr + proc.stdout
    assert_store_consistent(reg)


# ---- second catalogue (issue 18): signals, locks, full disks, secrets, leftovers ----------------------------------
# One section per class of the issue; each test fails on the code before the fix.

def _finish(proc: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _wait_caught(proc: subprocess.Popen, signum: int, timeout: float = 60) -> None:
    """Wait until `proc` has its own handler for `signum` (bit in /proc/<pid>/status SigCgt): the CLI's guard is
    in place, and (for a command that then imports torch and MLflow) no run exists yet."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        status = Path(f"/proc/{proc.pid}/status")
        caught = next((ln for ln in status.read_text().splitlines() if ln.startswith("SigCgt:")), "SigCgt: 0")
        if int(caught.split()[1], 16) >> (signum - 1) & 1:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"signal {signum} never got a handler")


def _new_runs(before: set[str], output_dir) -> list:
    return [r for r in all_runs()
            if r.info.run_id not in before and r.data.params.get("run.output_dir") == str(output_dir)]


def _unshare_ok() -> bool:
    """`unshare -rm` (a private mount namespace as an unprivileged user) lets a test mount a tiny tmpfs: a real
    full disk."""
    if not shutil.which("unshare") or not Path("/proc/self/status").exists():
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


# class 1: a dying process leaves nothing RUNNING; a locked store is waited for, then fails cleanly

@pytest.fixture(scope="module")
def sighup_run(store, tmp_path_factory):
    """A micro smoke with a long Stage A, sent SIGHUP (what an ssh disconnect sends) once Stage A trains. No secret
    in its params: `latentgate resume` rebuilds the config from them."""
    out = tmp_path_factory.mktemp("sighup")
    reg = registry_state()
    before = {r.info.run_id for r in all_runs()}
    proc = popen_cli("smoke", *MICRO, "--set", "stage_a.steps=300", "--set", "stage_a.probe_every=150",
                     "--set", f"run.output_dir={out}")
    wait_for_lines("smoke-*/stage_a/diagnostics.jsonl", out, 1, proc)
    proc.send_signal(signal.SIGHUP)
    return {"proc": _finish(proc, 120), "out": out, "registry": reg, "before": before}


def test_sighup_writes_final_checkpoint_and_ends_runs_killed(sighup_run):
    _check_interrupted(sighup_run, 129, "SIGHUP")


@pytest.mark.slow  # ~25 s: a 7 s lock
def test_locked_store_waits_then_fails_cleanly(store, tmp_path):
    """Another process holds the SQLite store locked while Stage A trains: the command waits the bounded time
    (LATENTGATE_STORE_WAIT_S), then exits 2 with one line; once the lock is gone the runs end FAILED."""
    import sqlite3

    reg = registry_state()
    before = {r.info.run_id for r in all_runs()}
    proc = popen_cli("smoke", *MICRO, "--set", "stage_a.steps=3000", "--set", "stage_a.probe_every=1500",
                     "--set", f"run.output_dir={tmp_path}", env={"LATENTGATE_STORE_WAIT_S": "2"})
    wait_for_lines("smoke-*/stage_a/diagnostics.jsonl", tmp_path, 1, proc)
    lock = sqlite3.connect(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"), timeout=30,
                           isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    time.sleep(7)  # past SQLite's own 5 s default, past our 2 s wait
    lock.execute("COMMIT")
    lock.close()
    assert_fails(_finish(proc), 2, "locked by another process")
    assert_store_consistent(reg)
    runs = runs_by_phase(parent_of_error(before, tmp_path))
    assert runs["stage_a"].info.status == "FAILED" and runs["smoke"].info.status == "FAILED"
    assert "database is locked" in runs["stage_a"].data.tags["latentgate.error"]


# class 2: work stops when the user stops it; --workers is bounded

def test_sweep_workers_are_capped(store, tmp_path):
    proc = run_cli("sweep", "--study", "micro", "--workers", "99999", "--check", cwd=tmp_path, timeout=60)
    assert_fails(proc, 2, "--workers=99999 exceeds")
    assert proc.stdout == ""


@pytest.mark.slow
def test_sigterm_to_sweep_stops_its_workers(store, tmp_path):
    journal = tmp_path / "stop.journal"
    log = (tmp_path / "sweep.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "latentgate", "sweep", "--study", "micro", "--name",
                             f"stop-{tmp_path.name}", "--n-trials", "8", "--workers", "2", "--storage", str(journal),
                             "--no-register", "--set", "stage_b.steps=400"], cwd=tmp_path, env=cli_env(),
                            stdout=log, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    deadline = time.time() + 240
    while len(pids) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        pids = [int(ln.split("(pid ")[1].split(",")[0]) for ln in (tmp_path / "sweep.out").read_text().splitlines()
                if " started (pid " in ln]
    assert len(pids) == 2, (tmp_path / "sweep.out").read_text()[-3000:]
    time.sleep(8)  # the workers are inside their first trials
    proc.send_signal(signal.SIGTERM)
    done = _finish(proc, 120)
    log.close()
    assert_fails(done, 143, "interrupted by SIGTERM")

    def alive(pid: int) -> bool:
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"

    assert not [p for p in pids if alive(p)], "workers kept running after the sweep was stopped"
    assert_store_consistent({})


# class 3: a secret in the tracking URI is never printed

@pytest.mark.slow
def test_secret_in_tracking_uri_is_not_printed(mlflow_server, tmp_path):
    uri = mlflow_server.replace("http://", f"http://lg:{SECRET}@")
    proc = run_cli("base", *MICRO, "--set", f"run.output_dir={tmp_path}", env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert "View run" not in proc.stdout


# class 4: no data silently lost, no half-copied artifact, no edited manifest passing verification

def test_in_memory_store_is_refused(store, tmp_path):
    proc = run_cli("smoke", *MICRO, "--set", f"run.output_dir={tmp_path}", env={"MLFLOW_TRACKING_URI": "sqlite://"},
                   timeout=120)
    assert_fails(proc, 2, "in-memory SQLite")
    assert proc.stdout == "" and not list(tmp_path.iterdir())


def test_edited_manifest_fails_verification(sigterm_run, tmp_path):
    ckpt = Path(error_line(sigterm_run["proc"]).split("saved to ")[1].split(" (fix:")[0])
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["config"]["stage_a.lr"] = 0.5  # every file still matches its hash; the manifest itself does not
    (copy / "manifest.json").write_text(json.dumps(m))
    assert_fails(run_cli("checkpoint", "verify", str(copy), timeout=90), 2, "does not match its own hash")


@pytest.mark.skipif(not _unshare_ok(), reason="needs `unshare -rm` (a private mount namespace) for a tiny tmpfs")
@pytest.mark.parametrize("full", ["artifact store", "output folder"])
def test_full_disk_leaves_nothing_half_copied(full, micro_smoke, tmp_path):
    """A real full disk (a 400 KiB tmpfs: the Stage A checkpoint does not fit) under the artifact store or the
    output folder: one line naming the file on that disk, runs FAILED, no partial checkpoint anywhere. The base LM
    is the session's (micro_smoke), so nothing registered lives on the vanishing tmpfs."""
    disk = tmp_path / "disk"
    disk.mkdir()
    name = f"full-{tmp_path.name}"
    if full == "artifact store":
        client().create_experiment(name, artifact_location=disk.as_uri())
    out = disk if full == "output folder" else tmp_path / "runs"
    reg = registry_state()
    before = {r.info.run_id for r in all_runs()}
    cmd = [sys.executable, "-m", "latentgate", "smoke", *MICRO, "--set", f"run.output_dir={out}",
           "--set", f"run.experiment={name if full == 'artifact store' else 'latentgate'}"]
    listing = tmp_path / "listing.txt"
    script = (f"mount -t tmpfs -o size=400k none {disk} && {{ {shlex.join(cmd)}; rc=$?; "
              f"find {disk} > {listing}; exit $rc; }}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert_fails(proc, 2, f"cannot write {disk}/", "no space left on the device")
    assert_store_consistent(reg)
    runs = runs_by_phase(parent_of_error(before, out))
    assert runs["smoke"].info.status == "FAILED" and "stage_b" not in runs
    assert runs["stage_a"].info.status == "FAILED"
    files = listing.read_text().splitlines()
    assert not [f for f in files if ".tmp-" in f], files
    folders = {f.rsplit("/", 1)[0] for f in files if "/checkpoints/stage_a/" in f}
    assert all(f"{d}/manifest.json" in files for d in folders), files  # a checkpoint is whole or absent


# class 5: recovery the docs promise works (a smoke's stage resumes); class 9: nothing copied into $TMPDIR;
# class 10: the resumed run, FINISHED, no longer carries the interruption's error

def test_resume_a_smoke_stage_after_sighup(sighup_run, tmp_path):
    runs = runs_by_phase(parent_of_error(sighup_run["before"], sighup_run["out"]))
    stage_a = runs["stage_a"].info.run_id
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    proc = run_cli("resume", stage_a, env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = client().get_run(stage_a)
    assert run.info.status == "FINISHED"
    assert "latentgate.error_type" not in run.data.tags and "latentgate.error" not in run.data.tags
    steps = [m.step for m in client().get_metric_history(stage_a, "stage_a/loss")]
    assert sorted(steps) == list(range(1, 301))  # continued, no step logged twice
    copies = [str(p) for p in tmp.rglob("*") if p.suffix == ".safetensors" or p.name == "manifest.json"]
    assert not copies, f"full copies of the base LM / checkpoints left in $TMPDIR: {copies}"
    assert_store_consistent(sighup_run["registry"])


# class 6: no MLflow log lines before our one line; reading commands never create a store
# class 9: several commands creating one new store at once

def test_new_store_created_once_and_quietly(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"}
    procs = [popen_cli("stage-a", *MICRO, env=env) for _ in range(2)]
    for proc in procs:
        assert_fails(_finish(proc), 2, "no base LM registered")  # not "duplicate column name", no INFO lines


def test_reading_commands_never_create_a_store(tmp_path):
    for args in (["monitor", "0123456789abcdef0123456789abcdef"], ["resume", "0123456789abcdef0123456789abcdef"],
                 ["checkpoint", "verify", "runs:/0123456789abcdef0123456789abcdef/checkpoints/stage_a"]):
        proc = run_cli(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""}, timeout=120)
        assert_fails(proc, 2, "no tracking store at")
    assert not list(tmp_path.iterdir())


def test_read_only_store_is_one_line(store, tmp_path):
    """MLflow logs every failed SQLite write at ERROR, with a traceback; our CLI silences MLflow's logger."""
    import sqlite3

    folder = tmp_path / "ro"
    folder.mkdir()
    src = sqlite3.connect(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    dst = sqlite3.connect(folder / "mlflow.db")
    src.backup(dst)
    src.close()
    dst.close()
    if not _immutable(folder / "mlflow.db", True) or not _immutable(folder, True):
        pytest.skip("cannot make the store unwritable here")
    try:
        proc = run_cli("smoke", *MICRO, "--set", f"run.output_dir={tmp_path / 'runs'}",
                       env={"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}, timeout=120)
    finally:
        _immutable(folder, False)
        _immutable(folder / "mlflow.db", False)
    assert_fails(proc, 2, "the tracking store refused a write")


# class 7: bad input is exit 2 with a fix, checked in the config schema before anything is tracked

CONFIG_CASES_2 = {
    "device garbage": (["--set", "run.device=garbage"], "run.device='garbage' is not auto, cpu, cuda or cuda:N"),
    "registry name with a slash": (["--set", "run.registry_base=bad/name"], "not a valid registered model name"),
    "no eval paths": (["--set", "eval.paths=[]"], "eval.paths is empty"),
    "M beyond the LM's positions": (["--set", "model.num_latents=100000"], "model.num_latents=100000 is out of range"),
    "threads beyond the machine": (["--set", "run.threads=100000"], "run.threads=100000 exceeds"),
    "n_train beyond the memory": (["--set", "data.n_train=100000000000000000000"], "would not fit this machine"),
    "output_dir is a file": (["--set", f"run.output_dir={ROOT / 'README.md'}"], "is a file, not a folder"),
    "empty --set value": (["--set", "stage_a.lr="], "override 'stage_a.lr=' has an empty value"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES_2))
def test_config_bounds_from_the_machine_and_model(case, store):
    args, needle = CONFIG_CASES_2[case]
    runs_before = len(all_runs())
    proc = run_cli("config", *MICRO, *args, timeout=60)
    assert_fails(proc, 2, needle)
    assert proc.stdout == "" and len(all_runs()) == runs_before


def _bad_inputs(tmp: Path) -> dict:
    """name -> (argv, needle); files made in `tmp` (class 7 and the FIFO of class 8)."""
    (tmp / "latin1.yaml").write_bytes(b"stage_a:\n  lr: 0.001 # caf\xe9\n")
    (tmp / "folder.yaml").mkdir()
    os.mkfifo(tmp / "data.jsonl")
    (tmp / "ok.jsonl").write_text(OK + "\n")
    return {
        "preset not UTF-8": (["config", "--preset", str(tmp / "latin1.yaml")], "not valid UTF-8 (byte 0xe9"),
        "preset is a directory": (["config", "--preset", str(tmp / "folder.yaml")], "is a directory"),
        "study not UTF-8": (["sweep", "--study", str(tmp / "latin1.yaml"), "--check"], "not valid UTF-8"),
        "study is a directory": (["sweep", "--study", str(tmp / "folder.yaml"), "--check"], "is a directory"),
        "data check --write-jsonl to a directory": (["data", "check", str(tmp / "ok.jsonl"), "--write-jsonl",
                                                     str(tmp)], "is a directory"),
        "data check on a FIFO (would hang)": (["data", "check", str(tmp / "data.jsonl")], "not a regular file"),
        "sweep --check --n-trials 0": (["sweep", "--study", "micro", "--n-trials", "0", "--check"],
                                       "--n-trials=0 must be >= 1"),
    }


BAD_INPUT_NAMES = ["preset not UTF-8", "preset is a directory", "study not UTF-8", "study is a directory",
                   "data check --write-jsonl to a directory", "data check on a FIFO (would hang)",
                   "sweep --check --n-trials 0"]


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_bad_input_files_and_options(case, tmp_path):
    args, needle = _bad_inputs(tmp_path)[case]
    before = digest([tmp_path])
    proc = run_cli(*args, cwd=tmp_path, timeout=30)  # a hang is a TimeoutExpired
    assert_fails(proc, 2, needle)
    assert proc.stdout == "" and digest([tmp_path]) == before


def test_missing_cuda_device_is_refused_before_any_run(store, tmp_path):
    import torch

    device = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"  # one past the last
    before = {r.info.run_id for r in all_runs()}
    proc = run_cli("smoke", *MICRO, "--set", f"run.device={device}", "--set", f"run.output_dir={tmp_path}",
                   timeout=120)
    assert_fails(proc, 2, f"run.device={device} but this machine has")
    assert not _new_runs(before, tmp_path) and not list(tmp_path.iterdir())


# class 8: no hangs; one bounded timeout for an unreachable server

@pytest.mark.parametrize("args", [["resume", "0123456789abcdef0123456789abcdef"],
                                  ["checkpoint", "verify", "runs:/0123456789abcdef0123456789abcdef/checkpoints/a"]])
def test_unreachable_server_fails_in_seconds_for_every_command(args):
    t0 = time.time()
    proc = run_cli(*args, env={"MLFLOW_TRACKING_URI": f"http://lg:{SECRET}@127.0.0.1:{free_port()}"}, timeout=60)
    assert_fails(proc, 2, "unreachable")
    assert time.time() - t0 < 30 and SECRET not in proc.stderr


# class 10: small things

def test_fix_hints_name_real_commands():
    """Every `latentgate <command> [<subcommand>]` quoted (in backticks or parentheses) in our sources exists."""
    import re

    import click

    import latentgate
    from latentgate.cli import main

    named = set()
    for path in Path(latentgate.__file__).parent.rglob("*.py"):
        named |= set(re.findall(r"[`(]latentgate ((?:--?\w[\w-]* )*[a-z][a-z0-9-]*)(?: ([a-z][a-z0-9-]*))?",
                                path.read_text()))
    assert named
    for command, sub in named:
        command = command.split()[-1]
        assert command in main.commands, f"`latentgate {command}` does not exist"
        group = main.commands[command]
        if isinstance(group, click.Group) and sub:
            assert sub in group.commands, f"`latentgate {command} {sub}` does not exist"


def test_set_values_with_spaces_and_empty_mlproject_parameters(store):
    proc = run_cli("config", *MICRO, "--set", "run.experiment=my runs", "--overrides", "stage_a.lr=0.002", timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["run"]["experiment"] == "my runs" and cfg["stage_a"]["lr"] == 0.002
    # what `mlflow run` builds from the MLproject: a parameter left at its empty default keeps the preset's value
    proc = run_cli("config", *MICRO, "--set", "stage_a.lr=", env={"MLFLOW_RUN_ID": "0" * 32}, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_signal_before_any_run_does_not_claim_a_killed_run(store, tmp_path):
    before = {r.info.run_id for r in all_runs()}
    proc = popen_cli("smoke", *MICRO, "--set", f"run.output_dir={tmp_path}")
    _wait_caught(proc, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    line = assert_fails(_finish(proc, 60), 143, "interrupted by SIGTERM outside a training step")
    assert not _new_runs(before, tmp_path)
    assert "KILLED" not in line


# class 4 (registry): a refused promote moves or removes no alias; class 7: demote of a version that does not exist

@pytest.mark.slow  # ~20 s; test_registry checks the same rule in-process
def test_refused_promote_keeps_the_alias_and_demote_needs_a_real_version(micro_smoke, micro_cfg, tmp_path):
    from test_registry import LENIENT, eval_digest, write_checklist

    name = f"lg-keep-{os.getpid()}"
    lenient = write_checklist(tmp_path / "lenient.yaml", dict([eval_digest(micro_cfg)]), LENIENT)
    ok = run_cli("promote", micro_smoke.children["eval"], "--checklist", str(lenient), "--name", name)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    version = ok.stdout.split("PROMOTED: alias hero -> version ")[1].split()[0]
    reg = registry_state()
    assert {k: str(v) for k, v in reg[name][0].items()} == {"hero": version}
    # the same version under the default checklist (micro numbers fail it): refused, and the alias stays put
    refused = run_cli("promote", version, "--name", name)
    assert_fails(refused, 4, "refused")
    assert_store_consistent(reg)
    assert_fails(run_cli("demote", "999", "--reason", "gone", "--name", name), 2, f"{name} has no version '999'")
    assert_store_consistent(reg)
