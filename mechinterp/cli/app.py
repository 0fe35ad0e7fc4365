"""The ``mechinterp`` command: the command groups wired into one Typer app, and its entry point."""

from __future__ import annotations

import typer

from .entry import run_app
from .eval import eval_app
from .models import models_app
from .probes import figures, probes_app, run
from .study import compare_cmd, demo
from .train import train_app

app = typer.Typer(
    rich_markup_mode=None,  # plain help: rich markup would eat "[paper: 571]" and "[@REV]"
    help="Mechanistic interpretability of post-training: load a base model next to its fine-tunes "
    "and measure where and how fine-tuning changed it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(models_app, name="models")
app.add_typer(probes_app, name="probes")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.command("run")(run)
app.command("figures")(figures)
app.command("compare")(compare_cmd)
app.command("demo")(demo)


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``mechinterp``.

    Args:
        argv: the command line after the program name (None: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 for a user error (one line on stderr).
    """
    return run_app(app, argv)
