"""Where "mid-layer" is: the one definition every claim, preset and figure uses.

The paper speaks of SFT's damage to "mid-layer MLPs" and freezes the MLPs of layers 19-25 of
OLMo-2's 32 in its mitigation run. A claim about mid-layers (C4: where SFT's MLP change peaks; C6:
freezing them; C8: whether they carry the MMLU damage) must test the same layers the freezing run
froze, or the claims speak of different things. We use the middle third of the depth, scaled to
any model: layers ``[n // 3, 2n // 3)``. For 30 layers (the default model) that is 10-19; for 32,
10-20. The ``paper-mid-mlp`` freeze preset freezes the MLPs of this span (the paper's own run,
layers 19-25 of 32, is ``--freeze mlp@19-25``). The report prints the span it used.
"""

from __future__ import annotations

#: How the span is described in reports and ``--help``.
MID_LAYERS_RULE = "the middle third of the layers, [n // 3, 2n // 3)"


def mid_layers(n_layers: int) -> range:
    """The mid-layer span of a model with ``n_layers`` layers (at least one layer).

    Args:
        n_layers: depth of the model (number of transformer blocks), >= 1.

    Returns:
        ``range`` of layer indices, ``[n_layers // 3, 2 * n_layers // 3)``; for models of fewer than
        three layers, the single middle layer.
    """
    if n_layers < 1:
        raise ValueError(f"a model has at least one layer, got {n_layers}")
    lo, hi = n_layers // 3, (2 * n_layers) // 3
    if hi <= lo:
        lo = hi = n_layers // 2
        return range(lo, lo + 1)
    return range(lo, hi)


def thirds(n_layers: int) -> dict[str, range]:
    """``{"early", "mid", "late"}``: the layers before, inside and after :func:`mid_layers`."""
    mid = mid_layers(n_layers)
    return {"early": range(0, mid.start), "mid": mid, "late": range(mid.stop, n_layers)}
