"""Numbers as the report prints them: what a probe's ``summary`` uses to write its key numbers
(one line each) the way every other probe writes theirs."""

from __future__ import annotations

import math

import numpy as np


def fmt(x, digits: int = 3) -> str:
    """A number in a short fixed or scientific form; ``n/a`` for None and non-finite floats."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}"
    return str(x)


def interval(ci) -> str:
    """``[lo, hi]`` of a two-number interval ("" when there is none)."""
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def floats(values) -> np.ndarray:
    """A list of numbers (None for a missing one) as a float array, None as NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def nested_floats(x):
    """Nested lists of numbers with None as NaN (for ``np.asarray``)."""
    if isinstance(x, list):
        return [nested_floats(v) for v in x]
    return np.nan if x is None else float(x)


def mean_change(rel: dict[str, list], matrices=None) -> float:
    """Mean relative change over layers and matrices (NaN entries left out)."""
    vals = np.concatenate([floats(rel[m]) for m in (matrices or rel)])
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan


def paired_line(name: str, acc, ci, paired: dict | None) -> str:
    """A model's accuracy with its interval and, when paired against the base on the same items,
    the difference, McNemar's p and the flips each way."""
    line = f"{name}: accuracy {fmt(acc)} {interval(ci)}"
    if paired:
        line += (f"; vs base {paired['difference']:+.3f} {interval(paired['difference_ci95'])}, "
                 f"McNemar p {fmt(paired['mcnemar']['p_value'])}, flips right->wrong "
                 f"{paired['right_to_wrong']}, wrong->right {paired['wrong_to_right']}")
    return line
