"""Content hashes of the files a result read (weights, config, tokenizer, data), each computed once.

:func:`content_hash` is the SHA-256 of a file's bytes. It is cached in *our* cache folder
(``cache_dir()/content-hashes``, never beside the user's files), one entry per file keyed by
``(st_dev, st_ino)`` and valid only while ``(size, mtime_ns, ctime_ns)`` are those recorded: any
write, ``cp -p`` over the file or ``touch -r`` changes the ctime (which no user call can set back),
so a changed file is always re-read. A file changed less than :data:`RACY_S` seconds before it was
hashed is not cached (a change within the same timestamp tick would be invisible to the key).
Re-checking an unchanged file costs one ``stat``.

A file in a Hugging Face hub cache is a link to ``blobs/<sha256 of its content>``: that name is
its hash, read for free.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

from ..paths import cache_dir

BLOCK = 8 << 20
RACY_S = 2.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def _entry(st: os.stat_result) -> Path:
    return cache_dir() / "content-hashes" / f"{st.st_dev}-{st.st_ino}"


def sha256_file(path: Path) -> str:
    """SHA-256 of every byte, streamed in 8 MB blocks (no cache)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(BLOCK):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: Path | str) -> str:
    """The SHA-256 (hex) of ``path``'s content, from the cache while the file is unchanged."""
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        if target.parent.name == "blobs" and _SHA256.match(target.name):
            return target.name  # a hub blob is named by the sha256 of its content
    st = os.stat(path)
    entry = _entry(st)
    try:
        stamp, digest = entry.read_text().rsplit(" ", 1)
        if stamp == _stamp(st) and _SHA256.match(digest):
            return digest
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    after = os.stat(path)
    fresh = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_S * 1e9
    if _stamp(after) == _stamp(st) and not fresh:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
            tmp.write_text(f"{_stamp(st)} {digest}")
            os.replace(tmp, entry)
        except OSError:
            pass  # a read-only cache: hash again next time
    return digest
