"""``mechinterp models``: the built-in model zoo."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..models.zoo import ZOO, fetch

models_app = typer.Typer(rich_markup_mode=None,
                         help="The model zoo: list and fetch built-in models.", no_args_is_help=True)


@models_app.command("list")
def models_list() -> None:
    """List zoo models: name, family, size, cached or not."""
    table = Table("name", "family", "size", "cached", "description")
    for entry in ZOO.values():
        table.add_row(entry.name, entry.family, entry.size, "yes" if entry.is_cached() else "no",
                      entry.description)
    Console().print(table)


@models_app.command("fetch")
def models_fetch(name: Annotated[str, typer.Argument(help="Zoo name (see `models list`).")]) -> None:
    """Build a zoo model into the cache (once) and print its folder as the last line."""
    typer.echo(str(fetch(name)))
