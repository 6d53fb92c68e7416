"""The plan carried out: Phase 1 -> checklist -> Phase 2 / Phase 3 -> promote -> hero, above the phases and the
sweep (`latentgate pipeline`, `mlflow run . -e pipeline`)."""
