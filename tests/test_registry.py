"""The hero gate on the session's micro smoke, in a real SQLite registry: the checklist file, promotion (tags, JSON
report, audit, alias), refusals naming the failing criteria, missing evidence, a hand-set alias caught by verify,
a crash between tags and alias, concurrent promotions, and the pyfunc round trip against the eval's predictions."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from conftest import every_criterion_decides, free_port
from latentgate.errors import ConfigError, GateRefused

ROOT = Path(__file__).resolve().parents[1]
PLAN_THRESHOLDS = {"first_token_learning": 0.12, "first_token_stability": 0.20, "f1_breakthrough": 0.0,
                   "generation_quality": 0.01, "gradient_health": 500.0, "no_mode_collapse": 0.10}
CURVES = ("probe_f1_at_hero_budget", "probe_nll_at_hero_budget", "probe_lift_at_hero_budget")
EXTRA = ("eval_size", "beats_controls", "no_nan_or_skipped_steps", "lineage", "eval_dataset_digest")
# Thresholds a micro run (numbers meaningless: its first-token lift is negative and every latent answer the same)
# can pass; structural criteria kept as shipped.
LENIENT = {"first_token_learning": {"threshold": -1.0}, "first_token_stability": {"threshold": 1.0},
           "f1_breakthrough": {"op": ">=", "threshold": 0.0}, "generation_quality": {"threshold": 0.0},
           "no_mode_collapse": {"threshold": 0.5, "params": {"path": "latent", "max_top_prediction_share": 1.0,
                                                             "top_k": 4, "max_top_k_share": 1.0,
                                                             "max_empty_share": 1.0}},
           "eval_size": {"threshold": 1},
           "beats_controls": {"op": ">=", "threshold": -1.0}}


def eval_digest(cfg) -> tuple[str, str]:
    """(data config hash, eval dataset digest) computed the way the tracker logs it (MlflowTracker.log_input)."""
    from latentgate.config import config_hash
    from latentgate.tracking.tracker import dataset_digest
    from latentgate.train.workspace import load_splits

    return config_hash(cfg, ("data",)), dataset_digest(load_splits(cfg)["eval"])


def write_checklist(path: Path, pin: dict, changes: dict) -> Path:
    data = every_criterion_decides(yaml.safe_load((ROOT / "registry" / "hero.yaml").read_text()))
    data["eval_dataset_digest"] = pin
    for c in data["criteria"]:
        c.update(changes.get(c["name"], {}))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def pin(micro_cfg) -> dict:
    h, digest = eval_digest(micro_cfg)
    return {h: digest}


@pytest.fixture(scope="module")
def lenient(tmp_path_factory, pin) -> Path:
    return write_checklist(tmp_path_factory.mktemp("cl") / "lenient.yaml", pin, LENIENT)


@pytest.fixture(scope="module")
def latent_f1(micro_smoke) -> float:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=micro_smoke.children["eval"], artifact_path="metrics.json")
    return json.loads(Path(path).read_text())["paths"]["latent"]["f1"]


@pytest.fixture(scope="module")
def strict(tmp_path_factory, pin, latent_f1) -> Path:
    """The lenient file, but demanding a mean latent F1 the run does not reach."""
    return write_checklist(tmp_path_factory.mktemp("cl") / "strict.yaml", pin,
                           {**LENIENT, "generation_quality": {"threshold": latent_f1 + 0.01}})


@pytest.fixture(scope="module")
def candidate(micro_smoke) -> str:
    """The micro smoke's model, registered (pyfunc, models from code) as a version of `latentgate`."""
    from latentgate.registry.model import register_candidate

    return register_candidate(micro_smoke.children["eval"], "latentgate")


