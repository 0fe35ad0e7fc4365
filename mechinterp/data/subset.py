"""Seeded item selections: what ``BaseConfig.limit`` means in every probe.

``limit`` is the total number of data items a probe uses, whatever the number of prompt sets:

* :func:`seeded_subset` - a fixed, seeded selection of at most ``limit`` items of one list;
* :func:`split_limit` - how a total ``limit`` is shared between several prompt sets (as evenly as
  their sizes allow), each share then a :func:`seeded_subset` of its set;
* :func:`screened_subset` - the first ``limit`` items of a seeded order of all items that pass a
  test (causal tracing keeps facts the base knows), screening no more items than it needs.

The three draw from ``random.Random(seed).sample``. ``sample`` draws a small ``k`` of many items
differently from a whole permutation, so :func:`screened_subset` with a test every item passes
picks other items than :func:`seeded_subset`; both are kept as they are so that stored results
stay reproducible.

A ``limit`` larger than the set is no error: every item is used and :func:`note_limit` says so
(one line from the CLI, recorded in the result's provenance as ``notes``).
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


class LimitNotice(UserWarning):
    """A ``limit`` larger than the set it selects from: every item is used."""


_NOTES: contextvars.ContextVar[tuple[list[str], Callable[[str], None]] | None] = \
    contextvars.ContextVar("limit_notes", default=None)


def note_limit(limit: int | None, available: int) -> None:
    """Say (once per run) that ``limit`` exceeds the ``available`` items and all are used: into
    the list of :func:`collect_notes` when one is open (the runner prints and records it), else
    as a :class:`LimitNotice` warning."""
    if limit is None or limit <= available:
        return
    msg = f"limit {limit} exceeds the set's {available} items; using all {available}"
    open_ = _NOTES.get()
    if open_ is None:
        warnings.warn(msg, LimitNotice, stacklevel=3)
    elif msg not in open_[0]:
        open_[0].append(msg)
        open_[1](msg)


@contextlib.contextmanager
def collect_notes(say: Callable[[str], None] = lambda _: None) -> Iterator[list[str]]:
    """Collect the :func:`note_limit` notices of the code run inside; ``say`` hears each at once."""
    notes: list[str] = []
    token = _NOTES.set((notes, say))
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def seeded_subset(items: Sequence[T], limit: int | None, seed: int = 0) -> list[T]:
    """All items if ``limit`` is None or not smaller; else ``limit`` of them, seeded, in order."""
    if limit is None or limit >= len(items):
        note_limit(limit, len(items))
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def split_limit(limit: int | None, sizes: Sequence[int]) -> list[int]:
    """Items to take from each of several sets of ``sizes`` so that they add up to ``limit``
    (or to every item, when fewer): equal shares, the first sets taking the remainder, and a
    share a set cannot fill passed on to the others. ``limit`` None: every item of every set."""
    if limit is None:
        return list(sizes)
    note_limit(limit, sum(sizes))
    take = [0] * len(sizes)
    left = limit
    open_ = [i for i, s in enumerate(sizes) if s > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for rank, i in enumerate(open_):
            add = min(sizes[i] - take[i], share + (rank < extra))
            take[i] += add
            left -= add
        open_ = [i for i in open_ if take[i] < sizes[i]]
    return take


def screened_subset(items: Sequence[T], limit: int | None, seed: int,
                    accept: Callable[[T], bool],
                    progress: Callable[[], None] | None = None) -> tuple[list[T], int]:
    """The first ``limit`` items of a seeded order of all ``items`` for which ``accept`` holds (all
    accepted items when ``limit`` is None), in their original order; and how many were screened.
    ``progress`` is called once per accepted item."""
    note_limit(limit, len(items))
    order = random.Random(seed).sample(range(len(items)), len(items))
    keep: list[int] = []
    screened = 0
    for i in order:
        if limit is not None and len(keep) >= limit:
            break
        screened += 1
        if accept(items[i]):
            keep.append(i)
            if progress is not None:
                progress()
    return [items[i] for i in sorted(keep)], screened
