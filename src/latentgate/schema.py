"""What a run records, named once: tag names, metric keys, eval paths, artifact file names, loss terms and gradient
groups. Training and eval write runs under these names; the registry, the pipeline, sweeps, calibration and analysis
read them back. A name written in one module and read in another belongs here, and code refers to it by name, never
by a copy of the string (tests spell them out: they check the recorded contract). Data files name some of them too
(registry/hero.yaml, the config's eval.paths, sweeps/*.yaml objectives): the same strings.

Pure Python (the standard library and errors.py only), so it loads in milliseconds (no torch, MLflow or numpy).

    Tag, SweepTag, CalibrateTag  `latentgate.*` tags of MLflow runs      MlflowTag  MLflow's own tags we set or read
    VersionTag                   tags of registered model versions      StudyAttr, TrialAttr  Optuna user attributes
    Stage, Probe, Summary        metric keys: per optimizer step (Stage.metric), per probe (Probe.key), per run
    EvalPath, EvalKey            eval paths and their per-path aggregates (metrics.json; EvalKey.metric)
    Loss, GradGroup              loss terms (Loss.key) and gradient groups (GradGroup.norm_key)
    Artifact, Calibration        artifact file names (Artifact.checkpoint); fields of a calibration record
"""

from __future__ import annotations

# ---- run tags --------------------------------------------------------------------------------------------------------

class Tag:
    """`latentgate.*` tags of MLflow runs. Each comment: who writes it; who reads it."""

    # every run (tracking/runs.py tracked_run)
    PHASE = "latentgate.phase"  # base, stage_a, stage_b, eval, smoke, ...; registry, lineage, analysis, calibrate
    ERROR = "latentgate.error"  # a FAILED / KILLED run's error, one line; pipeline, monitor, calibrate, resume
    ERROR_TYPE = "latentgate.error_type"  # its exception class; calibrate reuses a deterministic failure
    FINAL_CHECKPOINT = "latentgate.final_checkpoint"  # an interrupted stage's last checkpoint, a runs:/ URI
    GIT_COMMIT = "latentgate.git_commit"  # provenance; registry lineage, pipeline reuse, analysis; a version tag too
    GIT_DIRTY = "latentgate.git_dirty"  # provenance; the registry's lineage check (require_clean_tree)
    PYTHON = "latentgate.python"  # provenance
    HOST = "latentgate.host"  # the host of the process that owns the run; the orphaned-run sweep (tracking/runs.py)
    PID = "latentgate.pid"  # that process's id; a run left RUNNING whose process is gone ends FAILED
    PID_START = "latentgate.pid_start"  # that process's start (epoch seconds): a pid reused later is not it
    VERSION_PREFIX = "latentgate.version."  # + package: its installed version (provenance)
    # lineage (phases/stages.py), followed by tracking/lineage.py and registry/evidence.py
    BASE_RUN = "latentgate.base_run"  # stage and eval runs: the base run of their base LM; a version tag too
    BASE_SOURCE = "latentgate.base_source"  # base run: trained:<run> | reused:<run> | external
    BASE_CONFIG_HASH = "latentgate.base_config_hash"  # base run and base-LM version: what identifies the base LM
    BASE_VERSION = "latentgate.base_version"  # base run: the base-LM model version it registered
    INIT_FROM = "latentgate.init_from"  # stage runs: the checkpoint URI they started from
    RESUME_FROM = "latentgate.resume_from"  # sweep runs: the study's Stage A checkpoint URI
    CHECKPOINT = "latentgate.checkpoint"  # eval run: the checkpoint URI it scored; a version tag too
    CHILDREN = "latentgate.children"  # smoke / hero / pipeline run: its child run ids, comma-separated
    # entry points (phases/entry.py): the pipeline's reuse and `latentgate resume` read them
    ENTRY_POINT = "latentgate.entry_point"  # the MLproject entry point
    STEP_KEY = "latentgate.step_key"  # hash of the resolved config the phase depends on
    INPUT_URI = "latentgate.input_uri"  # the checkpoint / model URI it started from
    OUTPUT_DIR = "latentgate.output_dir"  # local folder of its checkpoints and diagnostics
    PRESET = "latentgate.preset"  # the preset it was resolved from; analysis shows it
    RESUMED = "latentgate.resumed"  # a run continued by `latentgate resume`
    RESUMED_COMMITS = "latentgate.resumed_commits"  # `resume --allow-other-commit`: "<old> -> <new>"; registry lineage
    HERO_FROM = "latentgate.hero_from"  # hero run: the approved models:/<name>@hero URI
    HERO_VERSION = "latentgate.hero_version"  # hero run: the version that alias named
    HERO_CHECKLIST = "latentgate.hero_checklist"  # hero run: the checklist in force (path) that approved it
    HERO_CHECKLIST_SHA256 = "latentgate.hero_checklist_sha256"  # hero run: its sha256 (= the promotion audit's)
    HERO_SCALE = "latentgate.hero_scale"  # hero run: the budget scale over the approved run (registry/hero_recipe.py)
    HERO_DIFF = "latentgate.hero_diff"  # hero run: JSON list of every key that differs from the approved recipe
    HERO_RECIPE_CHANGES = "latentgate.hero_recipe_changes"  # hero run: the recipe keys the user changed ("" if none)
    HERO_APPROVED_RUN = "latentgate.hero_approved_run"  # hero run: the approved Stage B run its config comes from
    CHECKPOINT_SHA256 = "latentgate.checkpoint_sha256"  # register run PARAM (immutable) and version tag: sha256 of
    # the registered checkpoint's manifest.json; promote pins it, verify and hero refuse a checkpoint that differs
    # pipeline (pipeline/run.py)
    FINAL_RULE = "latentgate.final_rule"  # the decision tree's last rule
    FINAL_NEXT = "latentgate.final_next"  # and the phase it chose
    # registration (registry/model.py): the register run's and the model version's links to their evidence
    EVAL_RUN = "latentgate.eval_run"  # register run, trial run, model version; the gate, the pipeline
    STAGE_B_RUN = "latentgate.stage_b_run"  # register run, trial run, model version
    REGISTER_RUN = "latentgate.register_run"  # model version: the run that logged the model
    MODEL_URI = "latentgate.model_uri"  # register run: the logged model's URI
    BASE_REFERENCE = "latentgate.base_reference"  # register run: the base LM's name (builtin or a hub id)
    # the live monitor (analysis/monitor.py)
    ALERT_PREFIX = "latentgate.alert."  # + alert kind: the alert's message

    @staticmethod
    def dataset_digest(split: str) -> str:
        """`dataset.<split>.digest` (tracking/tracker.py log_input); the gate's dataset_digest criterion reads it."""
        return f"dataset.{split}.digest"