def clone(version: str, name: str, src: str = "latentgate") -> str:
    """Another registry version with the same model and evidence links (a second candidate, in milliseconds)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    c = MlflowClient()
    mv = c.get_model_version(src, version)
    try:
        c.create_registered_model(name)
    except MlflowException:
        pass
    tags = {k: v for k, v in mv.tags.items() if k.startswith("latentgate.")}
    return str(c.create_model_version(name, source=mv.source, run_id=mv.run_id, tags=tags).version)


def tags_of(name: str, version: str) -> dict:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version).tags


def holder(name: str) -> str | None:
    from mlflow import MlflowClient

    from latentgate.registry.writes import alias_holder

    return alias_holder(MlflowClient(), name, "hero")


# ---- the checklist file ---------------------------------------------------------------------------------------

def test_shipped_checklist_is_valid_and_carries_the_plan(micro_cfg):
    from latentgate import config
    from latentgate.registry.checklist import load_checklist

    cl = load_checklist()
    assert cl.path == (ROOT / "registry" / "hero.yaml").resolve() and cl.alias == "hero"
    assert cl.names() == list(PLAN_THRESHOLDS) + list(CURVES) + list(EXTRA)
    # every criterion that does not decide names the calibration that justified it
    assert all(cl.criterion(n).calibrated_by for n in cl.names() if n not in cl.deciding())
    for name, value in PLAN_THRESHOLDS.items():
        assert cl.threshold(name) == value
    # the real smoke's eval set is pinned, and the pin is what the tracker records for that data config
    h, digest = eval_digest(config.resolve("smoke"))
    assert cl.pinned_digest(h) == digest
    assert cl.pinned_digest(eval_digest(micro_cfg)[0]) is None  # micro is not pinned: a micro run never passes


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["criteria"][0].update(kind="vibes"), "unknown kind"),
    (lambda d: d["criteria"][0].pop("threshold"), "threshold must be a finite number"),
    (lambda d: d["criteria"][1].update(name=d["criteria"][0]["name"]), "duplicate criterion"),
    (lambda d: d["criteria"][0].update(op="~"), "unknown op"),
    (lambda d: d["criteria"][0]["params"].pop("metric"), "missing params"),
    (lambda d: d.update(eval_dataset_digest={"abc": 123}), "eval_dataset_digest"),
    (lambda d: d["criteria"][5]["params"].update(max_top_prediction_share=1.5), "max_top_prediction_share"),
    (lambda d: d["criteria"][5]["params"].pop("max_top_prediction_share"), "missing params"),
    (lambda d: d["criteria"][0].update(decides="no"), "is not true/false"),
    (lambda d: d["criteria"][0].update(decides=False, calibrated_by=""), "names no calibration"),
    (lambda d: d["criteria"][6]["params"].update(floor="low"), "floor must be a finite number"),
])
def test_checklist_validation_rejects_bad_files(tmp_path, edit, message):
    from latentgate.registry.checklist import load_checklist

    data = yaml.safe_load((ROOT / "registry" / "hero.yaml").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_checklist(path)


# ---- promotion ---------------------------------------------------------------------------------------------

def test_passing_candidate_gets_hero_with_tags_report_and_audit(candidate, lenient, micro_smoke):
    import mlflow

    from latentgate.registry.approval import hero_model_uri, verify
    from latentgate.registry.checklist import load_checklist
    from latentgate.registry.gate import check_candidate, promote

    name = "lg-pass"
    v = clone(candidate, name)
    dry = promote(v, dry_run=True, checklist=lenient, name=name)
    assert dry.passed and dry.decision == "dry-run" and holder(name) is None
    assert not any(k.startswith("hero.") for k in tags_of(name, v))  # dry run writes nothing

    report = promote(v, checklist=lenient, name=name)
    assert report.passed and report.decision == "promoted" and holder(name) == v
    assert report.lineage == micro_smoke.children
    tags = tags_of(name, v)
    cl = load_checklist(lenient)
    for crit in cl.criteria:  # deciding criteria all passed; the ones shown only may fail and refuse nothing
        ok = ("pass observed=",) if crit.decides else ("pass observed=", "fail (shown, not deciding) observed=")
        assert tags[f"hero.check.{crit.name}"].startswith(ok), crit.name
    # a micro run learns nothing: its probe curves, read at the hero's budget, fail; they are shown, not deciding
    assert set(report.failing_reported()) >= {"probe_f1_at_hero_budget", "probe_nll_at_hero_budget"}
    audit = json.loads(tags["hero.audit"])
    assert audit["decision"] == "promote" and audit["passed"] is True and audit["version"] == v
    assert audit["rules_sha256"] == cl.sha256 and audit["commit"] and audit["time"]
    saved = json.loads(Path(mlflow.artifacts.download_artifacts(tags["hero.report"])).read_text())
    assert saved["passed"] is True and saved["version"] == v and saved["eval_run"] == micro_smoke.children["eval"]
    assert [r["name"] for r in saved["rows"]] == cl.names()
    assert all(r["passed"] for r in saved["rows"] if r["decides"])
    grad = next(r for r in saved["rows"] if r["name"] == "gradient_health")
    assert 0 < grad["observed"] < 500 and "stage_b/grad_norm" in grad["source"]
    assert hero_model_uri(lenient, name) == f"models:/{name}@hero"
    assert verify(checklist=lenient, name=name).passed
    # the promotion pinned the registered checkpoint, and its audit names the checklist it ran under
    assert audit["checkpoint_sha256"] == tags["hero.checkpoint_sha256"] == tags["latentgate.checkpoint_sha256"]
    # check_candidate is read-only and also takes the eval run or the smoke run directly
    assert check_candidate(micro_smoke.run_id, lenient, name).eval_run == micro_smoke.children["eval"]


def test_strict_checklist_refuses_and_names_failing_criteria(candidate, strict, tmp_path, pin):
    from latentgate.registry.approval import hero_model_uri
    from latentgate.registry.gate import promote

    name = "lg-refuse"
    v = clone(candidate, name)
    report = promote(v, checklist=strict, name=name)
    assert not report.passed and report.decision == "refused"
    assert report.failing() == ["generation_quality"]
    assert holder(name) is None
    tags = tags_of(name, v)
    assert tags["hero.check.generation_quality"].startswith("fail observed=")
    assert tags["hero.check.lineage"].startswith("pass")
    assert json.loads(tags["hero.audit"])["decision"] == "refuse" and tags["hero.passed"] == "false"
    with pytest.raises(GateRefused, match="no version"):
        hero_model_uri(strict, name)
    # the shipped checklist refuses a micro run: no pinned eval set, and (numbers meaningless) no F1
    shipped = promote(v, dry_run=True, name=name)
    assert "eval_dataset_digest" in shipped.failing() and not shipped.passed
    # a different pinned digest fails the dataset criterion alone
    wrong = write_checklist(tmp_path / "wrong.yaml", {k: "00000000" for k in pin}, LENIENT)
    assert promote(v, dry_run=True, checklist=wrong, name=name).failing() == ["eval_dataset_digest"]


def test_collapsed_predictions_are_refused(micro_smoke, lenient, tmp_path):
    """An eval run whose latent predictions are "the the the": every other criterion passes, this one fails."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from latentgate.registry.gate import check_candidate

    c = MlflowClient()
    src = c.get_run(micro_smoke.children["eval"])
    run = c.create_run(src.info.experiment_id, tags={k: v for k, v in src.data.tags.items()
                                                     if k.startswith(("latentgate.", "dataset."))})
    params = [Param(k, v) for k, v in src.data.params.items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    local = Path(mlflow.artifacts.download_artifacts(run_id=src.info.run_id, artifact_path="eval_detailed.jsonl"))
    rows = [json.loads(x) for x in local.read_text().splitlines()]
    for r in rows:
        if r["path"] == "latent":
            r.update(prediction="the the the the", error_mode="repetition")
    (tmp_path / "eval_detailed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c.log_artifact(run.info.run_id, str(tmp_path / "eval_detailed.jsonl"))
    c.log_artifact(run.info.run_id, mlflow.artifacts.download_artifacts(run_id=src.info.run_id,
                                                                        artifact_path="metrics.json"))
    c.set_terminated(run.info.run_id, "FINISHED")
    report = check_candidate(run.info.run_id, lenient)
    assert report.failing() == ["no_mode_collapse"]
    row = asdict(report.row("no_mode_collapse"))
    assert row["observed"] == 1.0 and "eval_detailed.jsonl" in row["source"]
    assert row["detail"].startswith("mode collapse: ") and "repetitive" in row["detail"]


def test_missing_evidence_fails_with_the_list(micro_smoke, lenient, candidate, tmp_path):
    from mlflow import MlflowClient

    from latentgate.registry.gate import check_candidate, promote

    c = MlflowClient()
    exp = c.get_run(micro_smoke.run_id).info.experiment_id
    commit = c.get_run(micro_smoke.run_id).data.tags["latentgate.git_commit"]
    stage_b = c.create_run(exp, tags={"latentgate.phase": "stage_b", "latentgate.git_commit": commit}).info.run_id
    ev = c.create_run(exp, tags={"latentgate.phase": "eval", "latentgate.git_commit": commit,
                                 "latentgate.checkpoint": f"runs:/{stage_b}/checkpoints/stage_b"}).info.run_id
    for rid in (stage_b, ev):
        c.set_terminated(rid, "FINISHED")
    report = check_candidate(ev, lenient)
    assert not report.passed
    text = "\n".join(report.missing)
    for needle in ("no metric history stage_b/probe_first_acc", "no artifact metrics.json",
                   "no artifact eval_detailed.jsonl", "base run: the eval run has no latentgate.base_run tag",
                   "stage_a run", "no tag dataset.eval.digest"):
        assert needle in text, needle
    for crit in ("first_token_learning", "f1_breakthrough", "generation_quality", "no_mode_collapse",
                 "beats_controls", "lineage", "eval_dataset_digest"):
        assert crit in report.failing()
    # a version registered without a link to an eval run: every criterion fails, nothing passes by default
    name = "lg-missing"
    c.create_registered_model(name)
    v = c.create_model_version(name, source=tmp_path.as_uri()).version  # a model with no run behind it
    rep = promote(v, checklist=lenient, name=name)
    assert not any(r.passed for r in rep.rows) and "no latentgate.eval_run param" in rep.missing[0]
    assert rep.failing() == [r.name for r in rep.rows if r.decides]  # the rows shown only refuse nothing
    assert holder(name) is None and tags_of(name, v)["hero.check.lineage"].startswith("fail missing:")


def test_verify_catches_a_hand_set_alias(candidate, lenient, strict):
    from mlflow import MlflowClient

    from latentgate.registry.approval import hero_model_uri, verify
    from latentgate.registry.gate import demote, promote

    name = "lg-hand"
    c = MlflowClient()
    v_raw = clone(candidate, name)
    c.set_registered_model_alias(name, "hero", v_raw)  # by hand, no promotion at all
    report = verify(checklist=lenient, name=name)
    assert not report.passed and report.rows[0].name == "audit" and not report.rows[0].passed
    assert "set by hand" in report.rows[0].observed
    with pytest.raises(GateRefused, match="set by hand"):
        hero_model_uri(lenient, name)
    # a refused version with the alias set by hand afterwards
    v_ref = clone(candidate, name)
    promote(v_ref, checklist=strict, name=name)
    c.set_registered_model_alias(name, "hero", v_ref)
    assert "decision=refuse" in verify(checklist=lenient, name=name).rows[0].observed
    # a properly promoted version whose evidence no longer passes (a stricter checklist now)
    v_ok = clone(candidate, name)
    assert promote(v_ok, checklist=lenient, name=name).passed and holder(name) == v_ok
    again = verify(checklist=strict, name=name)  # and the promotion was under another checklist than this one
    assert not again.passed and again.failing() == ["audit", "generation_quality"]
    assert "not the one in force" in again.rows[0].observed
    # demote keeps the history in tags; a re-set alias on the demoted version is caught
    out = demote(v_ok, "evidence no longer passes", checklist=lenient, name=name)
    assert out["held_alias"] and holder(name) is None
    tags = tags_of(name, v_ok)
    events = [v for k, v in tags.items() if k.startswith("hero.event.")]
    assert any(v.startswith("demoted") and "no longer passes" in v for v in events)
    assert tags["hero.check.generation_quality"].startswith("pass")  # the promotion's record stays
    c.set_registered_model_alias(name, "hero", v_ok)
    assert "decision=demote" in verify(checklist=lenient, name=name).rows[0].observed


def test_crash_between_tags_and_alias_never_leaves_hero_on_a_failing_version(candidate, lenient, strict, monkeypatch):
    from mlflow import MlflowClient

    from latentgate.registry.approval import verify
    from latentgate.registry.gate import promote

    name = "lg-crash"
    v1, v2, v3 = clone(candidate, name), clone(candidate, name), clone(candidate, name)
    assert promote(v1, checklist=lenient, name=name).passed and holder(name) == v1

    def crash(*args, **kwargs):
        raise RuntimeError("store went away")

    set_tag = MlflowClient.set_model_version_tag

    def crash_on_event(self, name, version, key, value):
        if key.startswith("hero.event."):
            crash()
        return set_tag(self, name, version, key, value)

    # a passing candidate crashing after its tags, before the alias: hero stays on v1, which still verifies
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "set_registered_model_alias", crash)
        with pytest.raises(RuntimeError, match="store went away"):
            promote(v2, checklist=lenient, name=name)
    assert holder(name) == v1 and tags_of(name, v2)["hero.passed"] == "true"
    # a failing candidate crashing after its tags: no alias on it
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "set_model_version_tag", crash_on_event)
        with pytest.raises(RuntimeError, match="store went away"):
            promote(v3, checklist=strict, name=name)
    assert holder(name) == v1 and tags_of(name, v3)["hero.passed"] == "false"
    # the holder itself re-promoted and now failing: a refusal never removes the alias, nor rewrites the record of
    # the promotion that gave it (an event says so; `latentgate demote` takes the alias off on purpose)
    assert promote(v1, checklist=strict, name=name).decision == "refused-holder"
    assert holder(name) == v1 and tags_of(name, v1)["hero.check.generation_quality"].startswith("pass")
    assert any("re-promotion refused" in t for k, t in tags_of(name, v1).items() if k.startswith("hero.event."))
    assert promote(v2, checklist=lenient, name=name).passed and holder(name) == v2
    assert verify(checklist=lenient, name=name).passed


