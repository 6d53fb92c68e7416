"""Peak RSS of the SmolLM2 smoke on SQuAD-length contexts (issue #25: under 4 GiB for a 30 + 30-step smoke, under 2
GiB for the text-teacher eval). From the repository root with the venv's python (PYTHONPATH=src in a worktree):

    python bench/smollm2_rss.py data /tmp/sq/squad.json           # 400 train + 100 eval questions, 60-300 word contexts
    python bench/smollm2_rss.py run /tmp/sq/squad.json --out /tmp/sm25 [--set key=value ...]
    python bench/smollm2_rss.py steps /tmp/sq/squad.json --stage stage_b --steps 1 [--set key=value ...]

`data` writes a SQuAD v1.1 file: each question of the smollm2 preset's synthetic task after 60-300 words of the task's
own text (no real SQuAD file offline; prompts of about 254 tokens on average, 478 at most). `run` starts
`latentgate smoke --preset smollm2` on it (30 + 30 steps, probes every 10, gate F1 0.1; the extra --set after the
defaults) in --out (its own mlflow.db), samples the RSS of the process tree every 5 s into rss.tsv with the phase
the smoke's progress lines name, and prints the peak per phase. `steps` runs a few optimizer steps of one stage in
this process on the stage's longest training examples (the trainer's own stage_step, backward, clipping and AdamW;
Stage B with its LoRA), then one probe, and prints the RSS after each moment: the worst batch in minutes where the
smoke takes 40 (no tracking store, no Stage A checkpoint: the memory does not depend on the weights' values).

RSS depends on the malloc settings (the Makefile exports its own; this script passes the environment on as it is):
glibc's default grows its heap with a step's freed activations, MALLOC_MMAP_THRESHOLD_=131072 returns them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

MODEL = "models/smollm2"  # make models/smollm2
SMOKE = ["--preset", "smollm2", "--set", "data.n_train=400", "--set", "data.n_eval=100",
         "--set", "stage_a.steps=30", "--set", "stage_b.steps=30", "--set", "stage_a.probe_every=10",
         "--set", "stage_b.probe_every=10", "--set", "stage_a.warmup_steps=3", "--set", "stage_b.warmup_steps=3",
         "--set", "base.gate_min_f1=0.1"]
PHASE = re.compile(r"progress: smoke \d+/\d+ phases \(\d+%\) \| ([^|]+) \|")
TASK = re.compile(r"progress: (eval \([^)]+\)|stage_[ab]) ")
GiB = 2**30


def write_data(path: Path) -> None:
    from latentgate import config  # lazy: `run` needs no torch in this process
    from latentgate.train.workspace import load_splits  # lazy: as above

    cfg = config.resolve("smollm2", {"data.n_train": "500", "data.n_eval": "1", "data.n_probe": "1"})
    train = load_splits(cfg)["train"]
    rng = random.Random(0)
    stream = " ".join(e.context for e in train).split()
    paras = []
    for i, e in enumerate(train):
        n = rng.choice([60, 80, 100, 120, 120, 140, 160, 200, 250, 300])
        start = rng.randrange(0, len(stream) - n)
        ctx = " ".join(stream[start:start + n]) + " " + e.context
        paras.append({"context": ctx, "qas": [{"id": f"q{i}", "question": e.question,
                                               "answers": [{"text": e.answer, "answer_start": ctx.rfind(e.answer)}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paras}]}))
    print(f"wrote {len(paras)} questions to {path}")


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_smoke(data: Path, out: Path, model: str, extra: list[str], every: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "latentgate"), "smoke", *SMOKE,
           "--set", f"base.name={Path(model).resolve()}", "--set", f"data.source={data.resolve()}",
           *[a for kv in extra for a in ("--set", kv)]]
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    log = (out / "smoke.log").open("w")
    child = subprocess.Popen(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT)
    proc, peaks, phase, task = psutil.Process(child.pid), {}, "start", ""
    with (out / "rss.tsv").open("w") as tsv, (out / "smoke.log").open() as reader:
        tsv.write("utc\trss_bytes\tphase\ttask\n")
        while child.poll() is None:
            for line in reader.read().splitlines():
                if m := PHASE.search(line):
                    phase, task = m.group(1).strip(), ""
                elif m := TASK.search(line):
                    task = m.group(1)
            rss = tree_rss(proc)
            key = f"{phase} / {task}" if task else phase
            peaks[key] = max(peaks.get(key, 0), rss)
            tsv.write(f"{time.strftime('%H:%M:%S', time.gmtime())}\t{rss}\t{phase}\t{task}\n")
            tsv.flush()
            time.sleep(every)
    log.close()
    print(f"exit {child.returncode}; peak RSS (sampled every {every:g} s) per phase / task:")
    for key, rss in peaks.items():
        print(f"  {key:32s} {rss / GiB:6.2f} GiB ({rss} bytes)")
    return child.returncode


def run_steps(data: Path, model: str, stage: str, steps: int, extra: list[str], trim: bool = True) -> int:
    import torch  # lazy: `run` and `data` need no torch here

    from latentgate import config, heap  # lazy: as above
    from latentgate.eval.probe import run_probe  # lazy: as above
    from latentgate.model.lora import attach_lora  # lazy: as above
    from latentgate.train.trainer import build_optimizer, set_training_modes, stage_step  # lazy: as above
    from latentgate.train.workspace import build_workspace, load_splits  # lazy: as above

    proc = psutil.Process()

    def mark(what: str) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"{what:40s} RSS {proc.memory_info().rss / GiB:5.2f} GiB, peak so far {peak / GiB:5.2f} GiB", flush=True)

    sets = dict(kv.split("=", 1) for kv in [*SMOKE[3::2], f"base.name={Path(model).resolve()}",
                                             f"data.source={data.resolve()}", *extra])
    cfg = config.resolve("smollm2", sets)
    splits = load_splits(cfg)
    ws = build_workspace(cfg, cfg.base.name, splits)
    if stage == "stage_b":
        ws.lm, _ = attach_lora(ws.lm, cfg)
    st = getattr(cfg, stage)
    set_training_modes(ws)
    opt, sched, groups = build_optimizer(ws, st)
    trainable = [p for ps in groups.values() for p in ps]
    longest = sorted(splits["train"], key=lambda e: len(e.context) + len(e.question), reverse=True)
    n = steps * st.batch_size * st.grad_accum
    print(f"{stage}: batch {st.batch_size} x grad_accum {st.grad_accum}, gradient checkpointing "
          f"{cfg.base.gradient_checkpointing}, the {n} longest examples", flush=True)
    mark("model loaded")
    gen, micro = torch.Generator().manual_seed(0), 0
    for step in range(1, steps + 1):
        for _ in range(st.grad_accum):
            batch = longest[micro * st.batch_size:(micro + 1) * st.batch_size]
            micro += 1
            set_training_modes(ws)
            out = stage_step(ws, batch, st, step - 1, gen)
            mark(f"step {step} micro-batch {micro}: losses")
            (out.total / st.grad_accum).backward()
            del out
            if trim:
                heap.release(ws.device)  # as the trainer does after each micro-batch
            mark(f"step {step} micro-batch {micro}: backward")
        torch.nn.utils.clip_grad_norm_(trainable, st.clip_norm if st.clip_norm > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mark(f"step {step}: optimizer")
    run_probe(ws, splits["probe"], with_f1=True)
    mark(f"probe ({len(splits['probe'])} examples, with F1)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    d = sub.add_parser("data", help="write the SQuAD-length file")
    d.add_argument("path", type=Path)
    r = sub.add_parser("run", help="run the smoke on it and sample RSS")
    r.add_argument("data", type=Path)
    r.add_argument("--out", type=Path, required=True, help="a fresh folder outside the repository")
    r.add_argument("--model", default=os.environ.get("LATENTGATE_SMOLLM2_DIR", MODEL))
    r.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    s = sub.add_parser("steps", help="a few steps of one stage on its longest examples, then a probe")
    s.add_argument("data", type=Path)
    s.add_argument("--stage", choices=("stage_a", "stage_b"), default="stage_b")
    s.add_argument("--steps", type=int, default=1, help="optimizer steps")
    s.add_argument("--model", default=os.environ.get("LATENTGATE_SMOLLM2_DIR", MODEL))
    s.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--keep-heap", action="store_true", help="no malloc_trim after each step (as before issue #25)")
    args = ap.parse_args()
    if args.verb == "data":
        write_data(args.path)
        return 0
    if args.verb == "steps":
        return run_steps(args.data, args.model, args.stage, args.steps, args.extra, trim=not args.keep_heap)
    return run_smoke(args.data, args.out, args.model, args.extra, args.every)


if __name__ == "__main__":
    sys.exit(main())
