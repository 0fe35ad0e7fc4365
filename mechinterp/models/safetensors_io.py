"""Reading safetensors files without loading them: header checks, tensor streaming, hashing."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from ..errors import CorruptCheckpoint


def weight_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint folder, in a stable order."""
    return sorted(Path(folder).glob("*.safetensors"))


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file, after checking that the file is complete.

    A truncated download or a file that is not safetensors at all raises :class:`CorruptCheckpoint`
    naming the file, instead of failing deep inside a loader.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CorruptCheckpoint(f"{path} is too short to be a safetensors file ({size} bytes)",
                                    "re-download or re-save the checkpoint")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size:
            raise CorruptCheckpoint(f"{path} has a broken safetensors header (claims {n} bytes)",
                                    "re-download or re-save the checkpoint")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpoint(f"{path} has an unreadable safetensors header: {exc}",
                                    "re-download or re-save the checkpoint") from None
    bad = _header_problem(header)
    if bad:
        raise CorruptCheckpoint(f"{path} has a malformed safetensors header: {bad}",
                                "re-download or re-save the checkpoint")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CorruptCheckpoint(
            f"{path} is truncated or padded: header describes {8 + n + end} bytes, file has {size}",
            "re-download or re-save the checkpoint",
        )
    return header


def _header_problem(header) -> str | None:
    """What is wrong with a parsed safetensors header (the format's own rules), or None."""
    if not isinstance(header, dict):
        return f"a JSON {type(header).__name__}, not an object"
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict):
                return "__metadata__ is not an object"
            continue
        if not isinstance(meta, dict):
            return f"entry {name!r} is {json.dumps(meta)[:40]}, not an object"
        shape, offsets = meta.get("shape"), meta.get("data_offsets")
        if not isinstance(meta.get("dtype"), str):
            return f"tensor {name!r} has no dtype"
        if not (isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            return f"tensor {name!r} has no valid shape"
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data_offsets"
    return None


def tensor_index(folder: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Map every tensor name in a checkpoint folder to (file, shape, dtype), checking each file."""
    files = weight_files(folder)
    if not files:
        raise CorruptCheckpoint(f"no .safetensors weights in {folder}",
                                "save the model with save_pretrained(safe_serialization=True)")
    index: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in files:
        for name, meta in read_header(f).items():
            if name == "__metadata__":
                continue
            index[name] = (f, tuple(meta["shape"]), meta["dtype"])
    return index


def iter_tensors(folder: Path, names: list[str] | None = None) -> Iterator[tuple[str, object]]:
    """Yield (name, tensor) one at a time, memory-mapped, so peak memory is one tensor."""
    from safetensors import safe_open

    index = tensor_index(folder)
    wanted = names if names is not None else list(index)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        if name not in index:
            raise CorruptCheckpoint(f"{folder} has no tensor {name}", "is it the same architecture?")
        by_file.setdefault(index[name][0], []).append(name)
    for f, ns in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for name in ns:
                yield name, fh.get_tensor(name)


def folder_hash(folder: Path) -> str:
    """SHA-256 over the folder's weight files (name and bytes), cached beside them by size+mtime."""
    files = weight_files(folder)
    stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    cache = Path(folder) / ".mechinterp-weight-hash.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        cache.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # read-only folder (e.g. a shared hub cache): just do not cache
    return digest


FULL_HASH_ENV = "MECHINTERP_FULL_HASH"
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")


def weights_identity(folder: Path) -> str:
    """An identity of a checkpoint's weights that costs no read of the tensors.

    * Files in a Hugging Face hub cache are symlinks to ``blobs/<sha256 of the content>``: the
      identity hashes those content addresses (``hub:``), exact and free.
    * Local files: name, size, modification time and the safetensors header (``stat:``): any
      re-save changes it. A 20-checkpoint 7B run is about 300 GB, which a full hash would read.
    * With ``MECHINTERP_FULL_HASH=1``: the SHA-256 of every byte (``sha256:``, cached by
      :func:`folder_hash`).
    """
    import os

    files = weight_files(folder)
    if os.environ.get(FULL_HASH_ENV) == "1":
        return "sha256:" + folder_hash(folder)
    h = hashlib.sha256()
    blobs = [Path(os.readlink(f)).name if f.is_symlink() else "" for f in files]
    if files and all(_SHA256_NAME.match(b) for b in blobs):
        for f, b in zip(files, blobs):
            h.update(f"{f.name}={b};".encode())
        return "hub:" + h.hexdigest()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        with f.open("rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(head + fh.read(min(n, 1 << 26)))
    return "stat:" + h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
