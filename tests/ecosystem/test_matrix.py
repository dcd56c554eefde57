"""The "works with" page is the matrix's output, and every test the matrix names exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from matrix import MATRIX, render

TESTS = Path(__file__).parents[1]
PAGE = TESTS.parent / "docs" / "reference" / "works-with.md"


@pytest.mark.parametrize("test", sorted({t for _, _, t in MATRIX}))
def test_every_row_names_a_test_that_exists(test: str) -> None:
    path, _, function = test.partition("::")
    tree = ast.parse((TESTS / path).read_text())
    assert function in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_the_page_is_generated_from_the_matrix() -> None:
    assert PAGE.read_text() == render(), "regenerate: python tests/ecosystem/matrix.py > docs/reference/works-with.md"
