"""House style: readable fonts, colour-blind-safe palette, editable PDF text.

The style is one file, ``mechinterp.mplstyle``; :func:`house_style` applies it. The runner, the
redraw and :meth:`Result.figures` draw *and* save inside it, since matplotlib reads some settings
when a figure is made (fonts, spines), some when a legend is made (its frame) and some only when
a file is written (the PDF font type). No backend is chosen here: figures show inline in Jupyter,
and headless runs fall back to Agg by themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

STYLE_FILE = Path(__file__).with_name("mechinterp.mplstyle")
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]


def model_colours(models: Sequence[str], base: str = "base") -> dict[str, str]:
    """One colour per model, the same in every probe's figures: the base the palette's first,
    the variants the following ones in their order, whether or not the base is drawn."""
    variants = [m for m in models if m != base]
    colours = {v: PALETTE[(j + 1) % len(PALETTE)] for j, v in enumerate(variants)}
    return {base: PALETTE[0], **colours} if base in models else colours


def token_text(token: str) -> str:
    """A token as a figure label: quoted like ``repr``, with every character the house font has no
    glyph for written as its ``\\uXXXX`` escape (a CJK token would otherwise draw as empty boxes),
    and ``$`` escaped (:func:`plain_text`)."""
    return plain_text("".join(c if _has_glyph(c) else f"\\u{ord(c):04x}" for c in repr(token)))


def plain_text(text: str) -> str:
    """Text from data (a token, a prompt, an MMLU question) drawn as it is: matplotlib reads the
    span between two ``$`` as mathtext, so a ``$$`` token fails to draw and ``$5 and $10`` comes
    out in maths italics. Escaped ``\\$`` draws a plain dollar sign."""
    return text.replace("$", r"\$")


@functools.lru_cache(maxsize=4096)
def _has_glyph(char: str) -> bool:
    return ord(char) < 0x250 or _house_font().get_char_index(ord(char)) != 0


@functools.lru_cache(maxsize=1)
def _house_font():
    from matplotlib import font_manager, ft2font

    with house_style():
        path = font_manager.findfont(font_manager.FontProperties(family=plt.rcParams["font.family"]))
    return ft2font.FT2Font(path)


@contextmanager
def house_style():
    """Apply the house style inside the block (drawing and saving figures)."""
    with plt.style.context(STYLE_FILE):
        yield


def figure(width: float = 6.0, height: float = 4.0):
    with house_style():
        return plt.figure(figsize=(width, height), layout="constrained")


def new_axes(width: float = 6.0, height: float = 4.0, nrows: int = 1, ncols: int = 1, **kw):
    with house_style():
        return plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", **kw)


def heatmap_grid(panels: Sequence[tuple[str, np.ndarray]], xlabels: Sequence[str], ylabel: str,
                 colorbar_label: str, title: str | None = None, vmin: float | None = None,
                 vmax: float | None = None, cmap: str = "viridis", diverging: bool = False,
                 ncols: int | None = None):
    """Side-by-side heatmaps (rows = layers, layer 0 at the bottom) sharing one colour scale.

    ``ncols`` wraps the panels into rows of at most that many (default: one row).
    """
    arrays = [np.asarray(a, dtype=float) for _, a in panels]
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays]) if arrays else np.zeros(1)
    finite = finite if finite.size else np.zeros(1)
    if diverging:
        lim = float(np.max(np.abs(finite))) or 1.0
        vmin, vmax, cmap = -lim, lim, "RdBu_r"
    vmin = float(finite.min()) if vmin is None else vmin
    vmax = float(finite.max()) if vmax is None else vmax
    if vmax <= vmin:
        vmax = vmin + 1e-12
    n = len(panels)
    cols = max(1, min(n, ncols or n))
    grid_rows = -(-n // cols)
    n_rows = arrays[0].shape[0] if arrays else 1
    fig, axes = new_axes(width=max(3.0, 0.35 * len(xlabels) + 1.2) * cols + 1.0,
                         height=max(3.0, 0.16 * n_rows + 1.5) * grid_rows, nrows=grid_rows,
                         ncols=cols, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    im = None
    for ax, (name, arr) in zip(axes.ravel(), panels):
        im = ax.imshow(np.asarray(arr, float), origin="lower", aspect="auto", cmap=cmap,
                       vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=0)
        ax.set_xlabel("matrix" if len(xlabels) < 12 else "")
        step = max(1, n_rows // 10)
        ax.set_yticks(range(0, n_rows, step))
        ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=axes.ravel().tolist(), label=colorbar_label, shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig
