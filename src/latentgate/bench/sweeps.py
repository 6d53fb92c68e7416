"""Sweep benchmarks (`latentgate bench --sweep`), two side-by-side comparisons:

- parallel workers: the same study on a journal storage with 2 worker processes vs 1 (same threads per worker).
  Both runs execute the same trials: their params are drawn once from the study's search space and enqueued in
  both studies, longest first, so the ratio measures worker throughput, not which step budgets a worker-seeded
  sampler happened to draw, nor the idle tail of a short study.
- pruning: the same study, sampler seed and trial budget with the study's pruner vs none, both run at the same
  time as single-worker studies (each is deterministic, so running them together changes only their wall time):
  optimizer steps spent (pruned / unpruned) and the gap between their best latent F1.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import optuna

from latentgate.bench.report import Row, judge, ratio_row
from latentgate.schema import StudyAttr, Summary
from latentgate.sweep.runner import create_study, run_sweep
from latentgate.sweep.study import load_study, spec_from_dict, suggest

PARALLEL = ("sweep: 2 journal workers vs 1, same trials", "1 worker")
PRUNING = ("sweep: pruning vs none, same sampler seed and budget", "no pruning")
F1_GAP = 0.02


def _variant(spec, name: str, **changes):
    changes.setdefault("stop", {"rule": "none"})  # a comparison spends the same budget on both sides
    return spec.with_changes(f"bench variant {name}", study_name=name, **changes)


def draw_trials(spec, n: int, seed: int = 0) -> list[dict]:
    """n param sets from the study's search space (random sampler, fixed seed), longest Stage B first."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    draws = []
    for _ in range(n):
        trial = study.ask()
        draws.append(suggest(trial, spec.search_space))
        study.tell(trial, 0.0)
    return sorted(draws, key=lambda p: -int(p.get("stage_b.steps", 0)))


def bench_parallel(spec, n_trials: int, workers: int, out: Path, tag: str, threads: int, echo=print) -> tuple:
    """Returns (row, the Stage A checkpoint URI the runs resumed from)."""
    draws = draw_trials(spec, n_trials, seed=int(spec.sampler.get("seed") or 0))
    runs, resume = {}, spec.resume_from
    for w in (1, workers):
        v = _variant(spec, f"bench-{tag}-w{w}", pruner={"name": "none"}, resume_from=resume)
        url = str(out / f"{v.name}.journal")
        study = create_study(v, url, n_trials)
        for params in draws:
            study.enqueue_trial(params)
        s = run_sweep(v, n_trials, w, url, threads=threads, echo=lambda *_: None, register=False, processes=True)
        resume = study.user_attrs[StudyAttr.RESUME_FROM]  # later variants resume from the same Stage A checkpoint
        runs[str(w)] = {"trials": s["finished"], "seconds": s["worker_seconds"],
                        "optimizer_steps": s["optimizer_steps"],
                        "trials_per_hour": s["finished"] * 3600 / s["worker_seconds"]}
        echo(f"  {w} worker(s): {s['finished']} trials ({s['optimizer_steps']} steps) in "
             f"{s['worker_seconds']:.0f} s -> {runs[str(w)]['trials_per_hour']:.0f} trials/hour")
    one, many = runs["1"], runs[str(workers)]
    ratio = many["trials_per_hour"] / one["trials_per_hour"]
    measured = (f"{ratio:.2f}x trials/hour ({many['trials_per_hour']:.0f} vs {one['trials_per_hour']:.0f}; "
                f"{n_trials} {spec.preset}-size trials of study {spec.name}, {threads} thread(s) per worker)")
    what = (PARALLEL[0].replace("2", str(workers), 1), PARALLEL[1])
    return ratio_row("sweep_workers", *what, ratio, ">=", 1.7, measured, details=runs), resume


