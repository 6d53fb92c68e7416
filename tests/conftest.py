"""Shared fixtures: one real SQLite MLflow store per test session (a fresh one costs ~6 s to migrate), one micro
smoke run in it, a real `mlflow server` per test module that asks for one, and helpers: the real CLI in a
subprocess, a free local port."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Offline, quiet, single-threaded: set before anything imports torch / HF / mlflow.
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "GIT_PYTHON_REFRESH": "quiet"}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory, hf_home) -> Path:
    """A real SQLite tracking store + artifact folder, shared by the session. Returns its folder."""
    root = tmp_path_factory.mktemp("mlstore")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    from latentgate.tracking.runs import setup_experiment

    setup_experiment("latentgate")
    return root


@pytest.fixture(scope="session")
def micro_cfg():
    from latentgate import config

    return config.resolve("micro")


@pytest.fixture(scope="session")
def micro_smoke(mlflow_store, micro_cfg, tmp_path_factory):
    """One end-to-end micro smoke (seconds) in the shared store: its SmokeResult (run ids, output dir)."""
    import dataclasses

    from latentgate.phases.smoke import run_smoke

    cfg = dataclasses.replace(micro_cfg)
    cfg.run = dataclasses.replace(micro_cfg.run, output_dir=str(tmp_path_factory.mktemp("runs")))
    return run_smoke(cfg, "micro")


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # set by mlflow.set_experiment in this process; would pin subprocesses
    env.update(extra or {})
    return env


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
            **kwargs) -> subprocess.CompletedProcess:
    """The real `latentgate` CLI in a subprocess (same interpreter), capturing output."""
    return subprocess.run([sys.executable, "-m", "latentgate", *args], cwd=cwd or ROOT, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and proxied artifacts, light (one worker, no
    job execution), stopped by its process group: its URI. One per test module, so modules never see each other's
    runs."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = cli_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
        time.sleep(1)
    try:
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def every_criterion_decides(data: dict) -> dict:
    """A checklist's data with every criterion deciding except the learning-curve ones (kind metric_extrapolated):
    the plan's rule, for tests of the gate's mechanics on micro runs, which learn nothing, so a curve read at the
    hero's budget (what the shipped file decides by) refuses them all. Returns `data`."""
    for c in data["criteria"]:
        c["decides"] = c["kind"] != "metric_extrapolated"
    return data


