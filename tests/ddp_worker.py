"""One training process of tests/test_distributed.py (run alone, under `python -m torch.distributed.run`, or started
directly with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, one process per rank).

argv: OUT_DIR STEPS [RESUME_DIR]. Rank 0 writes under OUT_DIR; a rank > 0 gets OUT_DIR/rank<r> (it must write
nothing there). Every rank ends by writing OUT_DIR/outcome-<rank>.json (the error it stopped on, if any, and its exit
code) and exits with that code, as the CLI's guard would. Env:
- LG_RUN_ID names a pre-created MLflow run that EVERY rank is handed a tracker for (as a careless caller would): the
  trainer must keep ranks > 0 off the store.
- LG_TRACKED=1: the stage runs inside `tracked_run` (a fresh run; its id is in the outcome).
- LG_FAULT: `nan:<rank>:<step>`: that rank's adapter outputs NaN in that optimizer step's forward pass;
  `prune`: rank 0's probe hook reports to a real Optuna trial whose pruner prunes at the first report, and raises
  optuna.TrialPruned as the sweep's objective does.
- LG_PROBE_EVERY: stage_a.probe_every (default 2).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from latentgate import config
from latentgate import distributed as dist
from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer
from latentgate.tracking.runs import tracked_run
from latentgate.tracking.tracker import MlflowTracker, NullTracker
from latentgate.train.trainer import train_stage
from latentgate.train.workspace import load_splits, workspace_from_lm


def inject_nan(ws, at_step: int) -> None:
    """NaN out of the adapter in the `at_step`-th training forward pass (probes run it in eval mode: not counted)."""
    calls = {"n": 0}

    def hook(module, args, output):
        if not module.training:
            return None
        calls["n"] += 1
        return output * float("nan") if calls["n"] == at_step else None

    ws.adapter.register_forward_hook(hook)


def pruning_hook():
    """What sweep/objective.py's on_probe does with a trial: report, ask the pruner, raise TrialPruned."""
    import optuna  # lazy: only the prune case needs it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=-1.0)).ask()  # any value prunes

    def on_probe(step: int, probe: dict) -> None:
        trial.report(probe["first_acc"], step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at optimizer step {step}")

    return on_probe


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    resume = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    dist.init_from_env()
    rank, size = dist.world()
    cfg = config.resolve("micro", {"stage_a.steps": steps, "stage_a.batch_size": 8, "stage_a.schedule": "constant",
                                   "stage_a.warmup_steps": 0, "stage_a.kd_weight": 0.5,
                                   "stage_a.probe_every": int(os.environ.get("LG_PROBE_EVERY", "2"))})
    torch.manual_seed(0)
    tok = builtin_tokenizer(cfg)
    ws = workspace_from_lm(cfg, build_builtin_lm(cfg, len(tok), tok), tok, load_splits(cfg))
    init = torch.cat([p.detach().flatten().clone() for m in (ws.encoder, ws.adapter) for p in m.parameters()])
    fault = os.environ.get("LG_FAULT", "")
    if fault.startswith("nan:") and int(fault.split(":")[1]) == rank:
        inject_nan(ws, int(fault.split(":")[2]))
    on_probe = pruning_hook() if fault == "prune" and rank == 0 else None
    out.mkdir(parents=True, exist_ok=True)
    mine = out if rank == 0 else out / f"rank{rank}"
    outcome: dict = {"rank": rank, "world": size, "pid": os.getpid(), "exit_code": 0}
    try:
        if os.environ.get("LG_TRACKED"):
            with tracked_run("stage_a", nested=False) as tracker:
                outcome["run_id"] = tracker.run_id
                result = train_stage(ws, cfg.stage_a, tracker, mine, name="stage_a", resume=resume, on_probe=on_probe)
        else:
            tracker = MlflowTracker(os.environ["LG_RUN_ID"]) if os.environ.get("LG_RUN_ID") else NullTracker()
            result = train_stage(ws, cfg.stage_a, tracker, mine, name="stage_a", resume=resume, on_probe=on_probe)
    except Exception as err:  # noqa: BLE001 - recorded for the test, then the exit code the CLI would give
        outcome.update(error=type(err).__name__, message=str(err), exit_code=dist.exit_code_of(err),
                       quiet=bool(getattr(err, "quiet", False)), step=getattr(err, "step", None))
    outcome["ended"] = time.time()
    if rank == 0 and not outcome.get("error"):
        params = torch.cat([p.detach().flatten() for m in (ws.encoder, ws.adapter) for p in m.parameters()])
        torch.save({"params": params, "init": init}, out / "params.pt")
        last = json.loads((out / "diagnostics.jsonl").read_text().splitlines()[-1])
        (out / "result.json").write_text(json.dumps({"world": size, "loss": last["loss"], "tf_raw": last["tf_raw"],
                                                     "steps": result["steps"], "checkpoint": result["checkpoint"]}))
    (out / f"outcome-{rank}.json").write_text(json.dumps(outcome))
    sys.exit(outcome["exit_code"])


if __name__ == "__main__":
    main()
