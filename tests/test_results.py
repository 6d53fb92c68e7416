"""What the phases return, as the CLI prints it: one typed result per kind of run (phases/results.py), read by
attribute; a phase's summary lines come from the result's own fields, whatever kind it is."""

from __future__ import annotations

import dataclasses

import pytest

from latentgate.phases.cli import _summary
from latentgate.phases.results import BaseResult, EvalResult, StageResult
from latentgate.schema import EvalKey, EvalPath, Probe
from latentgate.tracking.lineage import BaseLM

TRAINER_SUMMARY = {"stage": "stage_b", "steps": 30, "micro_steps": 90, "checkpoint": "/tmp/out/stage_b",
                   "probes": [{"step": 30, Probe.FIRST_ACC: 0.25}], "elapsed": 12.0,
                   "final_probe": {Probe.FIRST_ACC: 0.25, Probe.LIFT: 0.125, Probe.CONST: 0.0625,
                                   Probe.SHUFFLED: 0.125}}


def test_a_stage_result_is_the_trainers_summary_plus_its_run():
    r = StageResult.from_summary(TRAINER_SUMMARY, "r" * 32, f"runs:/{'r' * 32}/checkpoints/stage_b")
    assert (r.stage, r.steps, r.micro_steps, r.checkpoint) == ("stage_b", 30, 90, "/tmp/out/stage_b")
    assert r.final(Probe.LIFT) == 0.125 and r.final(Probe.F1) is None
    assert "probes" not in r.as_record() and r.as_record()["run_id"] == "r" * 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.steps = 1  # type: ignore[misc]


def test_each_kind_of_result_prints_its_own_lines():
    stage = StageResult.from_summary(TRAINER_SUMMARY, "s" * 32, "runs:/s/checkpoints/stage_b")
    assert _summary("stage_b", stage).splitlines() == [
        f"stage_b: run {'s' * 32}", "checkpoint  runs:/s/checkpoints/stage_b",
        "probe first-token accuracy 25.0% (lift +12.5% over the controls: constant guess 6.2%, shuffled latent 12.5%) "
        "after 30 optimizer steps"]
    paths = {EvalPath.LATENT: {EvalKey.EM: 0.5, EvalKey.F1: 0.75, EvalKey.FIRST_TOP1: 0.25}}
    assert _summary("eval", EvalResult("e" * 32, {"paths": paths})).splitlines()[1] == \
        "latent           EM 0.500  F1 0.750  first-token top-1 0.250"
    base = BaseResult("b" * 32, BaseLM("/m", "b" * 32, "external"), "external", {EvalKey.F1: 0.9}, 1.0)
    assert _summary("base", base).splitlines() == [f"base: run {'b' * 32}", "base LM     external"]
