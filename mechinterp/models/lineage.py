"""Where a checkpoint came from: the training run it belongs to, read from ``train-config.json``.

A training output ``OUT`` holds ``train-config.json``; its final model is ``OUT`` and its snapshots
``OUT/checkpoints/step-N``, so the file is found in the folder or two levels up. The run's *kind*
(``sft``, ``grpo``, ``sft-frozen``, ...) styles its lines in every figure and gives it its role in
the claims, from what was trained rather than from what the run is called.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN_CONFIG = "train-config.json"  # mechinterp.training.runner.CONFIG_FILE (no import cycle)


def find_train_config(folder: Path | str) -> Path | None:
    folder = Path(folder)
    for up in (folder, folder.parent, folder.parent.parent):
        if (up / TRAIN_CONFIG).is_file():
            return up / TRAIN_CONFIG
    return None


def kind_of(cfg: dict) -> str | None:
    """``sft`` / ``grpo``, with ``-frozen`` when any part was frozen; None without an algorithm."""
    algo = cfg.get("algorithm")
    if not algo:
        return None
    frozen = any(cfg.get(k) for k in ("freeze", "freeze_preset"))
    return algo + ("-frozen" if frozen else "")


def training_kind(folder: Path | str) -> str | None:
    """The kind of the run ``folder`` belongs to, or None for a model no run of ours made."""
    path = find_train_config(folder)
    if path is None:
        return None
    try:
        return kind_of(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
