#!/usr/bin/env python
"""The plan's `analyze_breakthrough.py`, kept under its name: a thin wrapper over `latentgate analyze`.

    python analysis/analyze_breakthrough.py <run_id>                 # a smoke parent, a stage run or an eval run
    python analysis/analyze_breakthrough.py runs/.../diagnostics.jsonl  # a local diagnostics file

Every option of `latentgate analyze --help` works here. The code lives in src/latentgate/analysis.
"""

import sys

from latentgate.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]], prog_name="analyze_breakthrough.py"))
