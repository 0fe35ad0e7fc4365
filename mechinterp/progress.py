"""Progress bars for long work: rich in a terminal and in Jupyter (as a widget), silent in CI
logs and pipes."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def in_jupyter() -> bool:
    """Inside a Jupyter kernel (where stderr is no tty, yet a bar is what the user wants)."""
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:  # noqa: BLE001
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def enabled() -> bool:
    """Bars on in a terminal and in Jupyter, off in pipes and CI logs; ``MECHINTERP_PROGRESS``
    (``0``/``1``) overrides."""
    if os.environ.get("MECHINTERP_PROGRESS") in ("0", "off"):
        return False
    if os.environ.get("MECHINTERP_PROGRESS") in ("1", "on"):
        return True
    return sys.stderr.isatty() or in_jupyter()


def new_bar(transient: bool = True):
    """The house progress bar (description, bar, n/total, elapsed, remaining)."""
    from rich.progress import (  # rich
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=transient)


@contextmanager
def task(description: str, total: int | None):
    """``with task("tracing", n) as advance: ... advance()`` - a bar, or nothing when quiet."""
    if not enabled():
        yield lambda n=1: None
        return
    with new_bar(transient=True) as prog:
        tid = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(tid, n)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with task(description, total if total is not None else len(items)) as advance:
        for item in items:
            yield item
            advance()


def quiet_library_bars() -> None:
    """transformers draws a bar per model load ("Loading weights"), datasets one per map (TRL's
    tokenising), and transformers warns of its own renamed options on every trainer: ours say
    what is going on instead. The CLI and ``mi.run`` call this; ours remain."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
