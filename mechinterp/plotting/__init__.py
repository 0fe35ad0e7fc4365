"""One house style and one function per figure kind; every figure is drawn from stored results."""

from .style import figure, heatmap_grid, new_axes

__all__ = ["figure", "heatmap_grid", "new_axes"]
