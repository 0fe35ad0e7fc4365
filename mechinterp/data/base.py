"""Data source: a local root or the hub, and a log of what was read (for provenance)."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..paths import data_root
from ..store.hashing import content_hash


def read_text(path: Path) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 stop with ``path:line`` and the byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start})", "re-save the file as UTF-8 or re-download it") from None


def read_jsonl(path: Path, fields: dict[str, tuple[type, ...]]) -> list[tuple[int, dict]]:
    """``(line number, row)`` for each non-blank line of a JSONL file, checked for ``fields``.

    A line that is not JSON, not an object, or lacks a field of the given types stops with
    ``path:line`` and what was expected.
    """
    rows = []
    with io.StringIO(read_text(path)) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg})",
                                "fix or re-download the file") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), t)
                                                    for k, t in fields.items()):
                raise DataError(f"{path}:{line_no}: expected a JSON object with fields "
                                f"{', '.join(fields)}", "fix the row")
            rows.append((line_no, row))
    return rows


@dataclass
class DataLog:
    """Files (with the sha256 of their content) and hub datasets a run read, and the data root
    they were read from: the result store re-checks these files before it reuses a result."""

    files: dict[str, str] = field(default_factory=dict)
    hub: list[str] = field(default_factory=list)
    root: Path | None = None

    def record_file(self, path: Path) -> None:
        key = str(path)
        if key not in self.files:
            self.files[key] = content_hash(path)

    def record_hub(self, name: str) -> None:
        if name not in self.hub:
            self.hub.append(name)

    def to_json(self) -> dict:
        return {"files": dict(sorted(self.files.items())), "hub": list(self.hub),
                "root": None if self.root is None else str(self.root)}


@dataclass
class DataSource:
    """Where data comes from: ``root`` (a folder) or None for the hub."""

    root: Path | None = None
    log: DataLog = field(default_factory=DataLog)

    def __post_init__(self):
        self.log.root = self.root

    @classmethod
    def from_option(cls, data_dir: str | os.PathLike | None = None) -> DataSource:
        return cls(data_root(data_dir))

    def folder(self, name: str) -> Path | None:
        """``root/name`` if the root is set (error if that folder is missing), else None."""
        if self.root is None:
            return None
        sub = self.root / name
        if not sub.is_dir():
            raise DataError(f"data root {self.root} has no {name}/ folder",
                            f"point --data-dir / MECHINTERP_DATA at a folder with {name}/ inside")
        return sub

    def hub_dataset(self, repo: str, config: str | None, split: str):
        """A split from the hub; a clear error when offline."""
        try:
            from datasets import load_dataset  # deferred: datasets is heavy; only the hub needs it

            ds = load_dataset(repo, config, split=split)
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"no data root set and the hub dataset {repo} ({config or 'default'}/{split}) could "
                f"not be loaded: {type(exc).__name__}",
                "set --data-dir or MECHINTERP_DATA to a local data folder (e.g. ../shared/data)",
            ) from None
        self.log.record_hub(f"{repo}:{config or 'default'}:{split}")
        return ds
