"""The scoring job runner: every job and follow-up runs once, follow-ups first, errors surface,
inference mode in every worker, torch threads shared out and put back."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mechinterp.evals.workers import cpu_workers, default_workers, run_jobs


def _jobs(log: list, lock: threading.Lock, n: int = 6, fanout: int = 3):
    def leaf(name):
        def job():
            time.sleep(0.001)
            with lock:
                log.append((name, torch.is_inference_mode_enabled(),
                            threading.current_thread().name))
        return job

    def parent(i):
        def job():
            leaf(f"p{i}")()
            return [leaf(f"p{i}.{j}") for j in range(fanout)]
        return job

    return [parent(i) for i in range(n)]


def test_one_worker_runs_follow_ups_before_later_jobs_in_this_thread():
    log, lock = [], threading.Lock()
    run_jobs(_jobs(log, lock, n=2, fanout=2), workers=1)
    assert [name for name, _, _ in log] == ["p0", "p0.0", "p0.1", "p1", "p1.0", "p1.1"]
    assert all(inf for _, inf, _ in log)
    assert {t for _, _, t in log} == {threading.current_thread().name}


def test_several_workers_run_every_job_once_in_inference_mode():
    log, lock = [], threading.Lock()
    run_jobs(_jobs(log, lock, n=8, fanout=3), workers=3)
    names = [name for name, _, _ in log]
    assert sorted(names) == sorted([f"p{i}" for i in range(8)]
                                   + [f"p{i}.{j}" for i in range(8) for j in range(3)])
    assert all(inf for _, inf, _ in log)
    assert {t for _, _, t in log} <= {"score-0", "score-1", "score-2"}
    for i in range(8):  # a follow-up never runs before its parent
        assert names.index(f"p{i}") < min(names.index(f"p{i}.{j}") for j in range(3))


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_in_a_job_is_raised_and_stops_the_run(workers):
    ran = []

    def bad():
        raise ValueError("broken batch")

    def later():
        ran.append(1)

    with pytest.raises(ValueError, match="broken batch"):
        run_jobs([bad] + [later] * 50 if workers == 1 else [bad], workers=workers)
    if workers == 1:
        assert ran == []


def test_cpu_workers_shares_threads_and_restores_them():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert default_workers(torch.device("cpu")) == 4
        assert default_workers(torch.device("cuda")) == 1
        with cpu_workers(torch.device("cpu"), 2) as n:
            assert (n, torch.get_num_threads()) == (2, 2)
        assert torch.get_num_threads() == 4
        with pytest.raises(RuntimeError), cpu_workers(torch.device("cpu"), 3):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 4
        with cpu_workers(torch.device("cuda"), None) as n:  # a GPU: one stream, threads untouched
            assert (n, torch.get_num_threads()) == (1, 4)
        with pytest.raises(ValueError), cpu_workers(torch.device("cpu"), 0):
            pass
    finally:
        torch.set_num_threads(before)
