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


CLI_MODULES = {"cli.py", "cli_common.py"}  # click only at the top: `latentgate --help` stays fast
REASONS = ("lazy:", "optional", "cycle:")  # in a comment: the only reasons an import may sit inside a function


def test_imports_sit_at_the_top_unless_a_comment_says_why():
    hidden = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in CLI_MODULES:
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    text = " ".join(lines[inner.lineno - 1:inner.end_lineno])
                    comment = text.partition("#")[2]
                    if not any(reason in comment for reason in REASONS):
                        hidden.append(f"{path.relative_to(SRC)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not hidden, "imports inside functions without a reason:\n" + "\n".join(sorted(set(hidden)))
