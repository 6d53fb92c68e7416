"""`latentgate calibrate`: the statistics (small tables), the set files, and a micro calibration end to end into the
real SQLite store: its confusion matrix against the verdicts and outcomes of the runs it made, its artifacts, and
a repeated command that reuses every chain instead of training again (about 30 s on 2 cores)."""

from __future__ import annotations

import json
import math
import os

import pytest

from latentgate.calibrate import stats
from latentgate.errors import ConfigError
from latentgate.registry.calibration import predict

# ---- pure statistics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs, counts, agreement, p_promote, p_refuse", [
    ([], {"tp": 0, "fp": 0, "fn": 0, "tn": 0}, None, None, None),
    ([(True, True), (False, False)], {"tp": 1, "fp": 0, "fn": 0, "tn": 1}, 1.0, 1.0, 1.0),
    ([(True, False), (True, True), (False, True), (False, False)], {"tp": 1, "fp": 1, "fn": 1, "tn": 1},
     0.5, 0.5, 0.5),
    ([(False, False)] * 3 + [(False, True)], {"tp": 0, "fp": 0, "fn": 1, "tn": 3}, 0.75, None, 0.75),
])
def test_confusion_and_rates(pairs, counts, agreement, p_promote, p_refuse):
    c = stats.confusion(pairs)
    assert c == counts
    r = stats.rates(c)
    assert (r["agreement"], r["precision_promote"], r["precision_refuse"]) == (agreement, p_promote, p_refuse)
    assert r["n"] == len(pairs)


@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (10, 2.228), (30, 2.042), (120, 1.980), (10**9, 1.960)])
def test_t_quantiles(df, t):
    assert stats.t975(df) == pytest.approx(t, abs=1e-3)
    assert 2.000 < stats.t975(45) < 2.021  # between the table's knots


def test_fit_line_and_prediction_interval():
    assert stats.fit_line([0.1, 0.2], [0.3, 0.5]) is None  # two points: no residual degrees of freedom
    assert stats.fit_line([0.2, 0.2, 0.2], [0.1, 0.3, 0.5]) is None  # one x: no line
    exact = stats.fit_line([0, 1, 2, 3], [1, 3, 5, 7])
    assert (exact["slope"], exact["intercept"], exact["s"]) == pytest.approx((2, 1, 0))
    assert predict(exact, 10) == pytest.approx((1, 1, 1))  # 21 on the line: an F1 is clipped to [0, 1]
    assert predict(exact, -1) == pytest.approx((0, 0, 0))
    xs, ys = [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]  # slope 0.5, intercept 0.5, residuals -0.5, 1, -0.5
    fit = stats.fit_line(xs, ys)
    assert (fit["slope"], fit["intercept"]) == pytest.approx((0.5, 0.5))
    assert fit["s"] == pytest.approx(math.sqrt(1.5))  # SSE 1.5 over n - 2 = 1
    y, lo, hi = predict(fit, 1.0)
    half = 12.706 * math.sqrt(1.5) * math.sqrt(1 + 1 / 3)  # at the mean x
    assert half > 1 and (y, lo, hi) == pytest.approx((1.0, 0.0, 1.0), abs=1e-3)  # 1 -+ half, clipped


def _row(name, observed, op, threshold, passed=None, missing=()):
    from latentgate.registry.checklist import OPS

    passed = OPS[op](observed, threshold) if passed is None else passed
    return {"name": name, "observed": observed, "op": op, "threshold": threshold, "passed": passed,
            "missing": list(missing)}


def _rec(split, quality, outcome, lineage=0, collapsed=False):
    rows = [_row("generation_quality", quality, ">=", 0.01),
            _row("lineage", lineage, "==", 0),
            _row("no_mode_collapse", 0.0, "<", 0.1, passed=not collapsed)]
    return {"split": split, "rows": rows, "outcome": outcome}


def test_threshold_proposal_fits_one_split_and_is_judged_on_the_other():
    # hero success needs a smoke F1 around 0.3; the checklist's 0.01 passes everything
    records = [_rec("fit", 0.05, False), _rec("fit", 0.1, False), _rec("fit", 0.4, True), _rec("fit", 0.6, True),
               _rec("fit", 0.7, True, collapsed=True), _rec("fit", 0.8, False, lineage=1),
               _rec("holdout", 0.02, False), _rec("holdout", 0.5, True), {"split": "holdout", "rows": None,
                                                                          "outcome": False}]
    prop = stats.propose_thresholds(records)
    assert set(prop["changes"]) == {"generation_quality"}  # lineage (==) is a pin, never tuned
    new = prop["changes"]["generation_quality"]
    assert new["from"] == 0.01 and 0.1 < new["to"] <= 0.4
    # before: the two low F1s are promoted and fail; after: only the collapsed success still disagrees
    assert prop["fit"] == {"n": 6, "before": 0.5, "after": pytest.approx(5 / 6)}
    assert prop["holdout"] == {"n": 3, "before": pytest.approx(2 / 3), "after": 1.0}
    # a row failing for another reason (collapse) keeps failing whatever its threshold; no rows refuses
    assert not stats.verdict_with(records[4]["rows"], {"no_mode_collapse": 1.0})
    assert not stats.verdict_with(None, {})
    assert stats.verdict_with(records[2]["rows"], {"generation_quality": 0.3})


