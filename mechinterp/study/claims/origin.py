"""C8: where SFT's MMLU damage originates, decided by weight revert, not by activation patching.

Reverting one third of the layers' MLP weights to the base's (``revert_window_recovery``) asks
where the damage was *written*: the origin. Patching the base's MLP output into SFT
(``margin_recovery``) asks which layer's output *carries* the damage to the logits: mediation, which
the last layers win because they write straight into the logits. The claim needs a significant net
damage first: the mean margin drop over every item scored, not only the damaged ones, which are
selected for a drop (else there is nothing to attribute).
"""

from __future__ import annotations

import math

import numpy as np

from ...core.summary import floats
from ...evals.stats import Z95
from ...models.depth import MID_LAYERS_RULE, mid_layers
from . import stats
from .core import claim, gate, get, missing, primary, replicates, result, single_seed

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
    """C8: the mid third's weight-revert recovery of SFT's MMLU damage against the best other third.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.

    Returns:
        The decided claim, or a not-measured one naming what the study lacks.
    """
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
    net, net_ci, net_p, net_gate = _net_damage(d, names)
    first = names[0]
    layers = get(d, "revert_window_recovery", first, "mid", "layers")
    numbers = {"window_recovery": {w: float(win[:, i].mean()) for i, w in enumerate(WINDOWS)},
               "window_recovery_seed1_ci95": {w: get(d, "revert_window_recovery", first, w, "ci95")
                                              for w in WINDOWS},
               "mid_window_layers": layers, "mid_layers_rule": MID_LAYERS_RULE,
               "net_damage": net, "net_damage_ci95": net_ci, "net_damage_p": net_p,
               "n_used": n_used, "models": names}
    where = (f"mid = layers {layers[0]}-{layers[1]}, {MID_LAYERS_RULE}" if layers
             else MID_LAYERS_RULE)
    text = ["weight revert (origin): giving the base's MLP weights back to a third of the layers "
            "recovers " + ", ".join(f"{w} {win[:, i].mean():.2f}" for i, w in enumerate(WINDOWS))
            + f" of the margin drop ({where}); mid minus the best other third {p['effect']:+.2f} "
              f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] over {len(names)} seed(s)"]
    text += _revert_by_layer(get(d, "revert_recovery", first, "mlp"), numbers)
    text.append(_net_text(get(d, "net_damage", first, "n"), net, net_ci, n_used))
    text += _mediation(floats(get(d, "margin_recovery", first, "mlp_out") or []), numbers)
    return claim("C8", title, "; ".join(text), numbers, p, [net_gate], single_seed(len(names)))


def _net_damage(d: dict, names: list[str]) -> tuple[float, list[float], list, dict]:
    """The net damage (margin drop over every item scored), over the SFT replicates ``names``: mean,
    hierarchical 95% interval, per-seed p-values, and the gate that it is significant (else there
    is nothing to attribute)."""
    est = np.array([[get(d, "net_damage", n, "mean"), _se(get(d, "net_damage", n, "ci95"))]
                    for n in names], float)
    reps = _param_bootstrap(est[:, :1], est[:, 1:], lambda m: m[..., 0])
    lo, hi = stats.interval(reps)
    p_values = [get(d, "net_damage", n, "p") for n in names]
    damaged = bool(lo > 0 and (len(names) > 1 or p_values[0] is None or p_values[0] < 0.05))
    mean = float(est[:, 0].mean())
    shown = ", ".join(f"{p:.2g}" for p in p_values if p is not None)
    return mean, [lo, hi], p_values, gate(
        damaged, f"SFT's net damage (mean margin drop over every item scored, damaged or not) is "
                 f"not significant ({mean:.3g} [{lo:.3g}, {hi:.3g}]"
                 + (f", p = {shown}" if shown else "") + "): nothing to attribute", blocks="any")


def _net_text(n_scored, net: float, net_ci: list[float], n_used: list) -> str:
    return (f"net damage (mean margin drop over all {n_scored} items scored) {net:.3g} "
            f"[{net_ci[0]:.3g}, {net_ci[1]:.3g}]; recoveries read on "
            f"{', '.join(map(str, n_used))} damaged items")


def _revert_by_layer(per_layer: list | None, numbers: dict) -> list[str]:
    """Beside the primary: which single layer's MLP revert recovers most (first seed); adds its
    numbers to ``numbers`` and returns the statement's line (none without per-layer results)."""
    recovery = floats(per_layer or [])
    if not recovery.size or not np.isfinite(recovery).any():
        return []
    span = mid_layers(len(recovery))
    top = int(np.nanargmax(recovery))
    numbers |= {"revert_by_layer": recovery.tolist(), "revert_top_layer": top,
                "revert_mid_mean": float(np.nanmean(recovery[span.start:span.stop]))}
    return [f"per layer, reverting layer {top}'s MLP recovers most ({recovery[top]:.2f})"]


def _mediation(recovery: np.ndarray, numbers: dict) -> list[str]:
    """Beside the primary: the layer whose patched mlp_out gives back most (mediation, first seed);
    adds its numbers to ``numbers`` and returns the statement's line (none without results)."""
    if not recovery.size or not np.isfinite(recovery).any():
        return []
    top = int(np.nanargmax(recovery))
    numbers |= {"mediation_patching_by_layer": recovery.tolist(), "mediation_top_layer": top}
    return [f"beside, mediation (patching the base's mlp_out): layer {top} gives back most "
            f"({recovery[top]:.2f}); that says which output carries the damage, not where it was "
            "written"]
