"""How a ``mechinterp`` command ends: a :class:`~mechinterp.errors.UserError` is one line on stderr
and exit code 2, an abort or interrupt 130, a usage error click's message and code."""

from __future__ import annotations

import sys

import click
import typer

from ..errors import UserError
from ..progress import quiet_library_bars

# typer >= 0.29 raises its own vendored click's exceptions; older typer raises click's
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, getattr(typer, "TyperException", click.ClickException))


def run_app(app: typer.Typer, argv: list[str] | None, prog_name: str = "mechinterp") -> int:
    """Run a Typer app as a console command.

    Args:
        app: the app (the whole ``mechinterp`` command, or one command group of it).
        argv: its arguments (None: ``sys.argv[1:]``).
        prog_name: the name usage lines show.

    Returns:
        The exit code: 0, 2 for a user error, 130 for an abort or interrupt, click's code for a
        usage error.
    """
    quiet_library_bars()
    try:
        app(args=argv, prog_name=prog_name, standalone_mode=False)
    except UserError as exc:
        print(f"mechinterp: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except _EXIT as exc:
        return exc.exit_code
    except _ABORT:
        print("mechinterp: aborted", file=sys.stderr)
        return 130
    except _USAGE as exc:
        exc.show()
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("mechinterp: interrupted", file=sys.stderr)
        return 130
    return 0
