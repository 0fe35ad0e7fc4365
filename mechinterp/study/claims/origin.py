"""C8: where SFT's MMLU damage originates, decided by weight revert, not by activation patching.

Reverting one third of the layers' MLP weights to the base's (``revert_window_recovery``) asks
where the damage was *written*: the origin. Patching the base's MLP output into SFT
(``margin_recovery``) asks which layer's output *carries* the damage to the logits: mediation, which
the last layers win because they write straight into the logits. The claim needs a significant net
damage on the items used first (else there is nothing to attribute).
"""

from __future__ import annotations

import math

import numpy as np

from ...evals.stats import Z95
from ...models.depth import MID_LAYERS_RULE, mid_layers
from . import stats
from .core import claim, floats, gate, get, missing, primary, replicates, result, single_seed

WINDOWS = ("early", "mid", "late")
NEEDED = 0.1  # fraction of the margin drop: the smallest lead of the mid third worth a claim


def _se(ci) -> float:
    if not ci or ci[0] is None or ci[1] is None:
        return math.nan
    return (float(ci[1]) - float(ci[0])) / (2 * Z95)


def _param_bootstrap(means: np.ndarray, ses: np.ndarray, stat, n_boot: int = stats.N_BOOT,
                     seed: int = 0) -> np.ndarray:
    """Hierarchical bootstrap from per-seed estimates with standard errors ``[seeds, k]``: draw
    seeds with replacement, each drawn seed's estimates from normals with their standard errors
    (the items' sampling variation), average the drawn seeds' statistics."""
    rng = np.random.default_rng(seed)
    s = means.shape[0]
    pick = rng.integers(0, s, (n_boot, s))
    draws = means[pick] + ses[pick] * rng.standard_normal((n_boot, s, means.shape[1]))
    return stat(draws).mean(1)


def c8_damage_mid_mlp(study) -> dict:
    title = "SFT's MMLU damage originates in the mid-layer MLPs (weight revert by thirds)"
    names, res = replicates(study, "sft"), result(study, "damage-attribution")
    if not names or res is None:
        return missing("C8", title, "no sft variant" if not names
                       else "no damage-attribution result in the study")
    d = res.data
    if "revert_window_recovery" not in d or "net_damage" not in d:
        return missing("C8", title, "the damage-attribution result has no revert_window_recovery / "
                                    "net_damage (weight revert by thirds; stored before they were "
                                    "measured): re-run compare")
    names = [n for n in names if n in d["revert_window_recovery"] and n in d["net_damage"]]
    if not names:
        return missing("C8", title, "no SFT replicate with weight-revert results")
    win = np.array([[get(d, "revert_window_recovery", n, w, "mean") for w in WINDOWS]
                    for n in names], float)
    win_se = np.array([[_se(get(d, "revert_window_recovery", n, w, "ci95")) for w in WINDOWS]
                       for n in names], float)
    if not np.isfinite(win).all() or not np.isfinite(win_se).all():
        return missing("C8", title, "weight-revert recovery (or its interval) is undefined for a "
                                    "third: too few damaged items")

    def lead(m):
        return m[..., 1] - np.maximum(m[..., 0], m[..., 2])

    reps = _param_bootstrap(win, win_se, lead)
    n_used = [get(d, "n_used", n) or get(d, "net_damage", n, "n") for n in names]
    p = primary("hierarchical bootstrap over seeds (items through each window's interval)",
                "revert recovery of the mid third minus the best other third",
                float(lead(win).mean()), reps, NEEDED, int(min(n_used)), len(names),
                units="fraction of the margin drop")
    nd = np.array([[get(d, "net_damage", n, "mean"), _se(get(d, "net_damage", n, "ci95"))]
                   for n in names], float)
    nd_reps = _param_bootstrap(nd[:, :1], nd[:, 1:], lambda m: m[..., 0])
    nd_lo, nd_hi = stats.interval(nd_reps)
    nd_p = [get(d, "net_damage", n, "p") for n in names]
    damaged = bool(nd_lo > 0 and (len(names) > 1 or nd_p[0] is None or nd_p[0] < 0.05))
    gates = [gate(damaged, f"net damage on the items used is not significant ({nd[:, 0].mean():.3g} "
                           f"[{nd_lo:.3g}, {nd_hi:.3g}]): nothing to attribute", blocks="any")]
    first = names[0]
    layers = get(d, "revert_window_recovery", first, "mid", "layers")
    per_layer = get(d, "revert_recovery", first, "mlp")
    n_layers = len(per_layer) if per_layer else None
    span = mid_layers(n_layers) if n_layers else None
    numbers = {"window_recovery": {w: float(win[:, i].mean()) for i, w in enumerate(WINDOWS)},
               "window_recovery_seed1_ci95": {w: get(d, "revert_window_recovery", first, w, "ci95")
                                              for w in WINDOWS},
               "mid_window_layers": layers, "mid_layers_rule": MID_LAYERS_RULE,
               "net_damage": float(nd[:, 0].mean()), "net_damage_ci95": [nd_lo, nd_hi],
               "net_damage_p": nd_p, "n_used": n_used, "models": names}
    where = (f"mid = layers {layers[0]}-{layers[1]}, {MID_LAYERS_RULE}" if layers
             else MID_LAYERS_RULE)
    text = ["weight revert (origin): giving the base's MLP weights back to a third of the layers "
            "recovers " + ", ".join(f"{w} {win[:, i].mean():.2f}" for i, w in enumerate(WINDOWS))
            + f" of the margin drop ({where}); mid minus the best other third {p['effect']:+.2f} "
              f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] over {len(names)} seed(s)"]
    if per_layer:
        rv = floats(per_layer)
        if np.isfinite(rv).any():
            top = int(np.nanargmax(rv))
            numbers |= {"revert_by_layer": rv.tolist(), "revert_top_layer": top,
                        "revert_mid_mean": float(np.nanmean(rv[span.start:span.stop]))}
            text.append(f"per layer, reverting layer {top}'s MLP recovers most ({rv[top]:.2f})")
    text.append(f"net damage (margin drop) {nd[:, 0].mean():.3g} [{nd_lo:.3g}, {nd_hi:.3g}] on "
                f"{', '.join(map(str, n_used))} items used")
    med = floats(get(d, "margin_recovery", first, "mlp_out") or [])
    if med.size and np.isfinite(med).any():
        top = int(np.nanargmax(med))
        numbers |= {"mediation_patching_by_layer": med.tolist(), "mediation_top_layer": top}
        text.append(f"beside, mediation (patching the base's mlp_out): layer {top} gives back "
                    f"most ({med[top]:.2f}); that says which output carries the damage, not "
                    "where it was written")
    cav = single_seed(len(names))
    return claim("C8", title, "; ".join(text), numbers, p, gates, cav)
