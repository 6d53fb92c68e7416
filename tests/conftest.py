"""Shared fixtures: one real SQLite MLflow store per test session (a fresh one costs ~6 s to migrate), one micro
smoke run in it, and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Offline, quiet, single-threaded: set before anything imports torch / HF / mlflow.
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "GIT_PYTHON_REFRESH": "quiet"}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory, hf_home) -> Path:
    """A real SQLite tracking store + artifact folder, shared by the session. Returns its folder."""
    root = tmp_path_factory.mktemp("mlstore")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    from latentgate.tracking.runs import setup_experiment

    setup_experiment("latentgate")
    return root


@pytest.fixture(scope="session")
def micro_cfg():
    from latentgate import config

    return config.resolve("micro")


@pytest.fixture(scope="session")
def micro_smoke(mlflow_store, micro_cfg, tmp_path_factory):
    """One end-to-end micro smoke (seconds) in the shared store: its summary dict (run ids, output dir)."""
    import dataclasses

    from latentgate.phases.smoke import run_smoke

    cfg = dataclasses.replace(micro_cfg)
    cfg.run = dataclasses.replace(micro_cfg.run, output_dir=str(tmp_path_factory.mktemp("runs")))
    return run_smoke(cfg, "micro")


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # set by mlflow.set_experiment in this process; would pin subprocesses
    env.update(extra or {})
    return env


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
            **kwargs) -> subprocess.CompletedProcess:
    """The real `latentgate` CLI in a subprocess (same interpreter), capturing output."""
    return subprocess.run([sys.executable, "-m", "latentgate", *args], cwd=cwd or ROOT, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture()
def tiny_ws(micro_cfg):
    """A Workspace around a tiny, randomly initialised builtin Llama + encoder + adapter (no training)."""
    import torch

    from latentgate.data.synthetic import vocabulary
    from latentgate.model.base_lm import build_builtin_lm, build_builtin_tokenizer
    from latentgate.train.workspace import load_splits, synthetic_spec, workspace_from_lm

    cfg = copy.deepcopy(micro_cfg)  # tests may change the config; the session's stays untouched
    torch.manual_seed(0)
    tok = build_builtin_tokenizer(vocabulary(synthetic_spec(cfg)))
    lm = build_builtin_lm(cfg, len(tok), tok)
    return workspace_from_lm(cfg, lm, tok, load_splits(cfg))
