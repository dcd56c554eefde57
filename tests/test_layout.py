"""The house rules that keep the package readable, checked on its source: every package is shipped,
the CLI's files stay small, functions stay short (typer signatures aside), imports flow one way."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "se_inject"
MAX_CLI_FILE_LINES = 300
MAX_FUNCTION_LINES = 60


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found - listed == set(), "packages missing from pyproject.toml's [tool.setuptools] packages"


@pytest.mark.parametrize("path", sorted((PACKAGE / "cli").rglob("*.py")), ids=lambda p: p.name)
def test_cli_files_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_CLI_FILE_LINES


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function after its signature and docstring (a typer command's options are its signature)."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    assert node.end_lineno is not None
    return node.end_lineno - body[0].lineno + 1


def test_no_function_is_long():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_body_lines(node)} lines)"
        for path in _python_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > MAX_FUNCTION_LINES
    ]
    assert long == []


# the layers along the data flow; a module may import from its own layer and those before it. io.files
# (reading and writing files safely) serves every layer; io.saving rebuilds a model through the api.
LAYERS = ["errors", "grammar", "datafiles", "config", "io.files", "units", "graph", "placement", "surgery", "io", "api"]
LAYERS += ["io.saving", "io.hub", "runtime", "measure", "train", "inspect", "cli"]


def _layer(module: str) -> int | None:
    """The layer of ``se_inject.X...``: the longest of LAYERS that X... starts with."""
    name = module.removeprefix("se_inject.")
    if name == module:
        return None
    found = [layer for layer in LAYERS if name == layer or name.startswith(layer + ".")]
    return LAYERS.index(max(found, key=len)) if found else None


def test_imports_flow_one_way():
    """No module imports from a later layer (at import time or inside a function): cli is last, errors first."""
    backwards = []
    for path in _python_files():
        module = ".".join(path.with_suffix("").relative_to(ROOT).parts)
        own = _layer(module)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                target = _layer(node.module)
                if target is not None and target > own:
                    backwards.append(f"{module} imports {node.module}")
    assert backwards == []
