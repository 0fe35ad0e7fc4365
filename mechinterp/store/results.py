"""The result store: plain JSON (+ NPZ for big arrays) with provenance, written atomically.

Layout: ``OUT/<probe>/result.json`` (+ ``arrays.npz``, figures ``*.png`` / ``*.pdf``). NaN and
infinity are ``null`` in the JSON (strict JSON, readable by any tool) and listed by path under
``nonfinite``, so :func:`read_result` gives back exactly the floats the probe returned. A result
folder is built in a temporary sibling and renamed into place in one step, so a crash never leaves
a half-written ``result.json`` that looks complete; a previous result is replaced only on success.
``result.json`` is written last and lists every file the result owns (size and SHA-256), so a
folder that is not whole is seen as such (:func:`incomplete`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import frames
from .hashing import sha256_file
from .locking import writer_lock

RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.npz"


#: How a result finds its probe by name when no runner attached one (a Result read from disk or
#: built by hand): the probe registry installs its lookup here when it is imported
#: (:mod:`mechinterp.core.registry`), so the store never imports a probe.
_probe_finders: list[Callable[[str], Any]] = []


def set_probe_finder(find: Callable[[str], Any]) -> None:
    """Install ``find(name) -> probe object`` as the way results find their probe by name.

    Args:
        find: a function from a probe's name to the probe object (its ``frames``, ``frame_data``
            and ``plot``); it raises for an unknown name.
    """
    _probe_finders[:] = [find]


@dataclass
class Result:
    """What a probe returns, and what the store reads back.

    Args:
        probe: the probe's name (``"weight-change"``).
        data: the JSON-able numbers, keyed as the probe documents them.
        arrays: large arrays, stored in ``arrays.npz``.
        provenance: what made it (the runner fills it: config, model identity, timing, ...).
        files: text files written beside ``result.json`` (e.g. item-level rows as JSONL).
        made_by: the probe object that made it (the runner attaches it; a notebook's own probe
            too); None: the installed probe named ``probe``.

    ``result["key"]`` is ``result.data["key"]``.
    """

    probe: str
    data: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    made_by: Any = field(default=None, repr=False, compare=False)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def probe_object(self) -> Any:
        """The probe that made this result.

        Returns:
            The object the runner ran (``made_by``), else the installed probe of that name.

        Raises:
            UserError: no probe of that name is installed.
        """
        if self.made_by is not None:
            return self.made_by
        if not _probe_finders:
            raise UserError(f"no probe is known for the result of {self.probe!r}",
                            "import mechinterp (its registry finds installed probes)")
        return _probe_finders[0](self.probe)

    def to_frame(self):
        """The numbers as one long table.

        Returns:
            A pandas DataFrame in the long schema every probe shares (:mod:`mechinterp.store.frames`:
            model, run, step, layer, component, ..., metric, value, lo, hi); empty when the probe
            declares no table.
        """
        return frames.to_frame(self)

    def figures(self) -> dict[str, Any]:
        """The probe's figures of this result, drawn in the house style (they display inline in
        Jupyter; nothing is saved).

        Returns:
            ``{name: matplotlib Figure}``.
        """
        from ..plotting.style import house_style  # matplotlib

        with house_style():
            return self.probe_object().plot(self)


def jsonable(obj: Any, path: tuple = (), nonfinite: list | None = None) -> Any:
    """Convert numpy/torch scalars and arrays to JSON values. JSON has no NaN or infinity: such a
    float becomes ``null`` and, when ``nonfinite`` is given, its path and value are appended to it
    so that :func:`read_result` can put it back (a stored NaN reads as NaN, not ``None``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, path + (str(k),), nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, path + (i,), nonfinite) for i, v in enumerate(obj)]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist(), path, nonfinite)
    if isinstance(obj, float) and not math.isfinite(obj):
        if nonfinite is not None:
            nonfinite.append([list(path), repr(obj)])  # 'nan', 'inf' or '-inf'
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _restore_nonfinite(section: Any, entries: list) -> None:
    """Put the non-finite floats recorded by :func:`jsonable` back into ``section``."""
    for path, text in entries:
        node = section
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = float(text)


STORE_VERSION = 2  # result.json lists the files it owns; inputs are content-hashed
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=,-]{0,150}")
_RESERVED = (RESULT_FILE, ARRAYS_FILE)


