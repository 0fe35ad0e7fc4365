"""Quantities over the checkpoints of training runs: steps, line styles, one trajectory plot.

A *run* is a list of checkpoint variant names in training order (``ModelSet.runs``); the training
step of a checkpoint is read from its label (:func:`~mechinterp.models.specs.checkpoint_step`:
``sft@step-40`` -> 40, hub revision ``v01.14-step-000000029`` -> 29, ``checkpoint-500`` -> 500).
Runs whose labels carry no step are plotted against the checkpoint index instead.

Line style follows the run's kind from its training metadata (:data:`KIND_LINESTYLE`: GRPO solid,
SFT dashed, frozen SFT dotted), recorded by the runner in ``provenance["run_kinds"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..models.specs import checkpoint_step


def run_steps(runs: Mapping[str, Sequence[str]]) -> dict[str, int | None]:
    """``{checkpoint variant: step or None}`` for every checkpoint of every run."""
    return {name: checkpoint_step(name) for names in runs.values() for name in names}


#: line style per run kind (from the training metadata: algorithm, frozen parts), the same in
#: every figure; runs of unknown kind take the remaining styles in order
KIND_LINESTYLE = {"grpo": "-", "sft": "--", "sft-frozen": ":", "grpo-frozen": "-."}
_SPARE = [(0, (5, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1))]


def run_styles(runs, kinds: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """``{run: linestyle}``: a run's declared kind decides (``kinds``, as the runner records
    them in ``provenance["run_kinds"]``), never a substring of its name."""
    kinds = kinds or {}
    out, spare = {}, iter(_SPARE * 4)
    for run in runs:
        kind = kinds.get(run)
        out[run] = KIND_LINESTYLE[kind] if kind in KIND_LINESTYLE else next(spare)
    return out


def run_x(names: Sequence[str], steps: Mapping[str, int | None]) -> tuple[list[float], bool]:
    """x values for a run's checkpoints: their steps if all have one, else 1, 2, ..."""
    got = [steps.get(n) for n in names]
    if names and all(s is not None for s in got):
        return [float(s) for s in got], True
    return [float(i + 1) for i in range(len(names))], False


def plot_run_lines(ax, runs: Mapping[str, Sequence[str]], steps: Mapping[str, int | None],
                   values: Mapping[str, float], color=None, label: str | None = None,
                   err: Mapping[str, float] | None = None, marker_cycle: str = "osD^v<>",
                   kinds: Mapping[str, str | None] | None = None) -> bool:
    """One line per run of ``values[checkpoint]`` against step; returns whether x is steps.

    ``label`` prefixes the run name in the legend; ``err`` draws a shaded +-band.
    """
    all_steps = True
    styles = run_styles(runs, kinds)
    for i, (run, names) in enumerate(runs.items()):
        xs, is_step = run_x(names, steps)
        all_steps &= is_step
        ys = np.array([values.get(n, np.nan) for n in names], float)
        kw = {"linestyle": styles[run], "marker": marker_cycle[i % len(marker_cycle)],
              "markersize": 4, "label": f"{label} {run}" if label else run}
        if color is not None:
            kw["color"] = color
        (line,) = ax.plot(xs, ys, **kw)
        if err is not None:
            e = np.array([err.get(n, np.nan) for n in names], float)
            ax.fill_between(xs, ys - e, ys + e, color=line.get_color(), alpha=0.15, linewidth=0)
    return all_steps
