"""The plan's phases as entry points: one function per MLproject entry point, each one tracked MLflow run built
from `phases/stages.py`.

Inside `mlflow run` (MLFLOW_RUN_ID set) the phase's run IS the project's run; elsewhere it is a new run (nested
under an active one, e.g. the pipeline's). Every phase run carries the tags the pipeline and `resume` read:

    latentgate.entry_point   the MLproject entry point (base, stage_a, stage_b, eval, extend, fix, hero)
    latentgate.step_key      hash of the resolved config the phase depends on (reuse key)
    latentgate.input_uri     the checkpoint / model URI it started from ("" for base, stage_a)
    latentgate.output_dir    local folder of its checkpoints and diagnostics (resume reads it)
    latentgate.preset        the preset name it was resolved from

Inputs are checked before anything is built or trained: a checkpoint that does not exist, or one trained with a
different M, d_z, encoder or base LM, fails in one line naming the mismatch. A FINISHED phase is never
overwritten; a failed one ends FAILED with the error as the tag `latentgate.error`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from latentgate.config import Config, config_hash, flatten, from_flat
from latentgate.distributed import owns_store
from latentgate.errors import CheckpointError, ConfigError, LatentgateError
from latentgate.phases.results import BaseResult, EvalResult, SmokeResult, StageResult
from latentgate.phases.smoke import run_output_dir, run_smoke
from latentgate.phases.stages import run_base, run_eval, run_stage
from latentgate.registry.approval import HeroRequest, plan_hero
from latentgate.registry.checklist import load_checklist
from latentgate.schema import Artifact, MlflowTag, Tag
from latentgate.tracking import lineage
from latentgate.tracking.reuse import config_key
from latentgate.tracking.runs import PROCESS_TAGS, adopt_project_run, git_commit, setup_experiment
from latentgate.tracking.tracker import full_params
from latentgate.tracking.uris import ModelUri
from latentgate.train.load import check_compatible
from latentgate.train.workspace import load_splits, resolve_device

TRAINING = ("stage_a", "stage_b", "extend", "fix")
STAGE_OF = {"stage_a": "stage_a", "stage_b": "stage_b", "extend": "stage_b", "fix": "stage_b"}


def step_key(entry_point: str, cfg: Config) -> str:
    """What a phase's result depends on (tracking/reuse.py config_key: the base LM only on base/data; every other
    phase on the whole config)."""
    return config_key(entry_point, cfg)


def phase_tags(entry_point: str, cfg: Config, preset: str, input_uri: str = "", output_dir: Path | None = None) -> dict:
    return {Tag.ENTRY_POINT: entry_point, Tag.STEP_KEY: step_key(entry_point, cfg), Tag.INPUT_URI: input_uri,
            Tag.PRESET: preset, Tag.OUTPUT_DIR: str(Path(output_dir).resolve()) if output_dir else ""}


def _open(cfg: Config) -> str | None:
    """Point MLflow at the store and experiment; return the run `mlflow run` created for this process, if any
    (removed from the environment, so runs nested under it are real children)."""
    resolve_device(cfg.run.device)  # a device this machine lacks fails here, before any run starts
    setup_experiment(cfg.run.experiment)  # inside `mlflow run`: the project run's experiment
    return adopt_project_run()


@contextmanager
def _preflight(run_id: str | None):
    """Checks before the phase's run starts. Inside `mlflow run` the project's run already exists: a failed
    check marks it FAILED with the error as a tag, as a failure during training would."""
    try:
        yield
    except LatentgateError as err:
        if run_id and owns_store():
            client = lineage.client()
            if client.get_run(run_id).info.status != "FINISHED":  # a finished run is never touched
                client.set_tag(run_id, Tag.ERROR, f"{type(err).__name__}: {str(err)[:500]}")
                client.set_terminated(run_id, status="FAILED")
        raise


def _refuse_finished(run_id: str | None):
    """The attached run (an mlflow Run) if it already holds an unfinished phase, to be resumed; None for a fresh
    run. A FINISHED phase is never overwritten."""
    if not run_id:
        return None
    run = lineage.client().get_run(run_id)
    if run.info.status == "FINISHED" and run.data.tags.get(Tag.ENTRY_POINT):
        raise ConfigError(f"run {run_id} already holds a FINISHED {run.data.tags[Tag.ENTRY_POINT]} phase; "
                          "a finished phase is never overwritten", "start a new run (omit --run-id)")
    return run if run.data.tags.get(Tag.ENTRY_POINT) else None


def _begin(cfg: Config, name: str):
    """Output folder and data splits of a phase."""
    return run_output_dir(cfg, name), load_splits(cfg)


# ---- inputs: checkpoints and the base LM behind them ------------------------------------------------------------

def prepare_checkpoint(cfg: Config, uri: str, want: str | None = None) -> tuple[Path, dict, lineage.BaseLM]:
    """Resolve `uri`, check it against cfg (one line naming a mismatch), find its base LM: (dir, manifest, base)."""
    if not uri:
        raise ConfigError("no checkpoint given", "pass runs:/<run_id>/checkpoints/<stage>, models:/<name>@<alias> "
                                                 "or a checkpoint folder")
    local = lineage.resolve_checkpoint(uri)
    manifest = check_compatible(cfg, local)
    stage = "stage_b" if manifest.get("lora") else "stage_a"
    if want and stage != want:
        raise CheckpointError(f"{uri} is a {stage} checkpoint; this phase starts from a {want} checkpoint",
                              f"pass runs:/<{want}_run_id>/checkpoints/{want}")
    trained_with = from_flat(manifest.get("config") or flatten(cfg))
    return local, manifest, lineage.base_for_checkpoint(uri, trained_with)


# ---- the entry points ---------------------------------------------------------------------------------------------

def base(cfg: Config, preset: str = "") -> BaseResult:
    """`base`: train the builtin base LM (or reuse the registered one with the same config), then the sanity gate."""
    attached = _open(cfg)
    with _preflight(attached):
        _refuse_finished(attached)
    out, splits = _begin(cfg, "base")
    return run_base(cfg, out, splits, run_id=attached, tags=phase_tags("base", cfg, preset, "", out))


def stage_a(cfg: Config, preset: str = "") -> StageResult:
    """`stage_a`: encoder + adapter against the frozen base LM registered for this config."""
    attached = _open(cfg)
    with _preflight(attached):
        if (existing := _refuse_finished(attached)) is not None:
            return resume(existing.info.run_id)
        found = lineage.find_registered_base(cfg)
        if not found:
            raise CheckpointError(f"no base LM registered under {cfg.run.registry_base} for this config",
                                  "run `latentgate base` (or mlflow run . -e base) with the same preset first")
    out, splits = _begin(cfg, "stage_a")
    return run_stage(cfg, "stage_a", found, out, splits, run_id=attached,
                     tags=phase_tags("stage_a", cfg, preset, "", out))


def stage_b(cfg: Config, resume_from: str, preset: str = "", entry_point: str = "stage_b") -> StageResult:
    """`stage_b` (and Phase 1 `extend`, Phase 3 `fix`): Stage B with LoRA, starting from a Stage A checkpoint."""
    attached = _open(cfg)
    with _preflight(attached):
        if (existing := _refuse_finished(attached)) is not None:
            return resume(existing.info.run_id)
        local, _, base_info = prepare_checkpoint(cfg, resume_from, want="stage_a")
    out, splits = _begin(cfg, entry_point)
    tags = {**phase_tags(entry_point, cfg, preset, resume_from, out), Tag.PHASE: entry_point,
            Tag.INIT_FROM: resume_from}  # the URI: the registry follows it to the Stage A run
    return run_stage(cfg, "stage_b", base_info, out, splits, init_from=local, run_id=attached, tags=tags)


def extend(cfg: Config, resume_from: str, preset: str = "") -> StageResult:
    """Phase 1: Stage B resumed from Stage A with the budget doubled (preset `extend`)."""
    return stage_b(cfg, resume_from, preset, entry_point="extend")


def fix(cfg: Config, resume_from: str, preset: str = "") -> StageResult:
    """Phase 3: Stage B with scheduled sampling (preset `fix`: p_gold 1.0 -> 0.5)."""
    if not cfg.stage_b.scheduled_sampling:
        raise ConfigError("fix is the scheduled-sampling phase but stage_b.scheduled_sampling is false",
                          "use --preset fix, or --set stage_b.scheduled_sampling=true")
    return stage_b(cfg, resume_from, preset, entry_point="fix")


def eval_checkpoint(cfg: Config, checkpoint: str, preset: str = "") -> EvalResult:
    """`eval`: every eval path (latent and its controls) on a Stage A or Stage B checkpoint."""
    attached = _open(cfg)
    with _preflight(attached):
        _refuse_finished(attached)
        local, _, base_info = prepare_checkpoint(cfg, checkpoint)
    out, splits = _begin(cfg, "eval")
    return run_eval(cfg, base_info, local, out, splits, source_uri=checkpoint, run_id=attached,
                    tags=phase_tags("eval", cfg, preset, checkpoint, out))


def hero(request: HeroRequest) -> SmokeResult:
    """Phase 4: the approved recipe at the hero budget, end to end (base reused, Stage A, Stage B, eval). Starts
    only from the version holding the alias, promoted under the checklist in force, with its pinned checkpoint;
    otherwise it exits with the reasons and starts nothing (`plan_hero` alone says what would run)."""
    checklist = load_checklist(request.checklist)
    attached = os.environ.get("MLFLOW_RUN_ID")  # run_smoke adopts it
    lineage.use_store()  # an existing, reachable store: the approved version is read from it
    with _preflight(attached):
        _refuse_finished(attached)
        start = plan_hero(replace(request, checklist=str(checklist.path)))
    cfg = start.plan.config
    setup_experiment(cfg.run.experiment)
    tags = {**phase_tags("hero", cfg, "hero", str(ModelUri(start.approved.name, version=start.approved.version))),
            **start.tags()}
    return run_smoke(cfg, "hero", name="hero", tags=tags)


ENTRY_POINTS = {"base": base, "stage_a": stage_a, "stage_b": stage_b, "extend": extend, "fix": fix,
                "eval": eval_checkpoint}  # and `hero`, whose config is the approved recipe's (HeroRequest)
INPUT_PARAM = {"stage_b": "resume_from", "extend": "resume_from", "fix": "resume_from", "eval": "checkpoint"}


def run_entry(entry_point: str, cfg: Config, preset: str = "",
              input_uri: str = "") -> BaseResult | StageResult | EvalResult:
    """Call an entry point in this process (the CLI and the pipeline's in-process runner)."""
    fn = ENTRY_POINTS[entry_point]
    return fn(cfg, input_uri, preset) if entry_point in INPUT_PARAM else fn(cfg, preset)


# ---- resume ---------------------------------------------------------------------------------------------------------

def resume(run_id: str, allow_other_commit: bool = False) -> StageResult:
    """Continue a killed, failed or interrupted training phase in the SAME run, from its last checkpoint. The
    config is rebuilt from the run's logged params (`config_of_run`); already-logged metric steps are not logged
    again. A run recorded at another git commit is refused unless `allow_other_commit`: then both commits are
    recorded (tag `latentgate.resumed_commits`, which the registry's lineage check flags) and the run's commit
    tags name the code that finished it."""
    client = lineage.client()  # an existing, reachable store (never creates one); runs of dead processes closed
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"no run {run_id} in the tracking store: {str(err).splitlines()[0][:160]}",
                          "check the run id and MLFLOW_TRACKING_URI") from None
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    tags = run.data.tags
    # a stage run of the smoke (or the hero) has no entry point of its own: its phase names the stage
    entry_point = tags.get(Tag.ENTRY_POINT) or tags.get(Tag.PHASE, "")
    if entry_point not in TRAINING:
        raise ConfigError(f"run {run_id} is not a training phase (entry point {entry_point or 'unknown'!r})",
                          f"resume a run of {list(TRAINING)}; for a smoke, resume its stage_a or stage_b child "
                          "run (their ids are in `mlflow ui` under the smoke's run)")
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} ({entry_point}) is FINISHED; a finished phase is never overwritten",
                          "start a new run of the phase instead")
    commit_tags = _commit_change(run, allow_other_commit)
    cfg = config_of_run(run)
    stage = STAGE_OF[entry_point]
    out = Path(tags.get(Tag.OUTPUT_DIR, ""))
    ckpt_dir = out / stage / Artifact.CHECKPOINTS / stage
    if not (ckpt_dir / Artifact.MANIFEST).exists():
        raise CheckpointError(f"run {run_id} left no checkpoint in {ckpt_dir} (it stopped before its first one)",
                              f"start the phase again (set {stage}.checkpoint_every to checkpoint more often)")
    base_info = lineage.base_from_run(run_id)
    keep = {k: v for k, v in tags.items()  # the new process's own tags, not those of the one that stopped
            if k.startswith("latentgate.") and k not in (Tag.ERROR, Tag.ERROR_TYPE, *PROCESS_TAGS)}
    if Tag.ERROR in tags and owns_store():
        client.delete_tag(run_id, Tag.ERROR)
    splits = load_splits(cfg)
    return run_stage(cfg, stage, base_info, out, splits, resume=ckpt_dir, run_id=run_id,
                     tags={**keep, Tag.RESUMED: "true", **commit_tags})


