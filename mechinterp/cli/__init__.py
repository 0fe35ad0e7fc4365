"""The ``mechinterp`` command. Thin: parse options, call the library, show progress.

Any :class:`~mechinterp.errors.UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .eval import eval_app
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
)
from .train import train_app
from ..errors import UserError

app = typer.Typer(
    rich_markup_mode=None,  # plain help: rich markup would eat "[paper: 571]" and "[@REV]"
    help="Mechanistic interpretability of post-training: load a base model next to its fine-tunes "
    "and measure where and how fine-tuning changed it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(rich_markup_mode=None,
                        help="The model zoo: list and fetch built-in models.", no_args_is_help=True)
probes_app = typer.Typer(rich_markup_mode=None,
                        help="Probes: one experiment each.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(probes_app, name="probes")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")

def _err(message: str) -> None:
    typer.echo(message, err=True)


def _console():
    from rich.console import Console

    return Console()


@models_app.command("list")
def models_list() -> None:
    """List zoo models: name, family, size, cached or not."""
    from rich.table import Table

    from ..models.zoo import ZOO

    table = Table("name", "family", "size", "cached", "description")
    for e in ZOO.values():
        table.add_row(e.name, e.family, e.size, "yes" if e.is_cached() else "no", e.description)
    _console().print(table)


@models_app.command("fetch")
def models_fetch(name: Annotated[str, typer.Argument(help="Zoo name (see `models list`).")]) -> None:
    """Build a zoo model into the cache (once) and print its folder as the last line."""
    from ..models.zoo import fetch

    typer.echo(str(fetch(name)))


@probes_app.command("list")
def probes_list() -> None:
    """List available probes (built-in and installed plugins)."""
    from rich.table import Table

    from ..core.probe import BROKEN, registry

    table = Table("probe", "version", "what it measures")
    for p in registry().values():
        table.add_row(p.name, p.version, p.description)
    for name, why in BROKEN.items():
        table.add_row(name, "BROKEN", f"plugin failed to load: {why}")
    _console().print(table)


@probes_app.command("show")
def probes_show(name: str = typer.Argument(..., help="Probe name (see `mechinterp probes list`).")
                ) -> None:
    """What a probe measures and each of its options: type, default, lower bound, meaning."""
    from rich.table import Table

    from ..core.probe import get_probe, options

    probe = get_probe(name)
    import inspect

    console = _console()
    console.print(f"[bold]{probe.name}[/bold] (version {probe.version}): {probe.description}\n")
    console.print(inspect.getdoc(inspect.getmodule(type(probe))) or "", markup=False)
    table = Table("option", "type", "default", "min", "meaning",
                  title="options: --set NAME=VALUE (CLI), NAME=VALUE (mi.run)")
    for o in options(probe):
        table.add_row(o["name"], o["type"], o["default"], o["min"], o["meaning"])
    console.print(table)


def _parse_sets(sets: list[str] | None) -> dict[str, str]:
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set {item!r} is not KEY=VALUE", "e.g. --set n_samples=5")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@app.command("run")
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
    from ..data import DataSource
    from ..models.modelset import ModelSet
    from ..core.probe import get_probe, make_config
    from ..store.results import check_out
    from ..core.runner import run_probe

    p = get_probe(probe)
    config = make_config(p, _parse_sets(set_), seed=seed, limit=limit)
    if limit is not None and limit <= 0:
        raise UserError(f"--limit {limit} must be positive", "omit it to use all items")
    check_out(out)
    data = DataSource.from_option(data_dir)
    models = ModelSet.from_args(base, variant or [], device=device, dtype=dtype,
                                device_map=device_map, max_memory=max_memory)
    result = run_probe(p, models, data, config, out=out, draw=not no_figures, echo=_err,
                       overwrite=overwrite)
    typer.echo(f"{p.name}: wrote {out / p.name / 'result.json'} "
               f"({result.provenance['wall_time_s']:.1f} s)")


@app.command("figures")
def figures(folder: Annotated[Path, typer.Argument(help="A results folder (from --out).")],
            paper: Annotated[bool, typer.Option(
                "--paper", help="Also write the paper's figure set (and ours) to FOLDER/paper/: "
                                "needs a compare or demo folder.")] = False) -> None:
    """Re-draw every figure from the stored results under FOLDER (no model is loaded)."""
    from ..store.results import find_results
    from ..core.runner import redraw

    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", "pass the --out folder of an earlier run")
    if not find_results(folder):
        raise UserError(f"no result.json under {folder}", "run a probe with --out first")
    written = redraw(folder)
    typer.echo(f"re-drew {len(written)} figure files under {folder}")
    if paper:
        from ..study.paper_figures import paper_figures

        files = paper_figures(folder)
        typer.echo(f"paper figure set: {len(files) // 2} figures (PNG + PDF) in {folder / 'paper'}")


@app.command("compare")
def compare_cmd(
    base: Annotated[str | None, typer.Option(
        "--base", "-b", help="Base model spec (default: the built-in model; with --preset paper "
        "and no --variant, allenai/OLMo-2-1124-7B-Instruct).")] = None,
    variant: Variant = None,
    out: Out = Path("results"),
    preset: Annotated[str, typer.Option(help="What to measure: smoke (seconds per probe), default "
                                        "(the CPU study: MMLU cloze on 64 stratified items, 32 "
                                        "held-out task items; single-model probes on each "
                                        "kind's first seed), full (default plus the "
                                        "model-diffing probes), paper (GPU scale; without "
                                        "--variant: the paper's released OLMo-2-7B SFT and GRPO "
                                        "checkpoints, see docs/gpu.md).")] = "default",
    revisions: Annotated[list[str] | None, typer.Option(
        "--revisions", help="With --preset paper and no --variant: the hub revisions (saved "
        "steps) of a run to analyse, RUN=REV1,REV2 (e.g. grpo=v01.14-step-000000029); default: "
        "every step, listed from the hub. Repeatable.")] = None,
    only: Annotated[str | None, typer.Option(help="Comma-separated probes of the plan to run "
                                             "(default: all).")] = None,
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    executor: Annotated[str, typer.Option(
        help="Where the probe jobs run: serial (this process, one after the other), local "
        "(worker processes on this machine), slurm (one Slurm job per probe and model set, with "
        "its device needs; OUT on a shared file system). Claims and report come after all "
        "jobs.")] = "serial",
    workers: Annotated[int, typer.Option(help="Jobs running at once (local processes; Slurm "
                                         "array parallelism).")] = 1,
    executor_option: Annotated[list[str] | None, typer.Option(
        "--executor-option", help="KEY=VALUE passed to submitit's executor, e.g. "
        "slurm_partition=gpu, slurm_account=lab, timeout_min=600, mem_gb=64. Repeatable.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Run every probe and evaluation on a base and its fine-tunes; decide the paper's claims;
    write OUT/report.md, OUT/report.html (self-contained) and OUT/claims.json.

    A variant may be a training output folder (mechinterp train --out DIR): trajectory probes then
    run on every checkpoint, the others on the final model. Re-running into the same OUT reuses
    every result whose configuration and model weights are unchanged.
    """
    from ..study.claims import verdict_line
    from ..study.compare import compare
    from ..study.executor import check_executor, parse_executor_options
    from ..models.modelset import parse_variant_args

    check_executor(executor, workers)
    options = parse_executor_options(executor_option or [])
    runs = parse_variant_args(variant or [])
    if any(len(v) > 1 for v in runs.values()):
        raise UserError("compare takes one spec per variant (a model or a training folder)",
                        "pass the training output folder: its checkpoints are found in it")
    probes = [p.strip() for p in only.split(",") if p.strip()] if only else None
    study = compare(base, {n: v[0] for n, v in runs.items()}, out, data_dir=data_dir,
                    preset=preset, device=device, dtype=dtype, probes=probes, echo=typer.echo,
                    device_map=device_map, max_memory=max_memory,
                    revisions=parse_variant_args(revisions or []) or None, executor=executor,
                    workers=workers, executor_options=options,
                    overwrite=overwrite)
    typer.echo(f"report: {out / 'report.html'} (also report.md, claims.json)")
    for c in study.claims:
        typer.echo("  " + verdict_line(c))


