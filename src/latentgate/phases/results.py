"""What each phase returns: one frozen dataclass per kind of run, read by attribute, never by string key.

    run_base   -> BaseResult    the base LM (a `lineage.BaseLM`) and the text teacher's scores
    run_stage  -> StageResult   a Stage A / Stage B run: its optimizer steps, checkpoint and probes
    run_eval   -> EvalResult    an eval run: its per-path metrics (metrics.json)
    run_smoke  -> SmokeResult   the chain base -> stage_a -> stage_b -> eval under one parent run

Field names that are recorded keys equal their names in `latentgate.schema` (SmokeResult's text_f1, latent_f1 and
latent_em are `Summary`'s; a probe record is keyed by `Probe`'s names), so the JSON a run logs (`as_record`:
stage_summary.json, summary.json) is the dataclass field by field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from latentgate.schema import EvalKey, EvalPath, Probe
from latentgate.tracking.lineage import BaseLM


@dataclass(frozen=True)
class BaseResult:
    """The base run: the base LM the stages train against, and the sanity gate's text-teacher scores."""

    run_id: str
    base: BaseLM
    source: str  # trained:<run> | reused:<run> | external (the base run's tag latentgate.base_source)
    text: dict  # the text teacher's eval aggregates, keyed by EvalKey (f1, em, nll_per_token, ...)
    seconds: float


@dataclass(frozen=True)
class StageResult:
    """A training stage's run: what `train/trainer.py train_stage` summarised, plus where the run recorded it."""

    stage: str  # stage_a | stage_b
    run_id: str
    steps: int  # optimizer steps
    micro_steps: int  # micro-batches
    checkpoint: str  # the local checkpoint folder (rank 0 wrote it)
    checkpoint_uri: str  # runs:/<run_id>/checkpoints/<stage>, what later phases start from
    elapsed: float
    final_probe: dict[str, float] | None = None  # the last probe, keyed by Probe names (None: no probe ran)
    probes: tuple[dict, ...] = ()  # every probe: {"step": n, <Probe key>: value, ...}

    @classmethod
    def from_summary(cls, summary: dict, run_id: str, checkpoint_uri: str) -> StageResult:
        """From `train_stage`'s summary of the stage."""
        return cls(stage=summary["stage"], run_id=run_id, steps=summary["steps"], micro_steps=summary["micro_steps"],
                   checkpoint=summary["checkpoint"], checkpoint_uri=checkpoint_uri, elapsed=summary["elapsed"],
                   final_probe=summary["final_probe"], probes=tuple(summary["probes"]))

    def final(self, key: str) -> float | None:
        """One key (a `Probe` name) of the last probe; None when no probe ran or it lacks the key."""
        return (self.final_probe or {}).get(key)

    def as_record(self) -> dict:
        """stage_summary.json (the probes are the run's metric history already)."""
        return {k: v for k, v in asdict(self).items() if k != "probes"}


@dataclass(frozen=True)
class EvalResult:
    """An eval run: every path's aggregates (`evaluate`'s return, also the run's metrics.json)."""

    run_id: str
    metrics: dict  # {"paths": {<EvalPath>: {<EvalKey>: value}}, ...}

    @property
    def paths(self) -> dict[str, dict]:
        return self.metrics["paths"]

    def path(self, name: str) -> dict:
        """One path's aggregates, keyed by EvalKey names."""
        return self.paths[name]


SMOKE_CONTROLS = (EvalPath.ZERO_LATENT, EvalPath.SHUFFLED_LATENT, EvalPath.TOKEN_BUDGET)  # as the summary lists them


@dataclass(frozen=True)
class SmokeResult:
    """The smoke (or the hero, or a calibration chain): the parent run and what its summary prints."""

    run_id: str
    text_f1: float  # Summary.TEXT_F1
    latent_f1: float  # Summary.LATENT_F1
    latent_em: float  # Summary.LATENT_EM
    stage_a_probe_first_acc: float | None
    stage_b_probe_first_acc: float | None
    controls_f1: dict[str, float]  # control path (EvalPath) -> its F1
    wall_seconds: float
    base_source: str
    children: dict[str, str] = field(default_factory=dict)  # phase (base, stage_a, stage_b, eval) -> its run id
    output_dir: str = ""
    tracking_uri: str = ""

    @classmethod
    def of_chain(cls, run_id: str, base: BaseResult, a: StageResult, b: StageResult, ev: EvalResult,
                 wall_seconds: float, output_dir: str, tracking_uri: str) -> SmokeResult:
        paths = ev.paths
        latent = paths[EvalPath.LATENT]
        return cls(run_id=run_id, text_f1=(paths.get(EvalPath.TEXT) or base.text)[EvalKey.F1],
                   latent_f1=latent[EvalKey.F1], latent_em=latent[EvalKey.EM],
                   stage_a_probe_first_acc=a.final(Probe.FIRST_ACC), stage_b_probe_first_acc=b.final(Probe.FIRST_ACC),
                   controls_f1={p: paths[p][EvalKey.F1] for p in SMOKE_CONTROLS if p in paths},
                   wall_seconds=wall_seconds, base_source=base.source,
                   children={"base": base.run_id, "stage_a": a.run_id, "stage_b": b.run_id, "eval": ev.run_id},
                   output_dir=output_dir, tracking_uri=tracking_uri)

    def as_record(self) -> dict:
        """summary.json of the parent run."""
        return asdict(self)