def checklist_copy(path: Path, edits: dict | None = None, **top) -> Path:
    """A copy of the shipped registry/hero.yaml at `path`, every criterion deciding but the curves
    (`every_criterion_decides`): criteria edited by `edits` ({criterion: {key: value}},
    params merged; an unknown criterion is an error), top-level keys replaced by `top` (eval_dataset_digest,
    model_name, ...). Returns `path`."""
    import yaml  # lazy: conftest sets the environment before anything heavy is imported

    from latentgate.registry.checklist import DEFAULT_PATH  # lazy: as above

    data = every_criterion_decides({**yaml.safe_load(DEFAULT_PATH.read_text()), **top})
    unknown = set(edits or {}) - {c["name"] for c in data["criteria"]}
    assert not unknown, f"no such criteria in {DEFAULT_PATH.name}: {sorted(unknown)}"
    for c in data["criteria"]:
        for key, value in (edits or {}).get(c["name"], {}).items():
            if key == "params":
                c["params"].update(value)
            else:
                c[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def micro_scale_checklist(folder: Path, cfg, eval_examples: list, edits: dict | None = None,
                          name: str = "micro_scale") -> Path:
    """The shipped rules at micro scale: a copy of registry/hero.yaml that pins `cfg`'s eval set (its data config
    hash -> the digest of `eval_examples`, beside the shipped pins) and lowers eval_size's threshold to the number
    of those examples. The shipped file refuses a micro run on provenance (a few dozen unpinned eval rows); this
    copy judges it by every other criterion as shipped, unless `edits` changes one. Returns the copy's path."""
    from latentgate.config import config_hash  # lazy: conftest sets the environment before anything heavy
    from latentgate.registry.checklist import load_checklist  # lazy: as above
    from latentgate.tracking.tracker import dataset_digest  # lazy: as above

    shipped = load_checklist()
    assert len(eval_examples) < shipped.threshold("eval_size"), "not a micro eval set: judge it with the shipped file"
    pins = {**shipped.eval_dataset_digest, config_hash(cfg, ("data",)): dataset_digest(eval_examples)}
    return checklist_copy(folder / f"{name}.yaml", {"eval_size": {"threshold": len(eval_examples)}, **(edits or {})},
                          eval_dataset_digest=pins)


@pytest.fixture()
def tiny_ws(micro_cfg):
    """A Workspace around a tiny, randomly initialised builtin Llama + encoder + adapter (no training)."""
    import torch

    from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer
    from latentgate.train.workspace import load_splits, workspace_from_lm

    cfg = copy.deepcopy(micro_cfg)  # tests may change the config; the session's stays untouched
    torch.manual_seed(0)
    tok = builtin_tokenizer(cfg)
    lm = build_builtin_lm(cfg, len(tok), tok)
    return workspace_from_lm(cfg, lm, tok, load_splits(cfg))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def bpe_lm_dir(tmp_path_factory, micro_cfg) -> Path:
    """A local HF folder like a real external LM: a byte-level BPE tokenizer (trained here with `tokenizers`, the
    GPT-2 / Llama-3 / SmolLM2 kind: leading-space tokens, newline tokens), a ChatML chat template, <|im_end|> as
    EOS plus a second end id in generation_config, and a tiny random Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from latentgate.train.workspace import load_splits

    splits = load_splits(micro_cfg)
    corpus = [f"context : {e.context} question : {e.question} answer : {e.answer}\n" for e in splits["train"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     bos_token=None, chat_template=CHATML)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
                                      tie_word_embeddings=True))
    lm.generation_config = GenerationConfig(eos_token_id=[hf_tok.eos_token_id, hf_tok.convert_tokens_to_ids(
        "<|endoftext|>")])
    folder = tmp_path_factory.mktemp("bpe_lm")
    lm.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def external_ws(folder):
    """A Workspace on a local HF LM folder at micro scale, loaded the way any external LM is."""
    from latentgate import config  # lazy: conftest sets the environment before anything heavy is imported
    from latentgate.train.workspace import build_workspace, load_splits  # lazy: as above

    cfg = config.resolve("micro", {"base.name": str(folder)})
    return build_workspace(cfg, cfg.base.name, load_splits(cfg))


@pytest.fixture()
def bpe_ws(bpe_lm_dir, micro_cfg):
    """A Workspace on the BPE LM folder, loaded the way any external LM is (lm_self encoder, answer_end=none)."""
    return external_ws(bpe_lm_dir)


GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
         "\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
         "{% endif %}")
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def sp_lm_dir(tmp_path_factory, micro_cfg):
    """A local HF folder like Llama-2 / Mistral / Gemma: a SentencePiece-style BPE tokenizer ("▁" word prefix from
    a Metaspace pre-tokenizer, prepended to the first word only; BOS `<s>` added by the post-processor; EOS `</s>`),
    trained here on the task's text, a Gemma-style chat template whose turns end with `<end_of_turn>` (not EOS), and
    a tiny random Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from latentgate.train.workspace import load_splits

    splits = load_splits(micro_cfg)
    corpus = [f"context : {e.context} question : {e.question} answer : {e.answer}\n" for e in splits["train"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", *TURN_TOKENS]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<unk>", additional_special_tokens=TURN_TOKENS, chat_template=GEMMA)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                                      pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=True))
    folder = tmp_path_factory.mktemp("sp_lm")
    lm.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def sp_ws(sp_lm_dir, micro_cfg):
    """A Workspace on the SentencePiece LM folder, loaded the way any external LM is."""
    return external_ws(sp_lm_dir)


