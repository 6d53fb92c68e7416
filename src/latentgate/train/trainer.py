"""Stage A / Stage B training loop.

Budgets, warm-up and schedules count OPTIMIZER steps; micro-steps are counted and logged separately (the
predecessor's "160 steps" were micro-batches: 12-16 real updates). Every trainable parameter is clipped together
and the grad norm is logged per parameter group. A NaN/inf loss or gradient stops the run with the step and the
terms that went bad. SIGTERM/SIGINT/SIGHUP write a final checkpoint before the run is marked KILLED.

Only the trainable modules train: the frozen LM stays in eval mode (no dropout in it, the KD teacher included).

Under torchrun the ranks meet once per optimizer step (`distributed.agree`, before the gradient all-reduce): an
error on any rank (a non-finite loss, a prune raised by the probe hook, anything else) and a stop signal received by
any rank reach every rank there, so all ranks stop at the same step with one exit code; rank 0 alone writes the
final checkpoint. An error in a step's bookkeeping (probe, logging, checkpoint, hook) is carried to the next
agreement (or the closing one) instead of leaving the other ranks waiting.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import get_constant_schedule_with_warmup
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from latentgate import distributed as dist
from latentgate import heap
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


def set_training_modes(ws: Workspace) -> None:
    """Only what trains is in train mode: the encoder and the adapter (a frozen encoder body excepted) and LoRA's own
    dropout. The frozen LM stays in eval mode, so dropout is off in it, in the KD teacher pass and in an lm_self
    encoder's pass through it. With gradient checkpointing, the LM's layers alone are flagged as training (HF
    recomputes a layer only then) while their children stay in eval mode."""
    ws.encoder.train()
    if getattr(ws.encoder, "frozen_body", False):
        ws.encoder.body.eval()
    ws.adapter.train()
    ws.lm.eval()
    for name, module in ws.lm.named_modules():
        if name.rsplit(".", 1)[-1] == "lora_dropout":
            module.train()
        elif ws.cfg.base.gradient_checkpointing and getattr(module, "gradient_checkpointing", False):
            module.training = True  # this module only: not its children


@dataclass
class LoopState:
    """How far a stage's loop got: saved in every checkpoint (the manifest's `trainer_state`, with the sampling
    generator's state) and restored on resume."""

    stage: str
    global_step: int = 0  # optimizer steps taken
    micro_step: int = 0  # micro-batches consumed: global_step x grad_accum
    probes: list[dict] = field(default_factory=list)  # {"step": n, **probe} after every probe
    elapsed: float = 0.0  # training seconds so far (a resumed run goes on counting)

    @classmethod
    def from_saved(cls, saved: dict) -> "LoopState":
        """From a manifest's trainer_state (older checkpoints also kept a copy of rng.json there: ignored)."""
        return cls(saved["stage"], saved["global_step"], saved["micro_step"], saved["probes"], saved["elapsed"])


@dataclass
class StepTotals:
    """One optimizer step's loss terms (raw and weighted) and loss statistics, averaged over its micro-batches."""

    losses: dict[str, float] = field(default_factory=lambda: {Loss.key(k, w): 0.0 for k in Loss.TERMS
                                                              for w in ("raw", "weighted")})
    stats: dict[str, float] = field(default_factory=dict)


