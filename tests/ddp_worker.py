"""One training process of tests/test_distributed.py (run alone, or under `python -m torch.distributed.run`).

argv: OUT_DIR STEPS [RESUME_DIR]. Env: LG_RUN_ID names a pre-created MLflow run that EVERY rank is handed a tracker
for (as a careless caller would): the trainer must keep ranks > 0 off the store.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from latentgate import config
from latentgate import distributed as dist
from latentgate.model.base_lm import build_builtin_lm, builtin_tokenizer
from latentgate.tracking.tracker import MlflowTracker, NullTracker
from latentgate.train.trainer import train_stage
from latentgate.train.workspace import load_splits, workspace_from_lm


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    resume = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    dist.init_from_env()
    rank, size = dist.world()
    cfg = config.resolve("micro", {"stage_a.steps": steps, "stage_a.batch_size": 8, "stage_a.schedule": "constant",
                                   "stage_a.warmup_steps": 0, "stage_a.probe_every": 2, "stage_a.kd_weight": 0.5})
    torch.manual_seed(0)
    tok = builtin_tokenizer(cfg)
    ws = workspace_from_lm(cfg, build_builtin_lm(cfg, len(tok), tok), tok, load_splits(cfg))
    init = torch.cat([p.detach().flatten().clone() for m in (ws.encoder, ws.adapter) for p in m.parameters()])
    tracker = MlflowTracker(os.environ["LG_RUN_ID"]) if os.environ.get("LG_RUN_ID") else NullTracker()
    result = train_stage(ws, "stage_a", tracker, out, resume=resume)
    if rank == 0:
        params = torch.cat([p.detach().flatten() for m in (ws.encoder, ws.adapter) for p in m.parameters()])
        torch.save({"params": params, "init": init}, out / "params.pt")
        last = json.loads((out / "diagnostics.jsonl").read_text().splitlines()[-1])
        (out / "result.json").write_text(json.dumps({"world": size, "loss": last["loss"], "tf_raw": last["tf_raw"],
                                                     "steps": result["steps"], "checkpoint": result["checkpoint"]}))


if __name__ == "__main__":
    main()
