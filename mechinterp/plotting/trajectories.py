"""Quantities over the checkpoints of training runs: steps, line styles, one trajectory plot.

A *run* is a list of checkpoint variant names in training order (``ModelSet.runs``); the training
step of a checkpoint is read from its label (:func:`~mechinterp.paths.checkpoint_step`:
``sft@step-40`` -> 40, hub revision ``v01.14-step-000000029`` -> 29, ``checkpoint-500`` -> 500).
Runs whose labels carry no step are plotted against the checkpoint index instead.

``x_axis`` (:data:`X_AXES`) chooses what a checkpoint is placed by: its training ``step``, the
``fraction`` of its run's training (step / the run's last step), or the ``kl`` from the base it
reached (``KL(base || checkpoint)`` from a kl-drift result's ``data["kl"]``): RL's Razor (arXiv
2509.04259) argues that forgetting follows the KL spent, not the steps taken.

Line style follows the run's kind from its training metadata (:data:`KIND_LINESTYLE`: GRPO solid,
SFT dashed, frozen SFT dotted), recorded by the runner in ``provenance["run_kinds"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..paths import checkpoint_step


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


X_AXES = ("step", "fraction", "kl")
X_LABELS = {"step": "training step", "fraction": "fraction of training",
            "kl": r"KL(base $\|$ checkpoint) reached, nats per token"}


def checkpoint_x(names: Sequence[str], steps: Mapping[str, int | None], x_axis: str = "step",
                 kl: Mapping[str, float | None] | None = None) -> tuple[list[float], bool]:
    """x values for a run's checkpoints by ``x_axis`` (:data:`X_AXES`), and whether they are
    that axis: without a step on every label (step, fraction) or a KL for every checkpoint (kl),
    the checkpoint index 1, 2, ... and False."""
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {', '.join(X_AXES)}, not {x_axis!r}")
    if x_axis == "kl":
        got = [(kl or {}).get(n) for n in names]
        if names and all(isinstance(g, (int, float)) and g == g for g in got):
            return [float(g) for g in got], True
        return [float(i + 1) for i in range(len(names))], False
    xs, is_step = run_x(names, steps)
    if x_axis == "fraction" and is_step:
        last = xs[-1] or 1.0
        return [x / last for x in xs], True
    return xs, is_step


def x_label(x_axis: str, ok: bool) -> str:
    """The axis label of :func:`checkpoint_x`'s values (``checkpoint`` when it fell back)."""
    return X_LABELS[x_axis] if ok else "checkpoint"


def plot_run_lines(ax, runs: Mapping[str, Sequence[str]], steps: Mapping[str, int | None],
                   values: Mapping[str, float], color=None, label: str | None = None,
                   err: Mapping[str, float] | None = None, marker_cycle: str = "osD^v<>",
                   kinds: Mapping[str, str | None] | None = None, x_axis: str = "step",
                   kl: Mapping[str, float | None] | None = None) -> bool:
    """One line per run of ``values[checkpoint]`` against ``x_axis`` (step, fraction of
    training or KL reached: :func:`checkpoint_x`); returns whether x is that axis for every run
    (label it with :func:`x_label`).

    ``label`` prefixes the run name in the legend; ``err`` draws a shaded +-band.
    """
    all_steps = True
    styles = run_styles(runs, kinds)
    for i, (run, names) in enumerate(runs.items()):
        xs, is_step = checkpoint_x(names, steps, x_axis, kl)
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
