"""The reference pages of the docs generated from the code: the command line from the typer app itself,
the styles from the style and rule files.

    python -m se_inject.cli.reference > docs/reference/cli.md
    python -m se_inject.cli.reference styles > docs/reference/styles.md

``tests/docs/test_cli_reference.py`` checks that the committed pages are what this prints, so an option
or a style changed without its page fails the suite.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

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


def _options(options: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in options.items()) or "the paper's"


def _placement(rule: Any) -> str:
    anchors = ", ".join(f"{position}: {anchor}" for position, anchor in rule.positions.items())
    when = f" when {', '.join(f'{k}={v}' for k, v in rule.when.items())}" if rule.when else ""
    units = f" (units: {_options(rule.options)})" if rule.options else ""
    return f"{rule.name}: {rule.pattern} -> {anchors}{when}{units}"


def styles_markdown() -> str:
    """The styles page: every built-in style, its options, its entries for other units and its rules."""
    from se_inject.config import builtin_styles
    from se_inject.placement.rules import load_rules

    rules = load_rules(style=None)
    parts = [
        "# Styles\n\n",
        "Generated from `rules/styles/*.toml` and `rules/families/*.toml` (`python -m se_inject.cli.reference\n"
        "styles > docs/reference/styles.md`); the suite checks that it matches. A style names a family's\n"
        "conventions (its options; an option given explicitly overrides them) and, where the family puts its\n"
        "units elsewhere than the paper, its placement: rules of its own, which then place its units alone.\n"
        "Another unit under a style takes the style's position and the style's entry for that unit, if any.\n"
        "[The twin sweep](twins.md) says which models each style reproduces.\n\n",
        "| style | reproduces | options | other units | placement |\n|---|---|---|---|---|\n",
    ]
    for style in builtin_styles().values():
        placement = "; ".join(_placement(r) for r in rules if style.name in r.style) or "the built-in rules"
        placement += "".join(f"; blocks {', '.join(g.blocks)}: {_options(g.options)}" for g in style.groups)
        others = "; ".join(f"{unit}: {_options(options)}" for unit, options in style.units.items()) or "-"
        source = Path(style.source).name if style.source.endswith(".toml") else style.source
        description = f"{style.description} ({source})".replace("|", "/")
        parts.append(f"| `{style.name}` | {description} | {_options(style.options)} | {others} | {placement} |\n")
    return "".join(parts)


if __name__ == "__main__":
    print(styles_markdown() if sys.argv[1:] == ["styles"] else markdown(), end="")
