"""Evidence for the readiness checklist: queries over what the runs recorded, never numbers typed in by hand.

One check per criterion kind, over a `CandidateEvidence` (registry/candidate.py: the lineage, its histories and
artifacts). Each check returns the observed value, the evidence source and what was missing. Missing evidence fails;
it never passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from latentgate.config import config_hash, from_flat
from latentgate.errors import ConfigError, did_you_mean
from latentgate.eval.controls import Collapse, row_collapse
from latentgate.eval_row import EvalRow
from latentgate.registry.candidate import CandidateEvidence, Missing, short_id
from latentgate.registry.checklist import ANY, Checklist, Criterion
from latentgate.registry.series import drop_from_peak, peak
from latentgate.schema import Artifact, EvalPath, Tag
from latentgate.tracking.tracker import digest_of_hashes, full_params


@dataclass
class Observation:
    observed: Any
    source: str
    detail: str = ""
    missing: list[str] = field(default_factory=list)
    threshold: Any = None  # overrides the criterion's threshold (dataset_digest: the pinned digest)
    failure: str = ""  # a reason the criterion fails whatever `observed` is (eval_collapse: one answer for many)
    step: int | None = None  # metric_peak / metric_final: the optimizer step the observed value is from
    shown: dict[str, float] = field(default_factory=dict)  # metric -> its value at `step` (the `show` param)
    collapse: Collapse | None = None  # eval_collapse: the statistics it judged



# ---- checks: one per criterion kind ----------------------------------------------------------------------------

def _at_step(ev: CandidateEvidence, c: Criterion, step: int) -> dict[str, float]:
    """The `show` metrics (e.g. the raw accuracy and the controls behind a lift) at one step."""
    shown = {}
    for key in c.params.get("show", []):
        try:
            at = {m.step: m.value for m in ev.history(c.params["run"], key)}
        except Missing:
            continue
        if step in at:
            shown[key] = at[step]
    return shown


def _shown_text(shown: dict[str, float]) -> str:
    return ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.4g}" for k, v in shown.items())


def check_metric_peak(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    hist = ev.history(c.params["run"], c.params["metric"])
    top = peak((m.step, m.value) for m in hist)
    if top is None:
        raise Missing(f"{ev.src(c.params['run'])}: {c.params['metric']} has no finite value")
    shown = _at_step(ev, c, top.step)
    return Observation(top.value, f"metric history {c.params['metric']} ({ev.src(c.params['run'])}, {len(hist)} "
                                  "points)",
                       f"peak at step {top.step}" + (f": {_shown_text(shown)}" if shown else ""), step=top.step,
                       shown=shown)


def check_metric_final(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    """The metric at the run's last optimizer step: the checkpoint that is registered and evaluated. A history
    that stops before the last step describes another checkpoint, so it is missing evidence, never a pass."""
    run = ev.run(c.params["run"])
    hist = ev.history(c.params["run"], c.params["metric"])
    last = hist[-1]
    steps = run.data.params.get(f"{c.params['run']}.steps", "")
    if steps.isdigit() and last.step != int(steps):
        raise Missing(f"{ev.src(c.params['run'])}: {c.params['metric']} was last recorded at step {last.step}, not "
                      f"at the final checkpoint (step {steps})")
    top = peak((m.step, m.value) for m in hist)
    at_peak = f"; peak {top.value:.4g} at step {top.step}" if top else ""
    shown = _at_step(ev, c, last.step)
    return Observation(last.value, f"metric history {c.params['metric']} ({ev.src(c.params['run'])}, "
                                   f"{len(hist)} points)",
                       f"at the final step {last.step}" + (f": {_shown_text(shown)}" if shown else "") + at_peak,
                       step=last.step, shown=shown)


def check_metric_final_drop(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    hist = ev.history(c.params["run"], c.params["metric"])
    top = peak((m.step, m.value) for m in hist)
    if top is None:
        raise Missing(f"{ev.src(c.params['run'])}: {c.params['metric']} has no finite value")
    final = hist[-1].value
    return Observation(drop_from_peak(top.value, final), f"metric history {c.params['metric']} "
                                                         f"({ev.src(c.params['run'])}, {len(hist)} points)",
                       f"peak {top.value:.4g}, final {final:.4g} at step {hist[-1].step}")


def extrapolate_log_step(points: list[tuple[int, float]], to_step: float) -> tuple[float, float]:
    """Least-squares y = a + b ln(step) through (step, value) points, read at `to_step`: (value there, slope b per
    e-fold of steps). Learning curves are close to straight in log(step) over a decade; a straight line in steps
    would promise a hero ten times the gate's gain."""
    xs = [math.log(s) for s, _ in points]
    ys = [v for _, v in points]
    n = len(xs)
    x_mean, y_mean = sum(xs) / n, sum(ys) / n
    sxx = sum((x - x_mean) ** 2 for x in xs)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sxx
    return y_mean + slope * (math.log(to_step) - x_mean), slope