class SweepTag:
    """Tags of a sweep's runs (sweep/runner.py, sweep/objective.py, sweep/tracking.py); the pipeline reads BEST_*."""

    STUDY = "latentgate.study"  # sweep, trial and their stage runs: the study name
    TRIAL_NUMBER = "latentgate.trial_number"  # trial and its stage runs
    TRIAL_STATE = "latentgate.trial_state"  # trial and its stage_b run: RUNNING, COMPLETE, PRUNED, FAIL
    PRUNED = "latentgate.pruned"  # a pruned trial's (and its stage run's) reason
    STAGE_A_KEY = "latentgate.sweep.stage_a_key"  # a Stage A run trained for `resume_from: auto`: its reuse key
    N_TRIALS = "latentgate.n_trials"  # sweep run: the budget (also a study attribute)
    WORKERS = "latentgate.workers"
    STORAGE = "latentgate.storage"  # the Optuna storage URL, secrets masked
    SAMPLER = "latentgate.sampler"
    PRUNER = "latentgate.pruner"
    SEED = "latentgate.seed"
    STOPPED = "latentgate.stopped"  # why the stop rule ended the study early (also a study attribute)
    BEST_TRIAL = "latentgate.best_trial"  # the best trial's number, or none
    BEST_TRIAL_RUN = "latentgate.best_trial_run"  # its trial run; the pipeline reads it
    BEST_EVAL_RUN = "latentgate.best_eval_run"  # its eval run; the pipeline reads it
    BEST_CHECKPOINT = "latentgate.best_checkpoint"  # its Stage B checkpoint URI
    BEST_MODEL_VERSION = "latentgate.best_model_version"  # the version registered from it
    BEST_GATE_PASSED = "latentgate.best_gate_passed"  # whether that version passes the checklist
    PLOT_NOTE_PREFIX = "latentgate.plot_note."  # + plot: why an Optuna plot was not made


