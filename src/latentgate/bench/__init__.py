"""Side-by-side performance benchmarks (`latentgate bench`, `python -m latentgate.bench`, `make bench`).

Each comparison runs both sides in one process with interleaved repetitions and reports a ratio, because these
machines are shared and noisy; absolute figures only count on a GPU. See `latentgate.bench.comparisons`.
"""
