"""The plan's phases as entry points, the pipeline's decision tree, reuse of finished steps, and kill -9 + resume.

Real SQLite MLflow store (conftest's session store), real tiny models, the real CLI in subprocesses where the
interface is the CLI. Each decision-tree branch is driven by synthetic evidence against the real checklist file."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, checklist_copy, cli_env, every_criterion_decides, run_cli
from latentgate.config import flatten, parse_set_args, resolve
from latentgate.errors import CheckpointError, ConfigError
from latentgate.pipeline.run import PipelineOptions, phase_overrides, run_pipeline
from latentgate.pipeline.summary import format_decisions
from latentgate.registry.checklist import DEFAULT_PATH, load_checklist
from latentgate.registry.decisions import FIX, HERO, PROMOTE, STOP, SWEEP, PhaseEvidence, decide

TRAINING_ENTRY_POINTS = ("base", "stage_a", "stage_b", "extend", "fix", "eval", "hero")


# ---- helpers -----------------------------------------------------------------------------------------------------

def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def all_runs() -> list:
    c = _client()
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, max_results=50000)


def phase_runs() -> set[str]:
    return {r.info.run_id for r in all_runs() if r.data.tags.get("latentgate.entry_point") in TRAINING_ENTRY_POINTS}


def mlproject_command(entry_point: str, params: dict) -> list[str]:
    """The exact argv MLflow builds for `mlflow run . -e <entry_point> -P k=v ...` (MLflow's own formatting)."""
    from mlflow.projects._project_spec import load_project

    cmd = load_project(str(ROOT)).get_entry_point(entry_point).compute_command(params, storage_dir=None)
    argv = shlex.split(cmd)
    assert argv[0] == "latentgate"
    return argv[1:]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.startswith("latentgate: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def stage_a_uri(micro_smoke) -> str:
    return f"runs:/{micro_smoke.children['stage_a']}/checkpoints/stage_a"


@pytest.fixture(scope="module")
def checklist():
    return load_checklist()


def micro_rules(path: Path, edits: dict) -> Path:
    """The shipped checklist at micro scale (its eval set unpinned and 24 questions: the shipped file stops a micro
    run on provenance), with criteria edited."""
    return checklist_copy(path, {"eval_size": {"threshold": 1}, **edits}, eval_dataset_digest="any")


BLIND_TO_COLLAPSE = {"params": {"max_top_prediction_share": 1.0, "max_top_k_share": 1.0, "max_empty_share": 1.0}}


@pytest.fixture(scope="module")
def steer_to_fix(tmp_path_factory) -> Path:
    """The real checklist with first_token_learning at a lift of -1 and no_mode_collapse blind to one answer for
    everyone: a micro run (F1 0, every latent answer the same) then takes the Phase 3 branch."""
    return micro_rules(tmp_path_factory.mktemp("checklist") / "steer.yaml",
                       {"first_token_learning": {"threshold": -1.0}, "no_mode_collapse": BLIND_TO_COLLAPSE})


@pytest.fixture(scope="module")
def approve_anything(tmp_path_factory) -> Path:
    """Every learning criterion passes a micro run: the pipeline promotes after Phase 1 and, with --launch-hero,
    runs the hero."""
    return micro_rules(tmp_path_factory.mktemp("checklist") / "approve.yaml", {
        "first_token_learning": {"threshold": -1.0}, "first_token_stability": {"threshold": 1.0},
        "f1_breakthrough": {"op": ">=", "threshold": 0.0}, "generation_quality": {"threshold": 0.0},
        "no_mode_collapse": {"threshold": 1.1, **BLIND_TO_COLLAPSE}, "beats_controls": {"op": ">=", "threshold": -1.0}})


# ---- the decision tree, branch by branch (synthetic evidence, real checklist) ------------------------------------

def ev(phase="extend", f1_max=0.0, lift=0.05, passed=False, budget=None, hero=False, raw=None, const=0.03,
       share=0.05, repetition=0.0) -> PhaseEvidence:
    """PhaseEvidence with the probe's controls: `lift` over the better of the constant guess (`const`) and the shuffled
    latent; raw accuracy defaults to const + lift. `share`/`repetition`: the latent path's eval predictions."""
    return PhaseEvidence(phase=phase, f1_max=f1_max, first_acc=None if lift is None else (raw or const + lift),
                         checklist_passed=passed, first_acc_lift=lift, first_acc_const=const,
                         first_acc_shuffled=const, top_prediction_share=share, repetition_rate=repetition,
                         checklist_failed=() if passed else ("f1_breakthrough",), budget_left_s=budget,
                         launch_hero=hero, run_ids={"stage_b": "s" * 32, "eval": "e" * 32})


# The issue's run: latent F1 0, probe first-token accuracy 17.2% (raw, above the plan's 12%), but the same answer
# to all 100 eval questions and a first token no better than always guessing the most frequent one.
ISSUE_RUN = dict(f1_max=0.0, raw=0.172, const=0.172, lift=0.0, share=1.0)

BRANCHES = {
    # Phase 1 result                                                      rule                       next phase
    "F1>0 + checklist passes: promote, stop before hero": (ev(f1_max=0.2, lift=0.3, passed=True),
                                                           "ready_stop_before_hero", PROMOTE),
    "F1>0 + checklist passes + --launch-hero": (ev(f1_max=0.2, lift=0.3, passed=True, hero=True),
                                                "ready_launch_hero", HERO),
    "ready, --launch-hero, budget spent: promote only": (ev(f1_max=0.2, lift=0.3, passed=True, hero=True, budget=0),
                                                         "ready_stop_before_hero", PROMOTE),
    "F1=0, peak first-token lift exactly 12%: Phase 3": (ev(f1_max=0.0, lift=0.12), "exposure_bias", FIX),
    "F1=0, peak first-token lift 11.9%: Phase 2": (ev(f1_max=0.0, lift=0.119), "needs_tuning", SWEEP),
    "F1=0, raw 40% but lift 5% over a 35% constant guess: Phase 2": (ev(f1_max=0.0, raw=0.40, const=0.35, lift=0.05),
                                                                    "needs_tuning", SWEEP),
    "the issue's run (one answer for all, raw 17.2% = constant guess): collapsed, Phase 2": (
        ev(**ISSUE_RUN), "collapsed", SWEEP),
    "F1=0, lift 12% but one answer for 60% of the eval: collapsed, not exposure bias": (
        ev(f1_max=0.0, lift=0.12, share=0.6), "collapsed", SWEEP),
    "top prediction share exactly at the limit (30%): not collapsed": (ev(f1_max=0.0, lift=0.12, share=0.3),
                                                                       "exposure_bias", FIX),
    "F1=0, lift 12%, 10% repetitive answers: collapsed": (ev(f1_max=0.0, lift=0.12, repetition=0.1), "collapsed",
                                                          SWEEP),
    "F1>0 but the checklist fails: Phase 2": (ev(f1_max=0.2, lift=0.5, passed=False), "needs_tuning", SWEEP),
    "F1>0, checklist fails on collapse: collapsed": (ev(f1_max=0.2, lift=0.5, share=0.9), "collapsed", SWEEP),
    "F1=0, first-token learned, budget spent: stop": (ev(f1_max=0.0, lift=0.5, budget=-1.0), "budget_exhausted", STOP),
    "after the sweep, still short: Phase 3": (ev("sweep", f1_max=0.0, lift=0.3), "still_short_after_sweep", FIX),
    "after the sweep, ready: promote": (ev("sweep", f1_max=0.05, lift=0.3, passed=True), "ready_stop_before_hero",
                                        PROMOTE),
    "after Phase 3, still short: stop": (ev("fix", f1_max=0.0, lift=0.5), "plan_exhausted", STOP),
    "after Phase 3, ready: promote": (ev("fix", f1_max=0.1, lift=0.5, passed=True), "ready_stop_before_hero", PROMOTE),
    "no eval rows, no lift recorded (the gate refuses missing evidence): Phase 2": (
        ev(f1_max=None, lift=None, share=None, repetition=None), "needs_tuning", SWEEP),
    "F1=0 but the gate passes (f1_breakthrough shown only): promote, never Phase 3": (
        ev(f1_max=0.0, lift=0.3, passed=True), "ready_stop_before_hero", PROMOTE),
    "after the sweep, F1=0, the gate passes: promote": (ev("sweep", f1_max=0.0, lift=0.3, passed=True),
                                                        "ready_stop_before_hero", PROMOTE),
}


@pytest.mark.parametrize("case", list(BRANCHES))
def test_decision_tree_branch(case, checklist):
    evidence, rule, nxt = BRANCHES[case]
    d = decide(evidence, checklist)
    assert (d.rule, d.next_phase) == (rule, nxt), d.reason
    assert d.evidence is evidence and d.reason
    if rule == "collapsed":
        assert d.reason.startswith("mode collapse") and "not exposure bias" in d.reason


def test_the_issues_run_reads_as_collapse_and_shows_its_raw_numbers(checklist):
    """Raw first-token accuracy 17.2% passes the plan's raw 12% bar, which read F1 0 as exposure bias; its lift
    over the constant guess is 0, and the reason says so with the raw numbers beside it."""
    evidence = ev(**ISSUE_RUN)
    assert checklist.criterion("first_token_learning").compare(evidence.first_acc)  # the plan's raw reading
    d = decide(evidence, checklist)
    assert d.rule == "collapsed" and d.next_phase != FIX
    assert "raw 0.172" in d.reason and "constant guess 0.172" in d.reason and "lift 0 not >= 0.12" in d.reason


def test_thresholds_come_from_the_checklist_file(tmp_path, checklist):
    assert checklist.threshold("first_token_learning") == 0.12 and checklist.threshold("f1_breakthrough") == 0.0
    data = every_criterion_decides(yaml.safe_load(DEFAULT_PATH.read_text()))
    for c in data["criteria"]:
        if c["name"] == "first_token_learning":
            c["threshold"] = 0.05
        if c["name"] == "f1_breakthrough":
            c["threshold"] = 0.5
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    edited = load_checklist(path)
    lift_8 = ev(f1_max=0.0, lift=0.08)
    assert decide(lift_8, checklist).next_phase == SWEEP  # 8% < 12%
    assert decide(lift_8, edited).next_phase == FIX  # 8% >= 5% in the edited file
    f1_02 = ev(f1_max=0.2, lift=0.3)  # refused by the gate: the plan's branches read the file's thresholds
    assert decide(f1_02, checklist).rule == "needs_tuning"  # 0.2 > 0: a breakthrough, so no exposure bias
    assert decide(f1_02, edited).rule == "exposure_bias"  # 0.2 is no breakthrough when the file says F1 > 0.5


def test_pipeline_phase_configs_equal_the_phase_presets():
    smoke = resolve("smoke")
    for phase in ("extend", "fix"):
        assert flatten(resolve("smoke", phase_overrides(phase, smoke))) == flatten(resolve(phase)), phase
    micro = resolve("micro")
    assert resolve("micro", phase_overrides("extend", micro)).stage_b.steps == 2 * micro.stage_b.steps


# ---- the CLI and the MLproject agree -----------------------------------------------------------------------------

ENTRY_COMMANDS = {"base": "base", "stage_a": "stage-a", "stage_b": "stage-b", "eval": "eval", "extend": "extend",
                  "fix": "fix", "hero": "hero", "pipeline": "pipeline"}
REQUIRED = {"stage_b": {"resume_from": "runs:/x/checkpoints/stage_a"}, "extend": {"resume_from": "/x"},
            "fix": {"resume_from": "/x"}, "eval": {"checkpoint": "/x"}}


def test_phase_commands_are_registered():
    from latentgate.cli import main
    from latentgate.phases.cli import COMMANDS as PHASES
    from latentgate.pipeline.cli import COMMANDS as PIPELINE

    names = {c.name for c in PHASES + PIPELINE}
    assert names == set(ENTRY_COMMANDS.values()) | {"resume"}
    assert names <= set(main.commands)


@pytest.mark.parametrize("entry_point", list(ENTRY_COMMANDS))
def test_every_mlproject_command_parses(entry_point):
    """The command MLflow builds from the defaults (empty values included) is accepted by our CLI."""
    from latentgate.cli import main

    argv = mlproject_command(entry_point, REQUIRED.get(entry_point, {}))
    assert argv[0] == ENTRY_COMMANDS[entry_point]
    ctx = main.commands[argv[0]].make_context(argv[0], argv[1:])
    params = ctx.params
    if "preset" in params:  # empty parameters are dropped: the preset's values stand
        assert resolve(params["preset"], parse_set_args(list(params["sets"]) + [params["overrides"]]))


EXTEND_PARAMS = {"first_token_ce_weight": ("stage_b.first_token_ce_weight", "7.5", 7.5),
                 "steps": ("stage_b.steps", "5", 5), "lr": ("stage_b.lr", "0.002", 0.002),
                 "schedule": ("stage_b.schedule", "constant", "constant")}


@pytest.mark.parametrize("param", list(EXTEND_PARAMS))
def test_each_extend_parameter_changes_the_resolved_config(param):
    from latentgate.cli import main

    key, raw, value = EXTEND_PARAMS[param]
    argv = mlproject_command("extend", {"resume_from": "/x", "preset": "micro", param: raw})
    p = main.commands["extend"].make_context("extend", argv[1:]).params
    cfg = resolve(p["preset"], parse_set_args(list(p["sets"]) + [p["overrides"]]))
    changed = {k for k, v in flatten(cfg).items() if flatten(resolve("micro"))[k] != v}
    assert changed == {key} and flatten(cfg)[key] == value


def test_fix_is_scheduled_sampling_whatever_the_preset(tmp_path, mlflow_store):
    """`fix -P preset=micro` still samples (p_gold 1.0 -> 0.5); switching sampling off is refused, not ignored."""
    proc = run_cli("fix", "--resume-from", str(tmp_path / "nope"), "--preset", "micro")
    assert proc.returncode == 2 and "does not exist" in one_error_line(proc)  # got past the phase check
    proc = run_cli("fix", "--resume-from", str(tmp_path / "nope"), "--preset", "micro",
                   "--set", "stage_b.scheduled_sampling=false")
    assert proc.returncode == 2 and "stage_b.scheduled_sampling is false" in one_error_line(proc)


def test_a_wrongly_typed_parameter_is_refused_by_the_cli():
    proc = run_cli(*mlproject_command("extend", {"resume_from": "/x", "preset": "micro", "steps": "many"}),
                   env={"MLFLOW_RUN_ID": "0" * 32}, timeout=120)  # as `mlflow run` sets it: empty -P keep the preset
    assert proc.returncode == 2 and "stage_b.steps expects int" in one_error_line(proc)


def test_extend_parameters_reach_the_trainer_and_the_logged_params(stage_a_uri, tmp_path, mlflow_store):
    """All four extend parameters, passed as MLflow passes them, change the logged params AND what the trainer did."""
    before = phase_runs()
    params = {"resume_from": stage_a_uri, "preset": "micro", **{p: raw for p, (_, raw, _) in EXTEND_PARAMS.items()},
              "overrides": f"run.output_dir={tmp_path}"}
    proc = run_cli(*mlproject_command("extend", params), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_id,) = phase_runs() - before
    c = _client()
    run = c.get_run(run_id)
    assert run.data.tags["latentgate.entry_point"] == "extend" and run.info.status == "FINISHED"
    for key, _, value in EXTEND_PARAMS.values():
        assert run.data.params[key] == str(value), key
    hist = lambda k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, f"stage_b/{k}"))  # noqa: E731
    assert [s for s, _ in hist("loss")] == [1, 2, 3, 4, 5]  # steps=5 optimizer steps
    lrs = [v for _, v in hist("lr")]
    assert max(lrs) == pytest.approx(0.002) and len(set(lrs[1:])) == 1  # lr, constant after warm-up
    for (_, w), (_, r) in zip(hist("first_weighted"), hist("first_raw"), strict=True):
        assert w == pytest.approx(7.5 * r, rel=1e-3, abs=1e-5)  # first-token CE weight


