"""Scoring jobs on several CPU threads, each running its own forward passes.

On a CPU, one forward pass over a batch of a few hundred tokens spreads its small matrix products
(576 x 1536 for the default model) poorly over the cores: two passes side by side, one torch thread
each, do more per second than one pass on two threads (``benchmarks/mmlu_vs_lm_eval.py`` measures
it). Torch releases the GIL inside its kernels, so Python threads are enough; no process copies the
weights. On a GPU one stream of batches keeps the device busy: one worker.

A job is a callable returning follow-up jobs (a shared prefix's job returns the batches that run on
its KV cache). Follow-ups run before the jobs still waiting, so a cache lives only while its own batches
run. Each job writes only its own rows' results, so the results do not depend on which worker ran
which job; they do depend (within float rounding) on the torch thread count, which
:func:`cpu_workers` fixes for the whole run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

Job = Callable[[], Iterable["Job"] | None]

# A cap, not a measurement (only 2 cores measured here): each worker holds its own activations and
# KV-cache copies, and with many cores a few multi-threaded workers should share GEMMs well enough.
MAX_CPU_WORKERS = 4


def default_workers(device: torch.device) -> int:
    """One worker per torch thread on a CPU (at most :data:`MAX_CPU_WORKERS`), one on a GPU."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), MAX_CPU_WORKERS))


@contextmanager
def cpu_workers(device: torch.device, workers: int | None) -> Iterator[int]:
    """The number of workers to use; while inside, the torch threads are shared out among them
    (``threads // workers`` each) and put back afterwards."""
    n = default_workers(device) if workers is None else workers
    if n < 1:
        raise ValueError(f"workers must be at least 1, got {n}")
    threads = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield n
        return
    torch.set_num_threads(max(1, threads // n))
    try:
        yield n
    finally:
        torch.set_num_threads(threads)


def run_jobs(jobs: Iterable[Job], workers: int = 1) -> None:
    """Run ``jobs`` and their follow-ups on ``workers`` threads (the calling thread when 1), under
    ``torch.inference_mode``. The first error stops the workers and is raised here."""
    todo: list[Job] = list(jobs)[::-1]  # a stack: follow-ups go on top
    cond = threading.Condition()
    busy = 0
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal busy
        with torch.inference_mode():  # grad mode is per thread
            while True:
                with cond:
                    while not todo and busy and not errors:
                        cond.wait()
                    if errors or not todo:
                        cond.notify_all()
                        return
                    job = todo.pop()
                    busy += 1
                follow: list[Job] = []
                try:
                    follow = list(job() or ())
                except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                    with cond:
                        errors.append(e)
                with cond:
                    todo.extend(follow[::-1])
                    busy -= 1
                    cond.notify_all()

    if workers <= 1:
        worker()
    else:
        threads = [threading.Thread(target=worker, name=f"score-{k}", daemon=True)
                   for k in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
