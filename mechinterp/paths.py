"""Where things live on disk: the model cache, the data root, and the step a checkpoint's name
carries."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DataError


def cache_dir() -> Path:
    """The model cache: ``MECHINTERP_CACHE``, else ``$XDG_CACHE_HOME/mechinterp``, else ``~/.cache``."""
    env = os.environ.get("MECHINTERP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mechinterp"


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data root: ``explicit`` (``--data-dir``), else ``MECHINTERP_DATA``, else None (use the hub)."""
    chosen = explicit if explicit is not None else os.environ.get("MECHINTERP_DATA")
    if chosen is None or str(chosen) == "":
        return None
    root = Path(chosen).expanduser()
    if not root.is_dir():
        source = "--data-dir" if explicit is not None else "MECHINTERP_DATA"
        raise DataError(
            f"data root {root} (from {source}) is not a folder",
            "point it at a folder holding mmlu/, knowns/ and gsm8k/, e.g. ../shared/data",
        )
    return root


_STEP = re.compile(r"(?:step|checkpoint)[-_]?0*(\d+)", re.IGNORECASE)


def checkpoint_step(name: str, folder: bool = False) -> int | None:
    """The training step a checkpoint's name carries, or None when it names none: the one step
    parser (``@all`` listings, trajectories, frames, training's resume).

    A spec or label: the last step-like part after the first ``@`` (``sft@step-40`` -> 40, hub
    revision ``v01.14-step-000000029`` -> 29, ``checkpoint-500`` -> 500). ``folder=True``: the
    whole name must be a checkpoint folder's, ``step-N`` or ``checkpoint-N`` (or ``_N``, ``N``).
    """
    if folder:
        m = _STEP.fullmatch(name)
        return int(m.group(1)) if m else None
    label = name.split("@", 1)[1] if "@" in name else name
    found = _STEP.findall(label)
    return int(found[-1]) if found else None
