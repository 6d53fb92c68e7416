"""First-token controls and mode collapse, on real models and real recorded runs.

The issue: a run with latent F1 0 and probe first-token accuracy 17.2% was read as exposure bias, but its latent path
gave the same answer to every question, and 17.2% is what always guessing the most frequent first answer token
scores. Here a real model does the same thing (its adapter outputs one vector for every input; Stage B's LoRA learns
the answer prior), is recorded like any run (a parent; base and Stage A runs; a Stage B run with its probe history; an
eval run with its artifacts) in the session's SQLite store, and the checklist, the pipeline's decision tree, the
analysis report and the monitor judge it, with the shipped registry/hero.yaml at micro scale (tests/conftest.py
micro_scale_checklist: the fixture's eval set pinned and counted as enough; the shipped file itself refuses it on
provenance) and with edited copies of that."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import micro_scale_checklist
from latentgate.registry.checklist import load_checklist

MAJORITY = 0.3  # share of the most frequent first answer word in the collapsed model's training and probe sets


def _first_word(e) -> str:
    return e.answer.split()[0]


def _skewed(examples: list, word: str, n: int, share: float, seed: int) -> list:
    hot = [e for e in examples if _first_word(e) == word]
    cold = [e for e in examples if _first_word(e) != word]
    k = round(n * share)
    assert len(hot) >= k and len(cold) >= n - k
    out = hot[:k] + cold[: n - k]
    random.Random(seed).shuffle(out)
    return out


@pytest.fixture(scope="module")
def collapsed(mlflow_store, micro_cfg, tmp_path_factory) -> dict:
    """A model that answers every question alike, trained and recorded. Its adapter's first layer is zeroed and
    frozen, so the adapter outputs the same vector for every input; Stage B's LoRA then learns the answer prior
    (one-word answers, then the end token) from a training set whose most frequent answer covers 30%: it says that
    word, once, to everyone (no repetition). The probe set has the same skew. The eval set holds none of that
    word's answers, so the constant answer scores F1 0 everywhere, as in the issue (whose constant first token,
    "the", SQuAD normalisation drops). Recorded as a whole lineage (base, Stage A, Stage B from it, an eval run with
    its config and its eval set as a dataset input), so the gate's provenance criteria can pass and the rules judge
    what the model learned. The base LM is the builtin one, built here rather than trained: its run records its
    config."""
    from latentgate.config import flatten
    from latentgate.data.synthetic import SyntheticSpec, make_splits, vocabulary
    from latentgate.eval.evaluate import evaluate
    from latentgate.model.base_lm import build_builtin_lm, build_builtin_tokenizer
    from latentgate.model.lora import attach_lora
    from latentgate.phases.stages import record_eval
    from latentgate.schema import Tag
    from latentgate.tracking.runs import tracked_run
    from latentgate.train.trainer import train_stage
    from latentgate.train.workspace import workspace_from_lm

    cfg = copy.deepcopy(micro_cfg)
    cfg.data = dataclasses.replace(cfg.data, answer_length=1)
    cfg.stage_b = dataclasses.replace(cfg.stage_b, steps=60, lr=1e-2, probe_every=20)
    spec = SyntheticSpec.of(cfg.data)
    pool = make_splits(spec, cfg.data.seed, 3000, 300, 1000)
    word = Counter(_first_word(e) for e in pool["train"]).most_common(1)[0][0]
    splits = {"train": _skewed(pool["train"], word, 256, MAJORITY, 1),
              "probe": _skewed(pool["probe"], word, 32, MAJORITY, 2),
              "eval": [e for e in pool["eval"] if all(word not in a.split() for a in e.answers)][:24]}
    torch.manual_seed(0)
    tok = build_builtin_tokenizer(vocabulary(spec))
    ws = workspace_from_lm(cfg, build_builtin_lm(cfg, len(tok), tok), tok, splits)
    with torch.no_grad():
        ws.adapter.net[0].weight.zero_()
    ws.adapter.net[0].weight.requires_grad_(False)
    out = tmp_path_factory.mktemp("collapsed")
    with tracked_run("smoke", nested=False, tags={Tag.PRESET: "micro"}) as parent:
        with tracked_run("base") as tr:
            tr.log_params(flatten(cfg))
            base = tr.run_id
        with tracked_run("stage_a", tags={Tag.BASE_RUN: base}) as tr:
            train_stage(ws, cfg.stage_a, tr, out / "stage_a", name="stage_a")
            stage_a = tr.run_id
        ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
        with tracked_run("stage_b", tags={Tag.BASE_RUN: base,
                                          Tag.INIT_FROM: f"runs:/{stage_a}/checkpoints/stage_a"}) as tr:
            trained = train_stage(ws, cfg.stage_b, tr, out / "stage_b", name="stage_b")
            stage_b = tr.run_id
        with tracked_run("eval", tags={Tag.CHECKPOINT: f"runs:/{stage_b}/checkpoints/stage_b",
                                       Tag.BASE_RUN: base}) as tr:
            tr.log_params(flatten(cfg))
            tr.log_input(splits["eval"], "eval", "evaluation")
            record_eval(tr, ws, evaluate(ws, splits["eval"], out / "eval"), out / "eval")
            eval_run = tr.run_id
        parent.set_tags({Tag.CHILDREN: f"{base},{stage_a},{stage_b},{eval_run}"})
        parent_run = parent.run_id
    return {"parent": parent_run, "stage_b": stage_b, "eval": eval_run, "probes": trained["probes"], "word": word,
            "splits": splits, "ws": ws, "cfg": cfg}


def _micro_scale(collapsed: dict, tmp_path: Path, edits: dict | None = None) -> Path:
    """The shipped hero.yaml at micro scale (the fixture's 24 eval questions pinned and enough for eval_size), with
    criteria edited: {criterion: {key: value}}, params merged."""
    return micro_scale_checklist(tmp_path, collapsed["cfg"], collapsed["splits"]["eval"], edits)


# ---- the probe's controls -----------------------------------------------------------------------------------------

def test_a_constant_latent_scores_its_raw_first_token_accuracy_from_the_constant_guess(collapsed):
    probe = collapsed["splits"]["probe"]
    const = Counter(_first_word(e) for e in probe).most_common(1)[0][1] / len(probe)  # word-level tokenizer
    assert const == pytest.approx(MAJORITY, abs=0.02) and const > 0.12
    for p in collapsed["probes"]:
        assert p["first_acc_const"] == pytest.approx(const)
        assert p["first_acc_shuffled"] == p["first_acc"]  # the same latents for all: shuffling changes nothing
        assert p["first_acc_lift"] <= 0 and p["top_first_token_share"] == 1.0 and p["distinct_first_tokens"] == 1
    final = collapsed["probes"][-1]
    # it learned the answer prior: raw accuracy above the plan's 12% bar, all of it from guessing the same word
    assert final["first_acc"] == pytest.approx(const) and final["first_acc"] > 0.12
    assert final["first_acc_lift"] == pytest.approx(0.0)


def test_the_shuffled_control_feeds_each_example_the_previous_ones_latents_across_batches(tiny_ws):
    """Example i is fed the latents of example i-1 (the first one the last one's) across the whole probe set, whatever
    the batch size. The model here is the tiny random LM and its encoder (a copy of its body) with their weights
    scaled up, so the first answer token depends on the latent prefix; each example's gold answer is set to what
    the model says from the PREVIOUS example's latents, so the shuffled control must score 100% and the model
    itself what it says twice in a row."""
    from latentgate.eval.probe import run_probe
    from latentgate.model.contract import answer_logits, build_latent_batch, encode_answers

    ws = tiny_ws
    with torch.no_grad():
        for module in (ws.lm, ws.encoder):
            for name, p in module.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.mul_(3.0)
    probe = ws.splits["probe"]
    ws.encoder.eval(), ws.adapter.eval(), ws.lm.eval()
    with torch.no_grad():  # each example's first token from its own latents (first logits ignore the answer)
        answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in probe])
        batch = build_latent_batch(ws.contract, ws.embed, ws.latents(probe), answer_targets=answers)
        pred = answer_logits(ws.lm, batch)[:, 0].argmax(-1).tolist()
    n = len(probe)
    assert len(set(pred)) > 1 and n % 3 == 1  # the prefix matters; batches of 3 leave one example alone at the end
    rigged = [dataclasses.replace(e, answers=(ws.tokenizer.decode([pred[i - 1]]).strip(),))
              for i, e in enumerate(probe)]
    gold = [a[0] for a in encode_answers(ws.contract, ws.tokenizer, [e.answer for e in rigged])]
    assert gold == [pred[i - 1] for i in range(n)]
    acc = sum(pred[i] == gold[i] for i in range(n)) / n
    const = Counter(gold).most_common(1)[0][1] / n
    assert acc < 1.0
    for batch_size in (256, 3):
        got = run_probe(ws, rigged, batch_size=batch_size)
        assert got["first_acc_shuffled"] == 1.0, batch_size
        assert got["first_acc"] == pytest.approx(acc) and got["first_acc_const"] == pytest.approx(const)
        assert got["first_acc_lift"] == pytest.approx(acc - 1.0)
        assert got["top_first_token_share"] == pytest.approx(Counter(pred).most_common(1)[0][1] / n)
        assert got["distinct_first_tokens"] == len(set(pred))


def test_eval_reports_the_constant_guess_per_path(collapsed):
    import json

    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=collapsed["eval"], artifact_path="metrics.json")
    paths = json.loads(Path(local).read_text())["paths"]
    evals = collapsed["splits"]["eval"]
    const = Counter(_first_word(e) for e in evals).most_common(1)[0][1] / len(evals)
    assert {p: m["first_top1_const"] for p, m in paths.items()} == {p: pytest.approx(const) for p in paths}
    assert paths["latent"]["top_prediction_share"] == 1.0 and paths["latent"]["distinct_first_tokens"] == 1
    run = mlflow.get_run(collapsed["eval"])
    assert run.data.metrics["eval/latent/first_top1_const"] == pytest.approx(const)


# ---- the recorded run, judged -------------------------------------------------------------------------------------

def test_the_collapsed_run_is_not_exposure_bias_and_fails_the_checklist_naming_collapse(collapsed, tmp_path):
    from latentgate.pipeline.run import PipelineOptions, gather_evidence
    from latentgate.registry.decisions import STOP, SWEEP, decide
    from latentgate.registry.gate import check_candidate
    from latentgate.registry.gate_report import format_table

    # the shipped file refuses 24 unpinned eval questions before judging anything; its rules at micro scale judge
    shipped = load_checklist()
    refused = decide(gather_evidence("extend", collapsed["stage_b"], collapsed["eval"], PipelineOptions(), None,
                                     checklist=shipped), shipped)
    assert (refused.rule, refused.next_phase) == ("provenance", STOP), refused.reason
    assert set(refused.evidence.provenance_failed) == {"eval_size", "eval_dataset_digest"}  # its lineage is whole
    assert "eval_size" in refused.reason and "eval_dataset_digest" in refused.reason
    path = _micro_scale(collapsed, tmp_path)
    cl = load_checklist(path)
    evidence = gather_evidence("extend", collapsed["stage_b"], collapsed["eval"], PipelineOptions(checklist=str(path)),
                               None, checklist=cl)
    assert not evidence.provenance_failed
    # the picture: F1 0 and raw first-token accuracy above 12%, which the plan's tree read as exposure bias
    assert evidence.f1_max == 0.0 and evidence.first_acc > 0.12
    assert cl.criterion("first_token_learning").compare(evidence.first_acc)
    assert evidence.first_acc_lift == pytest.approx(0.0) and evidence.top_prediction_share == 1.0
    d = decide(evidence, cl)
    assert (d.rule, d.next_phase) == ("collapsed", SWEEP), d.reason
    assert d.reason.startswith("mode collapse") and "not exposure bias" in d.reason

    report = check_candidate(collapsed["eval"], path)
    rows = {r.name: asdict(r) for r in report.rows}
    learning, collapse = rows["first_token_learning"], rows["no_mode_collapse"]
    assert not learning["passed"] and learning["observed"] == pytest.approx(0.0)
    assert all(rows[name]["passed"] for name in cl.provenance())
    raw = collapsed["probes"][-1]["first_acc"]  # judged at the final step: the registered checkpoint
    assert f"probe_first_acc {raw:.4g}" in learning["detail"] and "probe_first_acc_const" in learning["detail"]
    assert not collapse["passed"] and collapse["observed"] == 0.0  # not one repetitive answer: one answer for all
    assert collapse["detail"].startswith(f"mode collapse: one answer ({collapsed['word']!r})")
    assert "24 of 24" in collapse["detail"]
    assert "mode collapse" in format_table(report)


# one answer for everyone is also 4 answers for everyone: both limits must allow it
EVERYONE = {"no_mode_collapse": {"params": {"max_top_prediction_share": 1.0, "max_top_k_share": 1.0}}}
CASES = {  # edits of hero.yaml at micro scale -> (gate: no_mode_collapse passes, first_token_learning passes), rule,
    # verdict, alert
    "shipped": ({}, (False, False), "collapsed", "phase2", True),
    "one answer for everyone allowed": (EVERYONE, (True, False), "needs_tuning", "phase2", False),
    "and a lift of 0 counts as learning": ({**EVERYONE, "first_token_learning": {"threshold": 0.0}},
                                           (True, True), "exposure_bias", "phase3", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_checklist_file_moves_the_gate_the_report_the_monitor_and_the_pipeline_alike(collapsed, case, tmp_path):
    from latentgate.analysis.history import load_run_bundle
    from latentgate.analysis.monitor import Monitor, default_limits
    from latentgate.analysis.report import build_report
    from latentgate.pipeline.run import PipelineOptions, gather_evidence
    from latentgate.registry.decisions import decide
    from latentgate.registry.gate import check_candidate

    edits, (collapse_ok, learning_ok), rule, verdict, alert = CASES[case]
    path = _micro_scale(collapsed, tmp_path, edits)
    cl = load_checklist(path)

    rows = {r.name: r.passed for r in check_candidate(collapsed["eval"], path).rows}
    assert (rows["no_mode_collapse"], rows["first_token_learning"]) == (collapse_ok, learning_ok)

    evidence = gather_evidence("extend", collapsed["stage_b"], collapsed["eval"], PipelineOptions(checklist=str(path)),
                               None, checklist=cl)
    assert decide(evidence, cl).rule == rule

    rec = build_report(load_run_bundle(collapsed["parent"]), checklist_path=path)["recommendation"]
    assert (rec["rule"], rec["verdict"]) == (rule, verdict), rec["reason"]

    mon = Monitor(collapsed["parent"], limits=default_limits(checklist_path=path), set_tags=False,
                  echo=lambda *_: None)
    eval_alerts = [a for a in mon.poll() if a.kind == "collapse" and a.run_id == collapsed["eval"]]
    assert bool(eval_alerts) is alert
    if alert:
        assert "mode collapse" in eval_alerts[0].message
