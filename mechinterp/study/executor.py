"""Where a study's probe runs execute: in this process, in local worker processes, or on Slurm.

A ``compare`` plan is a list of independent jobs, one per (probe, model set): each job loads its
models, runs its probe through the one runner (:func:`mechinterp.core.runner.run_probe`, with reuse) and
commits its result into the study's result store (``OUT/<probe>/``); claims and the report are
computed afterwards from what the store holds. The jobs are scheduled by submitit
(https://github.com/facebookincubator/submitit):

* ``serial`` (default): one job after the other in this process, models shared between jobs;
* ``local``: each job in its own worker process on this machine, at most ``workers`` at a time
  (submitit's ``LocalExecutor``; a job that needs a GPU gets one of the visible GPUs);
* ``slurm``: each job is a Slurm job with its own device needs (``gpus_per_node``,
  ``cpus_per_task``, ``mem_gb``, ``timeout_min``), at most ``workers`` running at once
  (``slurm_array_parallelism``); ``executor_options`` pass anything else submitit's Slurm executor
  takes (``slurm_partition``, ``slurm_account``, ``slurm_qos`` ...). ``OUT`` must be on a file
  system the nodes share.

Why submitit and not Ray: the labs this suite is for schedule GPUs with Slurm, and submitit submits
a Python function as a Slurm job from a login node with nothing running beforehand, and runs the
same code in local processes on a laptop (a pure-Python package of a few hundred kB). A Ray cluster
(``ray.remote(num_gpus=1)`` around :func:`run_job`) does the same on machines that already run Ray;
the job function here is executor-neutral, so a Ray executor is a few lines where one is wanted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.options import make_config
from ..core.registry import get_probe
from ..core.runner import run_probe
from ..data import DataSource
from ..errors import UserError
from ..models.modelset import ModelSet
from ..store.locking import adopt, holder_text

EXECUTORS = ("serial", "local", "slurm")

#: Probes that read weight files only (no forward pass): their jobs never ask for a GPU.
WEIGHT_ONLY = frozenset({"weight-change", "update-geometry"})


@dataclass(frozen=True)
class Job:
    """One (probe, model set) of a study: everything a worker needs, as plain picklable values.

    Attributes:
        label: ``"[compare i/n] probe"``, for progress lines.
        probe: registered probe name.
        options: the probe's Config fields.
        base: the base model's spec.
        variants: ``{name: spec or [checkpoint specs]}``, as :class:`~mechinterp.models.ModelSet`
            takes them.
        check: whether the model set is checked comparable when built.
        out: the study folder (results go to ``out/<probe>/``).
        data_dir: the data root (None: ``$MECHINTERP_DATA``).
        model_kw: ``device``, ``dtype``, ``device_map``, ``max_memory`` for the model set.
        overwrite: replace a stored result of other models (see :func:`~mechinterp.core.runner.run_probe`).
        lock_holder: the text of the study folder's writer lock, held by the process that
            submitted the job; a worker process writes under it (:func:`mechinterp.store.locking.adopt`).
    """

    label: str
    probe: str
    options: dict[str, Any]
    base: str
    variants: dict[str, Any]
    check: bool
    out: str
    data_dir: str | None
    model_kw: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    lock_holder: str | None = None

    @property
    def needs_gpu(self) -> bool:
        """A GPU when the study runs on one and the probe runs the models."""
        return self.model_kw.get("device") not in ("cpu", None) and self.probe not in WEIGHT_ONLY


def _model_set(job: Job, cache: dict | None):
    key = (job.base, repr(sorted(job.variants.items())), job.check, repr(sorted(job.model_kw.items())))
    if cache is not None and key in cache:
        return cache[key]
    models = ModelSet(job.base, job.variants, check=job.check, **job.model_kw)
    if cache is not None:
        cache[key] = models
    return models


def run_job(job: Job, echo: Callable[[str], None] = print, cache: dict | None = None) -> dict:
    """Run one job and commit its result into the store.

    Args:
        job: the job.
        echo: print-like function for progress and reuse messages.
        cache: model sets built by earlier jobs of this process, reused by equal ones (serial).

    Returns:
        ``{"probe", "reused", "wall_s"}``.
    """
    start = time.perf_counter()
    probe = get_probe(job.probe)
    models = _model_set(job, cache)
    data = DataSource.from_option(job.data_dir)
    config = make_config(probe, job.options)
    try:
        result = run_probe(probe, models, data, config, out=job.out, reuse=True, echo=echo,
                           overwrite=job.overwrite)
    finally:
        for name in models.variants:
            models.release(name)
    return {"probe": job.probe, "reused": bool(result.provenance.get("reused")),
            "wall_s": time.perf_counter() - start}


def _worker(job: Job, threads: int | None = None) -> dict:
    """Entry point of a worker process (local or Slurm): progress goes to the job's log.
    ``threads``: torch threads of this worker (local workers share the machine's cores)."""
    if threads:
        import torch  # deferred: torch only in a worker process that sets its threads

        torch.set_num_threads(threads)
    scope = adopt(job.out, job.lock_holder) if job.lock_holder else contextlib.nullcontext()
    with scope:
        return run_job(job, echo=lambda m: print(f"{job.label}: {m}", flush=True))


def check_executor(name: str, workers: int) -> None:
    """Refuse an unknown executor or a worker count below 1 before any work.

    Args:
        name: ``serial``, ``local`` or ``slurm``.
        workers: jobs running at once.
    """
    if name not in EXECUTORS:
        raise UserError(f"unknown executor {name!r}", f"use one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise UserError(f"--workers {workers} is below 1", "use --workers 1 or more")


def parse_executor_options(pairs: list[str]) -> dict[str, Any]:
    """Parse ``--executor-option`` items.

    Args:
        pairs: ``KEY=VALUE`` items, e.g. ``["slurm_partition=gpu", "mem_gb=64"]``.

    Returns:
        ``{"slurm_partition": "gpu", "mem_gb": 64}``: integers and floats become numbers.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--executor-option {pair!r} is not KEY=VALUE",
                            "write e.g. --executor-option slurm_partition=gpu")
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value
    return out


def execute(jobs: list[Job], executor: str = "serial", workers: int = 1,
            log_folder: Path | str | None = None, options: dict[str, Any] | None = None,
            echo: Callable[[str], None] = print) -> list[dict]:
    """Run every job; returns their summaries in job order.

    Args:
        jobs: the study's jobs (independent of each other).
        executor: ``serial``, ``local`` or ``slurm``.
        workers: jobs running at once (local processes; Slurm array parallelism).
        log_folder: where submitit keeps each job's pickles and logs (local and Slurm).
        options: extra submitit parameters (``slurm_partition`` ...), passed as given.
        echo: print-like function for progress.

    Raises:
        UserError: a job failed in a worker (its log file is named).
    """
    check_executor(executor, workers)
    if executor == "serial":
        cache: dict = {}
        out = []
        for job in jobs:
            echo(f"{job.label} ...")
            summary = run_job(job, echo=lambda m: echo(f"      {m}"), cache=cache)
            echo(f"      done ({_how(summary)})")
            out.append(summary)
        return out
    return _execute_submitit(jobs, executor, workers, Path(log_folder or "."), options or {}, echo)


def _submitit_executor(kind: str, folder: Path, workers: int, options: dict):
    import submitit  # deferred: submitit only for the local and Slurm executors

    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=options.pop("timeout_min", 24 * 60), **options)
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(slurm_array_parallelism=workers,
                             timeout_min=options.pop("timeout_min", 24 * 60), **options)
    return ex


def _execute_submitit(jobs: list[Job], kind: str, workers: int, folder: Path, options: dict,
                      echo) -> list[dict]:
    """Submit the jobs, at most ``workers`` running at once, and wait for all of them."""
    try:
        import submitit  # noqa: F401 - fail early, with the fix, when it is missing
    except ImportError:
        raise UserError(f"--executor {kind} needs submitit", "pip install submitit") from None
    ex = _submitit_executor(kind, folder, workers, dict(options))
    threads = max(1, (os.cpu_count() or 1) // workers) if kind == "local" else None
    pending = list(enumerate(jobs))
    running: dict[int, Any] = {}
    results: dict[int, dict] = {}
    while pending or running:
        while pending and (kind == "slurm" or len(running) < workers):
            i, job = pending.pop(0)
            ex.update_parameters(**_resources(kind, job))
            job = dataclasses.replace(job, lock_holder=holder_text(job.out))
            running[i] = ex.submit(_worker, job, threads)
            echo(f"{job.label}: submitted ({kind} job {running[i].job_id})")
        done = [i for i, j in running.items() if j.done()]
        for i in done:
            job, handle = jobs[i], running.pop(i)
            try:
                results[i] = handle.result()
            except Exception as exc:  # noqa: BLE001 - a worker's failure names its log
                first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
                raise UserError(f"{job.label} failed in its worker ({first})",
                                f"read {handle.paths.stderr}, fix, and re-run: finished "
                                "results are reused") from None
            echo(f"{job.label}: done ({_how(results[i])})")
        if not done:
            time.sleep(0.5)
    shutil.rmtree(folder, ignore_errors=True)  # the jobs' pickles and logs; kept on a failure
    return [results[i] for i in range(len(jobs))]


def _how(summary: dict) -> str:
    return "reused" if summary["reused"] else f"{summary['wall_s']:.0f} s"


def _resources(kind: str, job: Job) -> dict[str, Any]:
    """A job's device needs, in submitit's parameter names."""
    gpus = 1 if job.needs_gpu else 0
    if kind == "local":
        return {"gpus_per_node": gpus}
    return {"gpus_per_node": gpus, "cpus_per_task": 8 if gpus else 4, "nodes": 1,
            "tasks_per_node": 1}
