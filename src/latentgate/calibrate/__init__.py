"""Gate fidelity: `latentgate calibrate` measures how well the cheap gate (the smoke and its readiness checklist)
predicts the expensive run (the hero).

A calibration set (`calibrations/<name>.yaml`, `spec.py`) declares configurations. For each, `runner.py` runs (or
reuses, by the reuse key of `reuse.py`) the smoke-scale chain and judges it with the checklist, read-only; then
the hero-scale chain, the hero `latentgate hero` would run (registry/hero_recipe.hero_plan: steps, warm-up, probe
and checkpoint cadence x hero_scale), whose outcome is hero latent F1 >= calibration.hero_f1_target of the
checklist. `stats.py` (pure) turns verdicts and outcomes into a confusion matrix, precisions, a fitted prediction
interval, a threshold proposal judged on held-out configurations and leave-one-out held-out verdicts at several
hero targets; `plot.py` draws the scatter and `report.py` the printed summary. What crosses these modules is typed:
`records.py` (a chain, a judged checklist row, a configuration, the whole calibration: calibration.json) and
`figures.py` (what the statistics return). registry/calibration.py is what `promote` and `analyze` print about a
candidate of the same family, from the summary tag alone.
"""