class StageRun:
    """One stage's training on this rank. `train_stage` drives it: setup (here), `resume`, then per optimizer step
    `step` (forward and backward passes), `update` (the optimizer step) and `record` (probe, logs, hook), and `save`
    at the end (or where a signal stopped every rank)."""

    def __init__(self, ws: Workspace, section: StageConfig, name: str, tracker, out_dir: Path, on_probe=None):
        self.rank, self.size = dist.active_world()
        if self.size > 1 and section.batch_size % self.size:
            raise ConfigError(f"{name}.batch_size={section.batch_size} does not split over {self.size} processes",
                              f"use a global batch size divisible by {self.size}")
        only_rank0 = self.size > 1 and self.rank != 0  # only rank 0 talks to the store and writes files
        self.tracker, self.on_probe = (NullTracker(), None) if only_rank0 else (tracker, on_probe)
        self.ws, self.st, self.name, self.out_dir = ws, section, name, out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = out_dir / Artifact.CHECKPOINTS / name
        self.train = ws.splits["train"]
        set_training_modes(ws)
        self.opt, self.sched, self.groups = build_optimizer(ws, section)
        self.trainable = [p for ps in self.groups.values() for p in ps]
        self.gen = torch.Generator().manual_seed(section.seed + 7)
        torch.manual_seed(section.seed)
        self.state = LoopState(name)
        self.last_probe: dict | None = None
        self.epoch_terms: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()

    def resume(self, checkpoint: Path) -> None:
        """Modules, optimizer, schedule, RNGs and loop state from `checkpoint`; steps already logged are skipped."""
        ws = self.ws
        manifest = ckpt.load_checkpoint(checkpoint, modules=checkpoint_modules(ws),
                                        lora_model=ws.lm if ws.is_peft else None, optimizer=self.opt,
                                        scheduler=self.sched, expect_config=flatten(ws.cfg), compat_keys=COMPAT_KEYS,
                                        expect_base=ws.base_ref, restore_rng=True)
        self.state = LoopState.from_saved(manifest["trainer_state"])
        self.gen.set_state(torch.tensor(manifest["trainer_state"]["gen_state"], dtype=torch.uint8))
        self.last_probe = self.state.probes[-1] if self.state.probes else None
        self.tracker.skip_logged_steps(_logged_keys(self.tracker, self.name))

    def open_diagnostics(self) -> tuple[Path, Path]:
        """diagnostics.jsonl and diagnostics_epoch.jsonl (rank 0; os.devnull elsewhere), cut back to the loop's
        step on resume; the clock starts (from the elapsed time of a resumed run)."""
        paths = tuple(self.out_dir / a if self.rank == 0 else Path(os.devnull)
                      for a in (Artifact.DIAGNOSTICS, Artifact.DIAGNOSTICS_EPOCH))
        for path in paths:
            _truncate_jsonl(path, self.name, self.state.global_step)
        self.t0 = time.perf_counter() - self.state.elapsed
        return paths

    def step(self) -> StepTotals:
        """The forward and backward passes of one optimizer step: `grad_accum` micro-batches of this rank's shard.
        A non-finite loss raises TrainingFault before its backward pass."""
        ws, st, state = self.ws, self.st, self.state
        totals = StepTotals()
        for _ in range(st.grad_accum):
            idx = dist.shard(batch_indices(len(self.train), st.batch_size, state.micro_step, st.seed), self.rank,
                             self.size)
            out = stage_step(ws, [self.train[i] for i in idx], st, state.global_step, self.gen)
            raw = {k: float(v.detach()) for k, v in out.raw.items()}
            bad = {k: v for k, v in raw.items() if not math.isfinite(v)}
            if bad or not math.isfinite(float(out.total.detach())):
                raise TrainingFault(f"{self.name}: non-finite loss at optimizer step {state.global_step + 1} "
                                    f"(micro-step {state.micro_step + 1}): {bad or {'total': float(out.total)}}",
                                    "lower the learning rate or the loss weights, "
                                    "then resume from the last checkpoint")
            (out.total / st.grad_accum).backward()
            heap.release(ws.device)  # this micro-batch's freed activations: the next one's shapes differ
            state.micro_step += 1
            for k in Loss.TERMS:
                totals.losses[Loss.key(k)] += raw[k] / st.grad_accum
                totals.losses[Loss.key(k, "weighted")] += float(out.weighted[k].detach()) / st.grad_accum
            for k, v in out.stats.items():
                totals.stats[k] = totals.stats.get(k, 0.0) + v / st.grad_accum
        return totals

    def update(self, totals: StepTotals) -> dict:
        """Average gradients and logged scalars over the ranks, clip every trainable parameter together, take the
        optimizer step. Returns the step's record (diagnostics.jsonl, step metrics) without its probe."""
        st = self.st
        if self.size > 1:  # every rank takes the same step
            dist.average_gradients(self.trainable, self.size)
            totals = StepTotals(dist.mean_scalars(totals.losses, self.size), dist.mean_scalars(totals.stats, self.size))
        norms = _group_norms(self.groups)
        max_norm = st.clip_norm if st.clip_norm > 0 else float("inf")
        total_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if not math.isfinite(total_norm):  # the same averaged gradients on every rank: every rank raises
            raise TrainingFault(f"{self.name}: non-finite gradient norm at optimizer step "
                                f"{self.state.global_step + 1} (per group: {norms})",
                                "lower the learning rate, then resume from the last checkpoint")
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        state = self.state
        state.global_step = step = state.global_step + 1
        record = {Stage.GLOBAL_STEP: step, Stage.MICRO_STEP: state.micro_step, Stage.STAGE: self.name,
                  Stage.EPOCH: epoch_of(len(self.train), st.batch_size, state.micro_step - 1), Stage.LR: lr,
                  **{k: round(v, 6) for k, v in totals.losses.items()},
                  Stage.LOSS: sum(totals.losses[Loss.key(k, "weighted")] for k in Loss.TERMS),
                  **{k: round(v, 6) for k, v in totals.stats.items()}, Stage.GRAD_NORM: total_norm,
                  **{GradGroup.norm_key(g): n for g, n in norms.items()},
                  Stage.ELAPSED: round(time.perf_counter() - self.t0, 3)}
        if st.scheduled_sampling:
            record[Stage.P_GOLD] = p_gold_at(step - 1, st.steps, st.p_gold_floor)
        for k, v in totals.losses.items():
            self.epoch_terms.setdefault(k, []).append(v)
        return record

    def record(self, record: dict, diag, diag_epoch, bar) -> None:
        """The step's bookkeeping: the probe when due, the epoch summary, diagnostics, metrics, progress, the
        periodic checkpoint, then the probe hook (a sweep reports there and may raise optuna.TrialPruned)."""
        st, ws, step = self.st, self.ws, self.state.global_step
        if step % st.probe_every == 0 or step == st.steps:
            self.last_probe = run_probe(ws, ws.splits["probe"], with_f1=True)
            self.state.probes.append({"step": step, **self.last_probe})
            record.update({Probe.key(k): v for k, v in self.last_probe.items()})
        next_epoch = epoch_of(len(self.train), st.batch_size, self.state.micro_step)
        if self.rank == 0 and (next_epoch != record[Stage.EPOCH] or step == st.steps):
            self._end_epoch(record[Stage.EPOCH], step, diag_epoch)
        diag.write(json.dumps(record) + "\n")
        self.tracker.log_metrics({Stage.metric(self.name, k): v for k, v in record.items()
                                  if isinstance(v, (int, float)) and k != Stage.GLOBAL_STEP}, step=step)
        bar.update(step, loss=record[Stage.LOSS], first_acc=(self.last_probe or {}).get(Probe.FIRST_ACC))
        if st.checkpoint_every and step % st.checkpoint_every == 0 and step < st.steps:
            diag.flush()
            self.save()
        if self.on_probe is not None and Probe.key(Probe.FIRST_ACC) in record:
            self.tracker.flush()
            self.on_probe(step, self.last_probe)

    def _end_epoch(self, epoch: int, step: int, fh) -> None:
        """diagnostics_epoch.jsonl: sample predictions, first-token histogram, loss breakdown of the epoch."""
        breakdown = {k: sum(v) / len(v) for k, v in self.epoch_terms.items() if v}
        fh.write(json.dumps({Stage.STAGE: self.name, Stage.EPOCH: epoch, Stage.GLOBAL_STEP: step,
                             "loss_breakdown": breakdown, **epoch_samples(self.ws, self.ws.splits["probe"])}) + "\n")
        self.epoch_terms.clear()

    def save(self) -> Path:
        """The checkpoint of the loop as it stands (rank 0 writes it; every rank gets its path). The metrics are
        flushed first, so that a run resumed from it misses none of the steps up to it."""
        if self.rank != 0:
            return self.ckpt_dir
        self.tracker.flush()
        ws = self.ws
        trainer_state = {**asdict(self.state), "elapsed": time.perf_counter() - self.t0,
                         "gen_state": self.gen.get_state().tolist()}
        return ckpt.save_checkpoint(self.ckpt_dir, modules=checkpoint_modules(ws),
                                    lora_model=ws.lm if ws.is_peft else None, optimizer=self.opt,
                                    scheduler=self.sched, trainer_state=trainer_state, config=flatten(ws.cfg),
                                    contract=ws.contract.to_dict(), base_lm=ws.base_ref)

    def summary(self) -> dict:
        return {"stage": self.name, "steps": self.state.global_step, "micro_steps": self.state.micro_step,
                "checkpoint": str(self.ckpt_dir.absolute()), "probes": self.state.probes,
                "final_probe": self.last_probe, "elapsed": time.perf_counter() - self.t0}


