"""Where a model's weights come from, as far as precision goes: dequantised from a GGUF or not.

The built-in default model is SmolLM2-135M-Instruct *dequantised from a Q4_1 GGUF*. A fine-tune of
the original (unquantised) SmolLM2 weights passes every compatibility check against it, and
weight-change would then report the quantisation noise (about 5% of every weight) as fine-tuning.
So a folder made from a GGUF carries ``mechinterp-origin.json``; a training output inherits its
base's origin through ``train-config.json``; :class:`~mechinterp.models.modelset.ModelSet` warns
when base and variant differ, and provenance records it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .lineage import find_train_config

ORIGIN_FILE = "mechinterp-origin.json"


def gguf_file_type(gguf: Path) -> str:
    """The GGUF's ``general.file_type`` as llama.cpp names it (``MOSTLY_Q4_1``); the file name's
    quantisation tag when the field is absent."""
    import gguf as gg

    reader = gg.GGUFReader(str(gguf))
    field = reader.fields.get("general.file_type")
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        try:
            return gg.LlamaFileType(value).name
        except ValueError:
            return f"file_type {value}"
    stem = Path(gguf).stem
    return stem.rsplit(".", 1)[-1] if "." in stem else "unknown"


def write_gguf_origin(folder: Path, gguf_name: str, file_type: str, sha256: str) -> None:
    (Path(folder) / ORIGIN_FILE).write_text(json.dumps(
        {"dequantised_from": gguf_name, "file_type": file_type, "gguf_sha256": sha256},
        indent=1) + "\n")


def quantisation_origin(folder: Path, _depth: int = 0) -> dict | None:
    """The folder's origin record, else its training base's (``OUT`` and ``OUT/checkpoints/
    step-N`` find ``OUT/train-config.json``), else None (plain weights as far as we know)."""
    folder = Path(folder)
    own = folder / ORIGIN_FILE
    if own.is_file():
        try:
            return json.loads(own.read_text())
        except ValueError:
            return None
    if _depth > 4:  # a run trained from a run trained from ...: stop somewhere
        return None
    cfg = find_train_config(folder)
    if cfg is None:
        return None
    try:
        base = json.loads(cfg.read_text()).get("base")
        from .specs import resolve

        found = quantisation_origin(resolve(base).path, _depth + 1) if base else None
    except Exception:  # noqa: BLE001 - a base that no longer resolves: origin unknown
        return None
    return None if found is None else {**found, "inherited_from": str(base)}


def origin_label(origin: dict | None) -> str:
    return "plain weights" if origin is None else \
        f"dequantised from {origin.get('file_type', '?')} ({origin.get('dequantised_from', '?')})"
