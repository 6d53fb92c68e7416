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
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow

from latentgate.calibrate.figures import CalibrationStats, TargetReport
from latentgate.calibrate.plot import scatter
from latentgate.calibrate.records import (
    ByRole,
    CalibrationResult,
    ChainRecord,
    ConfigurationRecord,
    GateRow,
    StageSteps,
    json_safe,
)
from latentgate.calibrate.report import format_summary
from latentgate.calibrate.reuse import ReuseKey, reuse_key
from latentgate.calibrate.spec import CalibrationSet, Configuration
from latentgate.calibrate.stats import other_failures, outcome_at, summarize
from latentgate.config import Config, config_hash, flatten
from latentgate.errors import GateRefused, TrainingFault
from latentgate.phases.smoke import run_smoke
from latentgate.registry.calibration import PHASE, CalibrationSummary, Family
from latentgate.registry.checklist import Checklist, load_checklist
from latentgate.registry.gate import check_candidate
from latentgate.registry.hero_recipe import STAGES
from latentgate.schema import CalibrateTag, EvalKey, EvalPath, MlflowTag, Stage, Tag
from latentgate.tracking.lineage import base_from_run, client
from latentgate.tracking.runs import adopt_project_run, setup_experiment, tracked_run
from latentgate.train.flops import step_flops
from latentgate.train.workspace import build_workspace, load_splits

CHAIN_NAME = {"gate": "smoke", "hero": "hero-scale"}
DETERMINISTIC_FAILURES = (TrainingFault, GateRefused)


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


def chain_record(run_id: str, reused: bool, key: ReuseKey) -> ChainRecord:
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
        steps[stage] = StageSteps(optimizer=last.step if last else 0, micro=int(last.value) if last else 0)
    ev = children.get("eval")
    finished = ev is not None and ev.info.status == "FINISHED"
    f1 = ev.data.metrics.get(EvalKey.metric(EvalPath.LATENT, EvalKey.F1)) if finished else None
    total = _seconds(run)
    return ChainRecord(
        run_id=run_id, status=run.info.status, reused=reused, reuse_key=key,
        commit=run.data.tags.get(CalibrateTag.COMMIT, key.git_commit), error=run.data.tags.get(Tag.ERROR, ""),
        children={p: k.info.run_id for p, k in children.items()}, latent_f1=json_safe(f1), steps=steps,  # nan: no F1
        wall_seconds=total - (_seconds(children["base"]) if "base" in children else 0.0),
        wall_seconds_with_base=total,
        # where the time went: each phase's run, and the chain's own work between them (start-up, store)
        phase_seconds={**{p: _seconds(k) for p, k in children.items()},
                       "between": total - sum(_seconds(k) for k in children.values())})


def _seconds(run) -> float:
    return ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000


def run_chain(role: str, conf: Configuration, cfg: Config, echo, allow_other_commit: bool = False) -> ChainRecord:
    """Reuse the chain for (role, cfg) with the same reuse key (any commit when `allow_other_commit`), or run it."""
    key = reuse_key(role, cfg)
    found = find_chain(key, cfg) or (find_chain(key, cfg, allow_other_commit=True) if allow_other_commit else None)
    if found:
        rec = chain_record(found, reused=True, key=key)
        other = f", trained at commit {rec.commit[:12]}" if rec.commit != key.git_commit else ""
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


def _flops(chain: ChainRecord, per_micro: dict[str, float]) -> float:
    return sum(per_micro[s] * chain.micro_steps(s) for s in STAGES)


def judge(gate: ChainRecord, checklist: Checklist) -> tuple[bool, tuple[GateRow, ...] | None, tuple[str, ...]]:
    """The checklist's verdict on the gate chain's eval run, read-only (registry.gate.check_candidate moves no alias):
    (passed, report rows, failing criteria and missing evidence). A chain that failed is refused. Each row keeps
    `failure`: every reason it fails besides its threshold (the threshold proposal never re-judges those)."""
    eval_run = gate.children.get("eval")
    if not gate.finished or not eval_run:
        return False, None, (f"gate chain {gate.status}: {gate.error or 'no eval run'}",)
    report = check_candidate(eval_run, checklist)
    rows = tuple(GateRow.of(r, other_failures(r, checklist)) for r in report.rows)
    return bool(report.passed), rows, (*report.failing(), *report.missing)