def _attempt(fn, *args):
    """(fn(*args), None), or (None, the error it raised): an error is held until the ranks next agree."""
    try:
        return fn(*args), None
    except Exception as err:  # noqa: BLE001 - every error reaches every rank at the next agreement, then is raised
        return None, err


def train_stage(ws: Workspace, section: StageConfig, tracker, out_dir: Path, *, name: str,
                resume: Path | None = None, on_probe=None) -> dict:
    """Train the stage `name` ("stage_a" or "stage_b", configured by `section`) on ws; returns a summary. Writes
    diagnostics and checkpoints under out_dir; the tracker receives params, step metrics and artifacts.
    `on_probe(step, probe)` is called on rank 0 after every probe (a sweep reports intermediate values there and may
    raise optuna.TrialPruned: the other ranks then stop at the same step, with RankFailed)."""
    run = StageRun(ws, section, name, tracker, out_dir, on_probe)
    if resume is not None:
        run.resume(resume)
    diag_path, epoch_path = run.open_diagnostics()
    failure, signum = None, 0
    with _SignalFlag() as flag, diag_path.open("a") as diag, epoch_path.open("a") as diag_epoch, \
            progress.task(name, total=section.steps, start=run.state.global_step) as bar:
        while run.state.global_step < section.steps and not signum:
            set_training_modes(ws)  # a probe restores modes its own way
            totals, failure = _attempt(run.step) if failure is None else (None, failure)
            signum = dist.agree(dist.News(failure, flag.signum))  # every rank, before the gradient all-reduce
            record = run.update(totals)
            _, failure = _attempt(run.record, record, diag, diag_epoch, bar)
            heap.release(ws.device)  # what the probe freed
        if failure is None:  # the final checkpoint (rank 0), at the end or where a signal stopped every rank
            diag.flush()
            diag_epoch.flush()
            _, failure = _attempt(run.save)
        signum = dist.agree(dist.News(failure, flag.signum))  # no rank returns before the checkpoint exists
    if signum:
        stopped = Interrupted(signum, run.state.global_step, str(run.ckpt_dir.absolute()))
        stopped.quiet = run.rank != 0  # rank 0 prints the one line
        raise stopped
    run.tracker.flush()
    return run.summary()


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
