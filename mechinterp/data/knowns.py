"""ROME's known facts (``knowns/known_1000.json``: 1,209 subject-relation-object prompts)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import DataError
from .base import DataSource, read_text

_FIELDS = ("known_id", "subject", "attribute", "template", "prediction", "prompt", "relation_id")
_TYPES = {f: (int if f == "known_id" else str) for f in _FIELDS}


@dataclass(frozen=True)
class KnownFact:
    known_id: int
    subject: str
    attribute: str
    template: str
    prediction: str
    prompt: str
    relation_id: str


def load_knowns(source: DataSource) -> list[KnownFact]:
    folder = source.folder("knowns")
    if folder is None:
        raise DataError("the known-facts set has no hub copy this suite reads",
                        "set --data-dir or MECHINTERP_DATA to a folder with knowns/known_1000.json")
    path = folder / "known_1000.json"
    if not path.is_file():
        raise DataError(f"{path} is missing", "the data root must hold knowns/known_1000.json")
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})",
                        "fix or re-download the file") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of facts", "fix or re-download the file")
    source.log.record_file(path)
    facts = []
    for i, row in enumerate(rows):
        missing = [f for f in _FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise DataError(f"{path}: fact #{i} lacks field {missing[0]!r}",
                            f"each fact needs {', '.join(_FIELDS)}")
        wrong = [f for f in _FIELDS if not isinstance(row[f], _TYPES[f]) or isinstance(row[f], bool)]
        if wrong:
            f = wrong[0]
            raise DataError(f"{path}: fact #{i} has {f}={row[f]!r}, not a {_TYPES[f].__name__}",
                            "fix or re-download the file")
        facts.append(KnownFact(**{f: row[f] for f in _FIELDS}))
    return facts
