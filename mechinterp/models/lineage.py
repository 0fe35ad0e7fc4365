"""Where a checkpoint came from: the training run it belongs to, read from ``train-config.json``.

A training output ``OUT`` holds ``train-config.json``; its final model is ``OUT`` and its snapshots
``OUT/checkpoints/step-N``, so the file is found in the folder or two levels up. The run's *kind*
(``sft``, ``grpo``, ``sft-frozen``, ...) styles its lines in every figure and gives it its role in
the claims, from what was trained rather than from what the run is called.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .run_folder import CONFIG_FILE as TRAIN_CONFIG



def find_train_config(folder: Path | str) -> Path | None:
    """The ``train-config.json`` of the run ``folder`` belongs to (the final model, or a
    checkpoint one or two levels below it); None when there is none."""
    folder = Path(folder)
    for up in (folder, folder.parent, folder.parent.parent):
        if (up / TRAIN_CONFIG).is_file():
            return up / TRAIN_CONFIG
    return None


# the fields of a run's train-config.json that other modules read, and their JSON types
_READ_FIELDS = {"algorithm": str, "base": str, "freeze": str, "freeze_preset": str, "seed": int,
                "processes": int}


def read_run_json(path: Path | str) -> dict:
    """A run's ``train-config.json`` (or ``train-summary.json``) as a dict; a file that is not a
    JSON object, or whose fields read here have the wrong type, is a one-line
    :class:`~mechinterp.errors.UserError` naming it."""
    path = Path(path)
    fix = "restore it from the training run, or train again into a new --out"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc})", fix) from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is a JSON {type(cfg).__name__}, not an object", fix)
    for key, kind in _READ_FIELDS.items():
        v = cfg.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            raise UserError(f"{path}: {key}={v!r} is not of type {kind.__name__}", fix)
    return cfg


#: the fields of a run's train-config.json that say what was frozen
FREEZE_FIELDS = ("freeze", "freeze_preset")


def run_kind(algorithm: str | None, frozen: bool) -> str | None:
    """The one rule that names a run's kind.

    Args:
        algorithm: ``sft`` / ``grpo`` (None or empty: unknown).
        frozen: whether any part of the model was frozen in training.

    Returns:
        ``sft``, ``grpo``, ``sft-frozen``, ``grpo-frozen``; None without an algorithm.
    """
    if not algorithm:
        return None
    return algorithm + ("-frozen" if frozen else "")


def freeze_text(cfg: dict) -> str:
    """What a run froze, from its train-config fields (``freeze`` and ``freeze_preset`` joined by a
    comma), ``""`` when nothing was frozen."""
    return ",".join(cfg[k] for k in FREEZE_FIELDS if cfg.get(k))


def kind_of(cfg: dict) -> str | None:
    """The kind of the run a train-config dict describes (:func:`run_kind`)."""
    return run_kind(cfg.get("algorithm"), bool(freeze_text(cfg)))


def role_from_name(name: str) -> dict[str, str]:
    """A model named ``sft...``, ``grpo...`` (``...frozen...``) but without training metadata:
    ``{"algorithm", "freeze"}`` read from the name (``freeze`` is ``"frozen"`` or ``""``), ``{}``
    when the name says neither."""
    low = name.lower()
    for algorithm in ("grpo", "sft"):
        if low.startswith(algorithm):
            return {"algorithm": algorithm, "freeze": "frozen" if "frozen" in low else ""}
    return {}


def training_kind(folder: Path | str) -> str | None:
    """The kind of the run ``folder`` belongs to, or None for a model no run of ours made."""
    path = find_train_config(folder)
    if path is None:
        return None
    try:
        return kind_of(read_run_json(path))
    except UserError:  # only styles a figure: compare refuses such a run before it gets here
        return None
