"""Sweep benchmarks (called by `latentgate bench`):

- parallel workers: the same study on a journal storage with 2 worker processes vs 1 (both as processes, same
  threads per worker): trials per hour of worker time, and their ratio;
- pruning: the same study, sampler seed and trial budget with the median pruner vs none: optimizer steps spent
  (pruned / unpruned) and the best latent F1 of each.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path


def _variant(spec, name: str, **changes):
    from latentgate.sweep.study import spec_from_dict

    raw = copy.deepcopy(spec.to_dict())
    raw.update(study_name=name, **changes)
    return spec_from_dict(raw, f"bench variant {name}")


def bench_sweep(out_dir: str | Path = "bench-out/sweep", study: str = "micro", n_trials: int = 8,
                workers: int = 2, threads: int = 1, echo=print) -> dict:
    """Run both comparisons on fresh storages under out_dir; returns the figures (also written as JSON)."""
    import json

    from latentgate.sweep.runner import run_sweep
    from latentgate.sweep.study import load_study

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = load_study(study)
    tag = time.strftime("%Y%m%d%H%M%S")
    quiet = lambda *_: None  # noqa: E731
    res: dict = {"study": study, "n_trials": n_trials, "threads_per_worker": threads}

    tp = {}
    for w in (1, workers):
        v = _variant(spec, f"bench-{tag}-w{w}", pruner={"name": "none"})
        s = run_sweep(v, n_trials, w, str(out / f"{v.name}.journal"), threads=threads, echo=quiet,
                      register=False, processes=True)
        tp[w] = s["finished"] * 3600 / s["worker_seconds"]
        echo(f"{w} worker(s): {s['finished']} trials in {s['worker_seconds']:.1f} s -> {tp[w]:.0f} trials/hour")
    res["trials_per_hour"] = {str(k): v for k, v in tp.items()}
    res["parallel_ratio"] = tp[workers] / tp[1]

    pr = {}
    for label, pruner in (("pruned", spec.pruner if spec.pruner["name"] != "none" else {"name": "median"}),
                          ("unpruned", {"name": "none"})):
        v = _variant(spec, f"bench-{tag}-{label}", pruner=pruner)
        s = run_sweep(v, n_trials, 1, str(out / f"{v.name}.journal"), threads=threads, echo=quiet, register=False)
        pr[label] = {"optimizer_steps": s["optimizer_steps"], "pruned_trials": s["pruned"],
                     "best_latent_f1": (s["best"] or {}).get("latent_f1") or 0.0,
                     "best_value": (s["best"] or {}).get("value") or 0.0, "seconds": s["worker_seconds"]}
        echo(f"{label}: {s['optimizer_steps']} optimizer steps, {s['pruned']} pruned, "
             f"best latent F1 {pr[label]['best_latent_f1']:.4f}")
    res["pruning"] = pr
    res["steps_ratio"] = pr["pruned"]["optimizer_steps"] / max(1, pr["unpruned"]["optimizer_steps"])
    res["best_f1_gap"] = pr["unpruned"]["best_latent_f1"] - pr["pruned"]["best_latent_f1"]
    (out / "sweep_bench.json").write_text(json.dumps(res, indent=2))
    return res
