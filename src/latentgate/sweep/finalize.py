"""The end of a sweep: the best trial's evidence on the parent run, its model registered with the checks the gate
records, the study's plots, and the summary printed."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from optuna.trial import TrialState as S
from optuna.visualization import matplotlib as ov

from latentgate.registry.checklist import load_checklist
from latentgate.registry.gate import check_candidate
from latentgate.registry.gate_report import Report
from latentgate.registry.model import register_candidate, version_for_eval_run
from latentgate.registry.writes import alias_holder, registry_lock, write_check_tags
from latentgate.schema import StudyAttr, Summary, SweepTag, TrialAttr, VersionTag
from latentgate.sweep.stopping import progress
from latentgate.sweep.study import StudySpec
from latentgate.tracking import lineage

# ---- the end of a sweep ----------------------------------------------------------------------------------------

def finalize(study, spec: StudySpec, tr, echo=print, register: bool = True) -> dict:
    p = progress(study)
    trials = study.get_trials(deepcopy=False)
    steps = sum(int(t.user_attrs.get(TrialAttr.OPTIMIZER_STEPS, 0)) for t in trials)
    summary = {"study": spec.name, "complete": p.complete, "pruned": p.pruned, "failed": p.failed,
               "finished": p.done, "trials": p.total, "optimizer_steps": steps, "best": None,
               "stopped": study.user_attrs.get(StudyAttr.STOPPED) or ""}
    if summary["stopped"]:  # the stop rule ended the study before its budget: say so, and why
        tr.set_tags({SweepTag.STOPPED: summary["stopped"]})
        echo(f"study {spec.name} {summary['stopped']}")
    tr.log_metrics({"sweep/complete": p.complete, "sweep/pruned": p.pruned, "sweep/failed": p.failed,
                    "sweep/optimizer_steps": steps}, step=0)
    complete = [t for t in trials if t.state == S.COMPLETE]
    _log_plots(study, tr, echo)
    if not complete:
        tr.set_tags({SweepTag.BEST_TRIAL: "none"})
        echo("no trial completed: no best trial")
        return summary
    best = study.best_trial
    ua = best.user_attrs
    summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                       Summary.LATENT_F1: ua.get(TrialAttr.LATENT_F1),
                       Summary.LATENT_FIRST_TOP1: ua.get(TrialAttr.LATENT_FIRST_TOP1),
                       "trial_run_id": ua.get(TrialAttr.MLFLOW_RUN_ID), "eval_run_id": ua.get(TrialAttr.EVAL_RUN_ID),
                       "checkpoint_uri": ua.get(TrialAttr.CHECKPOINT_URI)}
    tr.log_metrics({"best/value": best.value, f"best/{Summary.LATENT_F1}": ua.get(TrialAttr.LATENT_F1) or 0.0,
                    f"best/{Summary.LATENT_FIRST_TOP1}": ua.get(TrialAttr.LATENT_FIRST_TOP1) or 0.0}, step=0)
    tr.set_tags({SweepTag.BEST_TRIAL: best.number, SweepTag.BEST_TRIAL_RUN: ua.get(TrialAttr.MLFLOW_RUN_ID),
                 SweepTag.BEST_EVAL_RUN: ua.get(TrialAttr.EVAL_RUN_ID),
                 SweepTag.BEST_CHECKPOINT: ua.get(TrialAttr.CHECKPOINT_URI),
                 **{f"best.{k}": v for k, v in best.params.items()}})
    echo(f"best trial {best.number}: value {best.value:.4f} (latent F1 {ua.get(TrialAttr.LATENT_F1, 0):.4f}) "
         f"params {best.params}")
    if register:
        summary["registry"] = register_best(ua.get(TrialAttr.EVAL_RUN_ID), tr, echo)
    return summary


def register_best(eval_run_id: str | None, tr, echo=print) -> dict:
    """Register the best trial's model version and evaluate the readiness checklist on it (registry API)."""
    if not eval_run_id:
        return {"note": "best trial has no eval run"}
    # a continued study whose best trial did not change keeps its version instead of registering a copy
    name = load_checklist().model_name
    version = version_for_eval_run(eval_run_id, name) or register_candidate(eval_run_id, name)
    report = check_candidate(version)
    out = {"version": str(version), "gate_passed": report.passed, "missing": list(report.missing),
           "evidence": record_checks(report, f"sweep run {tr.run_id}")}
    tr.set_tags({SweepTag.BEST_MODEL_VERSION: out["version"], SweepTag.BEST_GATE_PASSED: out["gate_passed"]})
    tr.log_dict({**out, "rows": report.to_dict()["rows"]}, "best_gate_report.json")
    echo(f"best model version {out['version']}: readiness checklist {'PASSED' if out['gate_passed'] else 'not passed'}"
         f" ({out['evidence']})")
    return out


