"""``se-inject rules``: the pattern kinds, placement rules and styles, from their registries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from se_inject.cli import options as opt
from se_inject.cli.render import console, print_json, text_table


def command(
    rules: list[str] = typer.Option(
        [], "--rules", help="extra placement rule files (TOML) to list with the built-in ones"
    ),
    as_json: bool = opt.json_option("registries"),
) -> None:
    """List the pattern kinds (with their anchors and facts), the placement rules and the styles, from the registries."""
    from se_inject.config import styles
    from se_inject.placement.patterns import PATTERNS
    from se_inject.placement.rules import load_rules

    loaded = load_rules(tuple(rules), style=None)
    if as_json:
        print_json(_as_data(PATTERNS.values(), loaded, styles().values()))
        return
    out = console()
    kinds = text_table(
        "Pattern kinds (placement.patterns)",
        ("kind", "anchors", "facts (conditions: NAME, min_NAME, max_NAME)", "finds"),
    )
    for kind in PATTERNS.values():
        facts = ", ".join(f"{name} ({kind_type.__name__})" for name, kind_type in kind.facts.items())
        kinds.add_row(kind.name, ", ".join(kind.anchors), facts, kind.doc)
    out.print(kinds)
    listed = text_table("Rules", ("rule", "pattern", "priority", "positions -> anchor", "when", "file"))
    for rule in loaded:
        positions = ", ".join(f"{p}: {a}" for p, a in rule.positions.items())
        when = ", ".join(f"{k}={v}" for k, v in rule.when.items()) or "-"
        priority = f"{rule.priority}{' (fallback)' if rule.fallback else ''}"
        if rule.style:
            priority += f" (style {', '.join(rule.style)}{', adds' if rule.adds else ''})"
        if rule.options:
            when += "; units: " + ", ".join(f"{k}={v}" for k, v in rule.options.items())
        listed.add_row(rule.name, rule.pattern, priority, positions, when, Path(rule.source).name)
    out.print(listed)
    named = text_table("Styles (style=NAME; options left out are the paper's)", ("style", "options", "reproduces"))
    for style in styles().values():
        options = ", ".join(f"{k}={v}" for k, v in style.options.items())
        options += "".join(
            f"; {unit}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for unit, o in style.units.items()
        )
        options += "".join(
            f"; blocks {'|'.join(g.blocks)}: " + ", ".join(f"{k}={v}" for k, v in g.options.items())
            for g in style.groups
        )
        named.add_row(style.name, options, style.description)
    out.print(named)


def _as_data(kinds: Any, rules: Any, styles: Any) -> dict[str, Any]:
    return {
        "patterns": [
            {
                "name": k.name,
                "anchors": list(k.anchors),
                "facts": {f: t.__name__ for f, t in k.facts.items()},
                "description": k.doc,
            }
            for k in kinds
        ],
        "rules": [
            {
                "name": r.name,
                "pattern": r.pattern,
                "priority": r.priority,
                "fallback": r.fallback,
                "positions": r.positions,
                "when": r.when,
                "style": list(r.style),
                "options": r.options,
                "adds": r.adds,
                "source": r.source,
            }
            for r in rules
        ],
        "styles": [
            {
                "name": s.name,
                "options": s.options,
                "units": s.units,
                "groups": [{"blocks": list(g.blocks), **g.options} for g in s.groups],
                "description": s.description,
                "source": s.source,
            }
            for s in styles
        ],
    }
