"""Run a calibration set: for each configuration, the smoke-scale chain and its checklist verdict (read-only: no
alias moves), then the hero-scale chain and its outcome; then one parent run `calibrate <set>` with a child run per
configuration, the statistics, calibration.json and calibration.png.

A chain is `phases.smoke.run_smoke` (base -> stage_a -> stage_b -> eval under one parent run), tagged with its role
(gate | hero) and its reuse key (calibrate/reuse.py: role, resolved config, git commit, data digests, base weights).
A FINISHED chain with the same role and key is reused, never retrained; so is one that FAILED on a deterministic
fault (non-finite loss or gradient, the base LM's sanity gate), which is itself an outcome (the gate refuses it; a
hero that fails is a failed hero). The hero of a configuration is registry/hero_recipe.hero_plan(gate config,
hero_scale): the hero `latentgate hero` would run had the gate run been promoted.

Compute is counted from what ran: each stage's micro-steps (its `<stage>/micro_step` metric) times the model FLOPs of
one micro-step (`train.flops.step_flops` on a batch of the stage's size). The base LM is shared by both scales
and is not counted; nor is eval, the same at both scales. Wall time is each chain's run duration less its base run's
(training the shared base LM, or reusing it).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import mlflow

from latentgate.calibrate.plot import scatter
from latentgate.calibrate.reuse import ReuseKey, reuse_key
from latentgate.calibrate.spec import CalibrationSet, Configuration
from latentgate.calibrate.stats import other_failures, outcome_at, summarize
from latentgate.config import Config, config_hash, flatten
from latentgate.errors import GateRefused, TrainingFault
from latentgate.phases.smoke import run_smoke
from latentgate.registry.calibration import PHASE, CalibrationSummary, Confusion, Family, LineFit
from latentgate.registry.checklist import Checklist, load_checklist
from latentgate.registry.gate import check_candidate
from latentgate.schema import CalibrateTag, Calibration, EvalKey, EvalPath, MlflowTag, Stage, Summary, Tag
from latentgate.tracking.lineage import base_from_run, client
from latentgate.tracking.runs import adopt_project_run, setup_experiment, tracked_run
from latentgate.train.flops import step_flops
from latentgate.train.workspace import build_workspace, load_splits

CHAIN_NAME = {"gate": "smoke", "hero": "hero-scale"}
DETERMINISTIC_FAILURES = (TrainingFault, GateRefused)
STAGES = ("stage_a", "stage_b")


def _experiment_id(cfg: Config) -> str | None:
    exp = mlflow.get_experiment_by_name(cfg.run.experiment)
    return exp.experiment_id if exp else None


def find_chain(key: ReuseKey, cfg: Config, allow_other_commit: bool = False) -> str | None:
    """The newest reusable chain run with this reuse key: FINISHED, or FAILED on a deterministic fault.
    Interrupted (KILLED) and other failed chains are run again. `allow_other_commit`: a chain trained at another git
    commit with everything else the same also counts (the caller records which commit it came from)."""
    exp = _experiment_id(cfg)
    if exp is None:
        return None
    tag, digest = ((CalibrateTag.REUSE_KEY_ANY_COMMIT, key.any_commit()) if allow_other_commit
                   else (CalibrateTag.REUSE_KEY, key.digest()))
    runs = client().search_runs([exp], order_by=["attributes.start_time DESC"], max_results=20,
                                 filter_string=f"tags.`{CalibrateTag.ROLE}` = '{key.entry_point}' and "
                                               f"tags.`{tag}` = '{digest}'")
    reusable = {e.__name__ for e in DETERMINISTIC_FAILURES}
    for run in runs:
        status, error_type = run.info.status, run.data.tags.get(Tag.ERROR_TYPE)
        if status == "FINISHED" or (status == "FAILED" and error_type in reusable):
            return run.info.run_id
    return None


def chain_record(run_id: str, reused: bool, key: ReuseKey) -> dict:
    """What the calibration reads from a chain run: status, child runs by phase, latent F1, the optimizer and
    micro-steps each stage ran, the run's wall time, and the reuse key it was found or tagged with."""
    c = client()
    run = c.get_run(run_id)
    kids = c.search_runs([run.info.experiment_id], filter_string=f"tags.`{MlflowTag.PARENT_RUN}` = '{run_id}'",
                         order_by=["attributes.start_time ASC"])
    children = {k.data.tags.get(Tag.PHASE, ""): k for k in kids}
    steps = {}
    for stage in STAGES:
        metric = Stage.metric(stage, Stage.MICRO_STEP)
        hist = c.get_metric_history(children[stage].info.run_id, metric) if stage in children else []
        last = max(hist, key=lambda m: m.step) if hist else None
        steps[stage] = {"optimizer": last.step if last else 0, "micro": int(last.value) if last else 0}
    ev = children.get("eval")
    finished = ev is not None and ev.info.status == "FINISHED"
    f1 = ev.data.metrics.get(EvalKey.metric(EvalPath.LATENT, EvalKey.F1)) if finished else None
    total = _seconds(run)
    return {"run_id": run_id, "status": run.info.status, "reused": reused, "reuse_key": key.to_dict(),
            "commit": run.data.tags.get(CalibrateTag.COMMIT, key.git_commit),
            "error": run.data.tags.get(Tag.ERROR, ""),
            "children": {p: k.info.run_id for p, k in children.items()}, Summary.LATENT_F1: f1, "steps": steps,
            "wall_seconds": total - (_seconds(children["base"]) if "base" in children else 0.0),
            "wall_seconds_with_base": total,
            # where the time went: each phase's run, and the chain's own work between them (start-up, store)
            "phase_seconds": {**{p: _seconds(k) for p, k in children.items()},
                              "between": total - sum(_seconds(k) for k in children.values())}}