class CalibrateTag:
    """Tags of `latentgate calibrate` (calibrate/runner.py); registry/calibration.py reads SUMMARY."""

    ROLE = "latentgate.calibrate.role"  # each chain's parent run: gate | hero
    CONFIG_HASH = "latentgate.calibrate.config_hash"  # each chain: its resolved config
    REUSE_KEY = "latentgate.calibrate.reuse_key"  # each chain: what reuses it (calibrate/reuse.py ReuseKey.digest)
    # each chain: the same key without the git commit (`calibrate --allow-other-commit` looks for it)
    REUSE_KEY_ANY_COMMIT = "latentgate.calibrate.reuse_key_any_commit"
    COMMIT = "latentgate.calibrate.commit"  # each chain: the git commit it was trained at
    CONFIGURATION = "latentgate.calibrate.configuration"  # each chain and configuration run: its name
    SET = "latentgate.calibrate.set"  # the calibration's parent run: the set's name
    SUMMARY = "latentgate.calibrate.summary"  # the parent run: what `promote` and `analyze` print (JSON)
    SPLIT = "latentgate.calibrate.split"  # a configuration run: fit | holdout
    EXPECT = "latentgate.calibrate.expect"  # what the configuration was expected to do
    VERDICT = "latentgate.calibrate.verdict"  # the checklist's verdict on the gate chain: promote | refuse
    OUTCOME = "latentgate.calibrate.outcome"  # the hero chain's outcome: success | failure
    GATE_RUN = "latentgate.calibrate.gate_run"
    HERO_RUN = "latentgate.calibrate.hero_run"
    REUSED = "latentgate.calibrate.reused"  # which chains were reused: gate, hero, or none


class MlflowTag:
    """MLflow's own tags that latentgate sets or reads."""

    NOTE = "mlflow.note.content"  # the run's description (markdown)
    RUN_NAME = "mlflow.runName"
    PARENT_RUN = "mlflow.parentRunId"  # what analysis, calibrate and the registry follow to child runs
    SOURCE_GIT_COMMIT = "mlflow.source.git.commit"
    PROJECT_ENTRY_POINT = "mlflow.project.entryPoint"  # set by `mlflow run`


class Registry:
    """The registered model and its alias when a checklist file does not name them (registry/hero.yaml does)."""

    MODEL_NAME = "latentgate"
    ALIAS = "hero"


class VersionTag:
    """Tags of registered model versions. The registry gate (registry/gate.py) writes the `hero.*` ones; a version
    also carries its links to its evidence: Tag.EVAL_RUN, STAGE_B_RUN, BASE_RUN, CHECKPOINT, REGISTER_RUN, GIT_COMMIT
    (registry/model.py)."""

    CHECK_PREFIX = "hero.check."  # + criterion: pass | fail, with the observed value (promote, sweep record_checks)
    AUDIT = "hero.audit"  # the promotion's audit (JSON): rule file hash, commit, time, decision; verify reads it
    REPORT = "hero.report"  # the URI of the promotion's JSON report
    PASSED = "hero.passed"  # true | false
    EVENT_PREFIX = "hero.event."  # + time stamp: what happened to the version (promoted, refused, demoted)
    SUPERSEDED_BY = "hero.superseded_by"  # the version the alias moved to
    CALIBRATION = "hero.calibration"  # what the latest calibration predicts for it (registry/calibration.py)
    CHECKPOINT_PIN = "hero.checkpoint_sha256"  # the checkpoint manifest's sha256 the promotion approved
    CHECKED_BY = "latentgate.checked_by"  # the sweep run that wrote its check tags (sweep/runner.py)


# ---- Optuna attributes (sweeps) --------------------------------------------------------------------------------------

