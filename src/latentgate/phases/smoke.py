"""`smoke`: one parent run with child runs base -> stage_a -> stage_b -> eval, and a short printed summary."""

from __future__ import annotations

import os
import time
from pathlib import Path

from latentgate.config import Config, flatten
from latentgate.distributed import main_only
from latentgate.phases.results import SmokeResult
from latentgate.schema import Artifact, Summary, Tag
from latentgate.tracking import labels, progress
from latentgate.tracking.runs import adopt_project_run, setup_experiment, tracked_run, tracking_uri
from latentgate.tracking.secrets import mask_secrets
from latentgate.tracking.tracker import enable_system_metrics


def run_output_dir(cfg: Config, name: str) -> Path:
    """A fresh folder under run.output_dir. Under torchrun, rank 0's folder, shared by every rank (rank 0 writes
    the checkpoints the others load next; across nodes run.output_dir must be a shared filesystem)."""
    def make() -> Path:
        out = Path(cfg.run.output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        out.mkdir(parents=True, exist_ok=True)
        return out.resolve()

    return main_only(make)


PHASES = ("base LM", "stage_a", "stage_b", "eval")


def run_smoke(cfg: Config, preset: str = "smoke", name: str = "smoke", tags: dict | None = None) -> SmokeResult:
    """The whole chain as one parent run `name` (the smoke; the hero uses it with its own name and tags). Its
    progress (one line per phase) starts before anything slow: MLflow's import and store, the data."""
    with progress.task(name, total=len(PHASES), unit="phases", every=float("inf"), eta=False,
                       detail=f"preset {preset}: {' -> '.join(PHASES)}") as bar:
        return _run_smoke(cfg, preset, name, tags, bar)


def _run_smoke(cfg: Config, preset: str, name: str, tags: dict | None, bar) -> SmokeResult:
    # here, not at the top: the stages import torch and MLflow (seconds), and the first progress line comes before
    import mlflow  # lazy: first progress line before MLflow's import

    from latentgate.phases.stages import run_base, run_eval, run_stage  # lazy: first progress line before torch
    from latentgate.train.workspace import load_splits, resolve_device  # lazy: first progress line before torch

    resolve_device(cfg.run.device)  # a device this machine lacks fails here, before any run starts
    bar.update(0, force=True, at="opening the tracking store")
    setup_experiment(cfg.run.experiment)
    enable_system_metrics()  # every run of the chain records system/* metrics
    t0 = time.perf_counter()
    out = run_output_dir(cfg, name)
    splits = load_splits(cfg)
    nested = mlflow.active_run() is not None  # the pipeline's Phase 4 runs the hero under its own run
    with tracked_run(name, nested=nested, run_id=adopt_project_run(),
                     tags={Tag.PRESET: preset, **(tags or {})}) as parent:
        shown = name if preset == name else f"{name} {preset}"  # `smoke micro (...)`, `hero (...)`
        parent.set_name(f"{shown} ({labels.short_params(labels.stage_params(cfg, 'stage_b'))})")
        parent.log_params(flatten(cfg))
        bar.update(0, force=True, at=PHASES[0])
        base_run = run_base(cfg, out, splits)
        base = base_run.base
        bar.update(1, force=True, at=PHASES[1])
        a = run_stage(cfg, "stage_a", base, out, splits)
        bar.update(2, force=True, at=PHASES[2])
        b = run_stage(cfg, "stage_b", base, out, splits, init_from=Path(a.checkpoint))
        bar.update(3, force=True, at=PHASES[3])
        ev = run_eval(cfg, base, Path(b.checkpoint), out, splits, source_uri=b.checkpoint_uri)
        bar.update(4)
        summary = SmokeResult.of_chain(parent.run_id, base_run, a, b, ev, wall_seconds=time.perf_counter() - t0,
                                       output_dir=str(out), tracking_uri=mask_secrets(tracking_uri()))
        parent.log_metrics({Summary.TEXT_F1: summary.text_f1, Summary.LATENT_F1: summary.latent_f1,
                            Summary.LATENT_EM: summary.latent_em, "wall_seconds": summary.wall_seconds}, step=0)
        parent.log_dict(summary.as_record(), Artifact.SUMMARY)
        parent.set_tags({Tag.CHILDREN: ",".join(summary.children.values())})
        parent.set_description(labels.smoke_note(name, preset, summary.as_record()))
    return summary


def format_summary(s: SmokeResult) -> str:
    ctrl = ", ".join(f"{k} {v:.3f}" for k, v in s.controls_f1.items())
    fa = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    return "\n".join([
        "── latentgate smoke ──",
        f"text-teacher F1   {s.text_f1:.3f}",
        f"latent F1 / EM    {s.latent_f1:.3f} / {s.latent_em:.3f}",
        f"controls F1       {ctrl}",
        f"probe first-token Stage A {fa(s.stage_a_probe_first_acc)}, Stage B {fa(s.stage_b_probe_first_acc)}",
        f"base LM           {s.base_source}",
        f"wall time         {s.wall_seconds:.0f} s",
        f"run id            {s.run_id}  (mlflow ui --backend-store-uri {s.tracking_uri})",
    ])
