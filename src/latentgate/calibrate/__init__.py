"""Gate fidelity: `latentgate calibrate` measures how well the cheap gate (the smoke and its readiness checklist)
predicts the expensive run (the hero).

A calibration set (`calibrations/<name>.yaml`, `spec.py`) declares configurations. For each, `runner.py` runs (or
reuses) the smoke-scale chain and judges it with the checklist, read-only; then a hero-scale chain, the same config
with hero_scale x the optimizer steps, whose outcome is hero latent F1 >= calibration.hero_f1_target of the
checklist. `stats.py` (pure) turns verdicts and outcomes into a confusion matrix, precisions, a fitted prediction
interval and a threshold proposal judged on held-out configurations; `plot.py` draws the scatter. What `promote`
and `analyze` print about a candidate is read back from the recorded calibration by `registry/calibration.py`.
"""