# ---- inputs are checked before anything trains -------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [("model.num_latents=8", "model.num_latents"), ("model.d_z=8", "model.d_z"),
                                           ("base.hidden=64", "base.hidden")])
def test_incompatible_checkpoint_fails_before_any_run(override, key, stage_a_uri, tmp_path, mlflow_store):
    from latentgate.phases import entry

    before = len(all_runs())
    cfg = resolve("micro", parse_set_args([override, f"run.output_dir={tmp_path}"]))
    with pytest.raises(CheckpointError, match=f"incompatible checkpoint: {key} is"):
        entry.extend(cfg, stage_a_uri)
    assert len(all_runs()) == before


def test_bad_resume_from_is_one_line_through_the_cli(stage_a_uri, tmp_path, mlflow_store):
    before = len(all_runs())
    proc = run_cli("extend", "--resume-from", stage_a_uri, "--preset", "micro", "--set", "model.d_z=8",
                   "--set", f"run.output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "incompatible checkpoint: model.d_z is 16" in one_error_line(proc)
    assert len(all_runs()) == before


def test_missing_or_wrong_kind_of_checkpoint_fails_before_any_run(micro_smoke, tmp_path, mlflow_store):
    from latentgate.phases import entry

    before = len(all_runs())
    cfg = resolve("micro", {"run.output_dir": str(tmp_path)})
    with pytest.raises(CheckpointError, match="does not exist"):
        entry.stage_b(cfg, str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="does not exist|cannot resolve"):
        entry.eval_checkpoint(cfg, "runs:/0123456789abcdef0123456789abcdef/checkpoints/stage_b")
    stage_b = f"runs:/{micro_smoke.children['stage_b']}/checkpoints/stage_b"
    with pytest.raises(CheckpointError, match="is a stage_b checkpoint; this phase starts from a stage_a"):
        entry.fix(resolve("micro", {"run.output_dir": str(tmp_path), "stage_b.scheduled_sampling": "true"}), stage_b)
    assert len(all_runs()) == before


def test_a_failed_phase_inside_mlflow_run_is_marked_failed_with_the_error(tmp_path, mlflow_store):
    c = _client()
    exp = c.get_experiment_by_name("latentgate").experiment_id
    project_run = c.create_run(exp, tags={"mlflow.project.entryPoint": "eval"}).info.run_id  # what `mlflow run` makes
    proc = run_cli("eval", "--checkpoint", str(tmp_path / "missing"), "--preset", "micro",
                   env={"MLFLOW_RUN_ID": project_run})
    assert proc.returncode == 2
    run = c.get_run(project_run)
    assert run.info.status == "FAILED"
    assert "does not exist" in run.data.tags["latentgate.error"]


def test_a_finished_phase_is_never_overwritten(micro_smoke, stage_a_uri, monkeypatch, tmp_path, mlflow_store):
    from latentgate.phases import entry

    runs = [r for r in all_runs() if r.data.tags.get("latentgate.entry_point") in ("extend", "stage_b", "fix")
            and r.info.status == "FINISHED"]
    if not runs:  # make one
        cfg = resolve("micro", {"run.output_dir": str(tmp_path)})
        runs = [_client().get_run(entry.stage_b(cfg, stage_a_uri).run_id)]
    finished = runs[0]
    metrics_before = dict(finished.data.metrics)
    with pytest.raises(ConfigError, match="never overwritten"):
        entry.resume(finished.info.run_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", finished.info.run_id)  # `mlflow run --run-id <finished>` the same
    with pytest.raises(ConfigError, match="never overwritten"):
        entry.stage_b(resolve("micro", {"run.output_dir": str(tmp_path)}), stage_a_uri)
    after = _client().get_run(finished.info.run_id)
    assert after.info.status == "FINISHED" and dict(after.data.metrics) == metrics_before


def test_hero_refuses_without_the_alias_and_starts_nothing(mlflow_store, micro_smoke, tmp_path):
    before = len(all_runs())
    other = checklist_copy(tmp_path / "other.yaml", model_name="lg-no-hero-here")
    proc = run_cli("hero", "--checklist", str(other))
    assert proc.returncode == 4
    assert "no version of lg-no-hero-here holds alias hero" in one_error_line(proc)
    proc = run_cli("hero", "--checklist", str(other), "--dry-run", "true")
    assert proc.returncode == 4 and "no version of lg-no-hero-here" in one_error_line(proc)
    assert len(all_runs()) == before


def test_pipeline_promotes_then_runs_the_hero_of_the_approved_recipe(approve_anything, tmp_path_factory, mlflow_store,
                                                                     micro_smoke):
    """Phase 1 -> promote -> Phase 4: the hero's logged config is the approved Stage B run's, budget keys aside."""
    from latentgate.registry.hero_recipe import BUDGET_KEYS

    out = tmp_path_factory.mktemp("pipeline-hero")
    opts = PipelineOptions(preset="micro", overrides={"run.output_dir": str(out), "stage_b.first_token_ce_weight": 7.5},
                           checklist=str(approve_anything), runner="inprocess", launch_hero=True, hero_scale=2)
    summary = run_pipeline(opts)
    steps = [s.entry_point for s in summary.steps]
    assert steps == ["base", "stage_a", "extend", "eval", "promote", "hero"], steps
    assert summary.decisions[-1].rule == "ready_launch_hero"
    hero_run = _client().get_run(summary.steps[-1].run_id)
    approved = _client().get_run(summary.steps[2].run_id).data.params  # the extend run: the approved recipe
    hero = hero_run.data.params
    differ = {k for k in approved if k in hero and approved[k] != hero[k]}
    assert differ == set(BUDGET_KEYS), differ  # Stage A checkpointed only at its end: now every approved length
    assert hero["stage_b.steps"] == str(2 * int(approved["stage_b.steps"]))
    assert hero["stage_b.first_token_ce_weight"] == approved["stage_b.first_token_ce_weight"] == "7.5"
    tags = hero_run.data.tags
    assert tags["latentgate.hero_checklist_sha256"] == load_checklist(approve_anything).sha256
    assert {c["key"] for c in json.loads(tags["latentgate.hero_diff"])} == differ
    assert tags["latentgate.hero_recipe_changes"] == ""


# ---- the pipeline: decisions recorded, finished steps reused -----------------------------------------------------

def _pipeline_opts(tmp, checklist_path, runner="inprocess") -> PipelineOptions:
    return PipelineOptions(preset="micro", overrides={"run.output_dir": str(tmp)}, checklist=str(checklist_path),
                           runner=runner)


def test_pipeline_twice_second_time_reuses_every_step(steer_to_fix, tmp_path_factory, mlflow_store, micro_smoke):
    import mlflow

    out = tmp_path_factory.mktemp("pipeline")
    first = run_pipeline(_pipeline_opts(out, steer_to_fix))
    assert [s.entry_point for s in first.steps] == ["base", "stage_a", "extend", "eval", "fix", "eval"]
    assert [d.rule for d in first.decisions] == ["exposure_bias", "plan_exhausted"]
    training_before = phase_runs()
    second = run_pipeline(_pipeline_opts(out, steer_to_fix))
    assert phase_runs() == training_before  # no new phase run at all
    assert all(s.reused for s in second.steps)
    assert [s.run_id for s in second.steps] == [s.run_id for s in first.steps]
    # steps hand each other URIs; the decisions and their evidence are artifacts of the pipeline run
    ids = {s.entry_point: s.run_id for s in first.steps[:3]}
    assert first.steps[2].input_uri == f"runs:/{ids['stage_a']}/checkpoints/stage_a"
    assert first.steps[3].input_uri == f"runs:/{ids['extend']}/checkpoints/stage_b"
    local = Path(mlflow.artifacts.download_artifacts(run_id=second.run_id, artifact_path="decisions.json"))
    recorded = json.loads(local.read_text())
    assert [d["rule"] for d in recorded["decisions"]] == ["exposure_bias", "plan_exhausted"]
    evidence = recorded["decisions"][0]["evidence"]
    assert evidence["run_ids"] == {"stage_b": ids["extend"], "eval": first.steps[3].run_id}
    assert evidence["f1_max"] == 0.0 and evidence["first_acc"] is not None
    md = Path(mlflow.artifacts.download_artifacts(run_id=second.run_id, artifact_path="decisions.md")).read_text()
    assert "exposure_bias" in md and ids["extend"] in md
    tags = _client().get_run(second.run_id).data.tags
    assert tags["latentgate.final_rule"] == "plan_exhausted"
    # the fix step (Phase 3) trained what the plan's fix is: scheduled sampling, twice the Stage B steps
    fix_run = _client().get_run(first.steps[4].run_id)
    assert fix_run.data.params["stage_b.scheduled_sampling"] == "True"
    assert fix_run.data.params["stage_b.steps"] == str(2 * resolve("micro").stage_b.steps)


@pytest.mark.slow
def test_pipeline_as_mlflow_projects_twice(steer_to_fix, tmp_path_factory, mlflow_store, micro_smoke):
    """Every step an inner `mlflow run` (env_manager passed on); the second pipeline launches none."""
    out = tmp_path_factory.mktemp("pipeline-project")
    args = ("pipeline", "--preset", "micro", "--checklist", str(steer_to_fix), "--set", f"run.output_dir={out}",
            "--env-manager", "local")
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = run_cli(*args, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    project_runs = {r.info.run_id for r in all_runs() if r.data.tags.get("mlflow.project.entryPoint")}
    training = phase_runs()
    proc = run_cli(*args, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(reused)") == 6
    assert phase_runs() == training
    assert {r.info.run_id for r in all_runs() if r.data.tags.get("mlflow.project.entryPoint")} == project_runs


def test_pipeline_phase2_branch_end_to_end(tmp_path_factory, mlflow_store, micro_smoke, approve_anything):
    """The shipped rules at micro scale on a micro run (F1 0, one latent answer for all): Phase 1 -> Phase 2, a real
    sweep as an inner `mlflow run` -> the best trial's eval -> still short -> Phase 3 with the sweep's tuned params ->
    stop. Then the sweep's best trial promoted (a file that approves it): its hero is that trial's tuned recipe."""
    out = tmp_path_factory.mktemp("pipeline-sweep")
    rules = micro_rules(out / "micro-rules.yaml", {})
    opts = PipelineOptions(preset="micro", overrides={"run.output_dir": str(out)}, runner="inprocess",
                           sweep_study="micro", sweep_trials=2, checklist=str(rules))
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{old_path}"  # the inner `mlflow run`
    try:
        summary = run_pipeline(opts)
    finally:
        os.environ["PATH"] = old_path
    print(format_decisions(summary))
    rules = [d.rule for d in summary.decisions]
    # the micro run gives most eval questions the same (empty) latent answer: collapse, not a first-token shortfall
    assert rules[:2] == ["collapsed", "still_short_after_sweep"], rules
    share = summary.decisions[0].evidence.top_prediction_share
    assert share > load_checklist().collapse_rule().max_top_share
    steps = [s.entry_point for s in summary.steps]
    assert steps[:5] == ["base", "stage_a", "extend", "eval", "sweep"] and steps[5:7] == ["fix", "eval"], steps
    sweep_step = summary.steps[4]
    sweep_run = _client().get_run(sweep_step.run_id)
    assert sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["latentgate.best_trial_run"] == sweep_step.best_trial_run
    # the decision after the sweep read the best trial's own runs
    after_sweep = summary.decisions[1].evidence
    assert {k: after_sweep.run_ids[k] for k in ("stage_b", "eval")} == \
        {"stage_b": sweep_step.best_stage_b_run, "eval": sweep_step.best_eval_run}
    # Phase 3 starts from the same Stage A and carries the best trial's tuned Stage B params
    fix_run = _client().get_run(summary.steps[5].run_id)
    best = _client().get_run(sweep_step.best_trial_run).data.params
    assert fix_run.data.params["stage_b.scheduled_sampling"] == "True"
    for key in ("stage_b.lr", "stage_b.first_token_ce_weight"):
        assert fix_run.data.params[key] == best[key]
    # sweep -> promote -> hero: the hero of the promoted best trial is that trial's tuned Stage B config, budget aside
    from latentgate.phases import entry
    from latentgate.registry.approval import HeroRequest
    from latentgate.registry.gate import promote
    from latentgate.registry.hero_recipe import BUDGET_KEYS

    rules = yaml.safe_load(approve_anything.read_text())
    rules["model_name"] = "lg-sweep-hero"  # its own registered model: other tests' aliases stay where they are
    sweep_rules = out / "sweep-hero.yaml"
    sweep_rules.write_text(yaml.safe_dump(rules, sort_keys=False))
    assert promote(sweep_step.best_eval_run, checklist=sweep_rules).passed
    ran = entry.hero(HeroRequest(checklist=str(sweep_rules), scale=1,
                                 overrides={"run.output_dir": str(out / "hero")}))
    hero_run = _client().get_run(ran.run_id)
    tuned = _client().get_run(sweep_step.best_stage_b_run).data.params
    assert hero_run.data.tags["latentgate.hero_approved_run"] == sweep_step.best_stage_b_run
    hero = hero_run.data.params
    assert {k for k in tuned if k in hero and tuned[k] != hero[k]} <= set(BUDGET_KEYS) | {"run.output_dir"}
    for key in ("stage_b.lr", "stage_b.first_token_ce_weight", "stage_b.k", "model.lora_r"):
        assert hero[key] == tuned[key] == best[key]


# ---- kill -9 at a random step, then `latentgate resume` ----------------------------------------------------------

STEPS = 24
KILL_SETS = [f"stage_b.steps={STEPS}", "stage_b.checkpoint_every=3", "stage_b.probe_every=6"]
COMPARED = ("loss", "tf_raw", "first_raw", "kce_raw", "kd_raw", "first_acc", "grad_norm", "lr", "probe_first_acc",
            "probe_nll", "probe_f1")


def _manifest_step(out: Path) -> int:
    found = list(out.glob("*/stage_b/checkpoints/stage_b/manifest.json"))
    if not found:
        return 0
    try:
        return json.loads(found[0].read_text())["trainer_state"]["global_step"]
    except (ValueError, KeyError):
        return 0


def test_kill9_mid_stage_b_then_resume_matches_an_uninterrupted_run(stage_a_uri, tmp_path, mlflow_store):
    """kill -9 of a real `latentgate stage-b` process at a random step, then `latentgate resume <run_id>`: the same
    run finishes with exactly the metrics of an uninterrupted run, every metric step logged once."""
    from mlflow.entities import Metric

    from latentgate.phases import entry

    killed_out, ref_out = tmp_path / "killed", tmp_path / "reference"
    sets = [x for s in KILL_SETS for x in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "latentgate", "stage-b", "--resume-from", stage_a_uri,
                             "--preset", "micro", *sets, "--set", f"run.output_dir={killed_out}"],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = random.Random().choice([3, 6, 9, 12])
    deadline = time.monotonic() + 240
    while _manifest_step(killed_out) < target:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.15))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    resumed_at = _manifest_step(killed_out)
    (diag,) = killed_out.glob("*/stage_b/diagnostics.jsonl")
    reached = max([json.loads(x)["global_step"] for x in diag.read_text().splitlines() if x.strip()] or [0])
    assert resumed_at < STEPS, "the kill came after training ended"
    (run,) = [r for r in all_runs() if r.data.tags.get("latentgate.output_dir", "").startswith(str(killed_out))]
    assert run.info.status == "RUNNING"  # kill -9: nobody ended it

    c = _client()
    ref = entry.stage_b(resolve("micro", parse_set_args([*KILL_SETS, f"run.output_dir={ref_out}"])), stage_a_uri)
    # A kill can land after a metric flush and before the checkpoint it precedes (flush, then save): keys then hold
    # steps past the checkpoint. Make sure some do (as a partial flush would leave them); resume must not log them
    # twice. Keys the killed process already flushed past the checkpoint are left as they are.
    ref_metrics = c.get_run(ref.run_id).data.metrics
    logged = {k: max((m.step for m in c.get_metric_history(run.info.run_id, k)), default=0) for k in ref_metrics}
    early = [Metric(k, m.value, m.timestamp, m.step) for k in ref_metrics
             if k.startswith("stage_b/") and k != "stage_b/loss" and logged[k] <= resumed_at
             for m in c.get_metric_history(ref.run_id, k) if m.step == resumed_at + 1]
    if early:
        c.log_batch(run.info.run_id, metrics=early, synchronous=True)
    past_checkpoint = sorted({k for k in ref_metrics if logged[k] > resumed_at} | {m.key for m in early})

    res = run_cli("resume", run.info.run_id, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = c.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and "latentgate.error" not in resumed.data.tags
    assert set(resumed.data.metrics) == set(ref_metrics)
    for key in [k for k in resumed.data.metrics if k.startswith("stage_b/")]:
        steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: duplicated steps {sorted(steps)}"
        assert sorted(steps) == sorted(m.step for m in c.get_metric_history(ref.run_id, key)), key
    finals = {}
    for k in COMPARED:
        a = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, f"stage_b/{k}"))
        b = sorted((m.step, m.value) for m in c.get_metric_history(ref.run_id, f"stage_b/{k}"))
        assert a == b, k
        finals[k] = (a[-1][1], b[-1][1])
    assert past_checkpoint  # the case this guards against really was in the store
    report = {"kill_after_step": reached, "checkpoint_target": target, "resumed_from_step": resumed_at,
              "keys_in_store_past_checkpoint": len(past_checkpoint),
              "final_metrics_resumed_vs_uninterrupted": finals, "resumed_run": run.info.run_id,
              "uninterrupted_run": ref.run_id}
    print("KILL-RESUME " + json.dumps(report))  # pytest -s shows it
