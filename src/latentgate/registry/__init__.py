"""The model registry gate: the readiness checklist as data (registry/hero.yaml), evidence queries, the pyfunc
model and the `hero` alias, moved only on evidence. Modules: checklist, evidence, model, gate, cli."""
