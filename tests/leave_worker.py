"""One process of tests/test_distributed.py::test_leaving_the_group_joins_its_threads, under torchrun.

Joins the group as the CLI does, loads a tokenizer through transformers (which imports modules that bind the
group as a default argument), broadcasts as main_only does, leaves as the exit hook does, and writes how many
OS threads the process had before joining, while joined, and after leaving to <folder>/threads-<rank>.json.
Threads left behind outlive the interpreter and can abort the exit. argv: a scratch folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch  # noqa: F401 - imported before counting: its own thread pools are not the group's


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main() -> None:
    from latentgate import config
    from latentgate import distributed as dist
    from latentgate.model.base_lm import builtin_tokenizer

    before = threads()
    dist.init_from_env()
    joined = threads()
    folder = Path(sys.argv[1]) / f"tok-{os.environ['RANK']}"
    builtin_tokenizer(config.resolve("micro")).save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder)
    import torch.distributed.nn.functional  # noqa: F401 - what transformers imports today, should it stop
    dist.broadcast({"rank0": True})
    dist._leave()
    counts = {"rank": int(os.environ["RANK"]), "before": before, "joined": joined, "after": threads()}
    # a file per rank, not stdout: torchrun forwards both ranks' stdout into one pipe, where lines can interleave
    (Path(sys.argv[1]) / f"threads-{os.environ['RANK']}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main()