def run_configuration(conf: Configuration, checklist, target: float, echo,
                      allow_other_commit: bool = False) -> ConfigurationRecord:
    gate = run_chain("gate", conf, conf.gate, echo, allow_other_commit)
    verdict, rows, failing = judge(gate, checklist)
    hero = run_chain("hero", conf, conf.hero, echo, allow_other_commit)
    ran = any(chain.micro_steps(s) for chain in (gate, hero) for s in STAGES)
    base_run = gate.children.get("base") or hero.children.get("base")
    per_micro = micro_step_flops(conf.gate, base_run) if ran else {s: 0.0 for s in STAGES}
    rec = ConfigurationRecord(
        name=conf.name, expect=conf.expect, preset=conf.preset, overrides=conf.overrides, split=conf.split,
        verdict=verdict, failing=failing, rows=rows, outcome=outcome_at(hero.latent_f1, hero.finished, target),
        hero_finished=hero.finished, family=Family.of(conf.gate), smoke_f1=gate.latent_f1, hero_f1=hero.latent_f1,
        flops=ByRole(_flops(gate, per_micro), _flops(hero, per_micro)), micro_step_flops=per_micro,
        config_hash=ByRole(config_hash(conf.gate), config_hash(conf.hero)), gate=gate, hero=hero)
    f1 = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    echo(f"  verdict {'PROMOTE' if verdict else 'REFUSE'} (smoke F1 {f1(rec.smoke_f1)}); hero F1 "
         f"{f1(rec.hero_f1)} -> {'success' if rec.outcome else 'failure'}; "
         f"{'agree' if rec.agree else 'DISAGREE'}")
    return rec


def _child(rec: ConfigurationRecord, cfg: Config) -> str:
    tags = {Tag.PHASE: "calibrate.configuration", CalibrateTag.CONFIGURATION: rec.name,
            CalibrateTag.SPLIT: rec.split, CalibrateTag.EXPECT: rec.expect,
            CalibrateTag.VERDICT: "promote" if rec.verdict else "refuse",
            CalibrateTag.OUTCOME: "success" if rec.outcome else "failure",
            CalibrateTag.GATE_RUN: rec.gate.run_id, CalibrateTag.HERO_RUN: rec.hero.run_id,
            CalibrateTag.REUSED: ",".join(rec.reused()) or "none"}
    with tracked_run(rec.name, nested=True, tags=tags) as tr:
        tr.log_params(flatten(cfg))
        metrics = {"smoke_latent_f1": rec.smoke_f1, "hero_latent_f1": rec.hero_f1,
                   "gate_flops": rec.flops.gate, "hero_flops": rec.flops.hero,
                   "gate_wall_seconds": rec.wall_seconds.gate, "hero_wall_seconds": rec.wall_seconds.hero,
                   "verdict_promote": float(rec.verdict), "outcome_success": float(rec.outcome)}
        tr.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=0)
        tr.log_dict(rec.to_dict(), "configuration.json")
        tr.set_description(f"{rec.name} ({rec.expect}): verdict {tags[CalibrateTag.VERDICT]}, "
                           f"hero {tags[CalibrateTag.OUTCOME]}; gate run {rec.gate.run_id}, "
                           f"hero run {rec.hero.run_id}")
        return tr.run_id


def promotion_summary(cs: CalibrationSet, run_id: str, stats: CalibrationStats,
                      records: tuple[ConfigurationRecord, ...], checklist_sha256: str = "") -> CalibrationSummary:
    """The small part of a calibration that `promote` and `analyze` need (a run tag: no artifact download): the
    figures at the checklist's hero target, and the family it measured."""
    return CalibrationSummary(set=cs.name, run_id=run_id, hero_f1_target=stats.hero_f1_target, n=stats.rates.n,
                              confusion=stats.confusion, fit=None if stats.fit is None else stats.fit.line,
                              heldout=stats.heldout[0].confusion, hero_scale=float(cs.hero_scale),
                              families=tuple(dict.fromkeys(r.family for r in records)),
                              checklist_sha256=checklist_sha256)