@app.command("demo")
def demo(
    out: Out = Path("results"),
    preset: Annotated[str, typer.Option(help="smoke (a few minutes, one seed; what CI runs), "
                                        "default (the CPU study: three seeds per run kind), "
                                        "full (default plus the model-diffing probes on the "
                                        "first seed), paper (the paper's training settings; a "
                                        "GPU node).")] = "default",
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    keep_checkpoints: Annotated[bool, typer.Option(
        "--keep-checkpoints", help="keep every checkpoint of every run and the optimizer state "
        "(default: every checkpoint of the first seed's SFT and GRPO runs, the final model of "
        "the others: 39 GB instead of 10 GB at the default preset).")] = False,
    overwrite: Overwrite = False,
    precision_contrast: Annotated[bool, typer.Option(
        "--precision-contrast", help="also train SFT and GRPO in pure bf16 and with float32 "
        "master weights (same base rounded to bf16, seed, prompts, steps; OUT/precision) and "
        "give the report a precision-gate section: how sparse each update looks per scheme.")] = False,
) -> None:
    """The study end to end on the built-in default model: train SFT, GRPO and SFT with the
    mid-layer MLPs frozen on the same arithmetic task, compare them with the base, write the report
    and print one verdict line per claim."""
    from ..study.demo import run_demo

    if precision_contrast:  # first, so that compare's report has its section
        from ..study.precision import run_contrast

        run_contrast(out, preset, data_dir=data_dir, device=device, echo=typer.echo)
    run_demo(out, preset=preset, data_dir=data_dir, device=device, dtype=dtype, echo=typer.echo,
             keep_checkpoints=keep_checkpoints, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors are one line and exit code 2."""
    import click

    # typer >= 0.29 raises its own vendored click's exceptions; older typer raises click's
    exit_types = (click.exceptions.Exit, typer.Exit)
    abort_types = (click.exceptions.Abort, typer.Abort)
    usage_types = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
    from ..progress import quiet_library_bars

    quiet_library_bars()
    try:
        app(args=argv, prog_name="mechinterp", standalone_mode=False)
    except UserError as exc:
        print(f"mechinterp: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except exit_types as exc:
        return exc.exit_code
    except abort_types:
        print("mechinterp: aborted", file=sys.stderr)
        return 130
    except usage_types as exc:
        exc.show()
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("mechinterp: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
