"""A fresh venv that holds exactly a requirements list and what it needs, and nothing else: no latentgate, no
test tooling, none of the project's other dependencies. The packages are linked from this venv (same versions,
installed in milliseconds instead of a pip download), so a missing requirement fails exactly as it would in a
serving image built from the model's requirements.txt."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(req).name).lower()


def closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements pull in (markers evaluated for this interpreter, no extras)."""
    todo, seen = [_name(r) for r in requirements], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform package this interpreter does not use
        seen.add(name)
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(_name(req))
    return seen


def _top_level_entries(dist) -> set[str]:
    """The names a distribution puts in site-packages (packages, modules, its .dist-info, .pth files)."""
    out = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].startswith("__editable__"):
            out.add(parts[0])
    return out


def make_bare_venv(root: Path, requirements: list[str]) -> Path:
    """A venv under `root` with only `requirements` (and their dependencies) importable. Returns its python."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    here = Path(sysconfig.get_paths()["purelib"])
    for name in closure(requirements):
        dist = metadata.distribution(name)
        for entry in _top_level_entries(dist):
            src, dst = here / entry, site / entry
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
        for ep in dist.entry_points.select(group="console_scripts"):  # what pip writes to bin/ (uvicorn, mlflow)
            script = root / "bin" / ep.name
            script.write_text(f"#!{python}\nimport sys\nfrom {ep.module} import {ep.attr.split('.')[0]} as f\n"
                              f"sys.exit(f{''.join('.' + a for a in ep.attr.split('.')[1:])}())\n")
            script.chmod(0o755)
    return python
