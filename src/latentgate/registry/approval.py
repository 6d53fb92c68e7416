"""Whether the alias may start a hero: `verify` (the holder re-checked, as a report) and `approved_version` (the
holder, or GateRefused with every reason). Both require a passing promotion under the checklist in force, a
checkpoint that is still the pinned one, and evidence still bound to the version (registry/binding.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from latentgate.config import flatten, from_flat
from latentgate.errors import GateRefused
from latentgate.registry.binding import bound_eval_run, checkpoint_drift
from latentgate.registry.candidate import CandidateEvidence, Missing
from latentgate.registry.checklist import Checklist
from latentgate.registry.gate import as_checklist, check_candidate, commit_stamp, utc_now
from latentgate.registry.gate_report import CheckRow, Report
from latentgate.registry.hero_recipe import RECIPE, HeroPlan, hero_plan
from latentgate.registry.writes import TAG_MAX, alias_holder, tag_refuses
from latentgate.schema import Tag, VersionTag
from latentgate.tracking.lineage import client
from latentgate.tracking.tracker import full_params
from latentgate.tracking.uris import ModelUri


def audit_problems(mv, cl: Checklist) -> list[str]:
    """Why the alias on this version is not backed by a complete, passing promotion under the checklist in force
    ([] if it is)."""
    alias = cl.alias
    raw = mv.tags.get(VersionTag.AUDIT)
    if not raw:
        return [f"version {mv.version} has no {VersionTag.AUDIT} tag: alias {alias} was set by hand, "
                "not by `latentgate promote`"]
    try:
        audit = json.loads(raw)
    except ValueError:
        return [f"version {mv.version}: {VersionTag.AUDIT} is not valid JSON"]
    problems = []
    if audit.get("decision") != "promote" or audit.get("passed") is not True:
        problems.append(f"version {mv.version}: the audit says decision={audit.get('decision')} "
                        f"passed={audit.get('passed')}, so alias {alias} was set by hand")
    if str(audit.get("version")) != str(mv.version):
        problems.append(f"version {mv.version}: the audit names version {audit.get('version')}")
    if audit.get("rules_sha256") != cl.sha256:
        problems.append(f"version {mv.version} was promoted under checklist {audit.get('rules_file')} (sha256 "
                        f"{str(audit.get('rules_sha256'))[:12]}), not the one in force, {cl.path} (sha256 "
                        f"{cl.sha256[:12]})")
    if mv.tags.get(VersionTag.SUPERSEDED_BY):
        problems.append(f"version {mv.version} was superseded by version {mv.tags[VersionTag.SUPERSEDED_BY]}: "
                        f"alias {alias} was moved back by hand")
    if not audit.get("checkpoint_sha256") or mv.tags.get(VersionTag.CHECKPOINT_PIN) != audit.get("checkpoint_sha256"):
        problems.append(f"version {mv.version}: the promotion pinned no checkpoint (or the pin tag was edited)")
    checks = {k: v for k, v in mv.tags.items() if k.startswith(VersionTag.CHECK_PREFIX)}
    if not checks:
        problems.append(f"version {mv.version} has no {VersionTag.CHECK_PREFIX}* tags")
    problems += [f"version {mv.version}: {k} = {v[:120]}" for k, v in sorted(checks.items())
                 if tag_refuses(v)]
    return problems


def verify(checklist=None, name: str | None = None, *, checklist_path=None) -> Report:
    """Re-check the version holding `hero`: its audit (was the alias set by promote?) and its evidence now."""
    cl = as_checklist(checklist if checklist is not None else checklist_path)
    name = name or cl.model_name
    c = client()
    holder = alias_holder(c, name, cl.alias)
    if holder is None:
        return Report(candidate=f"models:/{name}@{cl.alias}", passed=False, rows=[], model_name=name,
                      alias=cl.alias,
                      missing=[f"no version of {name} holds alias {cl.alias}"], checklist=str(cl.path),
                      checklist_sha256=cl.sha256, decision="verified", time=utc_now(), commit=commit_stamp())
    mv = c.get_model_version(name, holder)
    problems = audit_problems(mv, cl) + checkpoint_drift(c, mv, name)
    report = check_candidate(holder, cl, name)
    audit_row = CheckRow(
        "audit", not problems, "; ".join(problems) or "promoted by the gate", "==", "audited promotion",
        source=f"version {holder} tags {VersionTag.AUDIT}, {VersionTag.CHECK_PREFIX}*",
        detail=mv.tags.get(VersionTag.AUDIT, "")[:300], kind="audit",
        description="the alias was moved by `latentgate promote` under the checklist in force after every criterion "
                    "passed, and the checkpoint is the one it pinned")
    report.rows.insert(0, audit_row)
    report.passed = report.passed and not problems
    report.candidate = f"models:/{name}@{cl.alias} (version {holder})"
    report.decision = "verified"
    return report


@dataclass(frozen=True)
class ApprovedVersion:
    """The version holding the alias, checked: what the hero run starts from."""

    name: str
    version: str
    uri: str  # models:/<name>@<alias>
    eval_run: str
    stage_b_run: str  # the run whose logged config is the approved recipe
    checklist: Checklist  # the checklist in force that approved it


def approved_version(checklist=None, name: str | None = None) -> ApprovedVersion:
    """The alias holder, after checking that a passing promotion under the checklist in force set the alias, that
    its checkpoint is the pinned one, and that its evidence still leads to a Stage B run. GateRefused otherwise."""
    cl = as_checklist(checklist)
    name, alias = name or cl.model_name, cl.alias
    c = client()
    holder = alias_holder(c, name, alias)
    if holder is None:
        raise GateRefused(f"no version of {name} holds alias {alias}",
                          "promote a candidate first: latentgate promote <version|eval_run>")
    mv = c.get_model_version(name, holder)
    problems = audit_problems(mv, cl) + checkpoint_drift(c, mv, name)
    eval_run, binding = bound_eval_run(c, mv)
    problems += [binding] if binding else []
    if problems:
        raise GateRefused(f"models:/{name}@{alias} (version {holder}) cannot start a hero: {'; '.join(problems)}",
                          f"run `latentgate verify`, then promote a candidate that passes under {cl.path.name} "
                          f"(`latentgate demote {holder} --reason ...` takes the alias off)")
    try:
        stage_b = CandidateEvidence(eval_run, c).run("stage_b")
    except Missing as err:
        raise GateRefused(f"version {holder}: {err}", "promote a candidate whose lineage is recorded") from None
    return ApprovedVersion(name, holder, str(ModelUri(name, alias=alias)), eval_run, stage_b.info.run_id, cl)


def hero_model_uri(checklist=None, name: str | None = None) -> str:
    """`models:/<name>@<alias>`, after `approved_version`'s checks."""
    return approved_version(checklist, name).uri


