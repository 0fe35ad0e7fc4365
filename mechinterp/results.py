"""The result store: plain JSON (+ NPZ for big arrays) with provenance, written atomically.

Layout: ``OUT/<probe>/result.json`` (+ ``arrays.npz``, figures ``*.png`` / ``*.pdf``). NaN and
infinity are ``null`` in the JSON (strict JSON, readable by any tool) and listed by path under
``nonfinite``, so :func:`read_result` gives back exactly the floats the probe returned. A result
folder is built in a temporary sibling and renamed into place in one step, so a crash never leaves
a half-written ``result.json`` that looks complete; a previous result is replaced only on success.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.npz"


@dataclass
class Result:
    """What a probe returns: JSON-able ``data``, optional large ``arrays``, provenance, and
    optional text ``files`` written beside ``result.json`` (e.g. item-level rows as JSONL)."""

    probe: str
    data: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_frame(self):
        """The numbers as a pandas DataFrame in the long schema every probe shares
        (:mod:`mechinterp.frames`: model, run, step, layer, component, ..., metric, value, lo,
        hi)."""
        from .frames import to_frame

        return to_frame(self)

    def probe_object(self):
        """The probe that made this result: the object the runner ran (a notebook's own probe
        too), else the installed probe of that name."""
        from .probe import get_probe

        return getattr(self, "_probe", None) or get_probe(self.probe)

    def figures(self) -> dict[str, Any]:
        """The probe's figures of this result, drawn in the house style (they display inline
        in Jupyter; nothing is saved)."""
        from .plotting.style import house_style

        with house_style():
            return self.probe_object().plot(self)


def _jsonable(obj: Any, path: tuple = (), nonfinite: list | None = None) -> Any:
    """Convert numpy/torch scalars and arrays to JSON values. JSON has no NaN or infinity: such a
    float becomes ``null`` and, when ``nonfinite`` is given, its path and value are appended to it
    so that :func:`read_result` can put it back (a stored NaN reads as NaN, not ``None``)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, path + (str(k),), nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, path + (i,), nonfinite) for i, v in enumerate(obj)]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _jsonable(obj.tolist(), path, nonfinite)
    if isinstance(obj, float) and not math.isfinite(obj):
        if nonfinite is not None:
            nonfinite.append([list(path), repr(obj)])  # 'nan', 'inf' or '-inf'
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _restore_nonfinite(section: Any, entries: list) -> None:
    """Put the non-finite floats recorded by :func:`_jsonable` back into ``section``."""
    for path, text in entries:
        node = section
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = float(text)


def write_result(result: Result, folder: Path, figures: dict[str, Any] | None = None) -> Path:
    """Atomically (re)write ``folder`` with the result, its arrays and its figures."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        nonfinite: dict[str, list] = {"data": [], "provenance": []}
        payload = {"probe": result.probe,
                   "data": _jsonable(result.data, (), nonfinite["data"]),
                   "provenance": _jsonable(result.provenance, (), nonfinite["provenance"]),
                   "arrays": sorted(result.arrays)}
        if any(nonfinite.values()):
            # JSON readers see null; read_result restores NaN / inf from these paths
            payload["nonfinite"] = {k: v for k, v in nonfinite.items() if v}
        if result.files:
            payload["files"] = sorted(result.files)
        for name, text in result.files.items():
            if Path(name).name != name or name in (RESULT_FILE, ARRAYS_FILE):
                raise ValueError(f"result file name {name!r} must be a plain, unreserved file name")
            (tmp / name).write_text(text)
        if result.arrays:
            np.savez_compressed(tmp / ARRAYS_FILE, **result.arrays)
        if figures:
            save_figures(figures, tmp)
        from .frames import write_parquet

        write_parquet(result, tmp)  # the long table beside result.json (when the probe has one)
        (tmp / RESULT_FILE).write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / RESULT_FILE


def read_result(folder: Path) -> Result:
    from .errors import UserError

    folder = Path(folder)
    path = folder / RESULT_FILE
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no {RESULT_FILE} in {folder}", "run a probe with --out first") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg})", "re-run the probe") from None
    arrays = {}
    if payload.get("arrays"):
        if not (folder / ARRAYS_FILE).is_file():
            raise UserError(f"{path} lists arrays but {ARRAYS_FILE} is missing from {folder}",
                            "copy the whole result folder, or re-run the probe")
        with np.load(folder / ARRAYS_FILE) as npz:
            arrays = {k: npz[k] for k in npz.files}
    files = {name: (folder / name).read_text() for name in payload.get("files", [])}
    provenance = payload.get("provenance", {})
    for section, entries in payload.get("nonfinite", {}).items():
        _restore_nonfinite(payload["data"] if section == "data" else provenance, entries)
    return Result(payload["probe"], payload["data"], arrays, provenance, files)


def save_figures(figures: dict[str, Any], folder: Path) -> list[Path]:
    """Save matplotlib figures as ``<name>.png`` and ``<name>.pdf`` in the house style (the PDF
    font type is read when the file is written); closes them."""
    import matplotlib.pyplot as plt

    from .plotting.style import house_style

    written = []
    with house_style():
        for name, fig in figures.items():
            for ext in ("png", "pdf"):
                path = Path(folder) / f"{name}.{ext}"
                fig.savefig(path, dpi=150 if ext == "png" else None, bbox_inches="tight")
                written.append(path)
            plt.close(fig)
    return written


def find_results(root: Path) -> list[Path]:
    """Every folder below ``root`` (itself included) holding a ``result.json``."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob(RESULT_FILE) if not p.parent.name.startswith("."))