def _seconds(run) -> float:
    return ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000


def run_chain(role: str, conf: Configuration, cfg: Config, echo, allow_other_commit: bool = False) -> dict:
    """Reuse the chain for (role, cfg) with the same reuse key (any commit when `allow_other_commit`), or run it."""
    key = reuse_key(role, cfg)
    found = find_chain(key, cfg) or (find_chain(key, cfg, allow_other_commit=True) if allow_other_commit else None)
    if found:
        rec = chain_record(found, reused=True, key=key)
        other = f", trained at commit {rec['commit'][:12]}" if rec["commit"] != key.git_commit else ""
        echo(f"  {role}: reusing run {found} (reuse key {key.digest()}{other})")
        return rec
    echo(f"  {role}: running {CHAIN_NAME[role]} (stage_a {cfg.stage_a.steps} + stage_b {cfg.stage_b.steps} "
         "optimizer steps)")
    tags = {CalibrateTag.ROLE: role, CalibrateTag.CONFIG_HASH: config_hash(cfg), CalibrateTag.REUSE_KEY: key.digest(),
            CalibrateTag.REUSE_KEY_ANY_COMMIT: key.any_commit(), CalibrateTag.COMMIT: key.git_commit,
            CalibrateTag.CONFIGURATION: conf.name}
    try:
        run_id = run_smoke(cfg, conf.preset, name=CHAIN_NAME[role], tags=tags).run_id
    except DETERMINISTIC_FAILURES as err:
        echo(f"  {role}: failed ({type(err).__name__}: {str(err)[:160]}); recorded as an outcome")
        run_id = find_chain(key, cfg)
        if run_id is None:  # the chain's run did not record the fault: nothing to judge, so stop here
            raise
    return chain_record(run_id, reused=False, key=key)


def micro_step_flops(cfg: Config, base_run: str) -> dict[str, float]:
    """Model FLOPs of one micro-step of each stage, counted by `train.flops.step_flops` on the first batch
    of the training split (its KD term follows the stage's own kd_weight)."""
    ws = build_workspace(cfg, base_from_run(base_run).dir, load_splits(cfg))
    out = {}
    for stage in STAGES:
        st = getattr(cfg, stage)
        out[stage] = step_flops(ws, st, ws.splits["train"][: st.batch_size])[0]
    return out


def _flops(chain: dict, per_micro: dict[str, float]) -> float:
    return sum(per_micro[s] * chain["steps"][s]["micro"] for s in STAGES)


