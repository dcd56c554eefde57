"""Placement rules: which pattern kinds get SE units, under which conditions, and where.

Rules are data: TOML files read with tomllib, nothing in them is executed. The built-in rules
live in the repository's ``rules/`` folder (installed as ``se_inject/rules``); a user adds or
overrides rules with files of their own (``--rules FILE``, ``rules=[...]`` in the API). A rule
with the name of a built-in one replaces it. Every file is checked completely before use; a
malformed one raises :class:`RuleError` naming the file, the rule and the field.

A rule::

    [[rule]]
    name = "residual"                    # unique
    pattern = "residual_add"             # a pattern kind of se_inject.placement.patterns
    priority = 20                        # where sites overlap, the higher priority keeps its unit
    fallback = false                     # true: used only when no other rule found a site
    description = "..."
    positions = { standard = "branch_output", post = "after_activation" }   # position -> anchor
    when = { min_branch_convs = 1 }      # conditions on the pattern's facts: NAME, min_NAME, max_NAME
    style = "tresnet"                    # optional: the rule is used only under this style (or these: a list)
    options = { r = 2 }                  # optional: unit options of the units it places (a family's
                                         # widths per kind of block); the call's explicit options win
    adds = true                          # optional, with style: the style keeps the built-in rules too

A rule with a ``style`` is part of that style's design: where the family puts its units and which
blocks get one. A style with rules of its own is placed by them alone (the family's design is whole:
CoAtNet's transformer stages get no unit because its rules name only its MBConv blocks), unless every
one of them ``adds`` to the built-in rules (EfficientNet-X's fused blocks beside EfficientNet's
depthwise ones); under any other style they are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from se_inject.config import GROUP_FIELDS, POSITIONS, InjectConfig, builtin_data_dir, styles
from se_inject.datafiles import read_tables, table_error
from se_inject.errors import ConfigError, RuleError
from se_inject.io.files import read_text_file
from se_inject.placement.patterns.base import PATTERNS, Candidate

_RULE_FIELDS = {
    "name",
    "pattern",
    "priority",
    "fallback",
    "description",
    "positions",
    "when",
    "style",
    "options",
    "adds",
}


@dataclass(frozen=True)
class Rule:
    """One placement rule, validated."""

    name: str
    pattern: str
    positions: dict[str, str]
    when: dict[str, int | bool] = field(default_factory=dict)
    priority: int = 0
    fallback: bool = False
    description: str = ""
    source: str = ""  # the file it was read from
    style: tuple[str, ...] = ()  # the styles whose design it is (none: every style's)
    options: dict[str, Any] = field(default_factory=dict)  # unit options of the units it places
    adds: bool = False  # a style's rule that adds to the built-in rules instead of replacing them

    def matches(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` (of this rule's pattern kind) meets every condition."""
        for key, expected in self.when.items():
            if key.startswith("min_"):
                ok = candidate.facts[key[4:]] >= expected
            elif key.startswith("max_"):
                ok = candidate.facts[key[4:]] <= expected
            else:
                ok = candidate.facts[key] == expected
            if not ok:
                return False
        return True


def builtin_rules_dir() -> Path:
    """The shipped rules: inside the installed package, or the checkout's ``rules/`` folder."""
    return builtin_data_dir()


def _fail(source: str, rule: str | None, field_name: str | None, problem: str) -> Exception:
    return table_error(RuleError, source, "rule", rule, field_name, problem)


