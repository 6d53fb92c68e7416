"""The package's layers (README, Layout): every import of latentgate points down this order, so a module's
header says what it stands on, and nothing below ever reaches up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "latentgate"

# bottom first; a module may import its own area and anything in a lower layer
LAYERS = [
    {"errors", "schema", "eval_row"},
    {"config", "config_parse", "data", "safety", "distributed", "heap"},
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
OPTIONAL = "optional"  # ... but only a third-party package can be optional: every latentgate module ships with it


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
                    in_package = _in_package(inner)
                    reasons = tuple(r for r in REASONS if r != OPTIONAL) if in_package else REASONS
                    if not any(reason in comment for reason in reasons):
                        hidden.append(f"{path.relative_to(SRC)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not hidden, "imports inside functions without a reason:\n" + "\n".join(sorted(set(hidden)))


def _in_package(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] == "latentgate"
    return any(alias.name.split(".")[0] == "latentgate" for alias in node.names)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                                       for n in names)


def test_no_in_package_import_is_treated_as_optional():
    """An `except ImportError` around a latentgate import turns a broken install into a silent skip (or a note)."""
    guarded = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                imports = [n for stmt in node.body for n in ast.walk(stmt)
                           if isinstance(n, (ast.Import, ast.ImportFrom))]
                guarded += [f"{path.relative_to(SRC)}:{n.lineno}" for n in imports if _in_package(n)]
    assert not guarded, "in-package imports guarded by except ImportError:\n" + "\n".join(guarded)


TORCH_FREE = """
import sys
from latentgate.cli import main
try:
    main(["checkpoint", "verify", sys.argv[1], "--preset", "micro"])
except SystemExit as done:
    assert done.code in (0, None), done.code
assert "torch" not in sys.modules, "checkpoint verify imported torch"
"""


def test_checkpoint_verify_with_a_config_does_not_import_torch(tmp_path, micro_cfg):
    """`latentgate checkpoint verify URI --preset ...` hashes files and compares config keys: no torch needed
    (COMPAT_KEYS lives in the torch-free train/manifest.py, not in the trainer)."""
    import torch

    from conftest import cli_env
    from latentgate.config import flatten
    from latentgate.train.checkpoint import save_checkpoint

    folder = save_checkpoint(tmp_path / "ck", modules={"encoder": torch.nn.Linear(2, 2)}, config=flatten(micro_cfg))
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(folder)], env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "every hash verified" in proc.stdout
