"""What the commands print: the console, tables, numbers, progress bars and one-line warnings."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table


def console(stderr: bool = False) -> Console:
    """The console on stdout (or stderr); when it is no terminal (a pipe, a file, a test) tables get 120
    columns, or as many as ``COLUMNS`` says."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS", "").isdigit() else 120  # None: rich decides
    return Console(soft_wrap=True, stderr=stderr, width=width)


def table(title: str | None, columns: Sequence[str], left: Sequence[str] = (), no_wrap: bool = False) -> Table:
    """A table in the house style: ``left`` columns are left-aligned, the others (numbers) right-aligned."""
    made = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        made.add_column(column, justify="left" if column in left else "right", no_wrap=no_wrap)
    return made


def text_table(title: str | None, columns: Sequence[str]) -> Table:
    """A table of text (registries, listings): every column left-aligned."""
    return table(title, columns, left=columns)


def count(n: int | float) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.2f}"


def gflops(n: int) -> str:
    return f"{n / 1e9:.3f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def points(value: float | None) -> str:
    """A difference of fractions in percentage points, signed."""
    return "-" if value is None else f"{100 * value:+.2f}"


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def show_then_plot(
    result: Any,
    as_json: bool,
    render: Callable[[Any, Console], None],
    plot: Callable[[Any, str], object],
    plot_file: str | None,
) -> None:
    """Print ``result`` (JSON or rich tables), then write its plot: the result first, so that a plot that
    fails (a full disk) does not lose what was measured."""
    if as_json:
        print_json(result.to_dict())
    else:
        render(result, console())
    if plot_file is not None:
        plot(result, plot_file)
        if not as_json:
            console().print(f"wrote {plot_file}")


def warn(message: str) -> None:
    """se-inject's own one-line warning, on stderr."""
    typer.echo(f"se-inject: warning: {message}", err=True)


@contextlib.contextmanager
def timing_progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar over timed rounds on stderr (none when ``quiet`` or stderr is no terminal);
    yields the ``progress(what, done, total)`` callback the bench and compare APIs take."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=quiet or not err.is_terminal) as bar:
        task = bar.add_task("building the models", total=None)

        def advance(what: str, done: int, total: int) -> None:
            bar.update(task, description=f"timing {what}", completed=done, total=total)

        yield advance
