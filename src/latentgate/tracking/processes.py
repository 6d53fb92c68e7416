"""Which process owns a run, and runs whose process is gone.

Every run records the host, pid and start time of the process that owns it (`process_tags`). A run left RUNNING
by a process that died (SIGKILL, or a tracking server that stopped answering when the process tried to end it)
ends FAILED at the next latentgate command on the store (`close_orphaned_runs`, called where a command opens it).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mlflow import MlflowClient

from latentgate.schema import Tag

# the tags naming the process that owns a run; a resumed run gets those of its new process
PROCESS_TAGS = (Tag.HOST, Tag.PID, Tag.PID_START)
ORPHANED = "OrphanedRun"  # the error type of a run closed by `close_orphaned_runs`


def process_tags() -> dict[str, str]:
    """Which process owns a run: host, pid and the process's start time (so that a pid reused later is not
    taken for it). `close_orphaned_runs` reads them."""
    tags = {Tag.HOST: socket.gethostname(), Tag.PID: str(os.getpid())}
    started = process_start(os.getpid())
    if started is not None:
        tags[Tag.PID_START] = f"{started:.2f}"
    return tags


def process_start(pid: int) -> float | None:
    """When process `pid` started (epoch seconds, Linux /proc); None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _process_alive(tags: dict) -> bool:
    """Whether the process a run's tags name still runs (unknown: assumed alive, the run is left alone)."""
    pid = tags.get(Tag.PID, "")
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    started, recorded = process_start(int(pid)), tags.get(Tag.PID_START)
    if started is None or not recorded:
        return True
    try:
        return abs(started - float(recorded)) < 1.0  # else the pid was reused by a later process
    except ValueError:
        return True


def close_orphaned_runs(uri: str) -> list[str]:
    """Runs of this host left RUNNING whose process is gone (killed, or the tracking store was unreachable when
    it tried to end them) end FAILED, with the reason as their error tag. Every command that opens a store runs
    this (`tracking_uri`, `setup_experiment`), so such runs end as soon as the store answers again. Best effort:
    a store that fails here fails the command later, where the error names what was being done. Returns the ids."""
    host = socket.gethostname()
    closed = []
    try:
        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        runs = client.search_runs(experiments, f"attributes.status = 'RUNNING' and tags.`{Tag.HOST}` = '{host}'",
                                  max_results=1000) if experiments else []
        for run in runs:
            if _process_alive(run.data.tags):
                continue
            pid = run.data.tags[Tag.PID]
            client.set_tag(run.info.run_id, Tag.ERROR, f"its process (pid {pid} on {host}) ended without ending "
                           "the run (killed, or the tracking store did not answer at the end); closed by a later "
                           "latentgate command")
            client.set_tag(run.info.run_id, Tag.ERROR_TYPE, ORPHANED)
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    except Exception:  # noqa: BLE001 - best effort (see above)
        pass
    return closed