# ---- set files ----------------------------------------------------------------------------------------------------


def test_shipped_sets_resolve():
    from latentgate.calibrate.spec import load_set

    cpu = load_set("cpu")
    assert len(cpu.configurations) >= 12
    assert {c.expect for c in cpu.configurations} == {"good", "marginal", "broken"}
    assert {c.preset for c in cpu.configurations} == {"smoke", "hard"}
    assert any(c.holdout for c in cpu.configurations) and not all(c.holdout for c in cpu.configurations)
    for c in cpu.configurations:  # the hero scale changes the optimizer steps and nothing else
        assert (c.hero.stage_a.steps, c.hero.stage_b.steps) == (10 * c.gate.stage_a.steps, 10 * c.gate.stage_b.steps)
        assert c.hero.stage_b.lr == c.gate.stage_b.lr and c.hero.model == c.gate.model and c.hero.data == c.gate.data
    micro = load_set("micro", extra={"run.threads": "1"})
    assert micro.name == "micro" and all(c.gate.run.threads == 1 for c in micro.configurations)


@pytest.mark.parametrize("body, match", [
    ("configurations: []\n", "no configurations"),
    ("colour: red\nconfigurations: [{name: a}]\n", "unknown key 'colour'"),
    ("configurations: [{name: a}, {name: a}]\n", "used twice"),
    ("configurations: [{name: a, expect: fine}]\n", "expect='fine'"),
    ("configurations: [{name: a, overrides: {stage_b.lrr: 1}}]\n", "configuration a: unknown config key"),
    ("hero_scale: 0\nconfigurations: [{name: a}]\n", "hero_scale=0"),
])
def test_bad_set_files_fail_in_one_line(tmp_path, body, match):
    from latentgate.calibrate.spec import load_set

    path = tmp_path / "bad.yaml"
    path.write_text("preset: micro\n" + body)
    with pytest.raises(ConfigError, match=match):
        load_set(str(path))


def test_cli_refuses_an_unknown_set():
    from conftest import run_cli

    proc = run_cli("calibrate", "nosuchset", timeout=60)
    assert proc.returncode == 2
    assert "unknown calibration set 'nosuchset'" in proc.stderr and "fix:" in proc.stderr


# ---- a micro calibration, end to end ------------------------------------------------------------------------------


# Micro runs learn nothing: every threshold is opened except the gradient norm's, which the high learning rate
# exceeds; the eval set is unpinned (micro data have no pin), and any finished hero counts as a success.
OPEN = {"first_token_learning": -1.0, "first_token_stability": 1e9, "f1_breakthrough": -1.0,
        "generation_quality": 0.0, "gradient_health": 10.0, "no_mode_collapse": 1.1, "beats_controls": -1.0}


@pytest.fixture()
def open_checklist(tmp_path):
    """registry/hero.yaml with the thresholds of OPEN, so that micro runs get verdicts that are not all alike."""
    import yaml

    from latentgate.registry.checklist import DEFAULT_PATH

    data = yaml.safe_load(DEFAULT_PATH.read_text())
    for crit in data["criteria"]:
        if crit["name"] in OPEN:
            crit["threshold"] = OPEN[crit["name"]]
        if crit["kind"] == "eval_collapse":
            crit["params"]["max_top_prediction_share"] = 1.0
    data["eval_dataset_digest"] = "any"
    data["calibration"] = {"hero_f1_target": 0.0}
    path = tmp_path / "checklist.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _runs(client, flt: str):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=flt, max_results=1000)