def _run_variant(raw: dict, n_trials: int, url: str, threads: int, result: str) -> None:
    """Child process of bench_pruning: one single-worker study, summary to a JSON file."""
    s = run_sweep(spec_from_dict(raw, "bench variant"), n_trials, 1, url, threads=threads, echo=lambda *_: None,
                  register=False)
    Path(result).write_text(json.dumps(s, default=str))


def bench_pruning(spec, n_trials: int, out: Path, tag: str, threads: int, resume: str, echo=print) -> Row:
    pruner = spec.pruner if spec.pruner["name"] != "none" else {"name": "median"}
    ctx = multiprocessing.get_context("spawn")
    procs = {}
    for label, p in (("pruned", pruner), ("unpruned", {"name": "none"})):
        v = _variant(spec, f"bench-{tag}-{label}", pruner=p, resume_from=resume)
        result = out / f"{v.name}.summary.json"
        proc = ctx.Process(target=_run_variant, args=(v.to_dict(), n_trials, str(out / f"{v.name}.journal"),
                                                      threads, str(result)))
        proc.start()
        procs[label] = (proc, result)
    res = {}
    for label, (proc, result) in procs.items():
        proc.join()
        if proc.exitcode != 0 or not result.exists():
            raise RuntimeError(f"the {label} study exited with {proc.exitcode}")
        s = json.loads(result.read_text())
        res[label] = {"optimizer_steps": s["optimizer_steps"], "pruned_trials": s["pruned"],
                      "best_latent_f1": (s["best"] or {}).get(Summary.LATENT_F1) or 0.0, "seconds": s["worker_seconds"]}
        echo(f"  {label}: {s['optimizer_steps']} optimizer steps, {s['pruned']}/{s['finished']} pruned, "
             f"best latent F1 {res[label]['best_latent_f1']:.4f}")
    steps = res["pruned"]["optimizer_steps"] / max(1, res["unpruned"]["optimizer_steps"])
    gap = res["unpruned"]["best_latent_f1"] - res["pruned"]["best_latent_f1"]
    ok_steps, ok_gap = judge(steps, "<=", 0.5), judge(gap, "<=", F1_GAP)
    measured = (f"{steps:.2f} of the steps ({res['pruned']['optimizer_steps']} vs {res['unpruned']['optimizer_steps']},"
                f" {res['pruned']['pruned_trials']}/{n_trials} trials pruned by {pruner['name']}); best latent F1 "
                f"{res['pruned']['best_latent_f1']:.3f} vs {res['unpruned']['best_latent_f1']:.3f} (gap {gap:+.3f})")
    return Row("sweep_pruning", *PRUNING, measured, f"<= 0.5x steps, F1 gap <= {F1_GAP}",
               ok_steps if ok_steps != "PASS" else ok_gap, steps, "<=", 0.5, {**res, "f1_gap": gap})


def bench_sweep(out_dir: str | Path = "bench-out", quick: bool = False, threads: int = 1, study: str | None = None,
                n_trials: int | None = None, workers: int = 2, echo=print) -> list[Row]:
    """Both comparisons on fresh journal storages under out_dir/sweep (also written as sweep_bench.json).
    Defaults: study phase2 with 8 trials (parallel) and 16 (pruning); `quick`: the micro study, 4 and 4."""
    spec = load_study(study or ("micro" if quick else "phase2"))
    n = int(n_trials or (4 if quick else 8))
    out = (Path(out_dir) / "sweep").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag = time.strftime("%Y%m%d%H%M%S")
    echo(f"bench: sweep, parallel workers ({n} trials each) ...")
    rows = []
    par, resume = bench_parallel(spec, n, workers, out, tag, threads, echo)
    rows.append(par)
    n_prune = n if quick else 2 * n
    echo(f"bench: sweep, pruning vs none ({n_prune} trials each) ...")
    rows.append(bench_pruning(spec, n_prune, out, tag, threads, resume, echo))
    (out / "sweep_bench.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2, default=str))
    return rows
