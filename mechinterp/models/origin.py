"""Where a model's weights come from, as far as precision goes: dequantised from a GGUF or not.

The built-in default model is SmolLM2-135M-Instruct *dequantised from a Q4_1 GGUF*. A fine-tune of
the original (unquantised) SmolLM2 weights passes every compatibility check against it, and
weight-change would then report the quantisation noise (about 5% of every weight) as fine-tuning.
So a folder made from a GGUF carries ``mechinterp-origin.json``; a training output inherits its
base's origin through ``train-config.json``
(:func:`~mechinterp.models.specs.quantisation_origin`, which resolves the base's spec); :class:`~mechinterp.models.modelset.ModelSet` warns
when base and variant differ, and provenance records it.
"""

from __future__ import annotations

import json
from pathlib import Path

ORIGIN_FILE = "mechinterp-origin.json"


def gguf_file_type(gguf: Path) -> str:
    """The GGUF's ``general.file_type`` as llama.cpp names it (``MOSTLY_Q4_1``); the file name's
    quantisation tag when the field is absent."""
    import gguf as gg  # deferred: the gguf package is only needed for GGUF files

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


def read_origin(folder: Path) -> dict | None:
    """The origin record written into ``folder`` itself, or None (none, or unreadable)."""
    own = Path(folder) / ORIGIN_FILE
    if not own.is_file():
        return None
    try:
        return json.loads(own.read_text())
    except ValueError:
        return None


def write_gguf_origin(folder: Path, gguf_name: str, file_type: str, sha256: str) -> None:
    (Path(folder) / ORIGIN_FILE).write_text(json.dumps(
        {"dequantised_from": gguf_name, "file_type": file_type, "gguf_sha256": sha256},
        indent=1) + "\n")


def origin_label(origin: dict | None) -> str:
    return "plain weights" if origin is None else \
        f"dequantised from {origin.get('file_type', '?')} ({origin.get('dequantised_from', '?')})"
