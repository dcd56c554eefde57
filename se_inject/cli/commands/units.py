"""``se-inject units``: the unit types ``--unit`` can name."""

from __future__ import annotations

from dataclasses import asdict

from se_inject.cli import options as opt
from se_inject.cli.render import console, print_json, text_table


def command(as_json: bool = opt.json_option("units")) -> None:
    """List the unit types --unit can name: their paper, their own options (--unit-option NAME=VALUE)
    and the conventions they bring (the style named like them)."""
    from se_inject.units.base import describe_units

    infos = describe_units()
    if as_json:
        print_json([asdict(info) for info in infos])
        return
    units = text_table(
        "Units (--unit NAME)", ("unit", "paper", "uses r", "options (--unit-option NAME=VALUE)", "conventions")
    )
    for info in infos:
        options = "\n".join(f"{name}={default!r}: {text}" for name, (default, text) in info.options.items())
        conventions = ", ".join(f"{k}={v}" for k, v in info.conventions.items()) or "the paper's"
        units.add_row(info.name, info.paper, "yes" if info.uses_r else "no", options or "-", conventions)
    console().print(units)
