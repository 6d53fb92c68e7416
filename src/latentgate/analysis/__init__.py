"""Analysis and monitoring from tracked data (MLflow metric histories and run artifacts; never logs).

Public API:
- `make_stage_plots(diagnostics_jsonl, out_dir)`, `make_eval_plots(eval_dir, out_dir)` -> list of PNG paths
- `recommend(evidence, checklist)` -> ("hero-ready" | "phase3" | "phase2", the pipeline's Decision)
- `build_report(bundle)`, `analyze(run_id, out_dir)`, `load_run_bundle(run_id)`
- `Monitor(run_id, ...)` (live follow with alerts), `compare_runs(run_ids)`
Imports are lazy: importing this package loads neither matplotlib nor mlflow.
"""

from __future__ import annotations

__all__ = ["Monitor", "analyze", "build_report", "compare_runs", "load_run_bundle", "make_eval_plots",
           "make_stage_plots", "recommend"]


def __getattr__(name: str):
    if name in ("make_stage_plots", "make_eval_plots"):
        from latentgate.analysis import plots  # lazy: keeps latentgate --help light

        return getattr(plots, name)
    if name in ("recommend", "build_report", "analyze"):
        from latentgate.analysis import report  # lazy: keeps latentgate --help light

        return getattr(report, name)
    if name == "load_run_bundle":
        from latentgate.analysis.history import load_run_bundle  # lazy: keeps latentgate --help light

        return load_run_bundle
    if name == "Monitor":
        from latentgate.analysis.monitor import Monitor  # lazy: keeps latentgate --help light

        return Monitor
    if name == "compare_runs":
        from latentgate.analysis.compare import compare_runs  # lazy: keeps latentgate --help light

        return compare_runs
    raise AttributeError(name)
