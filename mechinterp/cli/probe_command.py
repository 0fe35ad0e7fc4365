"""The one way a command runs a probe: options parsed, models loaded, the probe run through the
runner into ``OUT/<probe>/``, a line saying what was written. ``run`` and the ``eval`` commands
use it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..core.options import make_config
from ..core.registry import get_probe
from ..core.runner import run_probe
from ..data import DataSource
from ..models.modelset import ModelSet
from ..store.results import Result, check_out


def echo_err(message: str) -> None:
    """Print a progress line on stderr (stdout keeps the command's result lines)."""
    typer.echo(message, err=True)


def run_probe_command(probe_name: str, options: dict[str, Any], *, base: str,
                      variants: list[str] | None, out: Path, data_dir: Path | None, device: str,
                      dtype: str, limit: int | None, seed: int, device_map: str | None = None,
                      max_memory: str | None = None, draw: bool = True, overwrite: bool = False,
                      summary: Callable[[Result], list[str]] | None = None) -> Result:
    """Run one probe for a command and print what it wrote.

    The config is built (and checked: a bad option or ``--limit`` is a
    :class:`~mechinterp.errors.UserError`, exit code 2) and ``out`` checked before any model is
    loaded.

    Args:
        probe_name: a registered probe.
        options: the probe's options (typed values or ``KEY=VALUE`` strings).
        base: the base model's spec.
        variants: ``NAME=SPEC`` items (None: the base alone).
        out: the results folder.
        data_dir: the data root (None: ``$MECHINTERP_DATA`` or the hub).
        device, dtype, device_map, max_memory: where and how the models load.
        limit, seed: the options every probe shares.
        draw: draw the figures.
        overwrite: replace a stored result of other models.
        summary: lines to print (stdout) from the result before the "wrote" line.

    Returns:
        The probe's result.
    """
    probe = get_probe(probe_name)
    config = make_config(probe, options, seed=seed, limit=limit)
    check_out(out)
    data = DataSource.from_option(data_dir)
    models = ModelSet.from_args(base, variants or [], device=device, dtype=dtype,
                                device_map=device_map, max_memory=max_memory)
    result = run_probe(probe, models, data, config, out=out, draw=draw, echo=echo_err,
                       overwrite=overwrite)
    for line in summary(result) if summary else []:
        typer.echo(line)
    typer.echo(f"{probe.name}: wrote {out / probe.name / 'result.json'} "
               f"({result.provenance['wall_time_s']:.1f} s)")
    return result
