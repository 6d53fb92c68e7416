"""Side-by-side performance benchmarks (`latentgate bench`, `python -m latentgate.bench`, `make bench`).

Each comparison runs both sides in one process with interleaved repetitions and reports a ratio, because these
machines are shared and noisy; absolute figures only count on a GPU.

key         what                                                   compared with                    target
tracking    Stage A loop with MLflow tracking (SQLite store)       the same loop with NullTracker   >= 0.97x
generation  batched KV-cached greedy decoding (greedy_generate)    HF batched model.generate        >= 1.0x, identical
                                                                   per-example model.generate       >= 10x, identical
step        trainer step tokens/s (smoke config)                   bare forward+backward loop       >= 0.9x
compile     bare step tokens/s, eager                              the same step, torch.compile     info: which wins
startup     `latentgate --help`, `latentgate config` start-up      `python -c pass`                 <= 0.5 s
smoke       `latentgate smoke`: wall time, latent F1, peak RSS     -                                5 min, F1>0, 2 GiB
gpu         Stage B step tokens/s + MFU, generation (1B Llama)     -                                MFU >= 40%
sweep       2 workers vs 1; pruned vs unpruned study (sweeps.py)   -                                see sweeps.py

One module per comparison (tracking_cost, generation, step, processes for start-up and the smoke, gpu, sweeps),
the clocks they share in timing.py, the table and verdicts in report.py.
"""
