"""The plan's phases: smoke (base -> Stage A -> Stage B -> eval), extend, fix, hero, and the pipeline."""
