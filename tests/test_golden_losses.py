"""Golden losses: the first optimizer steps of the micro smoke's Stage A and Stage B, as recorded in its MLflow
metric history. The runs are deterministic on CPU, so any change to data, contract, model init, losses or the
optimizer moves these numbers. To 1e-6 relative, not bit for bit: CPUs with other vector widths may round the last
bits of a reduction differently. A deliberate change re-records them (print the histories, paste them here)."""

from __future__ import annotations

import pytest

GOLDEN = {
    "stage_a": [18.42488751374185, 17.777221102733165, 17.94022595277056, 17.95631506294012, 17.742429387173615,
                17.824183614226058],
    "stage_b": [18.254542880225927, 17.68936928769108, 17.899169009528123, 17.944654408842325, 17.750672749709338,
                17.803762541152537],
}


@pytest.mark.parametrize("stage", sorted(GOLDEN))
def test_first_losses_of_the_micro_smoke_are_the_recorded_ones(micro_smoke, stage):
    from mlflow import MlflowClient

    history = MlflowClient().get_metric_history(micro_smoke.children[stage], f"{stage}/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, len(GOLDEN[stage]) + 1))
    assert losses == pytest.approx(GOLDEN[stage], rel=1e-6, abs=0)
