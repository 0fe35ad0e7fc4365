"""``mechinterp compare`` and ``mechinterp demo``: the study on a base and its fine-tunes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from ..models.modelset import parse_variant_args
from ..study.claims import verdict_line
from ..study.compare import compare
from ..study.demo import run_demo
from ..study.executor import parse_executor_options
from ..study.precision import run_contrast
from .options import DataDir, Device, DeviceMap, Dtype, MaxMemory, Out, Overwrite, Variant

CompareBase = Annotated[str | None, typer.Option(
    "--base", "-b", help="Base model spec (default: the built-in model; with --preset paper and no "
    "--variant, allenai/OLMo-2-1124-7B-Instruct).")]
ComparePreset = Annotated[str, typer.Option(
    "--preset", help="What to measure: smoke (seconds per probe), default (the CPU study: what "
    "the claims read, on every seed: MMLU cloze on 64 stratified items, 24 held-out task items; "
    "damage attribution on the first SFT seed), full (default plus attention shift, MLP patching "
    "and causal tracing on each kind's first seed, and the model-diffing probes), paper (GPU "
    "scale; without "
    "--variant: the paper's released OLMo-2-7B SFT and GRPO checkpoints, see docs/gpu.md).")]
Revisions = Annotated[list[str] | None, typer.Option(
    "--revisions", help="With --preset paper and no --variant: the hub revisions (saved steps) of "
    "a run to analyse, RUN=REV1,REV2 (e.g. grpo=v01.14-step-000000029); default: every step, "
    "listed from the hub. Repeatable.")]
Only = Annotated[str | None, typer.Option(
    "--only", help="Comma-separated probes of the plan to run (default: all).")]
Executor = Annotated[str, typer.Option(
    "--executor", help="Where the probe jobs run: serial (this process, one after the other), "
    "local (worker processes on this machine), slurm (one Slurm job per probe and model set, with "
    "its device needs; OUT on a shared file system). Claims and report come after all jobs.")]
Workers = Annotated[int, typer.Option(
    "--workers", help="Jobs running at once (local processes; Slurm array parallelism).")]
ExecutorOption = Annotated[list[str] | None, typer.Option(
    "--executor-option", help="KEY=VALUE passed to submitit's executor, e.g. "
    "slurm_partition=gpu, slurm_account=lab, timeout_min=600, mem_gb=64. Repeatable.")]
DemoPreset = Annotated[str, typer.Option(
    "--preset", help="smoke (a few minutes, one seed; what CI runs), default (the CPU study: three "
    "seeds per run kind; about 26 minutes on 2 CPU cores), full (default plus attention shift, MLP "
    "patching, causal tracing and the model-diffing probes on the first seed), paper (the paper's "
    "training settings; a GPU node).")]
KeepCheckpoints = Annotated[bool, typer.Option(
    "--keep-checkpoints", help="keep every checkpoint of every run and the optimizer state "
    "(default: every checkpoint of the first seed's SFT and GRPO runs, the final model of the "
    "others: 39 GB instead of 10 GB at the default preset).")]


def _one_spec_each(variant: list[str] | None) -> dict[str, str]:
    """``NAME=SPEC`` items as ``{name: spec}``; compare takes one spec per variant."""
    runs = parse_variant_args(variant or [])
    if any(len(specs) > 1 for specs in runs.values()):
        raise UserError("compare takes one spec per variant (a model or a training folder)",
                        "pass the training output folder: its checkpoints are found in it")
    return {name: specs[0] for name, specs in runs.items()}


def compare_cmd(
    base: CompareBase = None,
    variant: Variant = None,
    out: Out = Path("results"),
    preset: ComparePreset = "default",
    revisions: Revisions = None,
    only: Only = None,
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    executor: Executor = "serial",
    workers: Workers = 1,
    executor_option: ExecutorOption = None,
    overwrite: Overwrite = False,
) -> None:
    """Run every probe and evaluation on a base and its fine-tunes; decide the paper's claims;
    write OUT/report.md, OUT/report.html (self-contained) and OUT/claims.json.

    A variant may be a training output folder (mechinterp train --out DIR): trajectory probes then
    run on every checkpoint, the others on the final model. Re-running into the same OUT reuses
    every result whose configuration and model weights are unchanged.
    """
    executor_options = parse_executor_options(executor_option or [])
    variants = _one_spec_each(variant)
    probes = [p.strip() for p in only.split(",") if p.strip()] if only else None
    study = compare(base, variants, out, data_dir=data_dir, preset=preset, device=device,
                    dtype=dtype, probes=probes, echo=typer.echo, device_map=device_map,
                    max_memory=max_memory, revisions=parse_variant_args(revisions or []) or None,
                    executor=executor, workers=workers, executor_options=executor_options,
                    overwrite=overwrite)
    typer.echo(f"report: {out / 'report.html'} (also report.md, claims.json)")
    for claim in study.claims:
        typer.echo("  " + verdict_line(claim))


def demo(
    out: Out = Path("results"),
    preset: DemoPreset = "default",
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    keep_checkpoints: KeepCheckpoints = False,
    overwrite: Overwrite = False,
    precision_contrast: Annotated[bool, typer.Option(
        "--precision-contrast", help="also train SFT and GRPO in pure bf16 and with float32 "
        "master weights (same base rounded to bf16, seed, prompts, steps; OUT/precision) and "
        "give the report a precision-gate section: how sparse each update looks per scheme.")] = False,
) -> None:
    """The study end to end on the built-in default model: train SFT, GRPO and SFT with the
    mid-layer MLPs frozen on the same arithmetic task, compare them with the base, write the report
    and print one verdict line per claim."""
    if precision_contrast:  # first, so that compare's report has its section
        run_contrast(out, preset, data_dir=data_dir, device=device, echo=typer.echo)
    run_demo(out, preset=preset, data_dir=data_dir, device=device, dtype=dtype, echo=typer.echo,
             keep_checkpoints=keep_checkpoints, overwrite=overwrite)
