"""What a person browsing `mlflow ui` reads first: run names that say what differs between runs, and a description
of each run's outcome (the tag `mlflow.note.content`, shown as the run's Description, markdown).

Names: `stage_b fte=6 lr=1e-4 350 steps`, `trial-7 fte=6 lr=1e-4 cosine K=8 r=8 350 steps`, `eval of <the stage
run's name>`, `base builtin 4x128 1000 steps`, `smoke micro`. A stage run always shows its first-token CE weight,
learning rate and budget, plus whatever else of its section differs from the config schema's defaults (schedule,
KD, K, LoRA rank, scheduled sampling, seed). Pure Python; secrets masked.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from latentgate.config import ModelConfig, StageConfig
from latentgate.schema import Artifact, EvalKey, EvalPath, Probe, Summary
from latentgate.tracking.lineage import base_source, client
from latentgate.tracking.secrets import mask_secrets
from latentgate.tracking.uris import run_in_uri

# config key (last part, or the full key for model.*) -> short name; "" shows the value alone
SHORT = {"first_token_ce_weight": "fte", "lr": "lr", "schedule": "", "min_lr": "min_lr", "warmup_steps": "warmup",
         "k": "K", "kce_weight": "kce", "tf_weight": "tf", "kd_weight": "kd", "kd_temperature": "T",
         "scheduled_sampling": "ss", "p_gold_floor": "p_gold", "batch_size": "bs", "grad_accum": "accum",
         "weight_decay": "wd", "clip_norm": "clip", "seed": "seed", "model.lora_r": "r", "model.lora_alpha": "alpha",
         "model.lora_dropout": "lora_dropout", "steps": "steps"}
# shown whenever they differ from the schema's defaults (fte, lr and steps are always shown for a stage)
STAGE_EXTRAS = ("schedule", "kd_weight", "kd_temperature", "k", "kce_weight", "tf_weight", "scheduled_sampling",
                "p_gold_floor", "seed")


def num(v) -> str:
    """3.0 -> '3', 0.0001 -> '1e-4', 0.00032 -> '3.2e-4', 5.69 -> '5.69'."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or float(v).is_integer() and abs(v) < 1e6:
        return str(int(v))
    if v != 0 and abs(v) < 1e-2:
        mantissa, exp = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:.3g}"


def _short_key(key: str) -> str:
    return SHORT.get(key, SHORT.get(key.rsplit(".", 1)[-1], key.rsplit(".", 1)[-1]))


def short_params(params: dict) -> str:
    """`{"stage_b.first_token_ce_weight": 6.0, "stage_b.lr": 1e-4, "stage_b.steps": 350}` -> 'fte=6 lr=1e-4 350
    steps' (steps last; a boolean shows its name when true, nothing when false)."""
    parts, steps = [], None
    for key, value in params.items():
        short = _short_key(key)
        if short == "steps":
            steps = value
        elif isinstance(value, bool):
            parts += [short] if value else []
        else:
            parts.append(f"{short}={num(value)}" if short else str(value))
    if steps is not None:
        parts.append(f"{num(steps)} steps")
    return mask_secrets(" ".join(parts))


def stage_params(cfg, stage: str) -> dict:
    """What names a stage run: fte, lr, what else differs from the schema's defaults, steps."""
    st, default = getattr(cfg, stage), StageConfig()
    out = {"first_token_ce_weight": st.first_token_ce_weight, "lr": st.lr}
    out.update({k: getattr(st, k) for k in STAGE_EXTRAS if getattr(st, k) != getattr(default, k)
                and (k != "p_gold_floor" or st.scheduled_sampling)})
    if stage == "stage_b" and cfg.model.lora_r != ModelConfig().lora_r:
        out["model.lora_r"] = cfg.model.lora_r
    out["steps"] = st.steps
    return out


def stage_run_name(phase: str, stage: str, cfg) -> str:
    return f"{phase} {short_params(stage_params(cfg, stage))}"


def trial_run_name(number: int, params: dict) -> str:
    return f"trial-{number} {short_params(params)}".strip()


def base_run_name(cfg, source: str) -> str:
    if cfg.base.name != "builtin":
        return mask_secrets(f"base {cfg.base.name}" + (f"@{cfg.base.revision}" if cfg.base.revision else ""))
    b = cfg.base
    what = f"base builtin {b.layers}x{b.hidden}"
    kind, holder = base_source(source)
    if kind == "reused":
        return f"{what} (reused from {holder[:8]})"
    return f"{what} {b.steps} steps"


def eval_run_name(source_uri: str) -> str:
    """`eval of <name of the run whose checkpoint is evaluated>` (runs:/ URIs), else `eval of <the URI>`."""
    if run_id := run_in_uri(source_uri):
        try:
            name = client().get_run(run_id).info.run_name
            if name:
                return f"eval of {name}"
        except MlflowException:
            pass
    return mask_secrets(f"eval of {source_uri}" if source_uri else "eval")