class StudyAttr:
    """User attributes of a sweep's Optuna study: what hand-started workers read (sweep/runner.py, bench/sweeps.py)."""

    SPEC = "latentgate.spec"  # the resolved study file
    N_TRIALS = SweepTag.N_TRIALS  # the trial budget
    RESUME_FROM = Tag.RESUME_FROM  # the Stage A checkpoint every trial resumes
    PARENT_RUN = "latentgate.mlflow_parent_run"  # the sweep's MLflow run
    STOPPED = SweepTag.STOPPED  # why the stop rule ended the study ("" while it runs; sweep/stopping.py)


class TrialAttr:
    """User attributes of a sweep's Optuna trials (sweep/objective.py); the runner's summary reads them."""

    WORKER_PID = "latentgate.worker_pid"
    MLFLOW_RUN_ID = "latentgate.mlflow_run_id"  # the trial's MLflow run
    STAGE_B_RUN_ID = "latentgate.stage_b_run_id"
    CHECKPOINT_URI = "latentgate.checkpoint_uri"  # its Stage B checkpoint
    EVAL_RUN_ID = "latentgate.eval_run_id"
    OPTIMIZER_STEPS = "latentgate.optimizer_steps"  # what it trained (also when pruned or failed)
    LATENT_F1 = "latentgate.latent_f1"
    LATENT_FIRST_TOP1 = "latentgate.latent_first_top1"
    ARTIFACT_PREFIX = "latentgate.artifact."  # + file name: its Optuna artifact id


# ---- metric keys -----------------------------------------------------------------------------------------------------

class Stage:
    """Keys of a training stage's per-step record (train/trainer.py): one line of diagnostics.jsonl per optimizer
    step, and every number in it as the metric <stage>/<key> (`Stage.metric`). Analysis, the live monitor, the plots,
    calibrate and the checklist (hero.yaml: stage_b/grad_norm, ...) read them. Also per step: the loss terms
    (`Loss.key`), the gradient norm of each group (`GradGroup.norm_key`), and at probe steps the probe (`Probe.key`)."""

    GLOBAL_STEP = "global_step"  # the optimizer step (the metrics' step; diagnostics.jsonl only)
    STAGE = "stage"  # stage_a | stage_b (diagnostics.jsonl only)
    MICRO_STEP = "micro_step"  # micro-batches so far; calibrate counts compute from it
    EPOCH = "epoch"
    LR = "lr"
    LOSS = "loss"  # the weighted total
    FIRST_ACC = "first_acc"  # first-token accuracy on the training batch (train/losses.py token_stats)
    FIRST_ACC_TOP5 = "first_acc_top5"
    TOKEN_DIVERSITY = "token_diversity"  # distinct first-token predictions / batch size: collapse shows as -> 0
    ANSWER_LENGTH_AVG = "answer_length_avg"
    GRAD_NORM = "grad_norm"  # every trainable parameter together, before clipping
    P_GOLD = "p_gold"  # scheduled sampling's p(gold)
    ELAPSED = "elapsed"
    FINAL_PROBE_PREFIX = "final_probe_"  # stage run, at its last step: the last probe's keys (phases/stages.py)

    @staticmethod
    def metric(stage: str, key: str) -> str:
        """The metric a stage logs a record key as: `stage_b/grad_norm`."""
        return f"{stage}/{key}"


class Probe:
    """Keys of the held-out probe (eval/probe.py run_probe, its controls eval/controls.py control_stats). A stage
    records each as probe_<key> (`Probe.key`) in its diagnostics and as the metric <stage>/probe_<key>."""

    FIRST_ACC = Stage.FIRST_ACC  # first-token accuracy, the same measure on the probe set
    FIRST_ACC_LO = "first_acc_lo"  # its 95% Wilson interval
    FIRST_ACC_HI = "first_acc_hi"
    FIRST_ACC_TOP5 = Stage.FIRST_ACC_TOP5
    NLL = "nll"  # teacher-forced answer NLL per token
    F1 = "f1"  # greedy latent F1 (with_f1)
    CONST = "first_acc_const"  # control: always guessing the set's most frequent gold first token
    SHUFFLED = "first_acc_shuffled"  # control: every example fed another example's latents
    LIFT = "first_acc_lift"  # accuracy minus the better control: what first_token_learning judges
    TOP_SHARE = "top_first_token_share"  # share of the most frequent predicted first token
    DISTINCT = "distinct_first_tokens"  # how many different first tokens it predicts
    CONTROLS = (CONST, SHUFFLED, LIFT, TOP_SHARE, DISTINCT)
    KEYS = (FIRST_ACC, FIRST_ACC_LO, FIRST_ACC_HI, FIRST_ACC_TOP5, F1, NLL, *CONTROLS)
    PREFIX = "probe_"

    @staticmethod
    def key(key: str) -> str:
        """The record key (and, under its stage, the metric) of a probe key: `probe_first_acc`."""
        return Probe.PREFIX + key


