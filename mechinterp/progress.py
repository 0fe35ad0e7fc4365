"""Progress bars for long work: rich in a terminal, silent otherwise (CI logs, pipes)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def enabled() -> bool:
    if os.environ.get("MECHINTERP_PROGRESS") in ("0", "off"):
        return False
    if os.environ.get("MECHINTERP_PROGRESS") in ("1", "on"):
        return True
    return sys.stderr.isatty()


def new_bar(transient: bool = True):
    """The house progress bar (description, bar, n/total, elapsed, remaining)."""
    from rich.progress import (
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