def _clean(v):
    """JSON-safe: non-finite floats become None (what the statistics read as 'no number')."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def judge(gate: dict, checklist: Checklist) -> tuple[bool, list[dict] | None, list[str]]:
    """The checklist's verdict on the gate chain's eval run, read-only (registry.gate.check_candidate moves no alias):
    (passed, report rows, failing criteria and missing evidence). A chain that failed is refused. Each row keeps
    `failure`: every reason it fails besides its threshold (the threshold proposal never re-judges those)."""
    eval_run = gate["children"].get("eval")
    if gate["status"] != "FINISHED" or not eval_run:
        return False, None, [f"gate chain {gate['status']}: {gate['error'] or 'no eval run'}"]
    report = check_candidate(eval_run, checklist)
    kept = ("name", "kind", "passed", "observed", "op", "threshold", "missing", "decides")
    rows = [_clean({**{k: getattr(r, k) for k in kept},
                    "failure": other_failures(r, checklist)}) for r in report.rows]
    return bool(report.passed), rows, report.failing() + list(report.missing)


def run_configuration(conf: Configuration, checklist, target: float, echo, allow_other_commit: bool = False) -> dict:
    gate = run_chain("gate", conf, conf.gate, echo, allow_other_commit)
    verdict, rows, failing = judge(gate, checklist)
    hero = run_chain("hero", conf, conf.hero, echo, allow_other_commit)
    hero_f1 = hero[Summary.LATENT_F1]
    hero_finished = hero["status"] == "FINISHED"
    outcome = outcome_at({Calibration.HERO_F1: hero_f1, "hero_finished": hero_finished}, target)
    ran = any(chain["steps"][s]["micro"] for chain in (gate, hero) for s in STAGES)
    base_run = gate["children"].get("base") or hero["children"].get("base")
    per_micro = micro_step_flops(conf.gate, base_run) if ran else {s: 0.0 for s in STAGES}
    rec = {"name": conf.name, "expect": conf.expect, "preset": conf.preset, "overrides": conf.overrides,
           "split": conf.split, "verdict": verdict, "failing": failing, "rows": rows, "outcome": outcome,
           "hero_finished": hero_finished, "family": Family.of(conf.gate).to_dict(),
           Calibration.SMOKE_F1: gate[Summary.LATENT_F1], Calibration.HERO_F1: hero_f1, "agree": verdict == outcome,
           "flops": {"gate": _flops(gate, per_micro), "hero": _flops(hero, per_micro)},
           "micro_step_flops": per_micro,
           "wall_seconds": {"gate": gate["wall_seconds"], "hero": hero["wall_seconds"]},
           "config_hash": {"gate": config_hash(conf.gate), "hero": config_hash(conf.hero)},
           "gate": gate, "hero": hero}
    f1 = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    echo(f"  verdict {'PROMOTE' if verdict else 'REFUSE'} (smoke F1 {f1(gate[Summary.LATENT_F1])}); hero F1 "
         f"{f1(hero_f1)} -> {'success' if outcome else 'failure'}; "
         f"{'agree' if rec['agree'] else 'DISAGREE'}")
    return rec


def _child(rec: dict, cfg: Config) -> str:
    tags = {Tag.PHASE: "calibrate.configuration", CalibrateTag.CONFIGURATION: rec["name"],
            CalibrateTag.SPLIT: rec["split"], CalibrateTag.EXPECT: rec["expect"],
            CalibrateTag.VERDICT: "promote" if rec["verdict"] else "refuse",
            CalibrateTag.OUTCOME: "success" if rec["outcome"] else "failure",
            CalibrateTag.GATE_RUN: rec["gate"]["run_id"], CalibrateTag.HERO_RUN: rec["hero"]["run_id"],
            CalibrateTag.REUSED: ",".join(r for r in ("gate", "hero") if rec[r]["reused"]) or "none"}
    with tracked_run(rec["name"], nested=True, tags=tags) as tr:
        tr.log_params(flatten(cfg))
        metrics = {"smoke_latent_f1": rec[Calibration.SMOKE_F1], "hero_latent_f1": rec[Calibration.HERO_F1],
                   "gate_flops": rec["flops"]["gate"], "hero_flops": rec["flops"]["hero"],
                   "gate_wall_seconds": rec["wall_seconds"]["gate"], "hero_wall_seconds": rec["wall_seconds"]["hero"],
                   "verdict_promote": float(rec["verdict"]), "outcome_success": float(rec["outcome"])}
        tr.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=0)
        tr.log_dict(rec, "configuration.json")
        tr.set_description(f"{rec['name']} ({rec['expect']}): verdict {tags[CalibrateTag.VERDICT]}, "
                           f"hero {tags[CalibrateTag.OUTCOME]}; gate run {rec['gate']['run_id']}, "
                           f"hero run {rec['hero']['run_id']}")
        return tr.run_id


def promotion_summary(cs: CalibrationSet, run_id: str, summary: dict, records: list[dict],
                      checklist_sha256: str = "") -> CalibrationSummary:
    """The small part of a calibration that `promote` and `analyze` need (a run tag: no artifact download): the
    figures at the checklist's hero target, and the family it measured."""
    families = tuple(dict.fromkeys(Family.from_dict(r["family"]) for r in records))
    fit = summary["fit"]
    return CalibrationSummary(set=cs.name, run_id=run_id, hero_f1_target=summary[Calibration.HERO_F1_TARGET],
                              n=summary["n"], confusion=Confusion.from_dict(summary["confusion"]),
                              fit=None if fit is None else LineFit.from_dict(fit),
                              heldout=Confusion.from_dict(summary["heldout"][0]["confusion"]),
                              hero_scale=float(cs.hero_scale), families=families, checklist_sha256=checklist_sha256)


