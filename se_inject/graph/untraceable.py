"""Code in libraries' models that torch.fx cannot trace, declared as data (``rules/tracing/*.toml``).

An entry names a class (``kind = "module"``: kept whole, one node) or a function (``kind = "function"``:
one node per call) by its qualified name, with the reason; ``kind = "traced"`` names a class its library
keeps whole for reasons of its own although its code traces, and which holds SE sites (NFNet's blocks);
``kind = "norm"`` keeps a normalisation layer whole and makes it one to the placement, an activation
too where the attribute ``activation_flag`` names is true (EvoNorm: the norm computes the block's
activation). Nothing is imported to apply an entry: a
class is matched by the qualified name of the model's own classes, and a function is looked up in its
module only where that module is already loaded (it is, once a model that calls it has been built).

>>> sorted({e.kind for e in load_untraceable()})
['function', 'module', 'norm', 'traced']
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from se_inject.config import builtin_data_dir
from se_inject.datafiles import read_tables, table_error
from se_inject.errors import RuleError

KINDS = ("module", "function", "traced", "norm")
_FIELDS = {"name", "kind", "reason", "activation_flag"}
MAX_NAME_LENGTH = 300


@dataclass(frozen=True)
class Untraceable:
    """A class or function fx must not trace into: ``name`` is ``package.module.Name``."""

    name: str
    kind: str
    reason: str
    activation_flag: str | None = None  # a norm's: the boolean attribute that says it applies an activation

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def attribute(self) -> str:
        return self.name.rpartition(".")[2]


def parse_untraceable(text: str, source: str) -> list[Untraceable]:
    """The ``[[untraceable]]`` tables of one TOML document; errors name the file, the entry and the field."""
    entries = []
    for entry in read_tables(text, source, "untraceable", _FIELDS, RuleError):
        name = entry["name"]

        def fail(field: str, problem: str, name: str = name) -> Exception:
            return table_error(RuleError, source, "untraceable", name, field, problem)

        parts = name.split(".")
        if len(name) > MAX_NAME_LENGTH or len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise fail("name", "expected a qualified name, package.module.Name")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise fail("kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
        reason = entry.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise fail("reason", "expected a sentence saying why fx cannot trace it")
        flag = entry.get("activation_flag")
        if flag is not None and (kind != "norm" or not isinstance(flag, str) or not flag.isidentifier()):
            raise fail("activation_flag", "expected an attribute name, on a kind = 'norm' entry only")
        entries.append(Untraceable(name, kind, reason, flag))
    return entries


@functools.cache
def load_untraceable() -> tuple[Untraceable, ...]:
    """The shipped entries, every file of ``rules/tracing/`` (read once per process)."""
    found: list[Untraceable] = []
    for path in sorted((builtin_data_dir() / "tracing").glob("*.toml")):
        found += parse_untraceable(path.read_text(encoding="utf-8"), str(path))
    return tuple(found)


@functools.cache
def untraceable_classes() -> frozenset[str]:
    """The qualified names of the classes kept whole."""
    return frozenset(e.name for e in load_untraceable() if e.kind in ("module", "norm"))


@functools.cache
def norm_classes() -> dict[str, str | None]:
    """The qualified names of the classes kept whole as norms -> the attribute saying they apply an
    activation (None: they never do)."""
    return {e.name: e.activation_flag for e in load_untraceable() if e.kind == "norm"}


@functools.cache
def traced_classes() -> frozenset[str]:
    """The qualified names of the classes traced into although their library marks them as leaves."""
    return frozenset(e.name for e in load_untraceable() if e.kind == "traced")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def loaded_functions() -> list[Callable[..., Any]]:
    """The declared functions whose modules are loaded now (never imported here)."""
    found = []
    for entry in load_untraceable():
        module = sys.modules.get(entry.module) if entry.kind == "function" else None
        function = getattr(module, entry.attribute, None)
        if callable(function):
            found.append(function)
    return found
