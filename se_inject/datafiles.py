"""The one reader of se_inject's data files: TOML documents of named tables (``[[rule]]``, ``[[style]]``).

Rules and styles are data: nothing in them is executed. This module reads what every such file
shares (valid TOML, only the tables of its kind at the top, each a table with a name and known
fields, no name twice) and words every problem one way, naming the file, the entry and the field:
``my.toml: rule 'residual': field 'when.min_depth': ...``. What a field means is checked by its kind
(:mod:`se_inject.placement.rules`, :mod:`se_inject.config`).

>>> [t["name"] for t in read_tables('[[style]]\\nname = "a"\\n', "x.toml", "style", {"name"}, ValueError)]
['a']
"""

from __future__ import annotations

import tomllib
from collections.abc import Set
from typing import Any


def table_error(
    error: type[Exception], source: str, kind: str, name: str | None, field: str | None, problem: str
) -> Exception:
    """``error`` with the one wording: ``SOURCE: KIND 'NAME': field 'FIELD': PROBLEM``."""
    where = source + (f": {kind} '{name}'" if name else "") + (f": field '{field}'" if field else "")
    return error(f"{where}: {problem}")


def read_tables(
    text: str,
    source: str,
    kind: str,
    fields: Set[str],
    error: type[Exception],
    identifier_names: bool = False,
) -> list[dict[str, Any]]:
    """The ``[[kind]]`` tables of one TOML document, each with a string ``name`` (an identifier when
    ``identifier_names``) and no field outside ``fields``, no name twice; ``source`` names the document in
    errors, which are ``error`` instances."""

    def fail(name: str | None, field: str | None, problem: str) -> Exception:
        return table_error(error, source, kind, name, field, problem)

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise fail(None, None, f"not valid TOML: {err}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise fail(None, None, f"not a {kind} file: it nests arrays or tables too deeply") from None
    unknown = sorted(set(data) - {kind})
    if unknown:
        raise fail(None, unknown[0], f"unknown top-level key; a {kind} file holds [[{kind}]] tables only")
    entries = data.get(kind, [])
    if not isinstance(entries, list) or not entries:
        raise fail(None, kind, f"no {kind}s: expected one or more [[{kind}]] tables")
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise fail(f"#{index + 1}", None, f"a {kind} must be a table ([[{kind}]])")
        name = entry.get("name")
        if not isinstance(name, str) or not name or (identifier_names and not name.isidentifier()):
            wanted = "a name such as 'my_se' (an identifier)" if identifier_names else "a non-empty string name"
            raise fail(f"#{index + 1}", "name", f"every {kind} needs {wanted}")
        extra = sorted(set(entry) - set(fields))
        if extra:
            raise fail(name, extra[0], f"unknown field; fields are {', '.join(sorted(fields))}")
        if name in seen:
            raise fail(name, "name", f"a {kind} of this name is already defined in this file")
        seen.add(name)
    return entries
