"""One writer per results folder: ``OUT/.mechinterp.lock``, held with ``fcntl.flock``.

The kernel drops a flock when its holder dies (even by ``kill -9``), so a crash never leaves the
folder locked; the file's text (pid, host, start time) only names the holder in the message a
second writer gets after waiting :data:`WAIT_S` seconds. A lock still held while its text names a
dead process of this host (a child that inherited it outlived its parent) is taken over. The lock
is re-entrant within a process: ``compare`` holds it for its whole run and each result write
inside takes it again. Worker processes of that run (``compare --executor local|slurm``) write under
their parent's lock: :func:`adopt` checks that the lock names the parent, then lets the worker's
writes through without taking it (each job writes its own probe's folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from ..errors import UserError

LOCK_FILE = ".mechinterp.lock"
WAIT_S = 60.0
_held: dict[str, list] = {}  # lock path -> [fd, depth]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _dead_holder(text: str) -> bool:
    """True when ``text`` names a process of this host that no longer runs."""
    parts = text.split()
    try:
        pid, host = int(parts[1]), parts[3]
    except (IndexError, ValueError):
        return False
    return host == socket.gethostname() and not _alive(pid)


@contextlib.contextmanager
def writer_lock(folder: Path | str, wait_s: float | None = None):
    """Hold ``folder``'s writer lock (creating the folder); wait up to ``wait_s`` seconds
    (default :data:`WAIT_S`, ``MECHINTERP_LOCK_WAIT``) for another writer, then stop with one
    line naming it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    if wait_s is None:
        wait_s = float(os.environ.get("MECHINTERP_LOCK_WAIT", WAIT_S))
    deadline = time.monotonic() + wait_s
    delay = 0.005
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _holder(path)
            if _dead_holder(text) and os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink(missing_ok=True)  # take over: the next open makes a fresh lock file
                os.close(fd)
                continue
            os.close(fd)
            if time.monotonic() >= deadline:
                raise UserError(f"{folder} is being written by {text} (lock {path})",
                                "wait for that run to finish, or use another --out") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was replaced while we waited: lock the new one
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()} since {stamp}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, the message just names no holder
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def adopt(folder: Path | str, holder: str):
    """Write into ``folder`` under a lock another process holds for us (a worker of ``compare``):
    ``holder`` is the lock's text as that process wrote it (:func:`holder_text`). Refused with one
    line when the lock names someone else (the run that started this worker has ended)."""
    path = Path(folder) / LOCK_FILE
    key = str(path.resolve())
    if _holder(path) != holder.strip():
        raise UserError(f"{folder} is no longer locked by the run that started this worker "
                        f"({holder.strip()})", "re-run the compare that launched it")
    _held[key] = [None, 1]
    try:
        yield
    finally:
        del _held[key]


def holder_text(folder: Path | str) -> str:
    """The text of ``folder``'s lock (who holds it), for :func:`adopt` in a worker."""
    return _holder(Path(folder) / LOCK_FILE)