def safe_name(name: str) -> str:
    """``name`` as one plain file name: itself when it is one, else its unsafe characters
    (``/``, spaces, ...) replaced and a short hash of the whole name appended (``sft@sub/step-2``
    -> ``sft@sub_step-2-1a2b3c4d``, an extension kept at the end), so that model names and hub revisions never become paths."""
    if _SAFE.fullmatch(name) and name not in _RESERVED:
        return name
    base, dot, ext = name.rpartition(".")
    if not (dot and base and re.fullmatch(r"[A-Za-z0-9]{1,8}", ext)):
        base, ext = name, ""
    stem = re.sub(r"[^A-Za-z0-9._+@=,-]", "_", base)[:120].lstrip(".") or "file"
    return f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}{'.' + ext if ext else ''}"


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _owned(folder: Path) -> dict[str, dict]:
    """``{file: {"size", "sha256"}}`` for every file of a result folder but ``result.json``."""
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != RESULT_FILE}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system has no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def temp_siblings(folder: Path) -> list[Path]:
    """Temporary folders a writer of ``folder`` makes beside it (left behind only by a crash)."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return []
    return [p for p in folder.parent.iterdir()
            if p.name.startswith(f".{folder.name}.tmp-") and p.is_dir()]


def remove_temp_siblings(folder: Path) -> None:
    """Remove what a killed writer of ``folder`` left; call it holding the folder's writer lock."""
    for p in temp_siblings(folder):
        shutil.rmtree(p, ignore_errors=True)


def write_result(result: Result, folder: Path, figures: dict[str, Any] | None = None) -> Path:
    """Commit ``folder`` whole or not at all: the result, its arrays, files, long table and
    ``figures`` are written into a temporary sibling, ``result.json`` last (listing every file
    it owns with size and SHA-256), then swapped into place in one rename.

    A figure that fails to save is recorded in ``result.provenance["figure_errors"]`` (reuse
    draws it again); a full disk raises :class:`~mechinterp.errors.UserError` and leaves the
    previous result as it was. The folder gets the permissions of the umask. One writer at a
    time: the write holds the parent folder's writer lock (:mod:`mechinterp.store.locking`)."""
    folder = Path(folder)
    with writer_lock(folder.parent):
        return _write_result(result, folder, figures)


def _write_result(result: Result, folder: Path, figures: dict[str, Any] | None) -> Path:
    remove_temp_siblings(folder)  # what a killed writer left (we hold the lock)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        names: dict[str, str] = {}
        for name, text in result.files.items():
            disk = names[name] = safe_name(name)
            (tmp / disk).write_text(text)
        if len(set(names.values())) != len(names):
            raise ValueError(f"result files {sorted(names)} map to clashing file names")
        if result.arrays:
            np.savez_compressed(tmp / ARRAYS_FILE, **result.arrays)
        drawn = _save_figures(figures, tmp, result.provenance) if figures else {}
        frames.write_parquet(result, tmp)  # the long table beside result.json (when the probe has one)
        nonfinite: dict[str, list] = {"data": [], "provenance": []}
        payload = {"probe": result.probe,
                   "data": jsonable(result.data, (), nonfinite["data"]),
                   "provenance": jsonable(result.provenance, (), nonfinite["provenance"]),
                   "arrays": sorted(result.arrays), "store": STORE_VERSION}
        if any(nonfinite.values()):
            # JSON readers see null; read_result restores NaN / inf from these paths
            payload["nonfinite"] = {k: v for k, v in nonfinite.items() if v}
        if names:
            payload["files"] = dict(sorted(names.items()))
        payload["figures"] = drawn
        payload["owned"] = _owned(tmp)
        (tmp / RESULT_FILE).write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
        if not (folder.exists() and _exchange(tmp, folder)):
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
                folder.rename(old / "old")
            tmp.rename(folder)
        # after an exchange ``tmp`` holds the previous result; removed in the finally below
    except OSError as exc:
        if _disk_full(exc):
            raise UserError(f"no space left on the disk of {folder.parent} while writing "
                            f"{folder.name} ({exc.strerror})",
                            "free some space and run again: finished results are reused") from None
        raise
    finally:
        remove_temp_siblings(folder)
    return folder / RESULT_FILE


def _malformed(path: Path, what: str):
    return UserError(f"{path} is malformed ({what})", "re-run the probe to rewrite it")


def read_payload(folder: Path) -> dict:
    """The parsed ``result.json`` of ``folder``, checked for the keys a result needs."""
    path = Path(folder) / RESULT_FILE
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no {RESULT_FILE} in {folder}", "run a probe with --out first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)})",
                        "re-run the probe") from None
    if not isinstance(payload, dict):
        raise _malformed(path, "not a JSON object")
    for key, kind in (("probe", str), ("data", dict)):
        if not isinstance(payload.get(key), kind):
            raise _malformed(path, f"no {key!r} {kind.__name__}")
    for key, kind in (("provenance", dict), ("arrays", list), ("nonfinite", dict),
                      ("files", (list, dict)), ("owned", dict), ("figures", dict)):
        if key in payload and not isinstance(payload[key], kind):
            raise _malformed(path, f"{key!r} has the wrong type")
    return payload


def incomplete(folder: Path, payload: dict) -> list[str]:
    """The files ``result.json`` lists as its own that are missing or not as written (size and
    SHA-256); [] when the folder is whole. A result without that list (an older store) is
    reported as such."""
    owned = payload.get("owned")
    if payload.get("store") != STORE_VERSION or not isinstance(owned, dict):
        return ["written by an older result store"]
    bad = []
    for name, meta in owned.items():
        path = Path(folder) / name
        try:
            ok = (isinstance(meta, dict) and path.stat().st_size == meta.get("size")
                  and sha256_file(path) == meta.get("sha256"))
        except OSError:
            ok = False
        if not ok:
            bad.append(name)
    return bad


