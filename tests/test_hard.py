"""The hard preset's regime (the plan's starting point) at micro scale, recorded and judged like any run.

`presets/hard.yaml` reproduces the plan's situation on this CPU (README, "The plan's real situation (the hard
preset)"): the text teacher answers (F1 0.845), the latent path does not (F1 0.047), Stage A's probe first-token
accuracy stays at 0%, and Stage B's ends at 4.7%, 2.3 points above the better of its controls. What makes it hard is
the latent bottleneck: a from-scratch encoder, M=2 soft tokens of width 16, a slow Stage A.

Here the same preset, with only its data and budgets shrunk (a vocabulary a 2-layer base LM learns in seconds; 40 +
40 stage steps), runs as a real smoke in the session's store, and the pipeline reads its evidence back as it does
after Phase 1 (MLflow metric histories, eval_detailed.jsonl, the registry's gate on registry/hero.yaml at micro
scale: its 48 eval questions pinned and counted as enough, which the shipped file refuses on provenance). The asserts
are the regime's signature, with margins that held for three seeds (base LM, Stage A and Stage B seeds 0-2), not its
numbers: a competent teacher, a latent path far below it, a first-token "accuracy" that is the answer prior (Stage A
never above the constant guess, Stage B's lift well short of the checklist's bar), and a decision tree that sends
the run to the sweep, never to scheduled sampling or the hero. (On so small a vocabulary guessing scores more F1
than on the preset's, so latent F1 is bounded by the teacher's here, not by the preset's 0.05.)"""

from __future__ import annotations

import pytest

from conftest import micro_scale_checklist
from latentgate.config import resolve

# Only the data size and vocabulary, the base LM's size and the budgets change; the latent recipe (model.encoder,
# num_latents, d_z, stage_a.lr) is the hard preset's own.
MICRO = {"data.facts_per_context": 3, "data.num_entities": 20, "data.values_per_attribute": 6, "data.n_train": 2000,
         "data.n_eval": 48, "data.n_probe": 64, "base.layers": 2, "base.hidden": 64, "base.heads": 2,
         "base.intermediate": 128, "base.steps": 300, "base.batch_size": 32, "base.warmup_steps": 10,
         "base.eval_every": 0, "model.lora_r": 2, "eval.batch_size": 48,
         **{f"{s}.{k}": v for s in ("stage_a", "stage_b")
            for k, v in (("steps", 40), ("batch_size", 16), ("warmup_steps", 4), ("probe_every", 10))}}
RECIPE = ("model.encoder", "model.num_latents", "model.d_z", "stage_a.lr")


@pytest.fixture(scope="module")
def hard(mlflow_store, tmp_path_factory) -> dict:
    from latentgate.phases.smoke import run_smoke
    from latentgate.pipeline.run import PipelineOptions, gather_evidence
    from latentgate.registry.checklist import load_checklist
    from latentgate.train.workspace import load_splits

    cfg = resolve("hard", {**MICRO, "run.output_dir": str(tmp_path_factory.mktemp("hard-micro"))})
    summary = run_smoke(cfg, "hard")
    path = micro_scale_checklist(tmp_path_factory.mktemp("hard-checklist"), cfg, load_splits(cfg)["eval"])
    checklist = load_checklist(path)
    evidence = gather_evidence("extend", summary.children["stage_b"], summary.children["eval"],
                               PipelineOptions(preset="hard", checklist=str(path)), None, checklist=checklist)
    return {"summary": summary, "evidence": evidence, "checklist": checklist}


def test_micro_overrides_leave_the_hard_latent_recipe_alone():
    hard_cfg, micro, smoke = resolve("hard"), resolve("hard", MICRO), resolve("smoke")
    for key in RECIPE:
        section, name = key.split(".")
        assert key not in MICRO
        assert getattr(getattr(micro, section), name) == getattr(getattr(hard_cfg, section), name)
    assert hard_cfg.model.encoder == "scratch" and hard_cfg.model.num_latents < smoke.model.num_latents
    assert hard_cfg.model.d_z < smoke.model.d_z and hard_cfg.stage_a.lr < smoke.stage_a.lr


def test_the_hard_regime_signature(hard):
    from mlflow import MlflowClient

    from latentgate.registry.checklist import COLLAPSE, LEARNING
    from latentgate.registry.decisions import SWEEP, decide

    s, ev, checklist = hard["summary"], hard["evidence"], hard["checklist"]
    client = MlflowClient()
    # a competent text teacher: the base LM passed its sanity gate, and reads the answers off the text
    assert client.get_run(s.children["base"]).data.metrics["text_f1"] >= resolve("hard", MICRO).base.gate_min_f1
    # ... while the latent path has not learned to read: its F1 is a small fraction of the teacher's
    assert s.latent_f1 < 0.2 * s.text_f1
    # Stage A learns nothing (the plan's "first_acc = 0.000 throughout"): never above the constant guess
    history = {k: {m.step: m.value for m in client.get_metric_history(s.children["stage_a"], f"stage_a/{k}")}
               for k in ("probe_first_acc", "probe_first_acc_const")}
    assert history["probe_first_acc"] and all(acc <= history["probe_first_acc_const"][step] + 1e-9
                                              for step, acc in history["probe_first_acc"].items())
    # Stage B's first-token accuracy is the answer prior: within a few probe examples of the better control, far
    # from the checklist's bar, which fails on it
    assert ev.first_acc is not None and ev.first_acc_lift is not None
    assert ev.first_acc_lift <= 0.05
    assert ev.first_acc_lift == pytest.approx(ev.first_acc - max(ev.first_acc_const, ev.first_acc_shuffled))
    assert not checklist.criterion(LEARNING).compare(ev.first_acc_lift)
    assert "first_token_learning" in ev.checklist_failed and not ev.checklist_passed
    assert not ev.provenance_failed  # judged on what it learned, not refused for where the evidence comes from
    # the decision tree: Phase 2, never exposure bias (Phase 3) nor promotion; by the rule the gate's own collapse
    # verdict names (collapsed when the checklist's no_mode_collapse failed, else needs_tuning)
    decision = decide(ev, checklist)
    rule = "collapsed" if COLLAPSE in ev.checklist_failed else "needs_tuning"
    assert (decision.next_phase, decision.rule) == (SWEEP, rule), (decision, ev.checklist_failed)