# ---- descriptions -------------------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def stage_note(phase: str, stage: str, result: dict, init_from: str = "", final_loss: float | None = None) -> str:
    probes = [p for p in result.get("probes") or [] if p.get(Probe.FIRST_ACC) is not None]
    final = result.get("final_probe") or {}
    lines = [f"**{phase}** ({stage}): {result.get('steps')} optimizer steps in {result.get('elapsed', 0):.0f} s"
             + (f", starting from `{mask_secrets(init_from)}`" if init_from else "") + "."]
    if final_loss is not None:
        lines.append(f"Final loss {final_loss:.4f}.")
    if probes:
        peak = max(probes, key=lambda p: p[Probe.FIRST_ACC])
        text = (f"Probe first-token accuracy {_pct(final.get(Probe.FIRST_ACC))} at the end, peak "
                f"{_pct(peak[Probe.FIRST_ACC])} at step {peak['step']}")
        if final.get(Probe.LIFT) is not None:
            text += (f"; lift {final[Probe.LIFT]:+.1%} over the controls (constant guess "
                     f"{_pct(final.get(Probe.CONST))}, shuffled latent {_pct(final.get(Probe.SHUFFLED))})")
        lines.append(text + ".")
    if result.get("checkpoint_uri"):
        lines.append(f"Checkpoint: `{result['checkpoint_uri']}`.")
    return "\n\n".join(lines)


def eval_note(metrics: dict, source_uri: str = "") -> str:
    paths = metrics.get("paths", {})
    lines = []
    if EvalPath.LATENT in paths:
        lat = paths[EvalPath.LATENT]
        f1 = lat[EvalKey.F1]
        lines.append(f"**Latent F1 {f1:.3f} / EM {lat[EvalKey.EM]:.3f}** on {lat['n']} questions "
                     f"(first-token top-1 {_pct(lat.get(EvalKey.FIRST_TOP1))}).")
        controls = {p: m[EvalKey.F1] for p, m in paths.items() if p not in (EvalPath.LATENT, EvalPath.TEXT)}
        if controls:
            best = max(controls.values())
            verdict = "beats every control" if f1 > best else "does NOT beat the best control"
            lines.append("Controls F1: " + ", ".join(f"{p} {v:.3f}" for p, v in controls.items())
                         + f"; the latent {verdict} (margin {f1 - best:+.3f}).")
    if EvalPath.TEXT in paths:
        text = paths[EvalPath.TEXT]
        lines.append(f"Text teacher F1 {text[EvalKey.F1]:.3f}, NLL/token {text[EvalKey.NLL_PER_TOKEN]:.3f}.")
    if source_uri:
        lines.append(f"Checkpoint: `{mask_secrets(source_uri)}`.")
    lines.append("One row per question and path (prediction, references, F1, error mode): artifact "
                 f"`{Artifact.EVAL_TABLE}` (Artifacts tab; Evaluation view).")
    return "\n\n".join(lines)


def base_note(cfg, source: str, text: dict, gate: dict) -> str:
    kind, _, run = source.partition(":")
    where = {"trained": f"trained here ({cfg.base.steps} steps)", "reused": f"reused from run {run}",
             "external": f"{mask_secrets(cfg.base.name)} (external)"}.get(kind, source)
    verdict = "passed" if gate.get("passed") else (f"FAILED (needs F1 >= {gate.get('min_f1')} and NLL/token <= "
                                                   f"{gate.get('max_nll')})")
    return (f"**Base LM** {where}. Text-teacher F1 {text[EvalKey.F1]:.3f} / EM {text[EvalKey.EM]:.3f}, NLL/token "
            f"{text[EvalKey.NLL_PER_TOKEN]:.3f}: sanity gate {verdict}.")


def smoke_note(name: str, preset: str, s: dict) -> str:
    controls = ", ".join(f"{k} {v:.3f}" for k, v in s["controls_f1"].items())
    return "\n\n".join([
        f"**{name}** (preset {preset}): latent F1 {s[Summary.LATENT_F1]:.3f} / EM {s[Summary.LATENT_EM]:.3f}, "
        f"text-teacher F1 {s[Summary.TEXT_F1]:.3f}; controls F1 {controls or 'n/a'}.",
        f"Probe first-token accuracy: Stage A {_pct(s.get('stage_a_probe_first_acc'))}, Stage B "
        f"{_pct(s.get('stage_b_probe_first_acc'))}. Wall time {s['wall_seconds']:.0f} s; base LM {s['base_source']}.",
        "Child runs: " + ", ".join(f"{k} `{v}`" for k, v in s["children"].items()) + "."])
