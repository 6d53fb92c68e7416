"""The comparisons behind `latentgate bench`. Each runs both sides in this process (or, for start-up and the smoke,
in subprocesses it starts), interleaved, and returns a `Row` with the ratio and PASS/FAIL against its target.

key         what                                                   compared with                    target
tracking    Stage A loop with MLflow tracking (SQLite store)       the same loop with NullTracker   >= 0.97x
generation  batched KV-cached greedy decoding (greedy_generate)    HF batched model.generate        >= 1.0x, identical
                                                                   per-example model.generate       >= 10x, identical
step        trainer step tokens/s (smoke config)                   bare forward+backward loop       >= 0.9x
compile     bare step tokens/s, eager                              the same step, torch.compile     info: which wins
startup     `latentgate --help`, `latentgate config` start-up      `python -c pass`                 <= 0.5 s
smoke       `latentgate smoke`: wall time, latent F1, peak RSS     -                                5 min, F1>0, 2 GiB
gpu         Stage B step tokens/s + MFU, generation (1B Llama)     -                                MFU >= 40%
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from latentgate.bench.report import (
    FAIL,
    INFO,
    PASS,
    Row,
    interleave,
    judge,
    median,
    not_measured,
    paired_ratio,
    ratio_row,
)
from latentgate.config import Config, flatten, resolve
from latentgate.tracking import lineage
from latentgate.tracking.schema import Artifact, Stage, Summary

# ---- configs --------------------------------------------------------------------------------------------------


def bench_config(preset: str = "smoke", overrides: dict | None = None, threads: int | None = None) -> Config:
    """The preset's config (model sizes, batch size, losses) with the bench's step budget overrides."""
    ov = dict(overrides or {})
    if threads is not None:
        ov["run.threads"] = threads
    return resolve(preset, ov)


def _stage_overrides(stage: str, steps: int, probe_every: int, checkpoint_every: int) -> dict:
    return {f"{stage}.steps": steps, f"{stage}.warmup_steps": min(2, steps - 1), f"{stage}.probe_every": probe_every,
            f"{stage}.checkpoint_every": checkpoint_every}


@contextlib.contextmanager
def _temp_env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _mlflow_state():
    """Give back MLflow's process-wide tracking URI and active experiment after the bench used its own store."""
    import mlflow
    from mlflow.tracking import fluent

    uri, exp = mlflow.get_tracking_uri(), getattr(fluent, "_active_experiment_id", None)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri)
        if hasattr(fluent, "_active_experiment_id"):
            fluent._active_experiment_id = exp


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds. Both are always reported; `JUDGE_CLOCK` picks the one the CPU comparisons are
    judged on. On a shared machine CPU time is the low-noise measure of work done (other people's jobs stretch
    our wall time, not our CPU time; measured here: wall 2.5x CPU under load, CPU time within a few % run to run).
    It misses time spent waiting on I/O; the SQLite store's fsyncs are a small part of a log_batch here."""
    return time.perf_counter(), time.process_time()


CLOCKS = ("wall", "cpu")
JUDGE_CLOCK = {"clock": "cpu"}  # set by `latentgate bench --clock`


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