def run_calibration(cs: CalibrationSet, checklist_path=None, echo=print, allow_other_commit: bool = False) -> dict:
    cl = load_checklist(checklist_path)
    target = cl.hero_f1_target()
    setup_experiment(cs.configurations[0].gate.run.experiment)
    project_run = adopt_project_run()  # the chains are runs of their own; `mlflow run`'s run becomes the parent
    records = []
    for i, conf in enumerate(cs.configurations, 1):
        echo(f"[{i}/{len(cs.configurations)}] {conf.name} ({conf.expect}, {conf.split})")
        records.append(run_configuration(conf, cl, target, echo, allow_other_commit))
    summary = summarize(records, target)
    for rec, held in zip(records, summary["heldout"][0]["verdicts"], strict=True):
        rec["heldout_verdict"] = held  # the leave-one-out verdict at the checklist's target
    setup_experiment(cs.configurations[0].gate.run.experiment)
    with tracked_run(f"calibrate {cs.name}", nested=False, run_id=project_run,
                     tags={Tag.PHASE: PHASE, CalibrateTag.SET: cs.name}) as parent:
        for rec, conf in zip(records, cs.configurations, strict=True):
            rec["child_run"] = _child(rec, conf.gate)
        parent.log_params({"calibrate.set": cs.name, "calibrate.set_sha256": cs.sha256,
                           "calibrate.hero_scale": cs.hero_scale, "calibrate.hero_f1_target": target,
                           "calibrate.checklist": str(cl.path), "calibrate.checklist_sha256": cl.sha256,
                           "calibrate.allow_other_commit": allow_other_commit,
                           "calibrate.chain_commits": ",".join(sorted({r[k]["commit"][:12] for r in records
                                                                       for k in ("gate", "hero")}))})
        c, fit, cost = summary["confusion"], summary["fit"] or {}, summary["cost"]
        metrics = {**{f"confusion_{k}": v for k, v in c.items()}, "n": summary["n"],
                   "agreement": summary["agreement"], "precision_promote": summary["precision_promote"],
                   "precision_refuse": summary["precision_refuse"], "cost_ratio_flops": cost["flops"]["ratio"],
                   "cost_ratio_wall": cost["wall_seconds"]["ratio"], "fit_slope": fit.get("slope"),
                   "fit_intercept": fit.get("intercept"), "fit_residual_sd": fit.get("s"),
                   **heldout_metrics(summary["heldout"][0])}
        parent.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=0)
        result = _clean({"run_id": parent.run_id, "set": cs.to_dict(),
                         "checklist": {"path": str(cl.path), "sha256": cl.sha256}, **summary,
                         "configurations": records})
        parent.log_dict(result, "calibration.json")
        with tempfile.TemporaryDirectory(prefix="latentgate-calibrate-") as tmp:
            png = scatter(records, summary, Path(tmp) / "calibration.png", title=f"calibrate {cs.name}")
            parent.log_artifact(png)
        tag = promotion_summary(cs, parent.run_id, summary, records, cl.sha256).to_dict()
        parent.set_tags({CalibrateTag.SUMMARY: json.dumps(_clean(tag), sort_keys=True)})
        parent.set_description(format_summary(result))
    return result


def heldout_metrics(h: dict) -> dict:
    """The leave-one-out figures at the checklist's hero target, as parent-run metrics."""
    return {**{f"heldout_confusion_{k}": v for k, v in h["confusion"].items()},
            "heldout_agreement": h["agreement"], "heldout_agreement_wilson_low": h["agreement_wilson"][0],
            "heldout_agreement_wilson_high": h["agreement_wilson"][1],
            "heldout_precision_promote": h["precision_promote"], "heldout_failures_refused": h["failures_refused"]}


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def format_heldout(h: dict) -> str:
    c, (lo, hi) = h["confusion"], h["agreement_wilson"]
    return (f"  hero F1 >= {h['target']:g}: agreement {_pct(h['agreement'])} ({c['tp'] + c['tn']} of {h['n']}, 95% "
            f"Wilson [{lo:.0%}, {hi:.0%}]); precision of promote {_pct(h['precision_promote'])} (of "
            f"{h['n_promote']}); hero failures refused {_pct(h['failures_refused'])} (of {h['n_failures']}); "
            f"promote+success {c['tp']}, promote+failure {c['fp']}, refuse+success {c['fn']}, refuse+failure "
            f"{c['tn']}")


