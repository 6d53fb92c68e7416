"""Does a plan fit the device? Its capacity, the refusal with the fixes that would make it fit, and the table."""

from __future__ import annotations

import copy
import os

import torch

from latentgate.config import Config, apply_overrides
from latentgate.errors import ConfigError
from latentgate.model.memory_plan import DEFAULT_SEQ_LEN, GiB, MemoryPlan, plan_memory

# ---- device capacity, the check, the table ----------------------------------------------------------------------

def device_memory_bytes(device: str | torch.device) -> int:
    """Total memory of a CUDA device; on CPU the RAM available now (MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fixes(plan: MemoryPlan, stage: str, capacity: int) -> str:
    """The settings that lower this stage's peak (each re-planned alone; kept when it saves 5% or more), as one
    clause; plus what the stage would still need with all of them, when that is still too much."""
    cfg, t = plan.cfg, plan.target
    if stage == "eval":
        return "lower eval.batch_size"
    if plan.stage(stage).at.startswith("probe"):
        return "lower data.n_probe (the probe runs the whole probe set in one batch)"
    batch = getattr(cfg, stage).batch_size
    candidates = []
    if not t.ckpt:
        candidates.append(("base.gradient_checkpointing=true", {"base.gradient_checkpointing": True}))
    if t.act == 4 and t.device_type == "cuda":
        candidates.append(("base.dtype=bfloat16", {"base.dtype": "bfloat16"}))
    if cfg.model.encoder in ("lm_copy", "scratch"):
        candidates.append(("model.encoder=lm_self", {"model.encoder": "lm_self"}))
    if batch > 1:
        candidates.append((f"lower {stage}.batch_size (and raise {stage}.grad_accum)",
                           {f"{stage}.batch_size": batch // 2}))
    before = plan.stage(stage).peak
    useful = [(text, change) for text, change in candidates if _replan(plan, stage, change) < 0.95 * before]
    if not useful:
        return f"use a device with more than {before / GiB:.1f} GiB"
    sets = [text for text, _ in useful if "=" in text and not text.startswith("lower")]
    lower = [text for text, _ in useful if text.startswith("lower")]
    clause = (f"set {', '.join(sets)}" if sets else "") + (" or " if sets and lower else "") + "".join(lower)
    combined = _replan(plan, stage, {k: v for _, change in useful for k, v in change.items()})
    if combined > capacity:
        clause += f"; with all of them it still needs {combined / GiB:.1f} GiB"
    return clause


def _replan(plan: MemoryPlan, stage: str, change: dict) -> int:
    cfg = apply_overrides(copy.deepcopy(plan.cfg), change)
    dtype = None if "base.dtype" in change else str(plan.target.dtype).removeprefix("torch.")
    new = plan_memory(cfg, plan.shapes.seq_len, device=plan.target.device_type, dtype=dtype,
                      answer_tokens=plan.shapes.answer_tokens, prefix_tokens=plan.shapes.prefix_tokens,
                      arch=plan.arch, stages=(stage,), world_size=plan.target.world_size)
    return new.stage(stage).peak


def check_fits(cfg: Config, device: str | torch.device, seq_len: int = DEFAULT_SEQ_LEN,
               memory_bytes: int | None = None, stages=("stage_a", "stage_b", "eval"), **kwargs) -> MemoryPlan:
    """Refuse a run that will not fit: ConfigError naming the first stage over the device's memory, the moment of its
    peak (e.g. its probe), both figures, and the settings that lower it. Returns the plan when every stage fits.
    Called before a stage or an eval loads anything; `kwargs` go to `plan_memory` (dtype, answer_tokens,
    prefix_tokens, arch, world_size)."""
    plan = plan_memory(cfg, seq_len, device=device, stages=stages, **kwargs)
    refuse_if_over(plan, memory_bytes if memory_bytes is not None else device_memory_bytes(device))
    return plan


def refuse_if_over(plan: MemoryPlan, capacity: int | None) -> None:
    if not capacity:
        return
    for sp in plan.stages:
        if sp.peak > capacity:
            cuda = f", CUDA overhead {sp.overhead / GiB:.1f} GiB included" if sp.overhead else ""
            raise ConfigError(f"{sp.label} needs {sp.peak / GiB:.1f} GiB (peak at its {sp.at}{cuda}), the device has "
                              f"{capacity / GiB:.1f} GiB", _fixes(plan, sp.stage, capacity))


def plan_capacity(plan: MemoryPlan, memory_gib: float | None = None) -> int | None:
    """The memory to check a plan against: `memory_gib` if given, else the planned device's when it is this
    machine's (a CUDA plan made on a CPU-only host has none: nothing to check)."""
    if memory_gib is not None:
        return int(memory_gib * GiB)
    if plan.target.device_type == "cuda" and not torch.cuda.is_available():
        return None
    device = plan.cfg.run.device if plan.cfg.run.device != "auto" else plan.target.device_type
    return device_memory_bytes(device)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plan: MemoryPlan, capacity: int | None = None) -> str:
    """One header line and one table (GiB): the parts of each stage's peak, activations and peak with checkpointing
    off and on (the configured one marked *), where the peak happens, and whether it fits."""
    a, t, sh, cfg = plan.arch, plan.target, plan.shapes, plan.cfg
    head = (f"{a.name}: {a.total_params / 1e9:.3f}B params, {a.layers} layers, hidden {a.hidden}; frozen "
            f"{str(t.dtype).removeprefix('torch.')} on {t.device_type}; encoder {cfg.model.encoder}; "
            f"{sh.seq_len} text tokens, M={cfg.model.num_latents}, prefix {sh.prefix_tokens}, answer "
            f"{sh.answer_tokens}; gradient checkpointing {'on' if t.ckpt else 'off'}"
            + (f"; {t.world_size} ranks (training batches per rank)" if t.world_size > 1 else "")
            + (f"; device {capacity / GiB:.1f} GiB" if capacity else ""))
    cols = ["stage", "batch", "frozen LM", "trainable", "grads", "AdamW", "logits", "acts ckpt off", "acts ckpt on",
            "CUDA", "peak ckpt off", "peak ckpt on", "at", "fits"]
    rows = []
    for sp in plan.stages:
        p = sp.parts
        on = (sp.activations_alt, p["activations"]) if t.ckpt else (p["activations"], sp.activations_alt)
        peaks = (sp.peak_alt, sp.peak) if t.ckpt else (sp.peak, sp.peak_alt)
        mark = (" ", "*") if t.ckpt else ("*", " ")
        batch = cfg.eval.batch_size if sp.stage == "eval" else t.per_rank(getattr(cfg, sp.stage).batch_size)
        fits = "-" if not capacity else ("yes" if sp.peak <= capacity else "NO")
        rows.append([sp.label, str(batch), _gib(p["frozen"]), _gib(p["trainable"]), _gib(p["grads"]),
                     _gib(p["adam"]), _gib(p["logits"]), _gib(on[0]), _gib(on[1]), _gib(sp.overhead),
                     _gib(peaks[0]) + mark[0], _gib(peaks[1]) + mark[1], sp.at, fits])
    widths = [max(len(r[i]) for r in [cols] + rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i in (0, 12, 13) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [cols] + rows]
    foot = ("GiB per rank; * = the configured setting (base.gradient_checkpointing); CUDA: context + allocator margin"
            " (memory_plan.cuda_overhead)")
    if capacity:
        foot += f"; fits: the peak is within {capacity / GiB:.1f} GiB"
    return "\n".join([head, "", *lines, "", foot])