def read_result(folder: Path) -> Result:
    """A stored result, exactly as its probe returned it (NaN and infinity restored).

    Args:
        folder: a result folder (``OUT/<probe>/``, holding ``result.json``).

    Returns:
        The :class:`Result`; ``figures()`` and ``to_frame()`` find its probe by name.

    Raises:
        UserError: ``result.json`` is missing or malformed, or a file it lists is missing.
    """
    folder = Path(folder)
    path = folder / RESULT_FILE
    payload = read_payload(folder)
    arrays = {}
    if payload.get("arrays"):
        if not (folder / ARRAYS_FILE).is_file():
            raise UserError(f"{path} lists arrays but {ARRAYS_FILE} is missing from {folder}",
                            "copy the whole result folder, or re-run the probe")
        try:
            with np.load(folder / ARRAYS_FILE) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"{folder / ARRAYS_FILE} is unreadable ({type(exc).__name__})",
                            "re-run the probe") from None
    listed = payload.get("files", {})
    listed = listed if isinstance(listed, dict) else {n: n for n in listed}
    try:
        files = {name: (folder / str(disk)).read_text() for name, disk in listed.items()}
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} lists a file that is unreadable ({exc})",
                        "copy the whole result folder, or re-run the probe") from None
    provenance = payload.get("provenance", {})
    try:
        for section, entries in payload.get("nonfinite", {}).items():
            _restore_nonfinite(payload["data"] if section == "data" else provenance, entries)
    except (KeyError, IndexError, TypeError, ValueError):
        raise _malformed(path, "its nonfinite list does not match its data") from None
    return Result(payload["probe"], payload["data"], arrays, provenance, files)


def save_figures(figures: dict[str, Any], folder: Path) -> list[Path]:
    """Save matplotlib figures as ``<name>.png`` and ``<name>.pdf`` (names made safe, see
    :func:`safe_name`) in the house style (the PDF font type is read when the file is written);
    closes them."""
    drawn = _save_figures(figures, Path(folder), None)
    return [Path(folder) / f for files in drawn.values() for f in files]


def _save_figures(figures: dict[str, Any], folder: Path,
                  errors: dict | None) -> dict[str, list[str]]:
    """:func:`save_figures`, returning ``{figure: [files]}``. With ``errors`` (a provenance
    dict), a figure that fails to save is recorded in ``errors["figure_errors"]`` and its partial
    files removed; a full disk always raises."""
    import matplotlib.pyplot as plt  # matplotlib

    from ..plotting.style import house_style  # matplotlib

    written: dict[str, list[str]] = {}
    with house_style():
        for name, fig in figures.items():
            files = [f"{safe_name(name)}.{ext}" for ext in ("png", "pdf")]
            try:
                for file in files:
                    fig.savefig(Path(folder) / file, dpi=150 if file.endswith("png") else None,
                                bbox_inches="tight")
                written[name] = files
            except Exception as exc:  # noqa: BLE001 - one figure must not cost the result
                if errors is None or _disk_full(exc):
                    raise
                for file in files:
                    (Path(folder) / file).unlink(missing_ok=True)
                errors.setdefault("figure_errors", []).append(
                    f"{name}: {type(exc).__name__}: {exc}")
            finally:
                plt.close(fig)
    return written


def find_results(root: Path) -> list[Path]:
    """Every folder below ``root`` (itself included) holding a ``result.json``."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob(RESULT_FILE) if not p.parent.name.startswith("."))


def load_results(folder: Path | str):
    """Every stored result under a folder as one long table.

    Args:
        folder: a ``compare`` or ``demo`` output (or any folder holding result folders).

    Returns:
        A pandas DataFrame in the long schema (:mod:`mechinterp.store.frames`), one row per
        number of every result whose probe declares tables; empty (with the schema's columns)
        when there is none.
    """
    import pandas as pd  # pandas

    tables = [frames.to_frame(read_result(p)) for p in find_results(Path(folder))]
    tables = [t for t in tables if not t.empty]
    if not tables:
        return pd.DataFrame(columns=list(frames.COLUMNS))
    return frames.order_columns(pd.concat(tables, ignore_index=True))


MIN_FREE_BYTES = 16 << 20


def check_out(out: Path | str) -> Path:
    """Check a results folder before any work (creating nothing): not a file, writable (or
    creatable), with room on its disk; else one :class:`~mechinterp.errors.UserError`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder",
                        "pass a folder (it is created if missing)")
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {out} cannot be created: {probe} is a file",
                        "pass a folder (it is created if missing)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable ({probe} does not allow writing)",
                        "pass a folder you can write to")
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"the disk of --out {out} is full ({free // 1024} KiB free)",
                        "free some space or pass another --out")
    return out
