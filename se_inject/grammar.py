"""The one grammar of option text: ``NAME=VALUE,...`` lists, read against the types the configs declare.

``--group 'layer4.*:r=32,act=silu'``, ``--candidate 'position=pre,r=8,include=layer3.*|layer4.*'`` and
``--unit-option kernel_size=5`` all go through :func:`read_options`: each value is read as the type its
field declares (``InjectConfig``'s, or a unit's ``Options``): ``true``/``false`` for a bool, a number
for an int or float, ``none`` for an optional value, ``a|b`` for a list (``2-4`` for a range of
integers). Text that does not have the declared form is passed on as it is, so the config's own
validation refuses it with the message a recipe or a style file holding the same value gets. A name
given twice is refused here, never decided silently.

Light on purpose (no torch): the command line parses with it before anything heavy is imported.

>>> from se_inject.config import InjectConfig
>>> read_options("r=8|16,bias=false,include=layer3.*|layer4.*", field_types(InjectConfig), "--candidate")
{'r': (8, 16), 'bias': False, 'include': ('layer3.*', 'layer4.*')}
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from se_inject.errors import ConfigError

LIST_SEPARATOR = "|"  # between the items of a list value (a comma separates the options)
MAX_LIST_VALUE = 1_000_000  # far above any stage count, ratio or batch; far below what a range can exhaust
MAX_LIST_LENGTH = 1000
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_int_list(text: str, option: str, separator: str = ",") -> int | tuple[int, ...]:
    """``"16"`` -> 16, ``"8,16,16,32"`` -> (8, 16, 16, 32), ``"2-4"`` -> (2, 3, 4).

    Values and lengths are bounded (a range like ``1-999999999999`` is refused, not expanded).

    >>> parse_int_list("2-4", "--stages"), parse_int_list("8|16", "r", "|")
    ((2, 3, 4), (8, 16))
    """
    values: list[int] = []
    usage = f"{option}: expected integers like 16, 8{separator}16{separator}32 or 2-4, got {text[:40]!r}"
    for part in text.split(separator):
        low, dash, high = part.strip().partition("-")
        is_range = bool(dash and low)  # a leading "-" is a (refused later) negative number
        try:
            first, last = (int(low), int(high)) if is_range else (int(part), int(part))
        except ValueError:
            raise ConfigError(usage) from None
        if max(abs(first), abs(last)) > MAX_LIST_VALUE:
            raise ConfigError(f"{option}: {part.strip()} is out of range (values up to {MAX_LIST_VALUE:,})")
        if last < first:
            raise ConfigError(f"{option}: the range {part.strip()} is empty; write it low-high")
        values.extend(range(first, last + 1))
        if len(values) > MAX_LIST_LENGTH:
            raise ConfigError(f"{option}: more than {MAX_LIST_LENGTH} values")
    is_single = len(values) == 1 and separator not in text and "-" not in text.strip().lstrip("-")
    return values[0] if is_single else tuple(values)


@cache
def field_types(config_type: type) -> dict[str, Any]:
    """The declared type of each field of a dataclass (its annotations resolved)."""
    return typing.get_type_hints(config_type)


def _union_members(annotation: Any) -> tuple[Any, ...] | None:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return None


def read_value(text: str, annotation: Any, name: str) -> Any:
    """``text`` as the type ``annotation`` declares, where it has that type's form; else ``text`` itself.

    >>> read_value("false", bool, "bias"), read_value("8|16", int | tuple[int, ...], "r"), read_value("none", int | None, "k")
    (False, (8, 16), None)
    """
    members = _union_members(annotation)
    if members is not None:
        if type(None) in members and text.lower() == "none":
            return None
        # a list where the text has a list's form; else the first member that reads it
        ordered = sorted(members, key=lambda m: typing.get_origin(m) is not tuple or LIST_SEPARATOR not in text)
        for member in ordered:
            if member is type(None):
                continue
            value = read_value(text, member, name)
            if value is not text or member is str:
                return value
        return text
    if annotation is bool:
        lowered = text.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else text
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            return text
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            return text
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        if item is int:
            try:
                return as_tuple(parse_int_list(text, name, LIST_SEPARATOR))
            except ConfigError:
                return text
        return tuple(read_value(part.strip(), item, name) for part in text.split(LIST_SEPARATOR))
    return text  # str, a Literal's choice (the config checks it), a class (not nameable in text)


def as_tuple(value: int | tuple[int, ...]) -> tuple[int, ...]:
    """One integer or several, as a tuple."""
    return value if isinstance(value, tuple) else (value,)


def parse_assignments(texts: str | list[str], option: str, example: str) -> list[tuple[str, str]]:
    """``"a=1,b=x"`` (or several such texts) as (name, value) pairs; an empty or malformed setting, or a name
    given twice, is a ConfigError naming ``option``."""
    pairs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for text in [texts] if isinstance(texts, str) else texts:
        for setting in text.split(","):
            name, equals, value = (part.strip() for part in setting.partition("="))
            if not equals or not name.isidentifier() or not value:
                raise ConfigError(f"{option}: expected NAME=VALUE,... such as {example!r}, got {text[:60]!r}")
            if name in seen:
                raise ConfigError(
                    f"{option}: {name} is given twice ({name}={seen[name]} and {name}={value}); give each option once"
                )
            seen[name] = value
            pairs.append((name, value))
    return pairs


def read_options(
    texts: str | list[str], types: Mapping[str, Any], option: str, example: str = "r=8,bias=false"
) -> dict[str, Any]:
    """``NAME=VALUE,...`` as a mapping, each value read as ``types[NAME]`` declares (an unknown name stays text
    for the config to refuse)."""
    return {
        name: read_value(value, types[name], f"{option} {name}") if name in types else value
        for name, value in parse_assignments(texts, option, example)
    }
