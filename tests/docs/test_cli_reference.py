"""The command-line reference page is the commands' own help: generated from the typer app, and
checked here against what ``se-inject COMMAND --help`` prints for every command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from se_inject.cli.commands import COMMANDS
from se_inject.cli.reference import WIDTH, help_text, markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "cli.md"


def test_the_page_is_what_the_generator_prints():
    assert PAGE.read_text() == markdown(), "regenerate: python -m se_inject.cli.reference > docs/reference/cli.md"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_each_commands_help_is_on_the_page(command):
    from se_inject.cli.app import app

    args = [command] if command else []
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="se-inject", terminal_width=WIDTH)
    assert result.exit_code == 0
    assert result.stdout == help_text(*args)
    assert f"$ se-inject {' '.join([*args, '--help'])}\n{result.stdout}" in PAGE.read_text()


def test_the_styles_page_is_what_the_generator_prints():
    """Every built-in style on the page with its options and the rules of its placement (a style a user
    registered is not on it)."""
    from se_inject.cli.reference import styles_markdown
    from se_inject.config import builtin_styles

    page = (PAGE.parent / "styles.md").read_text()
    assert page == styles_markdown(), "regenerate: python -m se_inject.cli.reference styles > docs/reference/styles.md"
    for name in builtin_styles():
        assert f"| `{name}` |" in page
    assert "tresnet_bottleneck: residual_add -> standard: before_last_conv" in page  # a family's placement
