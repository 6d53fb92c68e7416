"""What the wheel ships: the checklist, the sweep studies and the calibration sets are package data, found through
importlib.resources, so an installed latentgate (no checkout) has them; the checkout's registry/hero.yaml, sweeps/
and calibrations/ are links to the same files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"registry/hero.yaml": "latentgate/registry/hero.yaml", "sweeps": "latentgate/sweep/studies",
           "calibrations": "latentgate/calibrate/sets"}


def test_the_code_reads_package_data_and_the_checkout_links_to_it():
    from latentgate.calibrate.spec import CALIBRATION_DIR
    from latentgate.registry.checklist import DEFAULT_PATH
    from latentgate.sweep.study import SWEEP_DIR

    pkg = resources.files("latentgate")
    assert Path(str(pkg / "registry" / "hero.yaml")) == DEFAULT_PATH and DEFAULT_PATH.is_file()
    assert Path(str(pkg / "sweep" / "studies")) == SWEEP_DIR and (SWEEP_DIR / "phase2.yaml").is_file()
    assert Path(str(pkg / "calibrate" / "sets")) == CALIBRATION_DIR and (CALIBRATION_DIR / "cpu.yaml").is_file()
    for link in SHIPPED:  # one copy of each file: the checkout's paths resolve into the package
        assert (ROOT / link).is_symlink() and (ROOT / link).resolve().is_relative_to(ROOT / "src" / "latentgate")


def test_the_wheel_ships_them(tmp_path):
    src = tmp_path / "project"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("latentgate-*.whl"))).namelist())
    for link, packaged in SHIPPED.items():
        local = ROOT / link
        files = [local] if local.is_file() else sorted(local.glob("*.yaml"))
        assert files
        for f in files:
            assert (packaged if local.is_file() else f"{packaged}/{f.name}") in names
    assert "latentgate/presets/smoke.yaml" in names