def test_micro_calibration_matrix_artifacts_and_reuse(mlflow_store, tmp_path, open_checklist):
    from mlflow import MlflowClient

    from latentgate.calibrate.runner import run_calibration
    from latentgate.calibrate.spec import load_set
    from latentgate.registry.calibration import calibration_note
    from latentgate.registry.gate import check_candidate
    from latentgate.schema import CalibrateTag
    from latentgate.tracking.runs import local_artifacts

    cs = load_set("micro", extra={"run.output_dir": str(tmp_path / "runs")})
    lines: list[str] = []
    result = run_calibration(cs, open_checklist, echo=lines.append)
    c = MlflowClient()
    parent = c.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["latentgate.phase"] == "calibrate"
    assert parent.info.run_name == "calibrate micro"

    # one child per configuration; each child's verdict and outcome are those of the runs it names
    kids = _runs(c, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(k.data.tags["latentgate.calibrate.configuration"] for k in kids) == ["lr-high", "micro"]
    pairs = []
    for kid in kids:
        tags = kid.data.tags
        gate_run, hero_run = tags["latentgate.calibrate.gate_run"], tags["latentgate.calibrate.hero_run"]
        gate_eval = _runs(c, f"tags.`mlflow.parentRunId` = '{gate_run}' and tags.`latentgate.phase` = 'eval'")
        verdict = bool(gate_eval) and check_candidate(gate_eval[0].info.run_id, open_checklist).passed
        hero_eval = _runs(c, f"tags.`mlflow.parentRunId` = '{hero_run}' and tags.`latentgate.phase` = 'eval'")
        outcome = bool(hero_eval) and hero_eval[0].data.metrics["eval/latent/f1"] >= 0.0
        assert tags["latentgate.calibrate.verdict"] == ("promote" if verdict else "refuse")
        assert tags["latentgate.calibrate.outcome"] == ("success" if outcome else "failure")
        assert c.get_run(hero_run).data.params["stage_b.steps"] == str(5 * int(c.get_run(gate_run).data.params[
            "stage_b.steps"]))
        pairs.append((verdict, outcome))
    expected = stats.confusion(pairs)
    assert result["confusion"] == expected
    assert {k: int(parent.data.metrics[f"confusion_{k}"]) for k in expected} == expected
    assert result["agreement"] == stats.rates(expected)["agreement"]
    for r in result["configurations"]:  # compute is counted from the optimizer steps the stage runs recorded
        if r["hero"]["status"] == "FINISHED":
            assert r["hero"]["steps"]["stage_b"]["optimizer"] == 5 * r["gate"]["steps"]["stage_b"]["optimizer"] > 0
    cost = result["cost"]
    assert 0 < cost["flops"]["ratio"] < 0.3 and cost["wall_seconds"]["ratio"] > 0  # hero: 5x the gate's steps

    # artifacts: the JSON of it all and the scatter
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"calibration.json", "calibration.png"} <= arts
    folder = local_artifacts(f"runs:/{parent.info.run_id}")
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["confusion"] == expected and len(saved["configurations"]) == 2
    assert {"agreement", "precision_promote", "precision_refuse", "cost", "fit", "proposal"} <= set(saved)
    assert (folder / "calibration.png").read_bytes()[:4] == b"\x89PNG"

    # the repeated command trains nothing: every chain is reused, the matrix is the same
    chains = {r.info.run_id for r in _runs(c, f"tags.`{CalibrateTag.ROLE}` != ''")}
    stages = len(_runs(c, "tags.`latentgate.phase` = 'stage_b'"))
    again = run_calibration(cs, open_checklist, echo=lines.append)
    assert again["run_id"] != result["run_id"] and again["confusion"] == expected
    assert all(r["gate"]["reused"] and r["hero"]["reused"] for r in again["configurations"])
    assert [(r["gate"]["run_id"], r["hero"]["run_id"]) for r in again["configurations"]] == \
        [(r["gate"]["run_id"], r["hero"]["run_id"]) for r in result["configurations"]]
    assert {r.info.run_id for r in _runs(c, f"tags.`{CalibrateTag.ROLE}` != ''")} == chains
    assert len(_runs(c, "tags.`latentgate.phase` = 'stage_b'")) == stages

    # what promote / analyze print about a candidate: the latest calibration
    first = result["configurations"][0]
    eval_run = first["gate"]["children"]["eval"]
    note = calibration_note(eval_run, first["verdict"])
    assert note.startswith(f"calibration (run {again['run_id'][:8]}, set micro, 2 configurations")
    # a promotion (not a dry run) records it on the model version
    name = f"lg-calibrate-{os.getpid()}"
    c.create_registered_model(name)
    mv = c.create_model_version(name, source=f"runs:/{eval_run}/checkpoint", run_id=eval_run)
    assert calibration_note(eval_run, first["verdict"], version=mv.version, name=name) == note
    recorded = json.loads(c.get_model_version(name, mv.version).tags["hero.calibration"])
    assert recorded["calibration_run"] == again["run_id"] and recorded["smoke_f1"] == first["smoke_f1"]
