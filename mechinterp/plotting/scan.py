"""The attribution-patching scan of a probe (``scan=atp``) against exact patching, per layer."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from .style import PALETTE, new_axes


def scan_figure(estimate: dict, exact: dict, agreement: dict, names: dict[str, str],
                ylabel: str, title: str):
    """One panel per site: the AtP estimate per layer (line) and the exactly patched layers
    (open circles); Spearman and top-k overlap of the scan against exact patching in the title.
    ``estimate`` / ``exact``: ``{site: [value per layer]}`` (NaN where not patched exactly)."""
    sites = list(estimate)
    fig, axes = new_axes(width=4.2 * len(sites) + 1, height=3.8, ncols=len(sites), squeeze=False,
                         sharey=True)
    for c, s in enumerate(sites):
        ax = axes[0, c]
        layers = np.arange(len(estimate[s]))
        ax.plot(layers, np.array(estimate[s], float), marker=".", color=PALETTE[0],
                label="AtP estimate (scan)")
        ax.plot(layers, np.array(exact[s], float), "o", mfc="none", color=PALETTE[1],
                label="exact patching")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(names.get(s, s))
        ax.set_xlabel("patched layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=8)
    rho = agreement.get("spearman")
    rho = "n/a" if rho is None or not np.isfinite(rho) else f"{rho:.3f}"
    overlap = ("" if agreement.get("top_k_overlap") is None
               else f", top-{agreement['top_k']} overlap {agreement['top_k_overlap']}")
    fig.suptitle(f"{title}: Spearman {rho} over {agreement['n_sites']} exactly patched "
                 f"sites{overlap}", fontsize=10)
    return fig