def test_concurrent_promotes_leave_a_consistent_registry(candidate, lenient, strict):
    from latentgate.registry.approval import verify
    from latentgate.registry.gate import promote
    from latentgate.schema import VersionTag

    name = "lg-race"
    va, vb, vf = clone(candidate, name), clone(candidate, name), clone(candidate, name)
    results, errors = {}, []

    def go(v, cl):
        try:
            results[v] = promote(v, checklist=cl, name=name)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=go, args=a) for a in ((va, lenient), (vb, lenient), (vf, strict))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results[va].passed and results[vb].passed and not results[vf].passed
    winner = holder(name)
    assert winner in (va, vb)
    loser = vb if winner == va else va
    assert tags_of(name, loser)[VersionTag.SUPERSEDED_BY] == winner  # promotions applied one after the other
    assert json.loads(tags_of(name, winner)["hero.audit"])["previous_holder"] == loser  # the later one won
    assert verify(checklist=lenient, name=name).passed


# ---- the model -------------------------------------------------------------------------------------------------

def test_pyfunc_round_trip_equals_the_eval_predictions(candidate, lenient, micro_smoke, micro_cfg):
    """models:/latentgate@hero loads from code (no pickle) and answers exactly as `latentgate eval` did."""
    import mlflow
    import pandas as pd
    import torch

    from latentgate.eval.probe import EvalMode
    from latentgate.model.contract import build_latent_batch
    from latentgate.registry.approval import hero_model_uri
    from latentgate.registry.gate import promote
    from latentgate.tracking.lineage import resolve_checkpoint
    from latentgate.train.load import load_trained
    from latentgate.train.workspace import load_splits

    assert promote(candidate, checklist=lenient).passed
    uri = hero_model_uri(lenient)
    assert uri == "models:/latentgate@hero"
    info = mlflow.models.get_model_info(uri)
    assert [c.name for c in info.signature.inputs.inputs] == ["context", "question"]
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert (local / "input_example.json").exists()
    assert not [p.name for p in local.rglob("*") if p.suffix in (".pkl", ".pt", ".pickle", ".bin")]
    assert resolve_checkpoint(uri).name == "checkpoint"  # the hero run can start from the alias

    model = mlflow.pyfunc.load_model(uri)
    examples = load_splits(micro_cfg)["eval"]
    frame = pd.DataFrame({"context": [e.context for e in examples], "question": [e.question for e in examples]})
    out = model.predict(frame)
    detailed = Path(mlflow.artifacts.download_artifacts(run_id=micro_smoke.children["eval"],
                                                        artifact_path="eval_detailed.jsonl"))
    rows = [json.loads(x) for x in detailed.read_text().splitlines()]
    assert list(out["answer"]) == [r["prediction"] for r in rows if r["path"] == "latent"]
    # the same weights as the eval's workspace, so equal answers are not a coincidence of empty outputs
    ws = model.unwrap_python_model().ws
    ref = load_trained(micro_cfg, _base_dir(micro_smoke), resolve_checkpoint(_stage_b_uri(micro_smoke)), splits={})
    logits = []
    for w in (ws, ref):
        with torch.no_grad(), EvalMode(w.encoder, w.adapter, w.lm):
            prefix = build_latent_batch(w.contract, w.embed, w.latents(examples[:4]))
            logits.append(w.lm(inputs_embeds=prefix.inputs_embeds, attention_mask=prefix.attention_mask).logits)
    assert torch.equal(logits[0], logits[1])
    with torch.no_grad(), EvalMode(ref.encoder, ref.adapter, ref.lm), ref.teacher():  # LoRA off: different logits
        prefix = build_latent_batch(ref.contract, ref.embed, ref.latents(examples[:4]))
        assert not torch.equal(logits[0], ref.lm(inputs_embeds=prefix.inputs_embeds,
                                                 attention_mask=prefix.attention_mask).logits)