def _check_type(value: object, kind: type, source: str, rule: str, name: str) -> None:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(source, rule, name, f"expected an integer, got {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise _fail(source, rule, name, f"expected {kind.__name__}, got {value!r}")


def _parse_rule(entry: dict[str, Any], source: str) -> Rule:
    """One rule from its table (its name and fields already checked by read_tables)."""
    name = entry["name"]
    pattern = entry.get("pattern")
    if pattern not in PATTERNS:
        raise _fail(source, name, "pattern", f"{pattern!r} is not a pattern kind; kinds are {', '.join(PATTERNS)}")
    kind = PATTERNS[pattern]
    positions = entry.get("positions")
    if not isinstance(positions, dict) or not positions:
        raise _fail(source, name, "positions", 'expected a table of position = anchor, e.g. { standard = "..." }')
    for position, anchor in positions.items():
        if position not in POSITIONS:
            raise _fail(source, name, f"positions.{position}", f"not a position; positions are {', '.join(POSITIONS)}")
        if anchor not in kind.anchors:
            raise _fail(
                source,
                name,
                f"positions.{position}",
                f"{anchor!r} is not an anchor of '{pattern}'; anchors are {', '.join(kind.anchors)}",
            )
    when = entry.get("when", {})
    if not isinstance(when, dict):
        raise _fail(source, name, "when", "expected a table of conditions")
    for key, value in when.items():
        fact = key[4:] if key.startswith(("min_", "max_")) else key
        if fact not in kind.facts:
            raise _fail(
                source,
                name,
                f"when.{key}",
                f"'{pattern}' has no fact '{fact}'; facts are {', '.join(kind.facts)} (as NAME, min_NAME or max_NAME)",
            )
        _check_type(value, int if key != fact else kind.facts[fact], source, name, f"when.{key}")
    priority = entry.get("priority", 0)
    _check_type(priority, int, source, name, "priority")
    fallback = entry.get("fallback", False)
    _check_type(fallback, bool, source, name, "fallback")
    description = entry.get("description", "")
    _check_type(description, str, source, name, "description")
    style = entry.get("style", ())
    style = (style,) if isinstance(style, str) else style
    if not isinstance(style, list | tuple) or not all(isinstance(s, str) and s.isidentifier() for s in style):
        raise _fail(source, name, "style", f"expected a style's name or a list of them, got {entry.get('style')!r}")
    options = _rule_options(entry.get("options", {}), source, name)
    adds = entry.get("adds", False)
    _check_type(adds, bool, source, name, "adds")
    if adds and not style:
        raise _fail(source, name, "adds", "only a style's rule adds to the built-in rules; give the rule a style")
    return Rule(
        name, pattern, dict(positions), dict(when), priority, fallback, description, source, tuple(style), options, adds
    )


def _rule_options(options: object, source: str, name: str) -> dict[str, Any]:
    """The unit options a rule gives its units: group options (widths, act, gate...), each checked."""
    if not isinstance(options, dict):
        raise _fail(source, name, "options", "expected a table of unit options, e.g. { r = 2 }")
    for key in options:
        if key not in GROUP_FIELDS:
            raise _fail(source, name, f"options.{key}", f"a rule sets {', '.join(GROUP_FIELDS)}; not {key!r}")
    try:
        InjectConfig.from_dict(options)
    except ConfigError as err:
        raise _fail(source, name, "options", str(err)) from None
    return dict(options)


def parse_rules(text: str, source: str) -> list[Rule]:
    """The rules of one TOML document (``source`` names it in errors)."""
    return [_parse_rule(entry, source) for entry in read_tables(text, source, "rule", _RULE_FIELDS, RuleError)]


MAX_RULE_FILE_BYTES = 1 << 20  # rule files are a few hundred bytes; a larger one is not a rule file


def read_rule_file(path: str | Path) -> list[Rule]:
    """The rules of one file: a regular UTF-8 file of at most 1 MiB (never a device or a pipe)."""
    text = read_text_file(path, limit=MAX_RULE_FILE_BYTES, what="rule file", error=RuleError)
    return parse_rules(text, str(path))


def load_rules(extra: Sequence[str | Path] = (), style: str | None = "paper") -> tuple[Rule, ...]:
    """The built-in rules, then those of ``extra`` files (a rule named like an earlier one replaces it);
    a style with rules of its own is placed by them alone, rules of other styles are left out (None:
    every rule, as listed)."""
    builtin = sorted(builtin_rules_dir().glob("*.toml"))
    if not builtin:
        raise RuleError(f"{builtin_rules_dir()}: no built-in rule files found; is se_inject installed completely?")
    by_name: dict[str, Rule] = {}
    for path in [*builtin, *sorted((builtin_rules_dir() / "families").glob("*.toml")), *map(Path, extra)]:
        for rule in read_rule_file(path):
            by_name[rule.name] = rule
    known = styles()
    for rule in by_name.values():
        for unknown in (s for s in rule.style if s not in known):
            raise _fail(rule.source, rule.name, "style", f"{unknown!r} is not a style; styles are {', '.join(known)}")
    if style is None:
        return tuple(by_name.values())
    own = tuple(r for r in by_name.values() if style in r.style)
    unstyled = tuple(r for r in by_name.values() if not r.style)
    return (*unstyled, *own) if own and all(r.adds for r in own) else (own or unstyled)
