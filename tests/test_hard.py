"""The hard preset's regime (the plan's starting point) at micro scale, recorded and judged like any run.

`presets/hard.yaml` reproduces the plan's situation on this CPU (README, "The plan's real situation (the hard
preset)"): the text teacher answers (F1 0.845), the latent path does not (F1 0.047), Stage A's probe first-token
accuracy stays at 0%, Stage B's ends at 4.7%, two points above the better of its controls. What makes it hard is the
latent bottleneck, not the budget: a from-scratch encoder, M=2 soft tokens of width 16, a slow Stage A.

Here the same preset, with only its data and budgets shrunk (a vocabulary a 2-layer base LM learns in seconds; 40 +
40 stage steps), runs as a real smoke in the session's store, and the pipeline reads its evidence back as it does
after Phase 1 (MLflow metric histories, eval_detailed.jsonl, the registry's gate on registry/hero.yaml). The asserts
are the regime's signature, not numbers: competent teacher, a latent path no better than its controls, a first-token
"accuracy" that is the answer prior, and a decision tree that sends it to the sweep, never to scheduled sampling or
the hero. A second smoke on the same base LM and data, with the smoke preset's latent recipe (a copy of the LM body,
M=8, width 128, Stage A at 1e-3) and the same budget, learns: the bottleneck is what holds the hard preset back."""

from __future__ import annotations

import pytest

from latentgate.config import resolve

# Only data size, the base LM's size and the budgets change; the latent recipe (model.encoder, num_latents, d_z,
# stage_a.lr) is the hard preset's own.
MICRO = {"data.facts_per_context": 3, "data.num_entities": 20, "data.values_per_attribute": 6, "data.n_train": 2000,
         "data.n_eval": 48, "data.n_probe": 64, "base.layers": 2, "base.hidden": 64, "base.heads": 2,
         "base.intermediate": 128, "base.steps": 200, "base.batch_size": 32, "base.warmup_steps": 10,
         "base.eval_every": 0, "model.lora_r": 2, "eval.batch_size": 48,
         **{f"{s}.{k}": v for s in ("stage_a", "stage_b")
            for k, v in (("steps", 40), ("batch_size", 16), ("warmup_steps", 4), ("probe_every", 10))}}
SMOKE_RECIPE = {"model.encoder": "lm_copy", "model.num_latents": 8, "model.d_z": 128, "stage_a.lr": 1e-3}


def _smoke(tmp_path_factory, name: str, extra: dict) -> dict:
    from latentgate.phases.pipeline import PipelineOptions, gather_evidence
    from latentgate.phases.smoke import run_smoke

    out = tmp_path_factory.mktemp(name)
    cfg = resolve("hard", {**MICRO, **extra, "run.output_dir": str(out)})
    summary = run_smoke(cfg, "hard")
    evidence = gather_evidence("extend", summary["children"]["stage_b"], summary["children"]["eval"],
                               PipelineOptions(preset="hard"), None)
    return {"summary": summary, "evidence": evidence}


@pytest.fixture(scope="module")
def hard(mlflow_store, tmp_path_factory) -> dict:
    return _smoke(tmp_path_factory, "hard-micro", {})


@pytest.fixture(scope="module")
def easy(hard, tmp_path_factory) -> dict:
    """The smoke's latent recipe on the same data, base LM (reused from the registry) and budget."""
    return _smoke(tmp_path_factory, "hard-micro-smoke-recipe", SMOKE_RECIPE)


def test_micro_overrides_leave_the_hard_latent_recipe_alone():
    hard_cfg, micro = resolve("hard"), resolve("hard", MICRO)
    for key in SMOKE_RECIPE:
        section, name = key.split(".")
        assert key not in MICRO
        assert getattr(getattr(micro, section), name) == getattr(getattr(hard_cfg, section), name)
    assert hard_cfg.model.encoder == "scratch" and hard_cfg.model.num_latents < resolve("smoke").model.num_latents


def test_the_hard_regime_signature(hard):
    from mlflow import MlflowClient

    from latentgate.phases.pipeline import SWEEP, decide
    from latentgate.registry.checklist import LEARNING, load_checklist

    s, ev = hard["summary"], hard["evidence"]
    checklist = load_checklist()
    # a competent text teacher: the base LM passed its sanity gate, and reads the answer off the text
    base_gate = MlflowClient().get_run(s["children"]["base"]).data.metrics
    assert base_gate["text_f1"] >= resolve("hard", MICRO).base.gate_min_f1
    # ... while the latent path has not learned: near-zero F1, no better than its controls by any real margin
    assert s["latent_f1"] < 0.05 and s["text_f1"] - s["latent_f1"] > 0.4
    assert s["latent_f1"] - max(s["controls_f1"]["zero_latent"], s["controls_f1"]["shuffled_latent"]) < 0.05
    # the probe's first-token accuracy is the answer prior: within a few examples of the better control
    assert ev.peak_first_acc is not None and ev.peak_first_acc_lift is not None
    assert ev.peak_first_acc_lift <= 0.05
    assert not checklist.criterion(LEARNING).compare(ev.peak_first_acc_lift)
    assert "first_token_learning" in ev.checklist_failed and not ev.checklist_passed
    # Stage A learns nothing at all (the plan's "first_acc = 0.000 throughout"): never above its constant guess
    history = {k: {m.step: m.value for m in MlflowClient().get_metric_history(s["children"]["stage_a"], k)}
               for k in ("stage_a/probe_first_acc", "stage_a/probe_first_acc_const")}
    assert all(acc <= history["stage_a/probe_first_acc_const"][step] + 1e-9
               for step, acc in history["stage_a/probe_first_acc"].items())
    # the decision tree: Phase 2, as needs_tuning or collapse; never exposure bias (Phase 3) nor promotion
    decision = decide(ev, checklist)
    assert decision.next_phase == SWEEP and decision.rule in ("needs_tuning", "collapsed"), decision


def test_the_smoke_recipe_learns_on_the_same_data_and_budget(hard, easy):
    h, e = hard["evidence"], easy["evidence"]
    assert easy["summary"]["base_source"].startswith("reused:")  # the same base LM: only the latent recipe differs
    assert e.peak_first_acc_lift >= h.peak_first_acc_lift + 0.1
    assert easy["summary"]["latent_f1"] >= hard["summary"]["latent_f1"] + 0.1
