"""Grids of small panels (one per model, matrix kind or measure) and the per-layer arrays they draw."""

from __future__ import annotations

import numpy as np

from .style import new_axes


def panel_grid(n_panels: int, cols: int, panel_size: tuple[float, float], margin: float = 0.5,
               ylabel: str | None = None, **kw):
    """A figure of ``n_panels`` axes in rows of at most ``cols``, the axes past ``n_panels``
    hidden.

    Args:
        n_panels: panels drawn (at least 1).
        cols: panels per row at most.
        panel_size: (width, height) of one panel in inches; ``margin`` is added to the width.
        ylabel: set on the first panel of every row.
        **kw: passed to :func:`~mechinterp.plotting.style.new_axes` (``sharey=True``, ...).

    Returns:
        ``(fig, axes)``: ``axes`` a ``[rows, cols]`` array; zip ``axes.ravel()`` with the panels.
    """
    cols = max(1, min(cols, n_panels))
    rows = -(-n_panels // cols)
    fig, axes = new_axes(panel_size[0] * cols + margin, panel_size[1] * rows, nrows=rows,
                         ncols=cols, squeeze=False, **kw)
    for ax in axes.ravel()[n_panels:]:
        ax.set_visible(False)
    if ylabel is not None:
        for ax in axes[:, 0]:
            ax.set_ylabel(ylabel)
    return fig, axes


def none_nan(values) -> list[float]:
    """A stored list with JSON nulls as NaN."""
    return [np.nan if x is None else x for x in values]


def layer_matrix(per_matrix: dict, matrices: list[str]) -> np.ndarray:
    """``{matrix: [value per layer]}`` as a (layer, matrix) array; JSON null -> NaN."""
    return np.array([none_nan(per_matrix[m]) for m in matrices], float).T
