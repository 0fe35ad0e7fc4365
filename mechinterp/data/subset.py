"""A fixed, seeded selection of at most ``limit`` items (what ``BaseConfig.limit`` means)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def seeded_subset(items: Sequence[T], limit: int | None, seed: int = 0) -> list[T]:
    """All items if ``limit`` is None or not smaller; else ``limit`` of them, seeded, in order."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