class Loss:
    """The loss terms (train/losses.py compute_losses), all from one teacher-forced pass. Each is logged per step as
    <term>_raw and <term>_weighted (`Loss.key`); analysis plots and the monitor read the raw ones."""

    TF = "tf"  # teacher-forced CE over the whole answer
    FIRST = "first"  # first-token CE
    KCE = "kce"  # CE over the first K answer tokens
    KD = "kd"  # KL to the text teacher at aligned answer positions
    TERMS = (TF, FIRST, KCE, KD)

    @staticmethod
    def key(term: str, kind: str = "raw") -> str:
        """`tf_raw`, `kd_weighted`: a loss term's record key, `kind` raw or weighted."""
        return f"{term}_{kind}"

    RAW_KEYS = tuple(map(key, TERMS))


class GradGroup:
    """The optimizer's parameter groups (train/trainer.py build_optimizer); each group's pre-clip gradient norm is
    logged per step as grad_norm_<group> (`GradGroup.norm_key`), next to the total Stage.GRAD_NORM."""

    ENCODER = "encoder"
    ADAPTER = "adapter"
    LORA = "lora"
    ALL = (ENCODER, ADAPTER, LORA)

    @staticmethod
    def norm_key(group: str) -> str:
        return f"{Stage.GRAD_NORM}_{group}"

    NORM_KEYS = (Stage.GRAD_NORM, *map(norm_key, ALL))  # the total first, then each group


class Summary:
    """Run-level metrics (step 0) of the base run, the smoke / hero parent run and a sweep trial's run."""

    TEXT_F1 = "text_f1"  # base run and smoke parent: the text teacher's eval F1 (sanity_gate.json has it too)
    TEXT_EM = "text_em"  # base run
    TEXT_NLL_PER_TOKEN = "text_nll_per_token"  # base run (sanity_gate.json has it too)
    LATENT_F1 = "latent_f1"  # smoke / hero parent and trial run: mean latent F1; bench and sweep summaries read it
    LATENT_EM = "latent_em"
    LATENT_FIRST_TOP1 = "latent_first_top1"  # trial run
    LATENT_FIRST_TOP5 = "latent_first_top5"  # a study objective (sweep/study.py), not logged
    OBJECTIVE = "objective"  # trial run: the study's objective value
    OPTIMIZER_STEPS = "optimizer_steps"  # trial run


# ---- eval ------------------------------------------------------------------------------------------------------------

class EvalPath:
    """The eval paths (eval/evaluate.py). The config's eval.paths and hero.yaml name them as data."""

    LATENT = "latent"  # encoder -> adapter -> LoRA'd LM: the model under test
    TEXT = "text"  # the teacher: the LM with LoRA disabled, reading the full text
    TOKEN_BUDGET = "token_budget"  # the teacher on the text cut to M tokens (question kept)
    ZERO_LATENT = "zero_latent"  # control: latents of zeros
    SHUFFLED_LATENT = "shuffled_latent"  # control: every example fed another example's latents
    ALL = (LATENT, TEXT, TOKEN_BUDGET, ZERO_LATENT, SHUFFLED_LATENT)
    TEACHER = (TEXT, TOKEN_BUDGET)  # the LM with LoRA disabled
    WITH_LATENTS = (LATENT, ZERO_LATENT, SHUFFLED_LATENT)  # fed a latent prefix
    CONTROLS = (TOKEN_BUDGET, ZERO_LATENT, SHUFFLED_LATENT)  # what the latent path is compared with


