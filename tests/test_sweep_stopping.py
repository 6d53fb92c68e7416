"""Sweep evidence and stopping: the version a sweep checks carries promote's `hero.check.*` tags, WilcoxonPruner is
refused in one line (no per-example scores), PatientPruner and the stop rules (patience, Optuna's Terminator) are
read from study files, and a continued study stops with its reason printed. Real SQLite Optuna storage, real MLflow
store, micro trials."""

from __future__ import annotations

import pytest

from conftest import run_cli
from latentgate.errors import ConfigError
from test_sweep import load, write_study


@pytest.fixture(scope="module")
def stage_a_uri(micro_smoke) -> str:
    return f"runs:/{micro_smoke.children['stage_a']}/checkpoints/stage_a"


# ---- study files -----------------------------------------------------------------------------------------------

def test_wilcoxon_pruner_is_refused_in_one_line(tmp_path):
    from latentgate.sweep.study import load_study

    for pruner in ({"name": "wilcoxon"}, {"name": "patient", "patience": 1, "wrapped": {"name": "wilcoxon"}}):
        path = write_study(tmp_path, "wx", "auto", pruner=pruner)
        with pytest.raises(ConfigError, match="per-example scores keyed by example id"):
            load_study(str(path))
    proc = run_cli("sweep", "--study", str(path), "--check", timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("latentgate: warning:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "pruner wilcoxon needs per-example scores keyed by example id" in lines[0]
    assert "(fix: use pruner median" in lines[0]


@pytest.mark.parametrize("stop, message", [
    ({"rule": "patience"}, "stop rule patience needs trials"),
    ({"rule": "patience", "trials": 0}, "stop.trials=0 must be a positive integer"),
    ({"rule": "patience", "trials": 3, "delta": 0.1}, "takes no key 'delta'"),
    ({"rule": "terminator", "min_n_trials": 4}, "needs threshold"),
    ({"rule": "soon"}, "stop must be a mapping with rule"),
])
def test_bad_stop_rules_are_rejected(tmp_path, stop, message):
    from latentgate.sweep.study import load_study

    with pytest.raises(ConfigError, match=message):
        load_study(str(write_study(tmp_path, "st", "auto", stop=stop)))


def test_patient_pruner_and_stop_rules_are_built_from_the_study_file(tmp_path):
    import optuna

    from latentgate.sweep.study import build_pruner, load_study

    spec = load_study(str(write_study(tmp_path, "pp", "auto", stop={"rule": "patience", "trials": 4},
                                      pruner={"name": "patient", "patience": 2, "min_delta": 0.01,
                                              "wrapped": {"name": "median", "n_warmup_steps": 3}})))
    pruner = build_pruner(spec)
    assert isinstance(pruner, optuna.pruners.PatientPruner) and pruner._patience == 2
    assert isinstance(pruner._wrapped_pruner, optuna.pruners.MedianPruner)
    assert spec.stop == {"rule": "patience", "trials": 4, "min_delta": 0.0}
    assert load_study("micro").stop == {"rule": "none"}  # no key: no rule (stored studies load unchanged)


def _study(values):
    """An in-memory study with finished trials: a float completes, None is pruned."""
    import optuna
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(direction="maximize")
    for i, v in enumerate(values):
        dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
        study.add_trial(create_trial(params={"x": i / 10}, distributions=dist, value=v,
                                     state=TrialState.COMPLETE if v is not None else TrialState.PRUNED))
    return study


def test_patience_rule_counts_trials_without_a_real_gain():
    from latentgate.sweep.stopping import finished_trials, patience_reason

    trials = finished_trials(_study([0.5, 0.6, 0.605, None, 0.61]))
    assert patience_reason(trials, 3, 0.0) is None  # 0.61 is a new best: the count restarts
    why = patience_reason(trials, 3, 0.02)  # 0.605, pruned, 0.61: none gains 0.02 over 0.6 (trial 1)
    assert why == "the last 3 finished trials did not raise the best value 0.6000 (trial 1) by >= 0.02 (patience 3)"
    assert patience_reason(trials, 4, 0.02) is None
    assert patience_reason(finished_trials(_study([None, None])), 2, 0.0).startswith("none of the last 2")


def test_terminator_rule_stops_a_flat_study():
    from latentgate.sweep.stopping import stop_reason

    flat = _study([0.5] * 6)
    why = stop_reason({"rule": "terminator", "min_n_trials": 5, "threshold": 0.5}, flat)
    assert why.startswith("stopped after 6 finished trials: Optuna's Terminator: after 6 complete trials")
    assert flat.user_attrs["latentgate.stopped"] == why
    assert stop_reason({"rule": "terminator", "min_n_trials": 8, "threshold": 0.5}, _study([0.5] * 6)) is None


# ---- a real sweep, continued with a stop rule: evidence on the version, the reason printed --------------------------

def test_continued_study_stops_with_its_reason_and_the_version_carries_the_evidence(tmp_path, stage_a_uri,
                                                                                     mlflow_store, capfd):
    from mlflow import MlflowClient

    from latentgate.registry.gate import check_candidate
    from latentgate.registry.writes import check_tag_value
    from latentgate.sweep.finalize import format_summary
    from latentgate.sweep.runner import run_sweep
    from latentgate.sweep.study import load_study

    pruner = {"name": "patient", "patience": 1, "wrapped": {"name": "median", "n_startup_trials": 1,
                                                            "n_warmup_steps": 1}}
    space = {"stage_b.lr": {"type": "categorical", "choices": [1.0e-3, 2.0e-3]}}
    storage = f"sqlite:///{tmp_path / 'stop.db'}"
    first = load_study(str(write_study(tmp_path, "stop", stage_a_uri, pruner=pruner, search_space=space)))
    s1 = run_sweep(first, n_trials=2, workers=1, storage=storage, echo=lambda *_: None, register=False)
    assert s1["finished"] == 2 and not s1["stopped"]

    # the same study, continued to 8 trials with a patience rule no trial can meet (a gain of 1.0 in F1)
    stop = {"rule": "patience", "trials": 2, "min_delta": 1.0}
    again = load_study(str(write_study(tmp_path, "stop", stage_a_uri, pruner=pruner, search_space=space, stop=stop)))
    printed: list[str] = []
    s2 = run_sweep(again, n_trials=8, workers=1, storage=storage, echo=printed.append)
    study = load(storage, "stop")
    assert len(study.trials) == 3 and s2["finished"] == 3  # one more trial, then the rule held: not 8
    assert s2["stopped"].startswith("stopped after 3 finished trials: the last 2 finished trials did not raise the "
                                    "best value ") and s2["stopped"].endswith(" by >= 1 (patience 2)")
    assert any(line == f"[worker 0] {s2['stopped']}" for line in printed), printed
    assert f"stopped early     {s2['stopped']}" in format_summary(s2)
    client = MlflowClient()
    parent = client.get_run(s2["parent_run_id"])
    assert parent.data.tags["latentgate.stopped"] == s2["stopped"]
    assert "Stopped early: " in parent.data.tags["mlflow.note.content"]
    err = capfd.readouterr().err  # progress: the study's trials, by outcome (plain lines: no TTY here)
    assert "latentgate: progress: sweep stop resumed at 2/8 trials (25%)" in err
    assert "latentgate: progress: sweep stop 3/8 trials (38%) | complete " in err

    # the best trial's version carries the evidence promote would write, value for value
    version = s2["registry"]["version"]
    tags = client.get_model_version("latentgate", version).tags
    rows = check_candidate(version).rows
    assert rows and {f"hero.check.{r.name}": check_tag_value(r) for r in rows}.items() <= tags.items()
    assert tags["latentgate.checked_by"] == f"sweep run {s2['parent_run_id']}"
    assert "hero.audit" not in tags  # evidence only: the sweep never promotes (no audit, no alias move)
    assert s2["registry"]["evidence"] == f"{len(rows)} hero.check.* tags on version {version}"