def recorded_candidate(folder: Path, probes: dict[int, float], latent_f1: list[float], const: float = 0.01,
                       grad: float = 2.0, steps: int = 30) -> dict:
    """A real recorded lineage in the session's store, as the registry gate reads one: a parent smoke run with base,
    Stage A, Stage B and eval children, all FINISHED at one commit. Stage A and B log loss, grad norm (`grad`) and
    first_acc at every one of `steps` optimizer steps; Stage B logs its raw probe first-token accuracy at the steps
    of `probes` with the probe's controls (constant guess `const`, shuffled latent 0) and their lift. The eval run
    scored the smoke preset's pinned eval set (its 200 questions; the digest tag and every row's example hash
    match the shipped pin), latent F1 `latent_f1[i]` on question i: 'paris' where F1 > 0, a different wrong answer
    everywhere else, none repetitive. Returns {"parent", "stage_b", "eval"} run ids."""
    import json  # lazy: conftest sets the environment before anything heavy is imported

    import mlflow  # lazy: as above
    from mlflow import MlflowClient  # lazy: as above
    from mlflow.entities import Metric, Param  # lazy: as above

    from latentgate.config import config_hash, flatten, resolve  # lazy: as above
    from latentgate.registry.checklist import load_checklist  # lazy: as above
    from latentgate.tracking.tracker import example_sha256  # lazy: as above
    from latentgate.train.workspace import load_splits  # lazy: as above

    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("latentgate").experiment_id
    now = int(time.time() * 1000)
    commit = "0123456789abcdef0123456789abcdef01234567"
    parent = client.create_run(exp, run_name="recorded", tags={"latentgate.phase": "smoke"}).info.run_id

    def child(phase: str, **tags) -> str:
        return client.create_run(exp, run_name=phase, tags={"latentgate.phase": phase, "mlflow.parentRunId": parent,
                                                             "latentgate.git_commit": commit, **tags}).info.run_id

    base = child("base")
    stage_a = child("stage_a")
    stage_b = child("stage_b", **{"latentgate.init_from": f"runs:/{stage_a}/checkpoints/stage_a",
                                  "latentgate.base_run": base})
    for stage, run in (("stage_a", stage_a), ("stage_b", stage_b)):
        metrics = []
        for step in range(1, steps + 1):
            metrics += [Metric(f"{stage}/loss", 5.0 - step * 0.01, now, step),
                        Metric(f"{stage}/grad_norm", grad, now, step), Metric(f"{stage}/first_acc", 0.05, now, step)]
            if stage == "stage_b" and step in probes:
                acc = probes[step]
                metrics += [Metric("stage_b/probe_first_acc", acc, now, step),
                            Metric("stage_b/probe_first_acc_lo", acc / 2, now, step),
                            Metric("stage_b/probe_first_acc_hi", min(1.0, acc * 2), now, step),
                            Metric("stage_b/probe_first_acc_const", const, now, step),
                            Metric("stage_b/probe_first_acc_shuffled", 0.0, now, step),
                            Metric("stage_b/probe_first_acc_lift", acc - const, now, step)]
        client.log_batch(run, metrics=metrics, params=[Param(f"{stage}.steps", str(steps))])
    smoke = resolve("smoke")
    digest = load_checklist().pinned_digest(config_hash(smoke, ("data",)))
    ev = child("eval", **{"latentgate.checkpoint": f"runs:/{stage_b}/checkpoints/stage_b",
                          "latentgate.base_run": base, "dataset.eval.digest": digest})
    examples = load_splits(smoke)["eval"]  # the pinned eval set: its rows hash to the pinned digest
    rows = [{"id": ex.id, "path": "latent", "question": ex.question, "references": ["paris"],
             "prediction": "paris" if f > 0 else f"x{i}", "first_token": i, "em": float(f == 1.0), "f1": f,
             "first_token_correct": f > 0, "error_mode": "correct" if f == 1.0 else "wrong_entity",
             "example_sha256": example_sha256(ex)} for i, (f, ex) in enumerate(zip(latent_f1, examples, strict=True))]
    rows += [{**r, "path": "text", "f1": 0.8} for r in rows]
    mean = sum(latent_f1) / len(latent_f1)
    top_share = max(sum(f > 0 for f in latent_f1), 1) / len(latent_f1)
    paths = {"latent": {"f1": mean, "em": mean, "n": len(latent_f1), "top_prediction_share": top_share,
                        "repetition_rate": 0.0},
             "text": {"f1": 0.8}, "zero_latent": {"f1": 0.0}, "shuffled_latent": {"f1": 0.0}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval_detailed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "metrics.json").write_text(json.dumps({"paths": paths}))
    client.log_artifact(ev, str(folder / "eval_detailed.jsonl"))
    client.log_artifact(ev, str(folder / "metrics.json"))
    params = [Param(k, str(v)) for k, v in flatten(smoke).items()]  # the config the eval ran with
    client.log_batch(ev, metrics=[Metric(f"eval/{p}/{k}", v, now, 0) for p, m in paths.items() for k, v in m.items()
                                  if k != "n"], params=params)
    for run in (base, stage_a, stage_b, ev, parent):
        client.set_terminated(run)
    return {"parent": parent, "stage_b": stage_b, "eval": ev}
