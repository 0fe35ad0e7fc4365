"""``mechinterp compare``: every probe and evaluation on a base and its fine-tunes, one folder.

A variant is a model spec or a training output folder (``mechinterp train --out``). For a training
folder the trajectory probes (weight change, KL, MMLU, in-domain accuracy) run on every checkpoint
of the run, and the single-model probes (attention, tracing, patching, damage attribution) on its
final model (the last checkpoint). Results go to ``OUT/<probe>/`` through the one runner, so a
re-run into the same folder reuses every result whose configuration and weights are unchanged.
Then the claims are decided (``OUT/claims.json``) and the report written (``OUT/report.md``,
``OUT/report.html``).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.options import make_config
from ..core.registry import get_probe
from ..data import DataSource
from ..errors import UserError
from ..models.modelset import ModelSet
from ..models.zoo import DEFAULT_MODEL
from ..store.locking import LOCK_FILE, writer_lock
from ..store.results import check_out, read_result
from .claims import decide_all, write_claims
from .executor import Job, check_executor, execute
from .folder import Study, VariantInfo, describe_variant, write_study
from .paper_release import PAPER_BASE, paper_variants
from .presets import PAPER_RELEASE_PLAN, PLANS, Step, select_steps, step_variants
from .report import write_report


@dataclass(frozen=True)
class CompareOptions:
    """How :func:`compare` runs; every field has the CLI's default.

    Attributes:
        data_dir: the data root (None: ``$MECHINTERP_DATA``); compare needs one.
        preset: a plan of :data:`~mechinterp.study.presets.PLANS`.
        device, dtype, device_map, max_memory: where and how the models load.
        probes: the probes of the plan to run (None: all).
        echo: print-like function for progress.
        revisions: with ``preset="paper"`` and no variants, ``{run: [rev, ...]}`` of the paper's
            released checkpoints (default: every saved step).
        overwrite: replace stored results of other models (see
            :func:`mechinterp.core.runner.run_probe`).
        executor, workers, executor_options: where and how many probe jobs run at once
            (:mod:`mechinterp.study.executor`).
    """

    data_dir: Path | str | None = None
    preset: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    probes: list[str] | None = None
    echo: Callable[[str], None] = print
    device_map: str | None = None
    max_memory: dict | str | None = None
    revisions: dict[str, list[str]] | None = None
    overwrite: bool = False
    executor: str = "serial"
    workers: int = 1
    executor_options: dict[str, Any] | None = None

    @property
    def model_kw(self) -> dict[str, Any]:
        """The keyword arguments every model set of the study is built with."""
        return dict(device=self.device, dtype=self.dtype, device_map=self.device_map,
                    max_memory=self.max_memory)


def compare(base: str | None, variants: dict[str, str], out: Path | str,
            options: CompareOptions | None = None, **fields: Any) -> Study:
    """Run the plan of a preset on a base and its variants, decide the claims, write the report.

    ``out`` is checked before any work and held with its writer lock for the whole run (a second
    writer waits, then stops with a line naming this one; worker processes of this run write under
    it); a run that fails before any work leaves no ``out``. ``preset="paper"`` without variants
    analyses the paper's released checkpoints (:mod:`mechinterp.study.paper_release`).

    Args:
        base: the base model's spec (None: the built-in model, or the paper's base).
        variants: ``{name: spec}``, a model spec or a training output folder each.
        out: the study folder.
        options: how to run (None: the defaults).
        **fields: :class:`CompareOptions` fields, overriding ``options``'.

    Returns:
        The study, its results and decided claims.
    """
    options = dataclasses.replace(options or CompareOptions(), **fields)
    check_executor(options.executor, options.workers)
    check_out(out)
    for name, spec in variants.items():  # a damaged run folder stops before OUT is made
        describe_variant(name, spec)
    made = not Path(out).exists()
    try:
        with writer_lock(out):
            return _compare(base, variants, Path(out), options)
    except BaseException:
        if made and {p.name for p in Path(out).iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)  # a run that failed before any work leaves no OUT
        raise


def _compare(base: str | None, variants: dict[str, str], out: Path,
             options: CompareOptions) -> Study:
    """:func:`compare` under the writer lock: the plan's jobs, then claims and report."""
    release, plan = _plan_of(variants, options)
    base = base or (PAPER_BASE if release else DEFAULT_MODEL)
    info = (paper_variants(options.revisions) if release
            else {n: describe_variant(n, s) for n, s in variants.items()})
    data = DataSource.from_option(options.data_dir)
    if data.root is None:
        raise UserError("compare needs a data root (MMLU, known facts)",
                        "pass --data-dir or set MECHINTERP_DATA (e.g. ../shared/data)")
    ModelSet(base, {n: v.final for n, v in info.items()}, **options.model_kw)  # comparable first
    runs = ModelSet(base, {n: v.checkpoints for n, v in info.items()}, **options.model_kw)
    out.mkdir(parents=True, exist_ok=True)
    planned = [s.probe for s in plan
               if s.kinds is None or any(v.kind in s.kinds for v in info.values())]
    study = Study(out, base, info, {}, options.preset, dict(runs.runs), plan=planned)
    write_study(study)
    jobs = _jobs(study, plan, str(data.root), options)
    execute(jobs, options.executor, options.workers, out / ".jobs", options.executor_options,
            options.echo)
    for job in jobs:
        study.results[job.probe] = read_result(out / job.probe)
    study.claims = decide_all(study)
    write_claims(study.claims, out)
    write_report(study, study.claims)
    return study


def _plan_of(variants: dict[str, str], options: CompareOptions) -> tuple[bool, list[Step]]:
    """``(release, steps)``: whether the paper's released checkpoints are analysed, and the steps
    of the plan that run; an unknown preset, a missing variant or misplaced revisions stop here."""
    if options.preset not in PLANS:
        raise UserError(f"unknown compare preset {options.preset!r}",
                        f"use one of {', '.join(PLANS)}")
    release = options.preset == "paper" and not variants
    if options.revisions and not release:
        raise UserError("--revisions names steps of the paper's checkpoints",
                        "use it with --preset paper and no --variant")
    if not variants and not release:
        raise UserError("compare needs at least one --variant NAME=SPEC",
                        "e.g. --variant sft=runs/sft --variant grpo=runs/grpo (or --preset "
                        "paper alone: the paper's released checkpoints)")
    steps = PAPER_RELEASE_PLAN if release else PLANS[options.preset]
    return release, select_steps(steps, options.probes)


def _jobs(study: Study, plan: list[Step], data_root: str, options: CompareOptions) -> list[Job]:
    """One job per step that has variants to run on; each step's options are checked first."""
    jobs = []
    for i, step in enumerate(plan, 1):
        label = f"[compare {i}/{len(plan)}] {step.probe}"
        names = step_variants(study, step)
        models = {n: _specs(v, step) for n, v in study.variants.items() if n in names}
        if not models:
            options.echo(f"{label}: skipped (no {'/'.join(step.kinds or ())} variant)")
            continue
        probe_options = {k: v for k, v in step.options.items() if v is not None}
        make_config(get_probe(step.probe), probe_options)  # a bad option stops before any job
        jobs.append(Job(label, step.probe, probe_options, study.base, models,
                        check=step.kinds is None and not step.first_seed, out=str(study.out),
                        data_dir=data_root, model_kw=options.model_kw,
                        overwrite=options.overwrite))
    return jobs


def _specs(variant: VariantInfo, step: Step) -> str | list[str]:
    """What a step loads of a variant: every checkpoint, or the final model."""
    return variant.checkpoints if step.checkpoints else variant.final
