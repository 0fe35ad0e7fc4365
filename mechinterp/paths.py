"""Where things live on disk: the model cache and the data root."""

from __future__ import annotations

import os
from pathlib import Path


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
    from .errors import DataError

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