def bounded(value: float, floor: float | None, ceiling: float | None) -> float:
    """`value` kept within [floor, ceiling]; a bound that is None does not apply."""
    if floor is not None:
        value = max(value, floor)
    if ceiling is not None:
        value = min(value, ceiling)
    return value


def check_metric_extrapolated(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    """A metric's learning curve extrapolated to the hero's budget: the run's steps x the checklist's hero.scale,
    by `extrapolate_log_step` over every finite point after step 0, then kept within [floor, ceiling] (an accuracy
    cannot pass 1, an NLL cannot fall below 0)."""
    run, metric = c.params["run"], c.params["metric"]
    hist = ev.history(run, metric)
    points = [(m.step, m.value) for m in hist if m.step >= 1 and math.isfinite(m.value)]
    if len({s for s, _ in points}) < 2:
        raise Missing(f"{ev.src(run)}: {metric} has {len(points)} finite point(s) after step 0; a curve needs 2 steps")
    steps = ev.run(run).data.params.get(f"{run}.steps", "")
    last = int(steps) if steps.isdigit() else points[-1][0]
    to_step = last * cl.hero_scale()
    value, slope = extrapolate_log_step(points, to_step)
    floor, ceiling = c.params.get("floor"), c.params.get("ceiling")
    clipped = bounded(value, floor, ceiling)
    return Observation(clipped, f"metric history {metric} ({ev.src(run)}, {len(points)} points)",
                       f"{points[-1][1]:.4g} at step {points[-1][0]}, {slope:+.4g} per e-fold of steps -> {value:.4g} "
                       f"at step {to_step:g} (the hero budget: x{cl.hero_scale():g})", step=points[-1][0])


def check_metric_max(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    values, sources, missing = [], [], []
    for phase in c.params["runs"]:
        key = c.params["metric"].format(run=phase)
        try:
            hist = ev.history(phase, key)
        except Missing as err:
            missing.append(str(err))
            continue
        values += [m.value for m in hist]
        sources.append(f"{key} ({ev.src(phase)})")
    if missing:
        return Observation(None, "metric histories " + ", ".join(sources), missing=missing)
    bad = [v for v in values if not math.isfinite(v)]
    observed = float("nan") if bad else max(values)
    return Observation(observed, "metric histories " + ", ".join(sources),
                       f"{len(bad)} non-finite values" if bad else f"{len(values)} points")


def check_nonfinite_steps(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    count, problems, sources, missing = 0, [], [], []
    for phase in c.params["runs"]:
        try:
            run = ev.run(phase)
        except Missing as err:
            missing.append(str(err))
            continue
        steps = run.data.params.get(f"{phase}.steps", "")
        for pattern in c.params["metrics"]:
            key = pattern.format(run=phase)
            try:
                hist = ev.history(phase, key)
            except Missing as err:
                missing.append(str(err))
                continue
            sources.append(f"{key} ({ev.src(phase)})")
            nonfinite = [m.step for m in hist if not math.isfinite(m.value)]
            logged = {m.step for m in hist}
            expected = set(range(1, int(steps) + 1)) if steps.isdigit() else set(range(min(logged), max(logged) + 1))
            skipped = sorted(expected - logged)
            if nonfinite:
                problems.append(f"{key}: non-finite at steps {nonfinite[:5]}")
            if skipped:
                problems.append(f"{key}: {len(skipped)} optimizer steps not logged (first {skipped[:5]})")
            count += len(nonfinite) + len(skipped)
    return Observation(None if missing else count, "metric histories " + ", ".join(sources),
                       "; ".join(problems) or "every optimizer step logged, all finite", missing=missing)


def _row_values(rows: list[EvalRow], name: str) -> list:
    """The field `name` (a criterion's `field:`) of every row; a name that is no eval row field is missing evidence."""
    if name not in EvalRow.FIELDS:
        raise Missing(f"{Artifact.EVAL_DETAILED} rows have no field {name!r} (fix the criterion's field: "
                      f"{did_you_mean(name, EvalRow.FIELDS, 'one of ' + ', '.join(EvalRow.FIELDS))})")
    return [r.value(name) for r in rows]


def check_eval_example_max(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    rows = ev.detailed_rows(c.params["path"])
    vals = [float("nan") if v is None else float(v) for v in _row_values(rows, c.params["field"])]
    best = max(vals)
    nonzero = sum(v > 0 for v in vals)
    return Observation(best, f"{Artifact.EVAL_DETAILED} ({ev.src('eval')}, {len(rows)} {c.params['path']} rows)",
                       f"{nonzero} of {len(rows)} examples with {c.params['field']} > 0")


def check_eval_metric(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    m = ev.eval_path_metrics(c.params["path"])
    if c.params["key"] not in m:
        raise Missing(f"eval run {short_id(ev.eval_run_id)}: {Artifact.EVAL_METRICS} paths.{c.params['path']} "
                      f"has no {c.params['key']}")
    return Observation(float(m[c.params["key"]]),
                       f"{Artifact.EVAL_METRICS} paths.{c.params['path']}.{c.params['key']} ({ev.src('eval')})",
                       f"n={m.get('n')}")


def check_eval_share(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    rows = ev.detailed_rows(c.params["path"])
    hits = sum(v == c.params["equals"] for v in _row_values(rows, c.params["field"]))
    return Observation(hits / len(rows),
                       f"{Artifact.EVAL_DETAILED} ({ev.src('eval')}, {len(rows)} {c.params['path']} rows)",
                       f"{hits} of {len(rows)} with {c.params['field']}={c.params['equals']}")


def check_eval_collapse(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    rule = cl.collapse_rule(c.name)
    st = row_collapse(ev.detailed_rows(c.params["path"]), rule.top_k)
    why = rule.judge(st)
    return Observation(st.repetition_rate, f"{Artifact.EVAL_DETAILED} ({ev.src('eval')}, {st.n} {c.params['path']} "
                                           "rows)", f"{why}; {st.as_text()}" if why else st.as_text(),
                       failure=why or "", collapse=st)


def check_eval_count(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    """How many eval examples the path was scored on: a tiny eval set passes any threshold by luck."""
    rows = ev.detailed_rows(c.params["path"])
    return Observation(len(rows), f"{Artifact.EVAL_DETAILED} ({ev.src('eval')})",
                       f"{len(rows)} {c.params['path']} rows")


def check_latent_margin(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    key = c.params["key"]
    main = float(ev.eval_path_metrics(c.params["path"])[key])
    controls, missing = {}, []
    for p in c.params["controls"]:
        try:
            controls[p] = float(ev.eval_path_metrics(p)[key])
        except Missing as err:
            missing.append(str(err))
    if missing:
        return Observation(None, f"{Artifact.EVAL_METRICS} ({ev.src('eval')})", missing=missing)
    best = max(controls, key=controls.get)
    return Observation(main - controls[best], f"{Artifact.EVAL_METRICS} paths.*.{key} ({ev.src('eval')})",
                       f"{c.params['path']} {main:.4g} vs " + ", ".join(f"{p} {v:.4g}" for p, v in controls.items()))


def check_lineage(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    problems, missing, found = [], [], {}
    for phase in c.params["runs"]:
        try:
            found[phase] = ev.run(phase)
        except Missing as err:
            missing.append(str(err))
            problems.append(f"{phase} run not found")
    for phase, run in found.items():
        if run.info.status != "FINISHED":
            problems.append(f"{phase} run {short_id(run.info.run_id)} is {run.info.status}")
        tag_phase = run.data.tags.get(Tag.PHASE)
        allowed = (phase, "extend", "fix") if phase == "stage_b" else (phase,)  # extend/fix continue Stage B
        if tag_phase not in allowed:
            problems.append(f"{phase} run {short_id(run.info.run_id)} is tagged {Tag.PHASE}={tag_phase}")
        if c.params.get("require_clean_tree") and run.data.tags.get(Tag.GIT_DIRTY) != "false":
            problems.append(f"{phase} run {short_id(run.info.run_id)} ran from a dirty working tree")
        resumed = run.data.tags.get(Tag.RESUMED_COMMITS, "")
        if len({x.strip() for x in resumed.split("->") if x.strip()}) > 1:  # one run, more than one version of code
            chain = " -> ".join(x.strip()[:10] for x in resumed.split("->"))
            problems.append(f"{phase} run {short_id(run.info.run_id)} resumed across commits {chain}")
    commits = {p: r.data.tags.get(Tag.GIT_COMMIT, "unknown") for p, r in found.items()}
    if any(v in ("", "unknown") for v in commits.values()):
        unknown = ", ".join(p for p, v in commits.items() if v in ("", "unknown"))
        problems.append(f"runs without a git commit: {unknown}")
    if len(set(commits.values())) > 1:
        problems.append("different git commits: " + ", ".join(f"{p}={v[:10]}" for p, v in commits.items()))
    if "stage_b" in found and "base" in found:
        sb_base = found["stage_b"].data.tags.get(Tag.BASE_RUN)
        if sb_base and sb_base != found["base"].info.run_id:
            problems.append(f"Stage B was trained on base run {short_id(sb_base)}, the eval used "
                            f"{short_id(found['base'].info.run_id)}")
    ids = ", ".join(f"{p}={short_id(r.info.run_id)}" for p, r in found.items())
    commit = next(iter(set(commits.values()))) if len(set(commits.values())) == 1 else "mixed"
    return Observation(len(problems), f"run tags + statuses ({ids})",
                       "; ".join(problems) or f"all FINISHED at commit {commit[:10]}", missing=missing)


def check_dataset_digest(ev: CandidateEvidence, c: Criterion, cl: Checklist) -> Observation:
    run = ev.run("eval")
    tag = Tag.dataset_digest(c.params["dataset"])
    digest = run.data.tags.get(tag)
    if not digest:
        raise Missing(f"eval run {short_id(run.info.run_id)}: no tag {tag}")
    try:
        data_hash = config_hash(from_flat(full_params(run)), ("data",))
    except ConfigError as err:
        raise Missing(f"eval run {short_id(run.info.run_id)}: its params do not rebuild a config ({err})") from None
    pinned = cl.pinned_digest(data_hash)
    source = f"{ev.src('eval')} tag {tag}, recomputed from {Artifact.EVAL_DETAILED}; pin for data config {data_hash} " \
             f"in {cl.path.name}"
    scored = _scored_digest(ev)
    if scored != digest:  # the tag is editable; the scored rows are what the evidence describes
        return Observation(scored, source, f"the scored rows hash to {scored}, the run's tag {tag} says {digest}: "
                           "the tag was edited after the eval, or the rows are not those of the recorded eval set",
                           threshold=pinned or "<not pinned>", failure="scored rows do not match the digest tag")
    if pinned is None:
        return Observation(digest, source, f"no digest pinned for data config {data_hash}: add "
                           f"'{data_hash}: {digest}' under eval_dataset_digest in {cl.path} if this eval set is "
                           "the intended one", threshold="<not pinned>")
    if pinned == ANY:
        return Observation(digest, source, "the checklist pins no eval set (eval_dataset_digest: any)",
                           threshold=digest)
    return Observation(digest, source, f"data config {data_hash}", threshold=pinned)


def _scored_digest(ev: CandidateEvidence) -> str:
    """The eval set's digest recomputed from the latent path's scored rows, in eval order."""
    rows = ev.detailed_rows(EvalPath.LATENT)
    hashes = [r.example_sha256 for r in rows]
    if not all(isinstance(h, str) and h for h in hashes):
        raise Missing(f"eval run {short_id(ev.eval_run_id)}: {Artifact.EVAL_DETAILED} rows carry no "
                      f"{EvalRow.EXAMPLE_SHA256} (scored by an older latentgate): re-run the eval")
    return digest_of_hashes(hashes)


CHECKS = {
    "metric_peak": check_metric_peak,
    "metric_final": check_metric_final,
    "metric_final_drop": check_metric_final_drop,
    "metric_max": check_metric_max,
    "nonfinite_steps": check_nonfinite_steps,
    "eval_example_max": check_eval_example_max,
    "eval_metric": check_eval_metric,
    "eval_share": check_eval_share,
    "eval_collapse": check_eval_collapse,
    "eval_count": check_eval_count,
    "latent_margin": check_latent_margin,
    "metric_extrapolated": check_metric_extrapolated,
    "lineage": check_lineage,
    "dataset_digest": check_dataset_digest,
}
