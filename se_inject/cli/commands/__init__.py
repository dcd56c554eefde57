"""One module per command, each with one ``command`` function: it parses, calls the public API and
renders. ``COMMANDS`` is the order ``se-inject --help`` lists them in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from se_inject.cli.commands import (
    bench,
    compare,
    experiment,
    finetune,
    inject,
    inspect,
    prune,
    push,
    rules,
    sources,
    units,
)

COMMANDS: dict[str, Callable[..., Any]] = {
    "inject": inject.command,
    "finetune": finetune.command,
    "experiment": experiment.command,
    "bench": bench.command,
    "compare": compare.command,
    "inspect": inspect.command,
    "prune-se": prune.command,
    "push": push.command,
    "rules": rules.command,
    "units": units.command,
    "sources": sources.command,
}