@pytest.mark.slow  # 20-40 s: a fresh virtual environment and `mlflow models serve`
def test_hero_loads_and_serves_where_latentgate_is_not_installed(candidate, lenient, micro_cfg, tmp_path):
    """models:/latentgate@hero carries its code and requirements: in a fresh venv holding only the model's
    requirements.txt (no latentgate, no test tooling), `load_model` answers as here, and `mlflow models serve`
    answers an HTTP request on 127.0.0.1 with the same answers."""
    import os
    import subprocess
    import time
    import urllib.request

    import mlflow
    import pandas as pd

    from bare_env import make_bare_venv
    from latentgate.registry.gate import promote
    from latentgate.train.workspace import load_splits

    assert promote(candidate, checklist=lenient).passed
    uri = "models:/latentgate@hero"
    reqs = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert any(r.startswith("torch==") for r in reqs) and not any("latentgate" in r for r in reqs)
    python = make_bare_venv(tmp_path / "venv", reqs)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_EXPERIMENT_ID")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"  # as if the venv were activated
    missing = subprocess.run([str(python), "-c", "import latentgate"], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
    assert missing.returncode != 0 and "No module named 'latentgate'" in missing.stderr

    examples = load_splits(micro_cfg)["eval"][:6]
    frame = pd.DataFrame({"context": [e.context for e in examples], "question": [e.question for e in examples]})
    expected = list(mlflow.pyfunc.load_model(uri).predict(frame)["answer"])
    script = ("import json, sys, mlflow, pandas as pd; f = pd.DataFrame(json.loads(sys.argv[2])); "
              "print(json.dumps(list(mlflow.pyfunc.load_model(sys.argv[1]).predict(f)['answer'])))")
    out = subprocess.run([str(python), "-c", script, uri, frame.to_json(orient="columns")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(python), "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(1)
        body = json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert [row["answer"] for row in reply["predictions"]] == expected


def _base_dir(micro_smoke) -> str:
    import mlflow
    from mlflow import MlflowClient

    base = MlflowClient().get_run(micro_smoke.children["base"])
    holder_run = base.data.tags["latentgate.base_source"].split(":", 1)[1]
    return mlflow.artifacts.download_artifacts(run_id=holder_run, artifact_path="base_lm")


def _stage_b_uri(micro_smoke) -> str:
    return f"runs:/{micro_smoke.children['stage_b']}/checkpoints/stage_b"


# ---- the CLI -----------------------------------------------------------------------------------------------------

def test_cli_promote_dry_run_prints_the_table_and_exits_4_when_refused(candidate, strict):
    from conftest import run_cli

    proc = run_cli("promote", candidate, "--dry-run", "true", "--checklist", str(strict), "--explain")
    assert proc.returncode == 4, proc.stderr
    assert "generation_quality" in proc.stdout and "FAIL" in proc.stdout and "would REFUSE" in proc.stdout
    assert "query: eval_metric" in proc.stdout
    assert "failing criteria: generation_quality" in proc.stderr


def test_a_continued_sweep_does_not_register_its_unchanged_best_again(candidate, micro_smoke):
    from mlflow import MlflowClient

    from latentgate.schema import Tag
    from latentgate.sweep.finalize import register_best
    from latentgate.tracking.tracker import NullTracker

    eval_run = micro_smoke.children["eval"]
    mine = lambda: {str(v.version) for v in MlflowClient().search_model_versions("name='latentgate'")  # noqa: E731
                    if v.tags.get(Tag.EVAL_RUN) == eval_run}
    before = mine()
    assert candidate in before
    out = register_best(eval_run, NullTracker(), echo=lambda *_: None)
    assert mine() == before and out["version"] == max(before, key=int)
