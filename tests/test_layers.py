"""The package's layers (README, Layout): every import of latentgate points down this order, so a module's
header says what it stands on, and nothing below ever reaches up."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "latentgate"

# bottom first; a module may import its own area and anything in a lower layer
LAYERS = [
    {"errors", "schema"},
    {"config", "data", "safety", "distributed"},
    {"tracking"},
    {"cli_common"},
    {"model"},
    {"eval"},
    {"train"},
    {"registry"},
    {"analysis"},
    {"phases"},
    {"sweep"},
    {"bench", "pipeline"},
    {"calibrate"},
    {"cli", "__main__"},
]
LEVEL = {area: i for i, areas in enumerate(LAYERS) for area in areas}


def _area(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latentgate."):
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("latentgate."):
                    yield node.lineno, alias.name


def test_every_area_has_a_layer():
    areas = {_area(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert areas <= set(LEVEL), f"add {sorted(areas - set(LEVEL))} to LAYERS and to the README's layout"


def test_imports_point_down():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        here = _area(path)
        for line, module in _imports(ast.parse(path.read_text())):
            there = module.split(".")[1]
            if there != here and LEVEL.get(there, -1) > LEVEL.get(here, -1):
                upward.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)
