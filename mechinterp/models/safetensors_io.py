"""Reading safetensors files without loading them: header checks, tensor streaming, hashing."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open

from ..errors import CorruptCheckpoint
from ..store.hashing import content_hash, sha256_file


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
    index = tensor_index(folder)
    wanted = names if names is not None else list(index)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        if name not in index:
            raise CorruptCheckpoint(f"{folder} has no tensor {name}", "is it the same architecture?")
        by_file.setdefault(index[name][0], []).append(name)
    for f, names_in_file in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for name in names_in_file:
                yield name, fh.get_tensor(name)


# the files of a checkpoint folder that decide what a model computes, besides its weights
_CONFIG_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
                              r"vocab\.(json|txt)|merges\.txt|chat_template\..*|.*\.model)$")


def input_kind(name: str) -> str:
    """``weights``, ``config`` or ``tokenizer``: what a file of :func:`model_files` is."""
    if name.endswith(".safetensors"):
        return "weights"
    return "config" if name in _CONFIG_FILES else "tokenizer"


def model_files(folder: Path) -> dict[str, str]:
    """``{file name: sha256 of its content}`` for every file of a checkpoint folder a model reads:
    weights, ``config.json`` / ``generation_config.json`` and the tokenizer files. Each content is
    hashed once (:func:`mechinterp.store.hashing.content_hash`); a re-check of an unchanged file is a
    ``stat``."""
    folder = Path(folder)
    names = [f.name for f in weight_files(folder)]
    names += sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and (p.name in _CONFIG_FILES or _TOKENIZER_FILES.match(p.name)))
    return {n: content_hash(folder / n) for n in names}


def folder_hash(folder: Path) -> str:
    """SHA-256 over the folder's weight files (each file's name and content hash)."""
    h = hashlib.sha256()
    for f in weight_files(folder):
        h.update(f"{f.name}={content_hash(f)};".encode())
    return h.hexdigest()


def weights_identity(folder: Path) -> str:
    """The identity of a checkpoint's weights: ``sha256:`` + :func:`folder_hash`, from content
    hashes computed once per file content (hub blobs by their content address, free) and then
    re-checked with a ``stat``; two copies of the same bytes have the same identity, and no
    size/mtime coincidence can pass other bytes off as these."""
    return "sha256:" + folder_hash(folder)


def file_sha256(path: Path) -> str:
    return sha256_file(path)
