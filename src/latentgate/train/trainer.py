"""Stage A / Stage B training loop.

Budgets, warm-up and schedules count OPTIMIZER steps; micro-steps are counted and logged separately (the
predecessor's "160 steps" were micro-batches: 12-16 real updates). Every trainable parameter is clipped together
and the grad norm is logged per parameter group. A NaN/inf loss or gradient stops the run with the step and the
terms that went bad. SIGTERM/SIGINT/SIGHUP write a final checkpoint before the run is marked KILLED.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from transformers import get_constant_schedule_with_warmup
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from latentgate import distributed as dist
from latentgate.config import StageConfig, flatten
from latentgate.errors import STOP_SIGNALS, ConfigError, Interrupted, TrainingFault
from latentgate.eval.probe import epoch_samples, run_probe
from latentgate.model.contract import answer_logits, build_latent_batch, build_text_batch, encode_answers, text_prompt
from latentgate.schema import Artifact, GradGroup, Loss, Probe, Stage
from latentgate.tracking import progress
from latentgate.tracking.tracker import NullTracker
from latentgate.train import checkpoint as ckpt
from latentgate.train.losses import compute_losses, p_gold_at, scheduled_inputs
from latentgate.train.manifest import COMPAT_KEYS
from latentgate.train.workspace import Workspace, autocast


def build_optimizer(ws: Workspace, st: StageConfig):
    groups = {
        GradGroup.ENCODER: [p for p in ws.encoder.parameters() if p.requires_grad],
        GradGroup.ADAPTER: [p for p in ws.adapter.parameters() if p.requires_grad],
        GradGroup.LORA: [p for n, p in ws.lm.named_parameters() if p.requires_grad and "lora_" in n],
    }
    groups = {k: v for k, v in groups.items() if v}
    opt = torch.optim.AdamW([{"params": v, "name": k} for k, v in groups.items()], lr=st.lr,
                            weight_decay=st.weight_decay)
    if st.schedule == "cosine":
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, st.warmup_steps, st.steps, min_lr=st.min_lr)
    else:
        sched = get_constant_schedule_with_warmup(opt, st.warmup_steps)
    return opt, sched, groups


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Deterministic function of the micro-step, so a resumed run sees exactly the batches it would have."""
    per_epoch = max(1, n // batch_size)
    epoch, j = divmod(micro_step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[j * batch_size : (j + 1) * batch_size].tolist()


def epoch_of(n: int, batch_size: int, micro_step: int) -> int:
    return micro_step // max(1, n // batch_size)


class _SignalFlag:
    """SIGTERM/SIGINT/SIGHUP set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def stage_step(ws: Workspace, examples, st: StageConfig, step: int, gen: torch.Generator):
    """One micro-batch: encoder -> adapter -> contract -> LM; teacher pass with LoRA disabled; all losses."""
    with autocast(ws):
        return _stage_step(ws, examples, st, step, gen)


def _stage_step(ws: Workspace, examples, st: StageConfig, step: int, gen: torch.Generator):
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in examples])
    latents = ws.latents(examples)
    teacher = None
    if st.kd_weight > 0:
        with torch.no_grad(), ws.teacher():
            prompts = [text_prompt(e.context, e.question) for e in examples]
            tb = build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers)
            teacher = answer_logits(ws.lm, tb)
    inputs = None
    if st.scheduled_sampling:
        with torch.no_grad():
            probe = build_latent_batch(ws.contract, ws.embed, latents.detach(), answer_targets=answers)
            preds = answer_logits(ws.lm, probe).argmax(-1)
        p_gold = p_gold_at(step, st.steps, st.p_gold_floor)
        inputs = scheduled_inputs(preds, probe.answer_targets, probe.answer_mask, p_gold, gen)
    batch = build_latent_batch(ws.contract, ws.embed, latents, answer_inputs=inputs, answer_targets=answers)
    logits = answer_logits(ws.lm, batch)
    return compute_losses(logits, batch.answer_targets, batch.answer_mask, st, teacher, ws.contract.end_id)


def _group_norms(groups: dict) -> dict[str, float]:
    out = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        out[name] = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    return out


def checkpoint_modules(ws: Workspace) -> dict:
    return {"encoder": ws.encoder, "adapter": ws.adapter}


def train_stage(ws: Workspace, stage: str, tracker, out_dir: Path, resume: Path | None = None,
                on_probe=None) -> dict:
    """Train `stage` ("stage_a" or "stage_b") on ws; returns a summary. Writes diagnostics and checkpoints
    under out_dir; the tracker receives params, step metrics and artifacts. `on_probe(step, probe)` is called
    after every probe (a sweep reports intermediate values there and may raise optuna.TrialPruned)."""
    st: StageConfig = getattr(ws.cfg, stage)
    rank, size = dist.active_world()
    if size > 1:
        if st.batch_size % size:
            raise ConfigError(f"{stage}.batch_size={st.batch_size} does not split over {size} processes",
                              f"use a global batch size divisible by {size}")
        if rank != 0:  # only rank 0 talks to the store and writes files
            tracker, on_probe = NullTracker(), None
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / Artifact.CHECKPOINTS / stage
    train = ws.splits["train"]
    ws.encoder.train()
    ws.adapter.train()
    if ws.is_peft or ws.cfg.base.gradient_checkpointing:  # HF checkpoints layers only in train mode
        ws.lm.train()
    opt, sched, groups = build_optimizer(ws, st)
    trainable = [p for ps in groups.values() for p in ps]
    gen = torch.Generator().manual_seed(st.seed + 7)
    torch.manual_seed(st.seed)
    state = {"stage": stage, "global_step": 0, "micro_step": 0, "probes": [], "elapsed": 0.0}
    if resume is not None:
        manifest = ckpt.load_checkpoint(resume, modules=checkpoint_modules(ws),
                                        lora_model=ws.lm if ws.is_peft else None,
                                        optimizer=opt, scheduler=sched, expect_config=flatten(ws.cfg),
                                        compat_keys=COMPAT_KEYS, expect_base=ws.base_ref, restore_rng=True)
        state.update(manifest["trainer_state"])
        state.pop("rng", None)  # older checkpoints also kept a copy of rng.json here
        gen.set_state(torch.tensor(state.pop("gen_state"), dtype=torch.uint8))
        tracker.skip_logged_steps(_logged_keys(tracker, stage))
    diag_path = out_dir / Artifact.DIAGNOSTICS if rank == 0 else Path(os.devnull)
    _truncate_jsonl(diag_path, stage, state["global_step"])
    t0 = time.perf_counter() - state["elapsed"]
    last_probe = state["probes"][-1] if state["probes"] else None

    def save(step_state: dict) -> Path:
        if rank != 0:
            return ckpt_dir
        trainer_state = {**step_state, "elapsed": time.perf_counter() - t0, "gen_state": gen.get_state().tolist()}
        return ckpt.save_checkpoint(ckpt_dir, modules=checkpoint_modules(ws), lora_model=ws.lm if ws.is_peft else None,
                                    optimizer=opt, scheduler=sched, trainer_state=trainer_state,
                                    config=flatten(ws.cfg), contract=ws.contract.to_dict(), base_lm=ws.base_ref)

    epoch_path = out_dir / Artifact.DIAGNOSTICS_EPOCH if rank == 0 else Path(os.devnull)
    _truncate_jsonl(epoch_path, stage, state["global_step"])
    epoch_terms: dict[str, list[float]] = {}

    def end_epoch(epoch: int, step: int, fh) -> None:
        """diagnostics_epoch.jsonl: sample predictions, first-token histogram, loss breakdown of the epoch."""
        breakdown = {k: sum(v) / len(v) for k, v in epoch_terms.items() if v}
        fh.write(json.dumps({Stage.STAGE: stage, Stage.EPOCH: epoch, Stage.GLOBAL_STEP: step,
                             "loss_breakdown": breakdown, **epoch_samples(ws, ws.splits["probe"])}) + "\n")
        epoch_terms.clear()

    with _SignalFlag() as flag, diag_path.open("a") as diag, epoch_path.open("a") as diag_epoch, \
            progress.task(stage, total=st.steps, start=state["global_step"]) as bar:
        while state["global_step"] < st.steps:
            step = state["global_step"]
            sums = {Loss.key(k, w): 0.0 for k in Loss.TERMS for w in ("raw", "weighted")}
            stats_sum: dict[str, float] = {}
            for _ in range(st.grad_accum):
                idx = dist.shard(batch_indices(len(train), st.batch_size, state["micro_step"], st.seed), rank, size)
                out = stage_step(ws, [train[i] for i in idx], st, step, gen)
                raw = {k: float(v.detach()) for k, v in out.raw.items()}
                bad = {k: v for k, v in raw.items() if not math.isfinite(v)}
                if bad or not math.isfinite(float(out.total.detach())):
                    raise TrainingFault(f"{stage}: non-finite loss at optimizer step {step + 1} "
                                        f"(micro-step {state['micro_step'] + 1}): {bad or {'total': float(out.total)}}",
                                        "lower the learning rate or the loss weights, "
                                        "then resume from the last checkpoint")
                (out.total / st.grad_accum).backward()
                state["micro_step"] += 1
                for k in Loss.TERMS:
                    sums[Loss.key(k)] += raw[k] / st.grad_accum
                    sums[Loss.key(k, "weighted")] += float(out.weighted[k].detach()) / st.grad_accum
                for k, v in out.stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v / st.grad_accum
            if size > 1:  # every rank takes the same step: average gradients and logged scalars first
                dist.average_gradients(trainable, size)
                sums, stats_sum = dist.mean_scalars(sums, size), dist.mean_scalars(stats_sum, size)
            norms = _group_norms(groups)
            max_norm = st.clip_norm if st.clip_norm > 0 else float("inf")
            total_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            if not math.isfinite(total_norm):
                raise TrainingFault(f"{stage}: non-finite gradient norm at optimizer step {step + 1} "
                                    f"(per group: {norms})",
                                    "lower the learning rate, then resume from the last checkpoint")
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["global_step"] = step = step + 1
            record = {Stage.GLOBAL_STEP: step, Stage.MICRO_STEP: state["micro_step"], Stage.STAGE: stage,
                      Stage.EPOCH: epoch_of(len(train), st.batch_size, state["micro_step"] - 1), Stage.LR: lr,
                      **{k: round(v, 6) for k, v in sums.items()},
                      Stage.LOSS: sum(sums[Loss.key(k, "weighted")] for k in Loss.TERMS),
                      **{k: round(v, 6) for k, v in stats_sum.items()}, Stage.GRAD_NORM: total_norm,
                      **{GradGroup.norm_key(g): n for g, n in norms.items()},
                      Stage.ELAPSED: round(time.perf_counter() - t0, 3)}
            if st.scheduled_sampling:
                record[Stage.P_GOLD] = p_gold_at(step - 1, st.steps, st.p_gold_floor)
            if step % st.probe_every == 0 or step == st.steps:
                last_probe = run_probe(ws, ws.splits["probe"], with_f1=True)
                state["probes"].append({"step": step, **last_probe})
                record.update({Probe.key(k): v for k, v in last_probe.items()})
            for k in sums:
                epoch_terms.setdefault(k, []).append(sums[k])
            next_epoch = epoch_of(len(train), st.batch_size, state["micro_step"])
            if rank == 0 and (next_epoch != record[Stage.EPOCH] or step == st.steps):
                end_epoch(record[Stage.EPOCH], step, diag_epoch)
            diag.write(json.dumps(record) + "\n")
            tracker.log_metrics({Stage.metric(stage, k): v for k, v in record.items() if isinstance(v, (int, float))
                                 and k != Stage.GLOBAL_STEP}, step=step)
            bar.update(step, loss=record[Stage.LOSS], first_acc=(last_probe or {}).get(Probe.FIRST_ACC))
            if (st.checkpoint_every and step % st.checkpoint_every == 0) or flag.signum:
                diag.flush()
                tracker.flush()
                path = save(state)
            if on_probe is not None and Probe.key(Probe.FIRST_ACC) in record:
                tracker.flush()
                on_probe(step, last_probe)
            if flag.signum:
                raise Interrupted(flag.signum, step, str(path))
    path = save(state)
    dist.barrier()  # no rank returns before rank 0's final checkpoint exists
    if flag.signum:  # the signal came during the last step: the final checkpoint above is complete
        raise Interrupted(flag.signum, state["global_step"], str(path))
    tracker.flush()
    return {"stage": stage, "steps": state["global_step"], "micro_steps": state["micro_step"],
            "checkpoint": str(path), "probes": state["probes"], "final_probe": last_probe,
            "elapsed": time.perf_counter() - t0}


def _logged_keys(tracker, stage: str) -> list[str]:
    """Every metric of `stage` already in the run. All of them, not a few: a kill can land after a metric flush and
    before the checkpoint it precedes, so any key may hold steps past the checkpoint (they must not be re-logged)."""
    client = getattr(tracker, "client", None)
    if client is None:
        return []
    return [k for k in client.get_run(tracker.run_id).data.metrics if k.startswith(Stage.metric(stage, ""))]


def _truncate_jsonl(path: Path, stage: str, upto_step: int) -> None:
    """On resume, drop this stage's diagnostics past the checkpoint: they are re-created identically."""
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [json.dumps(r) for r in records if not (r.get(Stage.STAGE) == stage and r[Stage.GLOBAL_STEP] > upto_step)]
    path.write_text("".join(x + "\n" for x in keep))