class StepClock:
    """Wraps a tracker (NullTracker by default) and notes the clock each time the trainer logs a step's metrics,
    i.e. at the end of every optimizer step (after its probe, if it had one)."""

    def __init__(self, inner=None):
        from latentgate.tracking.tracker import NullTracker

        self.inner = inner if inner is not None else NullTracker()
        self.marks: list[tuple[float, float]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.marks.append(clock())
        self.inner.log_metrics(metrics, step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def segments(start: tuple[float, float], marks: list[tuple[float, float]], end: tuple[float, float] | None = None):
    """(wall, cpu) durations between consecutive clock readings."""
    points = [start, *marks] + ([end] if end is not None else [])
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(points, points[1:], strict=False)]


def best_of(reps: list[list[tuple[float, float]]], which: slice | None = None) -> tuple[float, float]:
    """Per segment, the fastest repetition (noise on a shared machine only ever adds time), summed: (wall, cpu).
    The work in segment k is identical in every repetition (same weights, batches and seeds)."""
    n = min(len(r) for r in reps)
    idx = range(n)[which or slice(None)]
    return (sum(min(r[k][0] for r in reps) for k in idx), sum(min(r[k][1] for r in reps) for k in idx))


def _split(samples: list[tuple[float, float]]) -> dict[str, list[float]]:
    return {"wall": [x[0] for x in samples], "cpu": [x[1] for x in samples]}


def total_of(rep: list[tuple[float, float]], which: slice | None = None) -> tuple[float, float]:
    part = rep[which or slice(None)]
    return sum(x[0] for x in part), sum(x[1] for x in part)


# ---- 1. tracking overhead -------------------------------------------------------------------------------------

TRACKING = ("training step with full MLflow tracking (SQLite store: per-step metrics, probes, checkpoints)",
            "the same loop with NullTracker", ">= 0.97x")


def bench_tracking(cfg: Config, work: Path, reps: int = 3, steps: int = 40, stage: str = "stage_a",
                   store_uri: str | None = None) -> Row:
    """`train_stage` inside a real tracked run (metrics batched into a fresh SQLite store, probes and checkpoints
    flushed and logged as artifacts) vs the same call with `NullTracker`, both from the same starting weights.
    Timed: the training loop plus the artifact logging of its checkpoint. Run start/params/tags/end are one-off
    per stage and reported separately. `store_uri`: an existing store (default: a fresh SQLite file in `work`)."""
    from latentgate.bench.fixtures import Snapshot, smoke_workspace
    from latentgate.tracking.runs import setup_experiment, tracked_run
    from latentgate.tracking.tracker import NullTracker
    from latentgate.train.trainer import train_stage

    half = max(1, steps // 2)
    cfg = resolve(None, {**flatten(cfg), **_stage_overrides(stage, steps, half, half)})
    if store_uri is None:
        (work / "store").mkdir(parents=True, exist_ok=True)
        store_uri = f"sqlite:///{work / 'store' / 'mlflow.db'}"
    ws = smoke_workspace(cfg, work / "base", stage)
    snap = Snapshot(ws)
    results: dict[str, list] = {"tracked": [], "null": []}
    with _mlflow_state(), _temp_env(MLFLOW_TRACKING_URI=store_uri, MLFLOW_DISABLE_TELEMETRY="true"):
        setup_experiment("latentgate-bench")

        def run(name: str):
            snap.restore()
            out = work / f"{name}-{len(results[name])}"
            tracked = name == "tracked"
            ctx = tracked_run(f"bench-{stage}", nested=False) if tracked else contextlib.nullcontext(NullTracker())
            t_run = clock()
            with ctx as tr:
                tr.log_params(flatten(cfg))
                timed = StepClock(tr)
                t0 = clock()
                res = train_stage(ws, stage, timed, out)
                tr.log_artifact(out / Artifact.DIAGNOSTICS)
                tr.log_artifacts(res["checkpoint"], Artifact.checkpoint(stage))
                t1 = clock()
            results[name].append({"run_id": tr.run_id, "losses": _losses(out / Artifact.DIAGNOSTICS),
                                  "setup": _since(t_run)[0] - (t1[0] - t0[0])})
            return segments(t0, timed.marks, t1)

        raw = interleave({"null": lambda: run("null"), "tracked": lambda: run("tracked")}, reps,
                         timer=lambda name, result, wall: result)
        run_id = results["tracked"][-1]["run_id"]
        logged = len(lineage.client().get_metric_history(run_id, Stage.metric(stage, Stage.LOSS)))
    best = {k: best_of(v) for k, v in raw.items()}
    totals = {k: _split([total_of(r) for r in v]) for k, v in raw.items()}
    c = CLOCKS.index(JUDGE_CLOCK["clock"])
    ratio = best["null"][c] / best["tracked"][c]
    side = paired_ratio(totals["null"]["wall"], totals["tracked"]["wall"])
    same = all(r["losses"] == results["null"][0]["losses"] for r in results["tracked"] + results["null"])
    setup = median([r["setup"] for r in results["tracked"]])
    per_step_ms = (best["tracked"][c] - best["null"][c]) / steps * 1000
    details = {"steps": steps, "reps": reps, "stage": stage, "probe_every": half, "checkpoint_every": half,
               "clock": CLOCKS[c], "ratio_best_wall": best["null"][0] / best["tracked"][0],
               "ratio_best_cpu": best["null"][1] / best["tracked"][1],
               "ratio_median_wall": side, "best_s": best, "totals_s": totals,
               "overhead_ms_per_step": per_step_ms, "run_start_end_s": setup,
               "metrics_logged_for_loss": logged, "identical_losses": same}
    measured = (f"{ratio:.3f}x by {CLOCKS[c]} time ({best['tracked'][c]:.2f} s vs {best['null'][c]:.2f} s for "
                f"{steps} steps, {per_step_ms:+.1f} ms/step); wall: best {details['ratio_best_wall']:.3f}x, median "
                f"of {reps} pairs {side:.3f}x; run start/end {setup:.2f} s once per stage")
    row = ratio_row("tracking", TRACKING[0], TRACKING[1], ratio, ">=", 0.97, measured, details=details)
    if logged != steps or not same:
        row.status = FAIL
        row.measured += f"; BROKEN: {logged} of {steps} loss metrics in the store, identical losses: {same}"
    return row


def _losses(path: Path) -> list[float]:
    return [json.loads(line)[Stage.LOSS] for line in path.read_text().splitlines() if line.strip()]


# ---- 2. generation --------------------------------------------------------------------------------------------

GENERATION = ("eval generation: batched KV-cached greedy decoding from inputs_embeds",
              "HF batched model.generate(inputs_embeds, attention_mask), same batches", ">= 1.0x, identical outputs")
GENERATION_LOOP = ("eval generation: batched KV-cached greedy decoding from inputs_embeds",
                   "per-example model.generate loop over the same inputs", ">= 10x, identical outputs")


def _cut(row: list[int], stops: set[int]) -> list[int]:
    return row[: next((i for i, t in enumerate(row) if t in stops), len(row))]


def hf_batched_generate(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                        stop_ids, pad_id: int, batch_size: int) -> list[list[int]]:
    """The peer a user would pick: HF `generate` on whole batches from `inputs_embeds` (rows left-padded, as
    latent prefixes and the eval's text prompts are), greedy, every stop id as an end token."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    rows: list[list[int]] = []
    for s in range(0, inputs_embeds.shape[0], batch_size):
        out = lm.generate(inputs_embeds=inputs_embeds[s : s + batch_size],
                          attention_mask=attention_mask[s : s + batch_size], max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=sorted(stops), pad_token_id=pad_id)
        rows += [_cut(r, stops) for r in out.tolist()]
    return rows


def per_example_generate(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                         stop_ids, pad_id: int) -> list[list[int]]:
    """The reference: `model.generate` one example at a time, cut at (and excluding) the first stop id."""
    rows, stops = [], {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    for i in range(inputs_embeds.shape[0]):
        out = lm.generate(inputs_embeds=inputs_embeds[i : i + 1], attention_mask=attention_mask[i : i + 1],
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stops),
                          pad_token_id=pad_id)
        rows.append(_cut(out[0].tolist(), stops))
    return rows


def batched_generate(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     stop_ids, batch_size: int) -> list[list[int]]:
    from latentgate.eval.generate import greedy_generate

    rows: list[list[int]] = []
    for s in range(0, inputs_embeds.shape[0], batch_size):
        rows += greedy_generate(lm, inputs_embeds[s : s + batch_size], attention_mask[s : s + batch_size],
                                max_new_tokens, stop_ids).token_ids
    return rows


def latent_prefixes(ws, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval latent path's generation inputs (encoder -> adapter -> prefix contract), in eval mode."""
    from latentgate.eval.probe import EvalMode
    from latentgate.model.contract import build_latent_batch

    with torch.no_grad(), EvalMode(ws.encoder, ws.adapter, ws.lm):
        prefix = build_latent_batch(ws.contract, ws.embed, ws.latents(examples))
    return prefix.inputs_embeds, prefix.attention_mask


def bench_generation(cfg: Config, work: Path, reps: int = 3, n: int = 200, ws=None,
                     loop_reps: int = 1) -> list[Row]:
    """Two rows from one interleaved run: ours vs HF batched `generate` (same batches), and vs the per-example
    loop. Both peers must produce exactly our token ids."""
    from latentgate.bench.fixtures import smoke_workspace
    from latentgate.eval.probe import EvalMode

    ws = ws or smoke_workspace(cfg, work / "base")
    examples = (ws.splits["eval"] * (n // max(1, len(ws.splits["eval"])) + 1))[:n]
    emb, mask = latent_prefixes(ws, examples)
    t, eos, pad = cfg.eval.max_new_tokens, ws.contract.stop_ids, ws.contract.pad_id
    outputs: dict[str, list] = {}

    def side(name, fn):
        def go():
            with torch.no_grad(), EvalMode(ws.lm):
                outputs[name] = fn()
        return go

    bs = cfg.eval.batch_size
    times = interleave({"ours": side("ours", lambda: batched_generate(ws.lm, emb, mask, t, eos, bs)),
                        "hf_batched": side("hf_batched", lambda: hf_batched_generate(ws.lm, emb, mask, t, eos,
                                                                                      pad, bs)),
                        "per_example": side("per_example", lambda: per_example_generate(ws.lm, emb, mask, t, eos,
                                                                                         pad))},
                       reps, counts={"per_example": loop_reps})
    ours = median(times["ours"])
    lengths = [len(r) for r in outputs["ours"]]
    common = {"n": n, "max_new_tokens": t, "batch_size": bs, "ours_s": times["ours"],
              "ours_answers_per_s": n / ours, "mean_generated_tokens": sum(lengths) / max(1, len(lengths))}
    rows = []
    for key, peer, (what, compared, _), target in (("generation", "hf_batched", GENERATION, 1.0),
                                                  ("generation_loop", "per_example", GENERATION_LOOP, 10)):
        p = median(times[peer])
        mismatches = sum(x != y for x, y in zip(outputs["ours"], outputs[peer], strict=True))
        measured = (f"{p / ours:.2f}x ({n / ours:.0f} vs {n / p:.1f} answers/s, n={n}, batch {bs}); outputs "
                    + ("identical" if mismatches == 0 else f"DIFFER in {mismatches} of {n}"))
        row = ratio_row(key, what, compared, p / ours, ">=", target, measured,
                        details={**common, f"{peer}_s": times[peer], f"{peer}_answers_per_s": n / p,
                                 "mismatches": mismatches})
        if mismatches:
            row.status = FAIL
        rows.append(row)
    return rows


# ---- 3. trainer step vs bare loop -----------------------------------------------------------------------------

STEP = ("training step throughput (tokens/s), default smoke config", "the same model's plain forward+backward loop "
        "(same batch tensors)", ">= 0.9x")


def prepare_bare_batch(ws, examples) -> dict:
    """Everything the trainer derives from text, done once: encoder ids, the teacher's text batch, the student's
    constant prefix/answer embeddings (the LM is frozen), attention mask and HF labels."""
    from latentgate.model.contract import build_latent_batch, build_text_batch, encode_answers, text_prompt
    from latentgate.model.latent import encoder_text

    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in examples])
    ids, mask = ws.enc_tok([encoder_text(e.context, e.question) for e in examples], ws.device)
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
    from latentgate.train.trainer import build_optimizer

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
    from latentgate.bench.fixtures import Snapshot, smoke_workspace
    from latentgate.train.trainer import batch_indices, train_stage

    cfg = resolve(None, {**flatten(cfg), **_stage_overrides(stage, steps, steps, 0)})
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
        train_stage(ws, stage, timed, out)
        return segments(t0, timed.marks)

    bare = bare_loop(ws, st, batches, snap)

    # steps warm+1 .. N-1: after warm-up, and before the last step (which carries the trainer's final probe)
    steady = slice(warm, steps - 1)
    raw = interleave({"bare": bare, "trainer": trainer}, reps, timer=lambda name, result, wall: result)
    best = {k: best_of(v, steady) for k, v in raw.items()}
    totals = {k: _split([total_of(r, steady) for r in v]) for k, v in raw.items()}
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
    from latentgate.bench.fixtures import Snapshot, smoke_workspace
    from latentgate.train.trainer import batch_indices

    cfg = resolve(None, {**flatten(cfg), **_stage_overrides(stage, steps, steps, 0)})
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


# ---- 4. CLI start-up ------------------------------------------------------------------------------------------

STARTUP = ("`latentgate --help` / `latentgate config` start-up (lazy imports)", "`python -c pass`", "<= 0.5 s")


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "latentgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "latentgate"]


def heavy_imports_at_startup() -> list[str]:
    """Heavy modules that `import latentgate.cli` pulls in (must be none)."""
    code = ("import sys, latentgate.cli; print(','.join(m for m in ('torch', 'mlflow', 'transformers', 'peft', "
            "'optuna', 'evaluate', 'pandas', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return [m for m in out.stdout.strip().split(",") if m]


def bench_startup(reps: int = 5) -> Row:
    cli = cli_command()
    cmds = {"python -c pass": [sys.executable, "-c", "pass"], "latentgate --help": cli + ["--help"],
            "latentgate config": cli + ["config"]}

    def runner(cmd):
        def go():
            subprocess.run(cmd, capture_output=True, check=True, timeout=60)
        return go

    times = interleave({k: runner(v) for k, v in cmds.items()}, reps)
    med = {k: median(v) for k, v in times.items()}
    worst = max(med["latentgate --help"], med["latentgate config"])
    heavy = heavy_imports_at_startup()
    details = {"reps": reps, "seconds": times, "median_s": med, "heavy_imports": heavy, "command": cli}
    measured = (f"--help {med['latentgate --help']:.2f} s, config {med['latentgate config']:.2f} s "
                f"(python -c pass {med['python -c pass']:.2f} s; +{worst - med['python -c pass']:.2f} s); "
                f"heavy imports at start-up: {', '.join(heavy) or 'none'}")
    row = ratio_row("startup", STARTUP[0], STARTUP[1], worst, "<=", 0.5, measured, unit=" s", details=details)
    if heavy:
        row.status = FAIL
    return row


# ---- 5. the smoke ---------------------------------------------------------------------------------------------

SMOKE = ("`latentgate smoke` on this CPU (base LM cached): wall time, latent F1, peak RSS", "-",
         "<= 5 min, F1 > 0, <= 2 GiB")
_RUN_ID = re.compile(r"run id\s+([0-9a-f]{32})")
_LATENT = re.compile(r"latent F1 / EM\s+([0-9.]+)\s*/\s*([0-9.]+)")
_WALL = re.compile(r"wall time\s+([0-9.]+)\s*s")
_URI = re.compile(r"--backend-store-uri\s+(\S+?)\)")


def parse_smoke_summary(text: str) -> dict:
    """run id, latent F1/EM and wall time from `format_summary` output."""
    out: dict = {}
    if m := _RUN_ID.search(text):
        out["run_id"] = m.group(1)
    if m := _LATENT.search(text):
        out[Summary.LATENT_F1], out[Summary.LATENT_EM] = float(m.group(1)), float(m.group(2))
    if m := _WALL.search(text):
        out["wall_seconds"] = float(m.group(1))
    if m := _URI.search(text):
        out["tracking_uri"] = m.group(1)
    return out


def measure_subprocess(cmd: list[str], env: dict | None = None, cwd: Path | None = None,
                       log: Path | None = None) -> dict:
    """Run cmd; its wall time, exit code, peak RSS (bytes, from wait4's rusage of that very child) and output."""
    import tempfile

    with tempfile.TemporaryFile("w+") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        fh.seek(0)
        text = fh.read()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
    return {"wall_s": wall, "rc": proc.returncode, "max_rss_bytes": usage.ru_maxrss * 1024, "output": text,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime}


def smoke_f1_from_store(run_id: str, env: dict, printed_uri: str | None = None) -> float | None:
    """The parent run's `latent_f1` metric, read back from the store the smoke wrote to."""
    try:
        from mlflow import MlflowClient

        uri = env.get("MLFLOW_TRACKING_URI") or printed_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        return MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics.get(Summary.LATENT_F1)
    except Exception:  # noqa: BLE001 - the printed summary is the fallback
        return None


def bench_smoke(preset: str = "smoke", extra_args: list[str] | None = None, out_dir: Path | None = None,
                env: dict | None = None, wall_target: float = 300.0, rss_target: float = 2 * 1024**3) -> Row:
    from latentgate.train.workspace import malloc_env

    run_env = {**os.environ, **malloc_env(), "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
               **(env or {})}
    cmd = cli_command() + ["smoke", "--preset", preset, *(extra_args or [])]
    res = measure_subprocess(cmd, env=run_env, log=(out_dir / "smoke.log") if out_dir else None)
    parsed = parse_smoke_summary(res["output"])
    f1_store = None
    if "run_id" in parsed:
        f1_store = smoke_f1_from_store(parsed["run_id"], run_env, parsed.get("tracking_uri"))
    f1 = f1_store if f1_store is not None else parsed.get(Summary.LATENT_F1)
    wall, rss = res["wall_s"], res["max_rss_bytes"]
    details = {"command": cmd, "rc": res["rc"], "wall_s": wall, "max_rss_bytes": rss, Summary.LATENT_F1: f1,
               "latent_f1_source": "mlflow" if f1_store is not None else "printed summary", **parsed,
               "user_s": res["user_s"], "sys_s": res["sys_s"],
               "output_tail": res["output"][-2000:] if res["rc"] else ""}
    checks = {"wall": judge(wall, "<=", wall_target), "f1": judge(f1, ">", 0.0), "rss": judge(rss, "<=", rss_target)}
    details["checks"] = checks
    status = PASS if res["rc"] == 0 and all(c == PASS for c in checks.values()) else FAIL
    f1_text = "n/a" if f1 is None else f"{f1:.3f}"
    measured = (f"{wall:.0f} s ({checks['wall']}), latent F1 {f1_text} ({checks['f1']}), peak RSS "
                f"{rss / 1024**3:.2f} GiB ({checks['rss']}); preset {preset}"
                + ("" if res["rc"] == 0 else f"; exit code {res['rc']}"))
    return Row("smoke", SMOKE[0], SMOKE[1], measured, f"<= {wall_target / 60:g} min, F1 > 0, <= "
               f"{rss_target / 1024**3:g} GiB", status, wall, "<=", wall_target, details)


# ---- 6. GPU ---------------------------------------------------------------------------------------------------

GPU_STEP = ("GPU: Stage B step of a 1B-class Llama (random init, bf16): tokens/s and MFU", "-", "MFU >= 40%")
GPU_GEN = ("GPU: eval generation rate (batched greedy, 1B-class Llama)", "-", "report answers/s")
LLAMA_1B = {"base.hidden": 2048, "base.layers": 16, "base.heads": 16, "base.intermediate": 8192,
            "base.dtype": "bfloat16",
            "stage_b.batch_size": 64, "data.n_train": 4096, "data.n_eval": 200, "data.n_probe": 16}
LLAMA_1B_VOCAB = 128256
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def direct_workspace(cfg: Config, device: torch.device, vocab_size: int | None = None, stage: str = "stage_b"):
    """A Workspace built in memory on `device` (a 1B model is not worth a round trip through disk): the builtin
    tokenizer, a Llama from config in base.dtype, the encoder/adapter, and LoRA for Stage B."""
    from latentgate.data.synthetic import vocabulary
    from latentgate.model.base_lm import build_builtin_lm, build_builtin_tokenizer, embedding_rms, freeze, resolve_dtype
    from latentgate.model.contract import PrefixContract
    from latentgate.model.latent import build_latent_modules
    from latentgate.model.lora import attach_lora
    from latentgate.train.workspace import Workspace, load_splits, set_threads, synthetic_spec

    set_threads(cfg.run.threads)
    tok = build_builtin_tokenizer(vocabulary(synthetic_spec(cfg)))
    with torch.device(device):
        lm = build_builtin_lm(cfg, vocab_size or len(tok), tok)
    lm = freeze(lm.to(resolve_dtype(cfg.base.dtype, device)))
    contract = PrefixContract.for_config(cfg, tok)
    ws = Workspace(cfg, device, lm, tok, contract, load_splits(cfg))
    ws.encoder, ws.adapter, ws.enc_tok = build_latent_modules(cfg, lm, tok, embedding_rms(lm))
    ws.encoder.to(device)
    ws.adapter.to(device)
    if stage == "stage_b":
        ws.lm, ws.lora_counts = attach_lora(ws.lm, cfg)
    return ws


def check_placement(ws) -> dict:
    """Every parameter and buffer on the workspace's device; the frozen LM's weights in base.dtype. Raises on a
    misplaced tensor, returns dtype counts."""
    from latentgate.model.base_lm import resolve_dtype

    want = resolve_dtype(ws.cfg.base.dtype, ws.device)
    dtypes: dict[str, int] = {}
    for owner, module in (("lm", ws.lm), ("encoder", ws.encoder), ("adapter", ws.adapter)):
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.device.type != ws.device.type:
                raise AssertionError(f"{owner}.{name} is on {t.device}, expected {ws.device}")
            if owner == "lm" and "lora_" not in name and t.is_floating_point() and t.dtype != want \
                    and name.endswith("weight"):
                raise AssertionError(f"lm.{name} is {t.dtype}, expected {want}")
            key = f"{owner}:{'lora' if 'lora_' in name else 'base'}:{str(t.dtype).removeprefix('torch.')}"
            dtypes[key] = dtypes.get(key, 0) + t.numel()
    return dtypes


def _body_params(module) -> int:
    """Parameters of the transformer layers (what the 2N-FLOPs-per-token rule counts)."""
    return sum(p.numel() for n, p in module.named_parameters() if ".layers." in f".{n}" and "lora_" not in n)


def step_flops(ws, examples) -> tuple[float, int]:
    """Model FLOPs of one Stage B micro-step (padded shapes): the trainable encoder 6N per token, the student LM
    4N (forward + activation gradients; its weights are frozen), the teacher 2N, and the LM head on the kept
    answer positions. Returns (flops, tokens)."""
    from latentgate.model.contract import build_text_batch, encode_answers, text_prompt
    from latentgate.model.latent import encoder_text

    answers = encode_answers(ws.contract, ws.tokenizer, [e.answer for e in examples])
    ids, _ = ws.enc_tok([encoder_text(e.context, e.question) for e in examples], ws.device)
    b, t_ans = len(examples), max(len(a) for a in answers)
    student = b * (ws.contract.prefix_len + t_ans - 1)
    teacher = 0
    if ws.cfg.stage_b.kd_weight > 0:
        with torch.no_grad():
            prompts = [text_prompt(e.context, e.question) for e in examples]
            teacher = build_text_batch(ws.contract, ws.tokenizer, ws.embed, prompts, answers).attention_mask.numel()
    n_enc, n_lm = _body_params(ws.encoder), _body_params(ws.lm)
    head = 2 * ws.embed.weight.shape[0] * ws.embed.weight.shape[1] * b * t_ans
    flops = 6 * n_enc * ids.numel() + 4 * n_lm * student + 2 * n_lm * teacher + 2 * head + (head if teacher else 0)
    return float(flops), ids.numel() + student + teacher


def gpu_stage_b(cfg: Config, device: torch.device, steps: int = 8, warm: int = 2, vocab_size: int | None = None,
                gen_n: int = 200) -> dict:
    """Stage B steps through the trainer's own step function (`stage_step`, optimizer, clipping, schedule) on
    `device`, timed with device synchronisation; then the eval generation rate. Works on CPU too (tests)."""
    from latentgate.train.trainer import batch_indices, build_optimizer

    ws = direct_workspace(cfg, device, vocab_size)
    placement = check_placement(ws)
    st = cfg.stage_b
    opt, sched, groups = build_optimizer(ws, st)
    trainable = [p for ps in groups.values() for p in ps]
    train = ws.splits["train"]
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ws.encoder.train()
    ws.adapter.train()
    ws.lm.train()
    batches = [[train[i] for i in batch_indices(len(train), st.batch_size, k, st.seed)] for k in range(steps)]
    counted = [step_flops(ws, b) for b in batches[warm:]]  # outside the timed region (it tokenizes on the host)
    flops, tokens = sum(f for f, _ in counted), sum(n for _, n in counted)
    syncs = None
    for k, examples in enumerate(batches):
        if k == warm:
            sync()
            t0 = time.perf_counter()
        if device.type == "cuda" and k == warm - 1:
            syncs = _count_syncs(_one_step, ws, examples, st, k, gen, opt, sched, trainable)
        else:
            _one_step(ws, examples, st, k, gen, opt, sched, trainable)
    sync()
    dt = time.perf_counter() - t0
    peak = peak_flops(device)
    out = {"device": str(device), "dtype": cfg.base.dtype, "steps": steps - warm, "seconds": dt,
           "tokens_per_s": tokens / dt, "model_tflops_per_s": flops / dt / 1e12,
           "mfu": (flops / dt / peak) if peak else None, "placement": placement,
           "lm_params": sum(p.numel() for p in ws.lm.parameters()), "host_syncs_per_step": syncs,
           "batch_size": st.batch_size}
    examples = (ws.splits["eval"] * (gen_n // max(1, len(ws.splits["eval"])) + 1))[:gen_n]
    emb, mask = latent_prefixes(ws, examples)
    with torch.no_grad():
        batched_generate(ws.lm, emb[:2], mask[:2], 2, ws.contract.stop_ids, cfg.eval.batch_size)  # warm-up
        sync()
        t0 = time.perf_counter()
        batched_generate(ws.lm, emb, mask, cfg.eval.max_new_tokens, ws.contract.stop_ids, cfg.eval.batch_size)
        sync()
    out["gen_answers_per_s"] = gen_n / (time.perf_counter() - t0)
    return out


def _one_step(ws, examples, st, k, gen, opt, sched, trainable) -> None:
    from latentgate.train.trainer import stage_step

    out = stage_step(ws, examples, st, k, gen)
    out.total.backward()
    torch.nn.utils.clip_grad_norm_(trainable, st.clip_norm if st.clip_norm > 0 else float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _count_syncs(fn, *args) -> int:
    """Host-device synchronisations during fn (torch's sync debug mode warns on each)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_gpu(overrides: dict | None = None, steps: int = 8) -> list[Row]:
    if not torch.cuda.is_available():
        return [not_measured("gpu_step", *GPU_STEP, "no GPU"), not_measured("gpu_generation", *GPU_GEN, "no GPU")]
    cfg = resolve("smoke", {**LLAMA_1B, **(overrides or {})})
    torch.backends.cuda.matmul.allow_tf32 = True
    r = gpu_stage_b(cfg, torch.device("cuda"), steps=steps, vocab_size=LLAMA_1B_VOCAB)
    mfu = r["mfu"]
    step = Row("gpu_step", *GPU_STEP[:2], f"{r['tokens_per_s']:.0f} tokens/s, {r['model_tflops_per_s']:.1f} TFLOP/s, "
               f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'} on {torch.cuda.get_device_name(0)} "
               f"({r['lm_params'] / 1e9:.2f}B LM, batch {r['batch_size']}, {r['host_syncs_per_step']} host syncs/step)",
               GPU_STEP[2], judge(mfu, ">=", 0.40), mfu, ">=", 0.40, r)
    genrow = Row("gpu_generation", *GPU_GEN[:2], f"{r['gen_answers_per_s']:.0f} answers/s", GPU_GEN[2], INFO,
                 r["gen_answers_per_s"], details={"max_new_tokens": cfg.eval.max_new_tokens})
    return [step, genrow]


__all__ = ["bench_config", "bench_tracking", "bench_generation", "bench_step", "bench_compile", "bench_startup",
           "bench_smoke", "bench_gpu", "gpu_stage_b", "per_example_generate", "hf_batched_generate",
           "batched_generate", "parse_smoke_summary",
           "measure_subprocess"]