def config_of_run(run) -> Config:
    """The Config a run trained with, rebuilt from its params (values too long for MLflow read whole from its
    artifact, `full_params`), checked against the run's step key."""
    cfg = from_flat(full_params(run))
    if config_hash(cfg) != run.data.tags.get(Tag.STEP_KEY):
        raise ConfigError(f"run {run.info.run_id}: the config rebuilt from its params does not match its step key",
                          "the run's params are incomplete; start the phase again")
    return cfg


def _commit_change(run, allow_other_commit: bool) -> dict:
    """The tags a resume under other code sets (none under the same code); refused unless allowed."""
    recorded = run.data.tags.get(Tag.GIT_COMMIT, "unknown")
    current = git_commit()[0]
    if recorded == current:
        return {}
    if not allow_other_commit:
        raise ConfigError(f"run {run.info.run_id} was recorded at git commit {recorded[:12]}, this code is at "
                          f"{current[:12]}: resuming would finish one run with two versions of the code",
                          f"check out {recorded[:12]} and resume, or pass --allow-other-commit to resume anyway "
                          "(both commits are recorded; the registry's lineage check flags the run)")
    chain = run.data.tags.get(Tag.RESUMED_COMMITS) or recorded
    return {Tag.RESUMED_COMMITS: f"{chain} -> {current}", Tag.GIT_COMMIT: current,
            MlflowTag.SOURCE_GIT_COMMIT: current}
