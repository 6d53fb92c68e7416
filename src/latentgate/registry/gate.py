"""The promotion gate: the alias `hero` moves only on evidence.

`check_candidate` is read-only. `promote` checks every criterion of the checklist, then, holding a registry lock:
removes `hero` first if this very version holds it and now fails; writes one tag per criterion
(`hero.check.<name>`), a JSON report artifact (`hero.report`) and the audit tag (`hero.audit`: rule file hash,
commit, time, decision); and moves the alias LAST, only when everything passed. A crash anywhere in between leaves
`hero` where it was (on a version whose audit passed) or nowhere, never on a failing version. The lock and the
writes themselves (check tags, events, the report artifact) are registry/writes.py; the report and its printed
table are registry/gate_report.py.

Whether the holder may start a hero (`verify`, `approved_version`) is registry/approval.py; what binds a version
to its evidence and weights is registry/binding.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException

from latentgate.errors import ConfigError, GateRefused, StoreError
from latentgate.registry.binding import bound_eval_run, pin_problems
from latentgate.registry.candidate import CandidateEvidence, Missing
from latentgate.registry.checklist import Checklist, load_checklist
from latentgate.registry.evidence import CHECKS, Observation
from latentgate.registry.gate_report import CheckRow, Report
from latentgate.registry.model import register_candidate
from latentgate.registry.writes import (
    TAG_MAX,
    add_event,
    alias_holder,
    log_report_artifact,
    registry_lock,
    write_check_tags,
)
from latentgate.schema import Tag, VersionTag
from latentgate.tracking.lineage import client
from latentgate.tracking.runs import git_commit
from latentgate.tracking.uris import RUN_ID, ModelUri, RunUri, parse_uri


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def commit_stamp() -> str:
    sha, dirty = git_commit()
    return sha + ("-dirty" if dirty else "")


def as_checklist(checklist) -> Checklist:
    return checklist if isinstance(checklist, Checklist) else load_checklist(checklist)


# ---- candidates ---------------------------------------------------------------------------------------------------

def _version_of(ref: str, name: str) -> str | None:
    """`<n>`, `<name>/<n>` or `models:/<name>/<n>` -> "<n>"; None for anything else."""
    parsed = parse_uri(ref)
    if isinstance(parsed, ModelUri):
        return parsed.version if parsed.name == name and parsed.version.isdigit() else None
    version = ref.removeprefix(f"{name}/")
    return version if version.isdigit() else None


def resolve_candidate(c, ref: str, name: str) -> tuple[str | None, str | None, list[str]]:
    """A version number (or models:/<name>/<n>), an eval run, a smoke run or a register run ->
    (version or None, eval run id or None, what is missing)."""
    ref = str(ref).strip()
    version = _version_of(ref, name)
    if version is not None:
        try:
            mv = c.get_model_version(name, version)
        except MlflowException:
            raise StoreError(f"model version {name}/{version} does not exist",
                             "register one: latentgate register <eval_run>") from None
        eval_run, problem = bound_eval_run(c, mv)
        return version, eval_run, [problem] if problem else []
    parsed = parse_uri(ref)
    run_id = parsed.run_id if isinstance(parsed, RunUri) else ref
    if not RUN_ID.match(run_id):
        raise GateRefused(f"{ref!r} is neither a model version nor a run id", "pass a version number or a run id")
    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise StoreError(f"run {run_id} does not exist in the tracking store",
                         "check the run id and MLFLOW_TRACKING_URI") from None
    phase = run.data.tags.get(Tag.PHASE)
    if phase == "eval":
        return None, run_id, []
    if phase == "register":
        return None, run.data.tags.get(Tag.EVAL_RUN), []
    if phase in ("smoke", "pipeline"):
        evals = []
        for cid in filter(None, run.data.tags.get(Tag.CHILDREN, "").split(",")):
            try:
                child = c.get_run(cid.strip())
            except MlflowException:
                continue
            if child.data.tags.get(Tag.PHASE) == "eval":
                evals.append(child)
        if evals:
            return None, max(evals, key=lambda r: r.info.start_time).info.run_id, []
        return None, None, [f"{phase} run {run_id}: no eval run among its {Tag.CHILDREN}"]
    raise GateRefused(f"run {run_id} is a {phase or 'non-latentgate'} run", "pass an eval or smoke run, or a version")


# ---- evaluation -----------------------------------------------------------------------------------------------

def _row(crit, obs) -> CheckRow:
    threshold = obs.threshold if obs.threshold is not None else crit.threshold
    passed = crit.compare(obs.observed, threshold) and not obs.missing and not obs.failure
    return CheckRow(crit.name, passed, obs.observed, crit.op, threshold, obs.source, obs.detail, list(obs.missing),
                    crit.kind, crit.description, crit.params, obs.step, dict(obs.shown),
                    None if obs.collapse is None else asdict(obs.collapse), crit.decides, crit.calibrated_by)


def check_candidate(version_or_eval_run: str, checklist=None, name: str | None = None, *,
                    checklist_path=None) -> Report:
    """Check every criterion of the checklist against the candidate's recorded evidence. Read-only. `checklist`
    (or `checklist_path`): a path or a loaded Checklist; default registry/hero.yaml."""
    cl = as_checklist(checklist if checklist is not None else checklist_path)
    name = name or cl.model_name
    c = client()
    version, eval_run, missing = resolve_candidate(c, version_or_eval_run, name)
    ev = CandidateEvidence(eval_run, c) if eval_run else None
    rows = []
    for crit in cl.criteria:
        if ev is None:
            obs = Observation(None, "", missing=list(missing))
        else:
            try:
                obs = CHECKS[crit.kind](ev, crit, cl)
            except Missing as err:
                obs = Observation(None, "", missing=[str(err)])
        rows.append(_row(crit, obs))
    # Missing evidence of a criterion that does not decide is shown on its row, and refuses nothing.
    all_missing = list(dict.fromkeys(missing + [m for r in rows if r.decides for m in r.missing]))
    passed = all(r.passed for r in rows if r.decides) and not all_missing
    return Report(candidate=str(version_or_eval_run), passed=passed,
                  rows=rows, missing=all_missing, version=version, eval_run=eval_run, model_name=name,
                  alias=cl.alias,
                  lineage=ev.lineage() if ev else {}, checklist=str(cl.path), checklist_sha256=cl.sha256,
                  time=utc_now(), commit=commit_stamp())


# ---- promote, demote ---------------------------------------------------------------------------------------

def promote(version: str, dry_run: bool = False, checklist=None, name: str | None = None, *,
            checklist_path=None) -> Report:
    """Check the candidate; unless dry_run, record the result on the version and move the alias only if all passed.
    A run id (eval/smoke) is registered first (`register_candidate`) unless dry_run."""
    cl = as_checklist(checklist if checklist is not None else checklist_path)
    name = name or cl.model_name
    report = check_candidate(version, cl, name)
    if dry_run:
        report.decision = "dry-run"
        return report
    if report.version is None:
        if not report.eval_run:
            raise GateRefused(f"{version}: nothing to register ({'; '.join(report.missing)})",
                              "pass a finished eval or smoke run, or a registered version")
        report.version = register_candidate(report.eval_run, name)
    c = client()
    v = report.version
    with registry_lock(name):
        holder = alias_holder(c, name, cl.alias)
        mv = c.get_model_version(name, v)
        if not report.passed and holder == v:
            # A refusal never moves or removes an alias: the holder keeps the alias AND the tags of the promotion
            # that gave it (so they still agree); the refusal is a report and an event. `latentgate verify` shows
            # evidence that no longer passes; `latentgate demote` takes the alias off, on purpose.
            report.decision = "refused-holder"
            report_uri = log_report_artifact(c, mv, report)
            add_event(c, name, v,
                      f"re-promotion refused, {cl.alias} kept: {', '.join(report.failing())} ({report_uri})")
            return report
        write_check_tags(c, mv, report, cl)
        pin = pin_problems(c, mv, name) if report.passed else []
        if pin:  # the evidence passed, but the checkpoint is not the one it describes
            report.passed = False
            report.missing += pin
        report.decision = "promoted" if report.passed else "refused"
        report_uri = log_report_artifact(c, mv, report)
        audit = {"decision": "promote" if report.passed else "refuse", "passed": report.passed, "version": v,
                 "eval_run": report.eval_run, "rules_file": report.checklist, "rules_sha256": report.checklist_sha256,
                 "commit": report.commit, "time": report.time, "failing": report.failing(), "report": report_uri,
                 "alias": cl.alias, "previous_holder": holder,
                 "checkpoint_sha256": c.get_run(mv.run_id).data.params.get(Tag.CHECKPOINT_SHA256) if report.passed
                 else None}
        c.set_model_version_tag(name, v, VersionTag.REPORT, report_uri)
        c.set_model_version_tag(name, v, VersionTag.PASSED, str(report.passed).lower())
        c.set_model_version_tag(name, v, VersionTag.AUDIT, json.dumps(audit, sort_keys=True)[:TAG_MAX])
        if report.passed:
            c.set_model_version_tag(name, v, VersionTag.CHECKPOINT_PIN, audit["checkpoint_sha256"])
            if VersionTag.SUPERSEDED_BY in mv.tags:  # promoted again, on its own evidence
                c.delete_model_version_tag(name, v, VersionTag.SUPERSEDED_BY)
            c.set_registered_model_alias(name, cl.alias, v)  # LAST: only after every tag landed
            add_event(c, name, v, f"promoted to {cl.alias} (previous holder: {holder or 'none'})")
            if holder and holder != v:
                c.set_model_version_tag(name, holder, VersionTag.SUPERSEDED_BY, v)
                add_event(c, name, holder, f"alias {cl.alias} moved to version {v}")
        else:
            add_event(c, name, v, f"refused: {', '.join(report.failing())}")
    return report


def demote(version: str, reason: str, to: str | None = None, checklist=None, name: str | None = None) -> dict:
    """Take `hero` off `version` (if it holds it) and mark its audit as demoted, keeping its tags as history.
    With `to`, then promote that version (the alias moves only if it passes)."""
    cl = as_checklist(checklist)
    name = name or cl.model_name
    if not reason or not reason.strip():
        raise GateRefused("a demotion needs a reason", "pass --reason '<why>'")

    c = client()
    v = _version_of(str(version), name) or str(version)
    with registry_lock(name):
        try:
            mv = c.get_model_version(name, v)
        except MlflowException:
            raise ConfigError(f"{name} has no version {v!r}", "pass an existing version (`latentgate verify` names "
                              "the one holding hero; the Models tab of `mlflow ui` lists them)") from None
        held = alias_holder(c, name, cl.alias) == v
        if held:
            c.delete_registered_model_alias(name, cl.alias)
        try:
            audit = json.loads(mv.tags.get(VersionTag.AUDIT, "{}"))
        except ValueError:
            audit = {}
        audit.update(decision="demote", passed=False, demoted_at=utc_now(), demote_reason=reason, version=v)
        c.set_model_version_tag(name, v, VersionTag.AUDIT, json.dumps(audit, sort_keys=True)[:TAG_MAX])
        c.set_model_version_tag(name, v, VersionTag.PASSED, "false")
        add_event(c, name, v, f"demoted{' (held ' + cl.alias + ')' if held else ''}: {reason}")
    out = {"version": v, "held_alias": held, "reason": reason, "promoted": None, "alias": cl.alias}
    if to:
        out["promoted"] = promote(to, checklist=cl, name=name)
    out["holder"] = alias_holder(c, name, cl.alias)
    return out
