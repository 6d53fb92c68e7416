"""Phase 2 sweeps: declarative Optuna studies (sweeps/*.yaml) over Stage B, tracked in MLflow.

Public API: `study.load_study(name)`, `study.validate_all()`, `runner.run_sweep(spec, n_trials, workers, storage)`,
`runner.run_worker(study, storage)`, `storage.resolve_storage(...)`, `bench.bench_sweep(...)`.
"""
