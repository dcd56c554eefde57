"""The ``se-inject`` command: the group and its commands, one module each in ``cli/commands/``.

A user mistake prints one line on stderr and exits with code 2; there is no traceback for it.
Only what parsing needs is imported here: torch and the pipeline load inside the command that runs,
so ``se-inject --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from se_inject._version import __version__
from se_inject.cli.commands import COMMANDS
from se_inject.errors import SEInjectError

HELP_OPTIONS = ["-h", "--help"]


def fail(message: str) -> None:
    typer.echo(f"se-inject: error: {' '.join(message.split())}", err=True)
    sys.exit(2)


class SEInjectGroup(TyperGroup):
    """``se-inject MODEL ...`` runs ``inject``; usage errors and se_inject errors become one line, exit 2.

    typer vendors its own click, so its usage errors are caught by typer's public base class
    (``typer.TyperException``) rather than by click's.
    """

    default_command = "inject"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in (*HELP_OPTIONS, "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, **{**kwargs, "standalone_mode": False})
        except SEInjectError as err:
            fail(str(err))
        except OSError as err:  # the file system said no (permissions, a full disk): not a bug to trace
            where = f"{err.filename}: " if err.filename else ""
            fail(f"{where}{err.strerror or err}")
        except typer.Abort:
            typer.echo("se-inject: aborted", err=True)
            sys.exit(1)
        except typer.TyperException as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # bare "se-inject": the help, as click prints it
                typer.echo(err.format_message())
                sys.exit(2)
            fail(f"{err.format_message()} (see 'se-inject --help')")
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


app = typer.Typer(
    cls=SEInjectGroup,
    help="Retrofit Squeeze-and-Excitation units into existing models. 'se-inject MODEL ...' is 'se-inject inject MODEL ...'.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    context_settings={"help_option_names": HELP_OPTIONS},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"se-inject {__version__}")
        raise typer.Exit()


@app.callback()
def _group(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Retrofit Squeeze-and-Excitation units into existing models."""


for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