def record_checks(report: Report, checked_by: str) -> str:
    """The checked version's evidence, as `latentgate promote` records it: one `hero.check.<criterion>` tag per
    criterion (the value from `registry.writes.check_tag_value`, the function promote writes them with; tags of
    criteria the checklist no longer has are removed), under the registry lock, and `latentgate.checked_by`. The
    alias never moves here, and a version holding it keeps its tags (`latentgate promote <version>` re-checks it,
    and takes the alias off if it now fails). Returns what was done."""
    cl, name, v, c = load_checklist(report.checklist or None), report.model_name, str(report.version), lineage.client()
    with registry_lock(name):
        if alias_holder(c, name, cl.alias) == v:
            return f"version {v} holds the alias {cl.alias}: tags left to `latentgate promote {v}`"
        write_check_tags(c, c.get_model_version(name, v), report, cl)
        c.set_model_version_tag(name, v, VersionTag.CHECKED_BY, checked_by)
    return f"{len(report.rows)} {VersionTag.CHECK_PREFIX}* tags on version {v}"


def _log_plots(study, tr, echo=print) -> None:
    """Optuna's visualisations (matplotlib backend) as parent-run artifacts under optuna_plots/."""
    matplotlib.use("Agg")
    plots = {"optimization_history": ov.plot_optimization_history, "param_importances": ov.plot_param_importances,
             "intermediate_values": ov.plot_intermediate_values}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = []
        for name, fn in plots.items():
            try:
                ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(Path(tmp) / f"{name}.png", dpi=90)
                plt.close(fig)
                made.append(name)
            except Exception as err:  # noqa: BLE001 - e.g. importances need 2+ complete trials
                tr.set_tags({SweepTag.PLOT_NOTE_PREFIX + name: f"{type(err).__name__}: {str(err)[:200]}"})
        if made:
            tr.log_artifacts(tmp, "optuna_plots")
    echo(f"plots: {', '.join(made) or 'none'} (parent run artifacts optuna_plots/)")


def format_summary(s: dict) -> str:
    lines = ["── latentgate sweep ──",
             f"study             {s['study']}  ({s['finished']}/{s['n_trials']} trials: {s['complete']} complete, "
             f"{s['pruned']} pruned, {s['failed']} failed)",
             f"optimizer steps   {s['optimizer_steps']}",
             f"worker time       {s['worker_seconds']:.0f} s with {s['workers']} worker(s)"]
    if s.get("stopped"):
        lines.append(f"stopped early     {s['stopped']}")
    if s.get("best"):
        b = s["best"]
        lines += [f"best trial        #{b['number']}  value {b['value']:.4f}  latent F1 {b[Summary.LATENT_F1]:.4f}",
                  f"best params       {b['params']}",
                  f"best checkpoint   {b['checkpoint_uri']}"]
        if s.get("registry"):
            lines.append(f"registry          {s['registry']}")
    lines += [f"parent run        {s['parent_run_id']}", f"dashboard         {s['dashboard']}"]
    return "\n".join(lines)