def format_summary(r: dict) -> str:
    c, cost, fit, prop = r["confusion"], r["cost"], r["fit"], r["proposal"]
    ratio = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [f"── latentgate calibrate {r['set']['name']}: {r['n']} configurations, hero target F1 >= "
             f"{r[Calibration.HERO_F1_TARGET]:g}, hero scale x{r['set']['hero_scale']} ──",
             f"{'configuration':20s} {'split':8s} {'verdict':8s} {'held out':8s} {'smoke F1':>8s} {'hero F1':>8s}  "
             "outcome   reused",
             *[f"{x['name']:20s} {x['split']:8s} {_word(x['verdict']):8s} {_word(x.get('heldout_verdict')):8s} "
               f"{_f(x[Calibration.SMOKE_F1]):>8s} {_f(x[Calibration.HERO_F1]):>8s}  "
               f"{'success' if x['outcome'] else 'failure':9s} "
               f"{','.join(k for k in ('gate', 'hero') if x[k]['reused']) or '-'}" for x in r["configurations"]],
             f"confusion (verdict vs hero): promote+success {c['tp']}, promote+failure {c['fp']}, "
             f"refuse+success {c['fn']}, refuse+failure {c['tn']}",
             f"agreement {_pct(r['agreement'])}; precision of promote {_pct(r['precision_promote'])} "
             f"(of {r['n_promote']}), of refuse {_pct(r['precision_refuse'])} (of {r['n_refuse']})",
             f"cost of the gate over the hero: {ratio(cost['flops']['ratio'])} of the FLOPs, "
             f"{ratio(cost['wall_seconds']['ratio'])} of the wall time",
             *[f"  {role} wall time by phase: " + ", ".join(f"{p} {sec:.0f} s" for p, sec in phases.items())
               for role, phases in cost.get("phase_seconds", {}).items()]]
    if fit:
        lines.append(f"hero F1 = {fit['intercept']:.3f} + {fit['slope']:.3f} x smoke F1 (n {fit['n']}, residual sd "
                     f"{fit['s']:.3f}, 95% prediction interval +-{fit['t']:.2f} x sd x sqrt(1 + 1/n + ...))")
    else:
        lines.append(f"no line fitted: {r['fit_points']} configuration(s) with both F1s, and a line needs 3 with "
                     "different smoke F1s")
    if prop["changes"]:
        changes = ", ".join(f"{n} {c['from']:g} -> {c['to']:g}" for n, c in prop["changes"].items())
        lines.append(f"proposed thresholds (fitted on {prop['fit']['n']}): {changes}; agreement on the "
                     f"{prop['holdout']['n']} held out: {_pct(prop['holdout']['before'])} -> "
                     f"{_pct(prop['holdout']['after'])} (fit split {_pct(prop['fit']['before'])} -> "
                     f"{_pct(prop['fit']['after'])})")
    else:
        lines.append(f"no threshold change proposed: the current ones agree best on the {prop['fit']['n']} fitted "
                     f"configurations ({_pct(prop['fit']['before'])}; held out {_pct(prop['holdout']['before'])})")
    lines.append(f"held-out verdicts (leave-one-out: thresholds refitted on the other {r['n'] - 1} configurations, "
                 "the left-out one judged with them):")
    lines += [format_heldout(h) for h in r["heldout"]]
    if r.get("shapes"):
        lines += format_shapes(r["shapes"])
    lines.append(f"run id {r['run_id']} (calibration.json, calibration.png)")
    return "\n".join(lines)


def format_shapes(shapes: list[dict]) -> list[str]:
    """Gate shapes side by side: held-out agreement (and the failed heroes refused) at each hero target."""
    targets = [rep["target"] for rep in shapes[0]["reports"]]
    width = max(len(x["shape"]) for x in shapes)
    head = f"{'gate shape (held out, but as written)':{width}s}" + "".join(
        f"  {'F1 >= ' + format(t, 'g'):>26s}" for t in targets)
    lines = ["gate shapes on the same runs: agreement [Wilson 95%], failed heroes refused", head]
    for x in shapes:
        cells = []
        for rep in x["reports"]:
            lo, hi = rep["agreement_wilson"]
            refused = "n/a" if rep["failures_refused"] is None else f"{rep['failures_refused']:.0%}"
            cells.append(f"{_pct(rep['agreement']):>4s} [{lo:.0%},{hi:.0%}] ref {refused:>4s}")
        lines.append(f"{x['shape']:{width}s}" + "".join(f"  {c:>26s}" for c in cells))
    return lines


def _word(verdict: bool | None) -> str:
    return "n/a" if verdict is None else "PROMOTE" if verdict else "REFUSE"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