# ---- the hero a request would start ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HeroRequest:
    """What `latentgate hero` (and the pipeline's Phase 4) asks for; the config itself is the approved recipe's."""

    overrides: dict = field(default_factory=dict)  # runtime and budget keys; recipe keys with allow_recipe_change
    scale: float | None = None  # None: the checklist's hero.scale
    checklist: str | None = None  # the checklist in force (None: registry/hero.yaml)
    allow_recipe_change: bool = False


@dataclass(frozen=True)
class HeroStart:
    """The hero about to run (or, on a dry run, that would run)."""

    approved: ApprovedVersion
    plan: HeroPlan

    def tags(self) -> dict[str, str]:
        a, p = self.approved, self.plan
        return {Tag.HERO_FROM: a.uri, Tag.HERO_VERSION: a.version, Tag.HERO_APPROVED_RUN: a.stage_b_run,
                Tag.HERO_CHECKLIST: str(a.checklist.path), Tag.HERO_CHECKLIST_SHA256: a.checklist.sha256,
                Tag.HERO_SCALE: f"{p.scale:g}", Tag.HERO_DIFF: p.diff_json()[:TAG_MAX],
                Tag.HERO_RECIPE_CHANGES: ",".join(c.key for c in p.of_kind(RECIPE))}

    def as_text(self) -> str:
        a, p = self.approved, self.plan
        lines = [f"── latentgate hero: version {a.version} of {a.name} ({a.uri}), approved under "
                 f"{a.checklist.path.name} (sha256 {a.checklist.sha256[:12]}) ──",
                 f"approved recipe: Stage B run {a.stage_b_run} (eval run {a.eval_run}); hero budget "
                 f"x{p.scale:g}",
                 "diff from the approved recipe:", *[f"  {c.as_text()}" for c in p.changes],
                 "resolved config:", *[f"  {k} = {v!r}" for k, v in flatten(p.config).items()]]
        return "\n".join(lines)


def plan_hero(request: HeroRequest, name: str | None = None) -> HeroStart:
    """The checked approved version (of `name`, default the checklist's model_name) and the hero built from its
    recipe (registry/hero_recipe.py)."""
    approved = approved_version(request.checklist, name)  # GateRefused with the reasons when no valid alias
    recipe = from_flat(full_params(client().get_run(approved.stage_b_run)))  # long values: the artifact
    scale = request.scale if request.scale is not None else approved.checklist.hero_scale()
    return HeroStart(approved, hero_plan(recipe, scale, request.overrides, request.allow_recipe_change))
