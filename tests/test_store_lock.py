"""Issue 22, item 5: one writer per results folder. Two processes writing one --out collided
(ENOTEMPTY, a `.probe-old-<pid>` folder left behind); now a flock'd lock file serialises them, a
second writer waits a bounded time and then names the holder, and a lock whose holder died is
taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

WRITER = """
import sys
from pathlib import Path
from mechinterp.store.results import Result, read_result, write_result
out, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
done = 0
for i in range(n):
    write_result(Result("p", {"tag": tag, "i": i}, files={"rows.jsonl": f"{tag} {i}\\n"}), out / "p")
    done += 1
print(done)
"""


@pytest.mark.slow
def test_two_processes_writing_one_out_lose_nothing(tmp_path):
    """Repro 5: 200 writes each; one process lost 132 to ENOTEMPTY and left `.p-old-<pid>`."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), tag, "200"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0 and stdout.strip() == "200", stderr[-2000:]
    from mechinterp.store.results import incomplete, read_payload, read_result

    res = read_result(out / "p")
    assert res.data["i"] == 199 and res.files["rows.jsonl"] == f"{res.data['tag']} 199\n"
    assert incomplete(out / "p", read_payload(out / "p")) == []
    assert sorted(p.name for p in out.iterdir()) == [".mechinterp.lock", "p"]


HOLDER = """
import sys, time
from mechinterp.store.locking import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(out: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds)], env=ENV,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_waits_then_names_the_holder(tmp_path):
    from mechinterp.errors import UserError
    from mechinterp.store.locking import writer_lock

    out = tmp_path / "out"
    holder = _hold(out, 60)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError) as info:
            with writer_lock(out, wait_s=0.5):
                pass
        waited = time.monotonic() - t0
        msg = info.value.one_line()
        assert 0.5 <= waited < 5 and f"pid {holder.pid}" in msg and socket.gethostname() in msg
        assert "another --out" in msg and len(msg.splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    # killed (-9) holder: the kernel dropped its flock, the lock is free at once
    t0 = time.monotonic()
    with writer_lock(out, wait_s=5):
        assert f"pid {os.getpid()}" in (out / ".mechinterp.lock").read_text()
    assert time.monotonic() - t0 < 2


def test_a_writer_that_finishes_within_the_wait_lets_the_next_in(tmp_path):
    from mechinterp.store.locking import writer_lock

    out = tmp_path / "out"
    holder = _hold(out, 1.0)
    t0 = time.monotonic()
    with writer_lock(out, wait_s=30):
        waited = time.monotonic() - t0
    holder.wait()
    assert 0.3 < waited < 10


FORKER = """
import os, sys, time
from mechinterp.store.locking import writer_lock
with writer_lock(sys.argv[1]):
    pid = os.fork()
    if pid == 0:  # the child inherits the flock and outlives its parent
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        time.sleep(120)
        os._exit(0)
    print(pid, flush=True)
    os._exit(0)
"""


def test_stale_lock_of_a_dead_holder_is_taken_over(tmp_path):
    """A flock still held by a child that outlived the holder named in the lock file (dead pid on
    this host) is taken over rather than waited for."""
    from mechinterp.store.locking import writer_lock

    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", FORKER, str(out)], env=ENV, capture_output=True,
                       text=True, timeout=60)
    orphan = int(p.stdout.strip())
    try:
        text = (out / ".mechinterp.lock").read_text()
        assert f"pid {orphan} " not in text and text.startswith("pid ")  # names the dead parent
        t0 = time.monotonic()
        with writer_lock(out, wait_s=30):
            assert f"pid {os.getpid()}" in (out / ".mechinterp.lock").read_text()
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(orphan, signal.SIGKILL)
    # and a lock file naming a dead pid with no flock on it at all
    (out / ".mechinterp.lock").write_text(f"pid 999999 host {socket.gethostname()} since x\n")
    with writer_lock(out, wait_s=0):
        pass


def test_lock_is_reentrant_within_a_process(tmp_path):
    from mechinterp.store.locking import writer_lock
    from mechinterp.store.results import Result, write_result

    with writer_lock(tmp_path, wait_s=0):
        write_result(Result("x", {"a": 1}), tmp_path / "x")  # takes the same lock again
    assert (tmp_path / "x" / "result.json").is_file()
