"""The command-line reference of the docs, generated from the typer app itself.

    python -m se_inject.cli.reference > docs/reference/cli.md

``tests/docs/test_cli_reference.py`` checks that the committed page is what this prints, so an option
changed without the page fails the suite.
"""

from __future__ import annotations

import contextlib
import io

import typer

from se_inject.cli.app import app
from se_inject.cli.commands import COMMANDS

WIDTH = 100  # fixed: the page must not depend on the terminal that generated it


def help_text(*command: str) -> str:
    """What ``se-inject COMMAND --help`` prints, at the reference's width."""
    group = typer.main.get_command(app)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        group.main([*command, "--help"], prog_name="se-inject", standalone_mode=False, terminal_width=WIDTH)
    return out.getvalue().rstrip() + "\n"


def markdown() -> str:
    """The reference page: the group's help, then each command's."""
    parts = [
        "# Command line\n\n",
        "Generated from the command itself (`python -m se_inject.cli.reference > docs/reference/cli.md`);\n"
        "the suite checks that it matches. Every command takes `-h` as `--help`.\n\n",
        f"```text\n$ se-inject --help\n{help_text()}```\n",
    ]
    for name in COMMANDS:
        parts.append(f"\n## se-inject {name}\n\n```text\n$ se-inject {name} --help\n{help_text(name)}```\n")
    return "".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
