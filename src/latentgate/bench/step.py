"""Comparison 3: the trainer's step against a bare forward+backward loop; eager against torch.compile."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from latentgate.bench.fixtures import Snapshot, smoke_workspace
from latentgate.bench.report import INFO, Row, interleave, paired_ratio, ratio_row
from latentgate.bench.timing import (
    CLOCKS,
    JUDGE_CLOCK,
    StepClock,
    best_of,
    clock,
    segments,
    split_clocks,
    stage_overrides,
    total_of,
)
from latentgate.config import Config, flatten, resolve
from latentgate.model.contract import build_latent_batch, build_text_batch, encode_answers, text_prompt
from latentgate.train.trainer import batch_indices, build_optimizer, train_stage

# ---- 3. trainer step vs bare loop -----------------------------------------------------------------------------

STEP = ("training step throughput (tokens/s), default smoke config", "the same model's plain forward+backward loop "
        "(same batch tensors)", ">= 0.9x")


def prepare_bare_batch(ws, examples) -> dict:
    """Everything the trainer derives from text, done once: encoder ids, the teacher's text batch, the student's
    constant prefix/answer embeddings (the LM is frozen), attention mask and HF labels."""
    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in examples])
    ids, mask = ws.enc_tok(examples, ws.device)
    with torch.no_grad():
        prompts = [text_prompt(e.context, e.question) for e in examples]
        tb = build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers)
        dummy = torch.zeros(len(examples), ws.contract.num_latents, ws.embed.weight.shape[1], device=ws.device)
        sb = build_latent_batch(ws.contract, ws.embed, dummy, answer_targets=answers)
    m = ws.contract.num_latents
    head = len(ws.contract.head_ids)
    emb = sb.inputs_embeds.detach()
    tokens = int(mask.sum()) + int(sb.attention_mask.sum()) + int(tb.attention_mask.sum())
    return {"ids": ids, "mask": mask, "t_emb": tb.inputs_embeds.detach(), "t_attn": tb.attention_mask,
            "pre": emb[:, :head], "post": emb[:, head + m :], "attn": sb.attention_mask, "labels": sb.labels,
            "tokens": tokens}


def bare_step(ws, batch: dict, opt, kd: bool, lm=None, encoder=None) -> None:
    """Plain forward + backward + optimizer step of the same model on prepared tensors (`lm`/`encoder`: the same
    modules compiled, for the torch.compile row)."""
    lm = ws.lm if lm is None else lm  # (a compiled module's truth value is not defined)
    encoder = ws.encoder if encoder is None else encoder
    lat = ws.adapter(encoder(batch["ids"], batch["mask"]))
    if kd:
        with torch.no_grad(), ws.teacher():
            lm(inputs_embeds=batch["t_emb"], attention_mask=batch["t_attn"], use_cache=False)
    emb = torch.cat([batch["pre"], lat.to(batch["pre"].dtype), batch["post"]], dim=1)
    loss = lm(inputs_embeds=emb, attention_mask=batch["attn"], labels=batch["labels"], use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bare_loop(ws, st, batches: list[dict], snap, **modules):
    """One timed pass of `bare_step` over the batches from the snapshot's weights (a fresh optimizer each pass);
    returns the per-step clock segments. `modules`: compiled stand-ins for the LM and encoder."""
    def go():
        snap.restore()
        ws.encoder.train()
        ws.adapter.train()
        t0 = clock()
        opt, _, _ = build_optimizer(ws, st)
        marks = []
        for batch in batches:
            bare_step(ws, batch, opt, st.kd_weight > 0, **modules)
            marks.append(clock())
        return segments(t0, marks)
    return go


def bench_step(cfg: Config, work: Path, reps: int = 3, steps: int = 14, warm: int = 2, stage: str = "stage_a",
               ws=None) -> Row:
    """`train_stage` (NullTracker, clocked per step by `StepClock`) vs `bare_step` over the same micro-batches, both
    from the same starting weights; best-of-repetitions per step, summed over the steady steps."""
    cfg = resolve(None, {**flatten(cfg), **stage_overrides(stage, steps, steps, 0)})
    ws = ws or smoke_workspace(cfg, work / "base", stage)
    ws.cfg = cfg
    st = getattr(cfg, stage)
    train = ws.splits["train"]
    batches = [prepare_bare_batch(ws, [train[i] for i in batch_indices(len(train), st.batch_size, k, st.seed)])
               for k in range(steps)]
    tokens = [b["tokens"] for b in batches]
    snap = Snapshot(ws)
    counter = {"trainer": 0}

    def trainer():
        snap.restore()
        out = work / f"step-trainer-{counter['trainer']}"
        counter["trainer"] += 1
        timed = StepClock()
        t0 = clock()
        train_stage(ws, st, timed, out, name=stage)
        return segments(t0, timed.marks)

    bare = bare_loop(ws, st, batches, snap)

    # steps warm+1 .. N-1: after warm-up, and before the last step (which carries the trainer's final probe)
    steady = slice(warm, steps - 1)
    raw = interleave({"bare": bare, "trainer": trainer}, reps, timer=lambda name, result, wall: result)
    best = {k: best_of(v, steady) for k, v in raw.items()}
    totals = {k: split_clocks([total_of(r, steady) for r in v]) for k, v in raw.items()}
    n = steps - 1 - warm
    tok_per_step = sum(tokens[steady]) / n
    c = CLOCKS.index(JUDGE_CLOCK["clock"])
    ratio = best["bare"][c] / best["trainer"][c]
    side = paired_ratio(totals["bare"]["wall"], totals["trainer"]["wall"])
    tr, br = tok_per_step * n / best["trainer"][c], tok_per_step * n / best["bare"][c]
    details = {"steps": steps, "warm": warm, "reps": reps, "batch_size": st.batch_size, "tokens_per_step": tok_per_step,
               "clock": CLOCKS[c], "ratio_best_wall": best["bare"][0] / best["trainer"][0],
               "ratio_best_cpu": best["bare"][1] / best["trainer"][1],
               "ratio_median_wall": side, "best_s": best, "totals_s": totals,
               "trainer_tokens_per_s": tr, "bare_tokens_per_s": br}
    measured = (f"{ratio:.3f}x by {CLOCKS[c]} time ({tr:.0f} vs {br:.0f} tokens/s, {best['trainer'][c] / n * 1000:.0f}"
                f" vs {best['bare'][c] / n * 1000:.0f} ms/step, batch {st.batch_size}); wall: best "
                f"{details['ratio_best_wall']:.3f}x, median of {reps} pairs {side:.3f}x")
    return ratio_row("step", STEP[0], STEP[1], ratio, ">=", 0.9, measured, details=details)


COMPILE = ("training step tokens/s, eager PyTorch (the bare step above)", "the same step with the LM and encoder "
           "under torch.compile (compile time reported apart)", "info: which wins")


def bench_compile(cfg: Config, work: Path, reps: int = 3, steps: int = 8, warm: int = 2, stage: str = "stage_a",
                  ws=None) -> Row:
    """Eager vs `torch.compile` of the same bare step over the same batches, from the same weights. The first
    compiled pass (all shapes compiled) is timed apart as the compile cost; the row says which side wins."""
    cfg = resolve(None, {**flatten(cfg), **stage_overrides(stage, steps, steps, 0)})
    ws = ws or smoke_workspace(cfg, work / "base", stage)
    st = getattr(cfg, stage)
    train = ws.splits["train"]
    batches = [prepare_bare_batch(ws, [train[i] for i in batch_indices(len(train), st.batch_size, k, st.seed)])
               for k in range(steps)]
    snap = Snapshot(ws)
    compiled = {"lm": torch.compile(ws.lm), "encoder": torch.compile(ws.encoder)}

    eager, comp = bare_loop(ws, st, batches, snap), bare_loop(ws, st, batches, snap, **compiled)
    t0 = time.perf_counter()
    comp()  # compiles every batch shape once
    compile_s = time.perf_counter() - t0
    raw = interleave({"eager": eager, "compiled": comp}, reps, timer=lambda name, result, wall: result)
    steady = slice(warm, steps)
    best = {k: best_of(v, steady) for k, v in raw.items()}
    c = CLOCKS.index(JUDGE_CLOCK["clock"])
    ratio = best["eager"][c] / best["compiled"][c]  # > 1: compiled is faster
    n = steps - warm
    tokens = sum(b["tokens"] for b in batches[steady])
    winner = "torch.compile" if ratio > 1.02 else "eager" if ratio < 0.98 else "neither (within 2%)"
    measured = (f"compiled {ratio:.2f}x eager by {CLOCKS[c]} time ({tokens / best['compiled'][c]:.0f} vs "
                f"{tokens / best['eager'][c]:.0f} tokens/s, {best['compiled'][c] / n * 1000:.0f} vs "
                f"{best['eager'][c] / n * 1000:.0f} ms/step); first compiled pass {compile_s:.0f} s; wins: {winner}")
    details = {"steps": steps, "warm": warm, "reps": reps, "clock": CLOCKS[c], "best_s": best,
               "first_compiled_pass_s": compile_s, "winner": winner,
               "steps_to_repay_compile": (compile_s / max(1e-9, (best["eager"][c] - best["compiled"][c]) / n)
                                          if ratio > 1 else None)}
    return Row("compile", COMPILE[0], COMPILE[1], measured, COMPILE[2], INFO, ratio, None, None, details)
