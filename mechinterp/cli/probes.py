"""``mechinterp run``, ``mechinterp figures`` and ``mechinterp probes``: one probe at a time, and
the figures re-drawn from stored results."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..core.options import options
from ..core.registry import BROKEN, get_probe, registry
from ..core.runner import redraw
from ..errors import UserError
from ..store.results import find_results
from ..study.paper_figures import paper_figures
from .options import (
    Base,
    DataDir,
    Device,
    DeviceMap,
    Dtype,
    Limit,
    MaxMemory,
    Out,
    Overwrite,
    Seed,
    Variant,
    key_values,
)
from .probe_command import run_probe_command

probes_app = typer.Typer(rich_markup_mode=None,
                         help="Probes: one experiment each.", no_args_is_help=True)


@probes_app.command("list")
def probes_list() -> None:
    """List available probes (built-in and installed plugins)."""
    table = Table("probe", "version", "what it measures")
    for probe in registry().values():
        table.add_row(probe.name, probe.version, probe.description)
    for name, why in BROKEN.items():
        table.add_row(name, "BROKEN", f"plugin failed to load: {why}")
    Console().print(table)


@probes_app.command("show")
def probes_show(name: str = typer.Argument(..., help="Probe name (see `mechinterp probes list`).")
                ) -> None:
    """What a probe measures and each of its options: type, default, lower bound, meaning."""
    probe = get_probe(name)
    console = Console()
    console.print(f"[bold]{probe.name}[/bold] (version {probe.version}): {probe.description}\n")
    console.print(inspect.getdoc(inspect.getmodule(type(probe))) or "", markup=False)
    table = Table("option", "type", "default", "min", "meaning",
                  title="options: --set NAME=VALUE (CLI), NAME=VALUE (mi.run)")
    for option in options(probe):
        table.add_row(option["name"], option["type"], option["default"], option["min"],
                      option["meaning"])
    console.print(table)


def run(
    probe: Annotated[str, typer.Argument(help="Probe name (see `probes list`).")],
    base: Base = "smollm2-135m-instruct",
    variant: Variant = None,
    data_dir: DataDir = None,
    out: Out = Path("results"),
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    limit: Limit = None,
    seed: Seed = 0,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Probe option KEY=VALUE (repeatable); see the probe's Config.")] = None,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Skip drawing.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Run one probe on a base model and its variants; write OUT/<probe>/result.json + figures."""
    run_probe_command(probe, key_values(set_, "--set", "n_samples=5"), base=base, variants=variant, out=out,
                      data_dir=data_dir, device=device, dtype=dtype, limit=limit, seed=seed,
                      device_map=device_map, max_memory=max_memory, draw=not no_figures,
                      overwrite=overwrite)


def figures(folder: Annotated[Path, typer.Argument(help="A results folder (from --out).")],
            paper: Annotated[bool, typer.Option(
                "--paper", help="Also write the paper's figure set (and ours) to FOLDER/paper/: "
                                "needs a compare or demo folder.")] = False) -> None:
    """Re-draw every figure from the stored results under FOLDER (no model is loaded)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", "pass the --out folder of an earlier run")
    if not find_results(folder):
        raise UserError(f"no result.json under {folder}", "run a probe with --out first")
    written = redraw(folder)
    typer.echo(f"re-drew {len(written)} figure files under {folder}")
    if paper:
        files = paper_figures(folder)
        typer.echo(f"paper figure set: {len(files) // 2} figures (PNG + PDF) in {folder / 'paper'}")
