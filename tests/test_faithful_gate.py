"""A faithful gate (issue #23): the hero is the approved recipe with only its budget scaled; the alias is reached only
under the checklist in force; collapse is judged on normalised answers; the evidence describes the registered
checkpoint, on the recorded eval set, at a size that means something; provenance failures never lead to tuning."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import checklist_copy, run_cli
from latentgate.config import flatten, resolve
from latentgate.errors import ConfigError
from latentgate.eval.controls import collapse_stats
from latentgate.registry.checklist import DEFAULT_PATH, load_checklist
from latentgate.registry.hero_recipe import BUDGET, BUDGET_KEYS, RECIPE, hero_plan

ROOT = Path(__file__).resolve().parents[1]


# ---- one definition of the hero ---------------------------------------------------------------------------------

def test_the_hero_is_the_approved_recipe_with_only_the_budget_scaled():
    approved = resolve("smoke", {"stage_b.first_token_ce_weight": 7.5, "stage_b.lr": 2e-3, "stage_a.k": 3})
    plan = hero_plan(approved, 10)
    diff = {c.key: (c.approved, c.hero) for c in plan.changes}
    assert set(diff) == set(BUDGET_KEYS)
    assert diff["stage_b.checkpoint_every"] == (0, 150)  # "only at the end" -> every approved-run length: resumable
    assert diff["stage_b.steps"] == (150, 1500) and diff["stage_a.warmup_steps"] == (15, 150)
    assert diff["stage_b.probe_every"] == (25, 250)  # as many probes as the gate recorded
    assert {c.kind for c in plan.changes} == {BUDGET}
    assert plan.config.stage_b.first_token_ce_weight == 7.5 and plan.config.stage_b.lr == 2e-3
    a, h = flatten(approved), flatten(plan.config)
    assert {k for k in a if a[k] != h[k]} <= set(BUDGET_KEYS)


def test_a_recipe_change_is_refused_unless_named_and_then_recorded():
    approved = resolve("smoke")
    with pytest.raises(ConfigError, match="stage_b.lr"):
        hero_plan(approved, 10, {"stage_b.lr": 1e-4})
    plan = hero_plan(approved, 10, {"stage_b.lr": 1e-4, "run.threads": 1}, allow_recipe_change=True)
    recipe = plan.of_kind(RECIPE)
    assert [(c.key, c.approved, c.hero) for c in recipe] == [("stage_b.lr", 5e-4, 1e-4)]
    assert {c["key"] for c in json.loads(plan.diff_json())} >= {"stage_b.lr", "run.threads", "stage_b.steps"}
    assert hero_plan(approved, 10, {"run.device": "cpu"}).config.run.device == "cpu"  # runtime: no flag needed


# ---- collapse, on normalised answers ------------------------------------------------------------------------------

def _rule():
    return load_checklist().collapse_rule()


def test_surface_variants_of_one_answer_fail_collapse():
    """'2018-2023)' and '2018-2023' (SmolLM2 after 10 + 10 steps: 44% + 26% of 100 questions) are one answer."""
    preds = ["2018-2023)"] * 44 + ["2018-2023"] * 26 + [f"answer {i}" for i in range(30)]
    st = collapse_stats(preds, [False] * 100, top_k=4)
    assert st.top_prediction_share == pytest.approx(0.70)
    why = _rule().judge(st)
    assert why and "one answer ('20182023') for 70%" in why
    assert collapse_stats(["2018-2023)", "2018-2023"], [False, False]).top_prediction_count == 2


def test_four_answers_sharing_the_inputs_fail_collapse():
    preds = [a for a in ("paris", "london", "rome", "berlin") for _ in range(25)]
    st = collapse_stats(preds, [False] * 100, top_k=4)
    assert st.top_prediction_share == 0.25 and st.top_k_share == 1.0
    why = _rule().judge(st)
    assert why and "4 answers for 100% of the inputs" in why and "one answer" not in why


def test_empty_answers_fail_collapse_and_every_failed_limit_is_named():
    preds = [""] * 25 + ["the"] * 10 + [f"a{i}" for i in range(65)]  # "the" normalises to empty too
    st = collapse_stats(preds, [True] * 15 + [False] * 85, top_k=4)
    assert st.empty_share == pytest.approx(0.35)
    why = _rule().judge(st)
    assert "35% empty answers" in why and "15% repetitive" in why and "one answer ('') for 35%" in why
    assert _rule().judge(collapse_stats([""] * 15 + [f"a{i}" for i in range(85)], [False] * 100, 4)) == (
        "mode collapse: 15% empty answers (> 0.1)")  # empty answers alone


def test_a_healthy_spread_passes_collapse():
    st = collapse_stats([f"answer {i % 40}" for i in range(200)], [False] * 200, top_k=4)
    assert _rule().judge(st) is None


# ---- recorded evidence ---------------------------------------------------------------------------------------

STEPS = 30


def _record(client, exp: str, probes: dict[int, float], n_rows: int = 200, digest_edit: str | None = None,
            pinned: bool = True) -> dict:
    """A real lineage in the store (base, Stage A, Stage B with its probe history and controls, an eval run with its
    artifacts, all FINISHED at one commit), on the smoke preset's eval set (pinned) or the micro one (not)."""
    from mlflow.entities import Metric, Param

    from latentgate.tracking.tracker import dataset_digest, example_sha256
    from latentgate.train.workspace import load_splits

    cfg = resolve("smoke" if pinned else "micro")
    examples = load_splits(cfg)["eval"][:n_rows]
    now, commit = int(time.time() * 1000), "0123456789abcdef0123456789abcdef01234567"
    parent = client.create_run(exp, tags={"latentgate.phase": "smoke"}).info.run_id

    def child(phase: str, **tags) -> str:
        return client.create_run(exp, tags={"latentgate.phase": phase, "mlflow.parentRunId": parent,
                                            "latentgate.git_commit": commit, **tags}).info.run_id

    base, stage_a = child("base"), child("stage_a")
    stage_b = child("stage_b", **{"latentgate.init_from": f"runs:/{stage_a}/checkpoints/stage_a",
                                  "latentgate.base_run": base})
    for stage, run in (("stage_a", stage_a), ("stage_b", stage_b)):
        metrics = []
        for step in range(1, STEPS + 1):
            metrics += [Metric(f"{stage}/loss", 5.0 - step * 0.01, now, step), Metric(f"{stage}/grad_norm", 2.0, now,
                                                                                       step)]
            if stage == "stage_b" and step in probes:
                metrics += [Metric("stage_b/probe_first_acc", probes[step] + 0.01, now, step),
                            Metric("stage_b/probe_first_acc_const", 0.01, now, step),
                            Metric("stage_b/probe_first_acc_shuffled", 0.0, now, step),
                            Metric("stage_b/probe_first_acc_lift", probes[step], now, step)]
        client.log_batch(run, metrics=metrics, params=[Param(f"{stage}.steps", str(STEPS))])
    digest = digest_edit or dataset_digest(examples)
    ev = child("eval", **{"latentgate.checkpoint": f"runs:/{stage_b}/checkpoints/stage_b",
                          "latentgate.base_run": base, "dataset.eval.digest": digest})
    f1s = [1.0 if i % 4 == 1 else 0.0 for i in range(len(examples))]
    rows = [{"id": ex.id, "path": "latent", "question": ex.question, "references": ["paris"],
             "prediction": "paris" if f else f"x{i}", "first_token": i, "em": f, "f1": f,
             "first_token_correct": bool(f), "error_mode": "correct" if f else "wrong_entity",
             "example_sha256": example_sha256(ex)} for i, (f, ex) in enumerate(zip(f1s, examples, strict=True))]
    mean = sum(f1s) / len(f1s)
    paths = {"latent": {"f1": mean, "em": mean, "n": len(rows)}, "zero_latent": {"f1": 0.0},
             "shuffled_latent": {"f1": 0.0}}
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"lg-faithful-{ev}"
    out.mkdir(parents=True)
    (out / "eval_detailed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "metrics.json").write_text(json.dumps({"paths": paths}))
    client.log_artifact(ev, str(out / "eval_detailed.jsonl"))
    client.log_artifact(ev, str(out / "metrics.json"))
    params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(ev, params=params[i:i + 100])
    client.log_batch(ev, metrics=[Metric("eval/latent/f1", mean, now, 0)])
    for run in (base, stage_a, stage_b, ev, parent):
        client.set_terminated(run)
    return {"stage_b": stage_b, "eval": ev}


@pytest.fixture(scope="module")
def store(mlflow_store):
    import mlflow
    from mlflow import MlflowClient

    return MlflowClient(), mlflow.get_experiment_by_name("latentgate").experiment_id


HEALTHY = {10: 0.10, 20: 0.16, 30: 0.15}  # lift at the final (registered) checkpoint 0.15 >= 0.12


def _judge(eval_run: str) -> dict:
    from latentgate.registry.gate import check_candidate

    report = check_candidate(eval_run)
    return {r.name: asdict(r) for r in report.rows} | {"_failing": report.failing(), "_missing": report.missing}


def test_recorded_healthy_candidate_passes_the_shipped_checklist(store):
    rows = _judge(_record(*store, HEALTHY)["eval"])
    assert rows["_failing"] == [] and rows["_missing"] == []
    assert rows["first_token_learning"]["step"] == STEPS


def test_a_lift_that_peaks_and_falls_at_the_registered_checkpoint_is_refused(store):
    rows = _judge(_record(*store, {10: 0.30, 20: 0.25, 30: 0.0})["eval"])
    learning = rows["first_token_learning"]
    # the curve read at the hero's budget (what decides) refuses it; the plan's two readings fail beside it, shown
    assert rows["_failing"] == ["probe_lift_at_hero_budget"]
    assert not learning["passed"] and not rows["first_token_stability"]["passed"]
    assert learning["observed"] == 0.0 and learning["step"] == STEPS  # the peak of 0.30 is shown, never judged
    assert "peak 0.3 at step 10" in learning["detail"]


def test_a_4_row_eval_is_refused(store):
    rows = _judge(_record(*store, HEALTHY, n_rows=4)["eval"])
    assert "eval_size" in rows["_failing"] and rows["eval_size"]["observed"] == 4


def test_a_digest_tag_edited_after_the_eval_is_refused(store):
    from latentgate.registry.decisions import decide, evidence_from_report
    from latentgate.registry.gate import check_candidate

    run = _record(*store, HEALTHY)["eval"]
    store[0].set_tag(run, "dataset.eval.digest", load_checklist().pinned_digest("02a814d2e35ac65f"))  # unchanged
    assert _judge(run)["_failing"] == []
    store[0].set_tag(run, "dataset.eval.digest", "feedfacefeedface")  # edited after the eval
    rows = _judge(run)
    assert rows["_failing"] == ["eval_dataset_digest"] and "the tag was edited" in rows["eval_dataset_digest"]["detail"]
    cl = load_checklist()
    d = decide(evidence_from_report(check_candidate(run), cl, "extend"), cl)
    assert d.rule == "provenance"


def test_an_unpinned_eval_set_leads_to_the_provenance_rule_not_tuning(store):
    from latentgate.registry.decisions import STOP, decide, evidence_from_report
    from latentgate.registry.gate import check_candidate

    run = _record(*store, HEALTHY, n_rows=24, pinned=False)["eval"]  # the micro eval set: no pin in hero.yaml
    cl = load_checklist()
    report = check_candidate(run)
    assert {"eval_dataset_digest", "eval_size"} <= set(report.failing())
    d = decide(evidence_from_report(report, cl, "extend"), cl)
    assert (d.rule, d.next_phase) == ("provenance", STOP) and "pin the eval set" in d.reason


# ---- alias integrity and the hero run ----------------------------------------------------------------------------

def _checklist_with(tmp_path: Path, name: str, pin: dict, model_name: str = "latentgate", **criteria) -> Path:
    return checklist_copy(tmp_path / f"{name}.yaml", criteria, eval_dataset_digest=pin, model_name=model_name)


PERMISSIVE = {"first_token_learning": {"threshold": -1.0}, "first_token_stability": {"threshold": 1.0},
              "f1_breakthrough": {"op": ">=", "threshold": 0.0}, "generation_quality": {"threshold": 0.0},
              "no_mode_collapse": {"threshold": 1.1, "params": {"max_top_prediction_share": 1.0,
                                                                "max_top_k_share": 1.0, "max_empty_share": 1.0}},
              "eval_size": {"threshold": 1}, "beats_controls": {"op": ">=", "threshold": -1.0}}


@pytest.fixture(scope="module")
def tuned(mlflow_store, micro_cfg, tmp_path_factory):
    """A micro smoke trained with a tuned first-token weight and learning rate, registered."""
    from latentgate.config import config_hash
    from latentgate.phases.smoke import run_smoke
    from latentgate.registry.model import register_candidate
    from latentgate.tracking.tracker import dataset_digest
    from latentgate.train.workspace import load_splits

    cfg = resolve("micro", {"stage_b.first_token_ce_weight": 7.5, "stage_b.lr": 2e-3,
                            "run.output_dir": str(tmp_path_factory.mktemp("tuned"))})
    smoke = run_smoke(cfg, "micro")
    version = register_candidate(smoke.children["eval"], "lg-faithful")
    pin = {config_hash(cfg, ("data",)): dataset_digest(load_splits(cfg)["eval"])}
    return {"cfg": cfg, "smoke": smoke, "version": version, "pin": pin}


def test_a_permissive_promotion_does_not_start_a_hero_under_the_shipped_checklist(tuned, tmp_path):
    from latentgate.errors import GateRefused
    from latentgate.registry.approval import HeroRequest, plan_hero, verify
    from latentgate.registry.gate import promote

    permissive = _checklist_with(tmp_path, "permissive", tuned["pin"], **PERMISSIVE)
    report = promote(tuned["version"], checklist=permissive, name="lg-faithful")
    assert report.passed and report.decision == "promoted"  # a team's own file may move the alias ...
    shipped = load_checklist().sha256
    with pytest.raises(GateRefused, match="not the one in force"):  # ... but no hero starts under another file
        plan_hero(HeroRequest(checklist=str(DEFAULT_PATH)), name="lg-faithful")
    v = verify(name="lg-faithful")
    assert not v.passed and "not the one in force" in v.rows[0].observed and shipped[:12] in v.rows[0].observed
    start = plan_hero(HeroRequest(checklist=str(permissive)), name="lg-faithful")  # the file that approved it
    assert start.tags()["latentgate.hero_checklist_sha256"] == load_checklist(permissive).sha256


def test_hero_dry_run_shows_the_tuned_recipe_and_a_diff_of_budget_keys_only(tuned, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from latentgate.registry.approval import HeroRequest, plan_hero
    from latentgate.registry.gate import promote

    permissive = _checklist_with(tmp_path, "team", tuned["pin"], **PERMISSIVE)
    assert promote(tuned["version"], checklist=permissive, name="lg-faithful").passed
    start = plan_hero(HeroRequest(checklist=str(permissive), scale=3), name="lg-faithful")
    text = start.as_text()
    assert "stage_b.first_token_ce_weight = 7.5" in text and "stage_b.lr = 0.002" in text
    diff = text.split("diff from the approved recipe:")[1].split("resolved config:")[0].strip().splitlines()
    assert diff and all(line.strip().split(":")[0] in BUDGET_KEYS and line.endswith("(budget)") for line in diff)
    assert "stage_b.steps: 6 -> 18 (budget)" in text
    # the config equals the approved Stage B run's logged params except the budget keys
    approved = MlflowClient().get_run(start.approved.stage_b_run).data.params
    hero = {k: str(v) for k, v in flatten(start.plan.config).items()}
    assert {k for k in hero if approved.get(k) != hero[k]} <= set(BUDGET_KEYS)
    # the command prints the same, and trains nothing
    team = _checklist_with(tmp_path, "team-file", tuned["pin"], model_name="lg-faithful", **PERMISSIVE)
    assert promote(tuned["version"], checklist=team).passed
    exp = MlflowClient().get_run(start.approved.stage_b_run).info.experiment_id
    before = len(MlflowClient().search_runs([exp], max_results=5000))
    proc = run_cli("hero", "--checklist", str(team), "--scale", "3", "--dry-run", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage_b.first_token_ce_weight = 7.5" in proc.stdout and "stage_b.steps: 6 -> 18 (budget)" in proc.stdout
    assert "(recipe)" not in proc.stdout and "(runtime)" not in proc.stdout
    assert len(MlflowClient().search_runs([exp], max_results=5000)) == before


def test_class7_a_checkpoint_rewritten_after_promotion_is_refused_by_verify_and_hero(tuned, tmp_path):
    """The forged checkpoint of issue #27: resealed so `checkpoint verify` alone passes, caught by the pin."""
    from mlflow import MlflowClient

    from latentgate.errors import GateRefused
    from latentgate.registry.approval import HeroRequest, plan_hero, verify
    from latentgate.registry.gate import promote
    from latentgate.train.manifest import read_manifest, verify_checkpoint, write_manifest

    checklist = _checklist_with(tmp_path, "team", tuned["pin"], **PERMISSIVE)
    assert promote(tuned["version"], checklist=checklist, name="lg-faithful").passed
    assert verify(checklist=checklist, name="lg-faithful").passed
    c = MlflowClient()
    source = c.get_model_version("lg-faithful", tuned["version"]).source  # models:/m-<id>
    logged = c.get_logged_model(source.removeprefix("models:/"))
    ckpt = Path(logged.artifact_location.removeprefix("file://")) / "artifacts" / "checkpoint"
    manifest = read_manifest(ckpt)
    write_manifest(ckpt, {**manifest, "note": "rewritten after promotion"})  # resealed: self-consistent again
    verify_checkpoint(ckpt)  # the checkpoint alone still verifies
    report = verify(checklist=checklist, name="lg-faithful")
    assert not report.passed and "rewritten after promotion" in report.rows[0].observed
    with pytest.raises(GateRefused, match="rewritten after promotion"):
        plan_hero(HeroRequest(checklist=str(checklist)), name="lg-faithful")