def run_calibration(cs: CalibrationSet, checklist_path=None, echo=print,
                    allow_other_commit: bool = False) -> CalibrationResult:
    cl = load_checklist(checklist_path)
    target = cl.hero_f1_target()
    setup_experiment(cs.configurations[0].gate.run.experiment)
    project_run = adopt_project_run()  # the chains are runs of their own; `mlflow run`'s run becomes the parent
    judged = []
    for i, conf in enumerate(cs.configurations, 1):
        echo(f"[{i}/{len(cs.configurations)}] {conf.name} ({conf.expect}, {conf.split})")
        judged.append(run_configuration(conf, cl, target, echo, allow_other_commit))
    stats = summarize(judged, target)
    # each record's leave-one-out verdict at the checklist's target
    records = tuple(replace(rec, heldout_verdict=held)
                    for rec, held in zip(judged, stats.heldout[0].verdicts, strict=True))
    setup_experiment(cs.configurations[0].gate.run.experiment)
    with tracked_run(f"calibrate {cs.name}", nested=False, run_id=project_run,
                     tags={Tag.PHASE: PHASE, CalibrateTag.SET: cs.name}) as parent:
        records = tuple(replace(rec, child_run=_child(rec, conf.gate))
                        for rec, conf in zip(records, cs.configurations, strict=True))
        parent.log_params({"calibrate.set": cs.name, "calibrate.set_sha256": cs.sha256,
                           "calibrate.hero_scale": cs.hero_scale, "calibrate.hero_f1_target": target,
                           "calibrate.checklist": str(cl.path), "calibrate.checklist_sha256": cl.sha256,
                           "calibrate.allow_other_commit": allow_other_commit,
                           "calibrate.chain_commits": ",".join(sorted({chain.commit[:12] for r in records
                                                                       for chain in r.chains().values()}))})
        parent.log_metrics(summary_metrics(stats), step=0)
        result = CalibrationResult(run_id=parent.run_id, set=cs, checklist_path=str(cl.path),
                                   checklist_sha256=cl.sha256, stats=stats, configurations=records)
        parent.log_dict(result.to_dict(), "calibration.json")
        with tempfile.TemporaryDirectory(prefix="latentgate-calibrate-") as tmp:
            png = scatter(records, stats, Path(tmp) / "calibration.png", title=f"calibrate {cs.name}")
            parent.log_artifact(png)
        tag = promotion_summary(cs, parent.run_id, stats, records, cl.sha256).to_dict()
        parent.set_tags({CalibrateTag.SUMMARY: json.dumps(json_safe(tag), sort_keys=True)})
        parent.set_description(format_summary(result))
    return result


def summary_metrics(stats: CalibrationStats) -> dict[str, float]:
    """The calibration's figures as parent-run metrics (those with a number)."""
    rates, line = stats.rates, stats.fit.line if stats.fit else None
    fit = {} if line is None else {"fit_slope": line.slope, "fit_intercept": line.intercept, "fit_residual_sd": line.s}
    metrics = {**{f"confusion_{k}": v for k, v in stats.confusion.to_dict().items()}, "n": rates.n,
               "agreement": rates.agreement, "precision_promote": rates.precision_promote,
               "precision_refuse": rates.precision_refuse, "cost_ratio_flops": stats.flops.ratio,
               "cost_ratio_wall": stats.wall_seconds.ratio, **fit, **heldout_metrics(stats.heldout[0])}
    return {k: v for k, v in metrics.items() if v is not None}


def heldout_metrics(h: TargetReport) -> dict:
    """The leave-one-out figures at the checklist's hero target, as parent-run metrics."""
    return {**{f"heldout_confusion_{k}": v for k, v in h.confusion.to_dict().items()},
            "heldout_agreement": h.agreement, "heldout_agreement_wilson_low": h.agreement_wilson[0],
            "heldout_agreement_wilson_high": h.agreement_wilson[1],
            "heldout_precision_promote": h.precision_promote, "heldout_failures_refused": h.failures_refused}