class EvalKey:
    """Per-path aggregates of an eval (metrics.json `paths.<path>.<key>`, eval/evaluate.py aggregate); those in
    LOGGED are also the eval run's metrics eval/<path>/<key> (`EvalKey.metric`, phases/stages.py record_eval). The
    collapse keys are also eval/controls.py collapse_stats's."""

    EM = "em"
    F1 = "f1"
    FIRST_TOP1 = "first_top1"
    FIRST_TOP5 = "first_top5"
    FIRST_TOP1_CONST = "first_top1_const"  # the constant-guess control of first_top1
    NLL_PER_TOKEN = "nll_per_token"
    REPETITION_RATE = "repetition_rate"  # share of repetitive ("thethethe") predictions
    EMPTY_RATE = "empty_rate"
    TOP_PREDICTION_SHARE = "top_prediction_share"  # share of the most frequent prediction
    DISTINCT_FIRST_TOKENS = Probe.DISTINCT
    F1_DISTRIBUTION = "f1_distribution"  # metrics.json only
    FIRST_F1_NONZERO_IDX = "first_f1_nonzero_idx"
    ERROR_MODES = "error_modes"
    LOGGED = (EM, F1, FIRST_TOP1, FIRST_TOP5, FIRST_TOP1_CONST, NLL_PER_TOKEN, REPETITION_RATE, EMPTY_RATE,
              TOP_PREDICTION_SHARE, DISTINCT_FIRST_TOKENS)
    PREFIX = "eval/"

    @staticmethod
    def metric(path: str, key: str) -> str:
        """The metric an eval run logs a path's aggregate as: `eval/latent/f1`."""
        return f"{EvalKey.PREFIX}{path}/{key}"


# ---- artifacts -------------------------------------------------------------------------------------------------------

class Artifact:
    """Artifact file names (the run's artifact root unless a folder is named)."""

    EVAL_DETAILED = "eval_detailed.jsonl"  # eval run: one row per question and path; registry, pipeline, analysis
    EVAL_METRICS = "metrics.json"  # eval run: per-path aggregates (EvalKey); registry, analysis, plots
    EVAL_TABLE = "eval_table.json"  # eval run: the same rows as an MLflow table (the UI's Evaluation view)
    CONTRACT = "contract.json"  # stage and eval runs: the prefix contract; registration bundles the eval run's
    SANITY_GATE = "sanity_gate.json"  # base run: the text teacher's sanity gate (train/base.py gate_record)
    DIAGNOSTICS = "diagnostics.jsonl"  # stage run: the Stage records; plots, analysis, bench
    DIAGNOSTICS_EPOCH = "diagnostics_epoch.jsonl"  # stage run: per epoch, sample predictions and a histogram
    STAGE_SUMMARY = "stage_summary.json"  # stage run
    LORA_PARAMS = "lora_params.json"  # Stage B run: trainable LoRA parameters per layer
    CHECKPOINTS = "checkpoints"  # stage run: checkpoints/<stage> (`Artifact.checkpoint`), and the local folder
    MANIFEST = "manifest.json"  # in a checkpoint folder (train/checkpoint.py writes it)
    BASE_LM = "base_lm"  # base run that trained its LM: the LM folder; lineage resolves it
    SUMMARY = "summary.json"  # smoke / hero parent: the printed summary
    HERO_REPORTS = "hero_reports"  # a model version's run: the gate's JSON reports (tag hero.report)
    PARAMS_FULL = "params_full.json"  # any run: params longer than MLflow takes, whole (tracking/tracker.py); resume

    @staticmethod
    def checkpoint(stage: str) -> str:
        """`checkpoints/<stage>`: where a stage run logs its checkpoint (runs:/<run>/checkpoints/<stage>)."""
        return f"{Artifact.CHECKPOINTS}/{stage}"


# ---- calibration -----------------------------------------------------------------------------------------------------

class Calibration:
    """Fields of a configuration's calibration record (calibrate/runner.py; calibration.json and the summary tag),
    read by calibrate/stats.py, calibrate/plot.py and registry/calibration.py."""

    SMOKE_F1 = "smoke_f1"  # the gate chain's mean latent F1
    HERO_F1 = "hero_f1"  # the hero chain's
    HERO_F1_TARGET = "hero_f1_target"  # the hero's success bar: hero.yaml's calibration.hero_f1_target
