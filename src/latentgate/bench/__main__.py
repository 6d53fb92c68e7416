"""`python -m latentgate.bench` (what `make bench` runs): the same as `latentgate bench`."""

from latentgate.bench.cli import bench

if __name__ == "__main__":  # pragma: no cover
    bench(prog_name="python -m latentgate.bench")
