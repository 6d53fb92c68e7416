"""A throwaway PostgreSQL server on 127.0.0.1 for tests (Debian's `postgresql` package).

`pg_url` (session fixture): finds initdb/pg_ctl (installing the package with apt-get when it is missing and we are
root), creates a cluster in a temporary folder owned by the `postgres` user (initdb refuses root), starts it on a
free loopback port, yields `postgresql://postgres@127.0.0.1:<port>/postgres`, and stops it afterwards. It skips
with the reason only when the server cannot be installed or started; the Python driver (psycopg2) must be there.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import free_port


def _find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def _install() -> str | None:
    """apt-get install postgresql; returns None on success, else the reason."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL binaries are missing and apt-get cannot run here (not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return None


def _as_user(cmd: list[str], user: str | None) -> list[str]:
    if user is None:
        return cmd
    runner = shutil.which("runuser")
    return [runner, "-u", user, "--", *cmd] if runner else ["su", user, "-s", "/bin/sh", "-c", " ".join(cmd)]


@pytest.fixture(scope="session")
def pg_url():
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("psycopg", "psycopg2")):
        pytest.skip("no PostgreSQL driver in this venv (pip install 'psycopg[binary]' or psycopg2-binary)")
    if not (_find_bin("initdb") and _find_bin("pg_ctl")):
        reason = _install()
        if reason or not (_find_bin("initdb") and _find_bin("pg_ctl")):
            pytest.skip(f"PostgreSQL server cannot be installed: {reason or 'initdb/pg_ctl not found after install'}")
    initdb, pg_ctl = _find_bin("initdb"), _find_bin("pg_ctl")
    user = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to own the test cluster")
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="latentgate-pg-"))
    data = root / "data"
    if user:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    port = free_port()
    r = subprocess.run(_as_user([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"], user),
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {(r.stderr or r.stdout).strip()[-300:]}")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    r = subprocess.run(_as_user([pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "server.log"), "-w",
                                 "-t", "60", "start"], user), capture_output=True, text=True, timeout=90)
    if r.returncode != 0:
        log = (root / "server.log").read_text()[-300:] if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {(r.stderr or r.stdout).strip()[-200:]} {log}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_user([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], user),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
