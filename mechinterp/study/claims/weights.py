"""C1, C3, C4: where and how much the weights moved, decided on measures the base's weight scale
does not drive.

At a few AdamW steps every entry moves by about lr x sign(g) per step, so the relative change
||dW|| / ||W|| ranks matrices by 1/RMS(W_base), whatever the algorithm did (``scale_confound``
measures that). These claims are decided on ``update_scale`` (RMS(dW) / (lr x steps): 1 when every
entry moved lr each step in one direction, about 1/sqrt(steps) for a random walk) or, where the
learning rate is unknown, ``coherence`` (||W_T - W_0|| / path length), each against the noise
floor: what the same optimizer reaches on pure-noise gradients. Relative change stays beside them.
"""

from __future__ import annotations

import math

import numpy as np

from ...core.summary import floats, mean_change
from ...models.depth import MID_LAYERS_RULE, mid_layers
from . import stats
from .core import (
    claim,
    gate,
    get,
    missing,
    pairs,
    primary,
    redecide,
    replicates,
    result,
    single_seed,
)

MLP = ("gate", "up", "down")
PAPER_MATCHED_LR_RATIO = "about 3-5x"  # the paper's SFT/GRPO weight-change ratio at matched lr
SCALE_CONFOUND = 0.9


def measure_name(data: dict, models: list[str]) -> str | None:
    """``update_scale`` where every model has a finite one, else ``coherence``, else None."""
    for key in ("update_scale", "coherence"):
        per = data.get(key) or {}
        if all(m in per and np.isfinite(np.concatenate(
                [floats(v) for v in per[m].values()] or [np.array([np.nan])])).any()
               for m in models):
            return key
    return None


def floor_hi(data: dict, model: str, key: str) -> float:
    """Upper end of the noise floor's 95% interval for ``key`` (its point value without one)."""
    nf = get(data, "noise_floor", model) or {}
    ci = nf.get(f"{key}_ci95")
    v = ci[1] if ci and ci[1] is not None else nf.get(key)
    return math.nan if v is None else float(v)


def floor_mean(data: dict, model: str, key: str) -> float:
    """The mean noise floor of measure ``key`` for ``model`` (NaN when not recorded)."""
    v = get(data, "noise_floor", model, key)
    return math.nan if v is None else float(v)


def floor_gate(value: float, floor: float, what: str, why: str = "") -> dict:
    """The claim cannot hold unless ``value`` is above the noise floor (nor when there is none)."""
    if not math.isfinite(floor):
        return gate(False, f"no noise floor for {what}: cannot tell the update from noise")
    return gate(value > floor, f"{what} ({value:.3g}) is within the optimizer's noise floor "
                               f"(up to {floor:.3g}){why}")


def confound_caveats(data: dict, models: list[str]) -> list[str]:
    """One caveat naming every model whose relative-change map reads the base's weight scale."""
    hits = [(m, get(data, "scale_confound", m)) for m in models]
    hits = [(m, r) for m, r in hits if r is not None and math.isfinite(r) and r > SCALE_CONFOUND]
    if not hits:
        return []
    return ["the relative-change map reads the base's weight scale: Spearman of relative change "
            "against 1/RMS(W_base) over layers x matrices is "
            + ", ".join(f"{r:.2f} ({m})" for m, r in hits)
            + f" (> {SCALE_CONFOUND}); the claims read update scale / coherence instead"]


def _weights(study):
    res = result(study, "weight-change")
    if res is None:
        return None, "no weight-change result in the study"
    if not any(k in res.data for k in ("update_scale", "coherence")) or "noise_floor" not in res.data:
        return None, ("the weight-change result has no update_scale / coherence / noise_floor "
                      "(stored before they were measured): re-run compare")
    return res.data, None


def _per_seed(study, data: dict, pr: list[tuple[str, str]]):
    """Per (SFT, GRPO) replicate pair: the (layer, matrix) entries' update scales ``[entries, 2]``,
    mean coherence and mean relative change of both, and the final models' names; or a message
    naming what is missing."""
    groups, coherence, relative, names = [], [], [], []
    relative_change = data.get("relative_change", {})
    for sft, grpo in pr:
        pair = tuple(study.final_name(v, "weight-change") for v in (sft, grpo))
        sft_scale, grpo_scale = (get(data, "update_scale", n) for n in pair)
        if sft_scale is None or grpo_scale is None:
            return f"no update_scale for {pair[0] if sft_scale is None else pair[1]}"
        rows = [(a, b) for m in sft_scale if m in grpo_scale
                for a, b in zip(floats(sft_scale[m]), floats(grpo_scale[m]))
                if np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0]
        if not rows:
            return (f"update_scale of {pair[0]} / {pair[1]} is unknown (learning rate or steps not "
                    "recorded with the run)")
        groups.append(np.array(rows))
        coherence.append([mean_change(get(data, "coherence", n) or {"x": [None]}) for n in pair])
        relative.append([mean_change(relative_change[n]) if n in relative_change else math.nan
                         for n in pair])
        names.append(pair)
    return groups, coherence, relative, names


def c1_weight_change(study) -> dict:
    """C1: update per unit of lr x steps, SFT over GRPO, above the noise floor.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.

    Returns:
        The decided claim, or a not-measured one naming what the study lacks.
    """
    title = "SFT moves the weights more than GRPO (per unit of lr x steps, above the noise floor)"
    pr = pairs(study, "sft", "grpo")
    if isinstance(pr, str):
        return missing("C1", title, pr)
    data, why = _weights(study)
    if data is None:
        return missing("C1", title, why)
    gathered = _per_seed(study, data, pr)
    if isinstance(gathered, str):
        return missing("C1", title, gathered)
    groups, coherence, relative, names = gathered
    point, reps = stats.hier_bootstrap(groups)

    def log_ratio(m):
        return np.log(m[..., 0]) - np.log(m[..., 1])

    p = primary("hierarchical bootstrap over seeds and (layer, matrix) entries",
                "log(update_scale SFT / update_scale GRPO)", float(log_ratio(point)),
                log_ratio(reps), needed=math.log(1.5), n=len(groups[0]), n_seeds=len(pr),
                units="log ratio")
    ratio, (ratio_lo, ratio_hi) = math.exp(p["effect"]), (math.exp(x) for x in p["ci95"])
    sft_coherence, grpo_coherence = np.nanmean(np.array(coherence, float), axis=0).tolist()
    floor_hi_mean = {k: float(np.nanmean([floor_hi(data, n, k) for n, _ in names]))
                     for k in ("coherence", "update_scale")}
    grpo_floor = np.nanmean([floor_hi(data, n, "coherence") for _, n in names])
    floor_scale = np.nanmean([floor_mean(data, n, "update_scale") for n, _ in names])
    gates = [floor_gate(sft_coherence, floor_hi_mean["coherence"], "SFT's update coherence",
                        ": a noise-driven run cannot support 'moves more'")]
    sft_scale, grpo_scale = (float(x) for x in point)
    ceiling = 1.0 / grpo_scale if grpo_scale > 0 else math.inf
    sft_relative, grpo_relative = np.nanmean(np.array(relative, float), axis=0).tolist()
    relative_ratio = float(np.divide(sft_relative, grpo_relative))
    numbers = {"sft_update_scale": sft_scale, "grpo_update_scale": grpo_scale,
               "ratio_sft_over_grpo": ratio, "ratio_ci95": [ratio_lo, ratio_hi],
               "noise_floor_update_scale": floor_scale,
               "noise_floor_update_scale_hi": floor_hi_mean["update_scale"],
               "sft_coherence": sft_coherence, "grpo_coherence": grpo_coherence,
               "noise_floor_coherence_hi": floor_hi_mean["coherence"],
               "grpo_noise_floor_coherence_hi": grpo_floor, "ceiling_ratio_over_grpo": ceiling,
               "paper_matched_lr_ratio": PAPER_MATCHED_LR_RATIO,
               "sft_mean_relative_change": sft_relative,
               "grpo_mean_relative_change": grpo_relative,
               "relative_change_ratio_sft_over_grpo": relative_ratio,
               "models": names}
    caveats = single_seed(len(pr)) + confound_caveats(data, [n for pair in names for n in pair])
    return claim("C1", title, _c1_statement(numbers, len(pr)), numbers, p, gates, caveats)


def _c1_statement(n: dict, n_seeds: int) -> str:
    """C1's statement from its numbers ``n``."""
    within = n["grpo_coherence"] <= n["grpo_noise_floor_coherence_hi"]
    return (
        f"update per unit of lr x steps (RMS(dW) / (lr x steps); the optimizer's ceiling is about "
        f"1: AdamW moves an entry at most about lr per step): SFT {n['sft_update_scale']:.3g}, "
        f"GRPO {n['grpo_update_scale']:.3g} (noise floor {n['noise_floor_update_scale']:.3g}); "
        f"SFT/GRPO = {n['ratio_sft_over_grpo']:.3g}x [{n['ratio_ci95'][0]:.3g}, "
        f"{n['ratio_ci95'][1]:.3g}] over {n_seeds} seed(s); at this step count the ceiling "
        f"allows at most {n['ceiling_ratio_over_grpo']:.3g}x over GRPO; the paper at matched lr: "
        f"{PAPER_MATCHED_LR_RATIO}. Coherence SFT {n['sft_coherence']:.3g}, GRPO "
        f"{n['grpo_coherence']:.3g} (noise floor up to {n['noise_floor_coherence_hi']:.3g}"
        + (", GRPO within it" if within else "")
        + f"). Beside: relative change SFT/GRPO {n['relative_change_ratio_sft_over_grpo']:.3g}x")


def _layer_matrix(data: dict, key: str, model: str, matrices: list[str]) -> np.ndarray:
    """``[layers, matrices]`` of a per-layer measure (rows with a NaN dropped)."""
    per = data[key][model]
    a = np.stack([floats(per[m]) for m in matrices], axis=1)
    return a[np.isfinite(a).all(1)]


def c3_qk_most_changed(study) -> dict:
    """C3: whether q and k are the two most-changed matrix kinds.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.

    Returns:
        The decided claim, or a not-measured one naming what the study lacks.
    """
    title = "q and k are the two most-changed matrix kinds (update scale / coherence)"
    kinds = {k: replicates(study, k) for k in ("sft", "grpo") if replicates(study, k)}
    if not kinds:
        return missing("C3", title, "no sft or grpo variant")
    data, why = _weights(study)
    if data is None:
        return missing("C3", title, why)
    finals = {k: [study.final_name(v, "weight-change") for v in vs] for k, vs in kinds.items()}
    key = measure_name(data, [n for ns in finals.values() for n in ns])
    if key is None:
        return missing("C3", title, "neither update_scale nor coherence for every model")
    parts, numbers, texts = [], {"measure": key}, []
    for kind, ns in finals.items():
        mats = list(data[key][ns[0]])
        if not {"q", "k"} <= set(mats) or len(mats) < 3:
            return missing("C3", title, f"{key} has no q/k matrices for {ns[0]}")
        qi, ki = mats.index("q"), mats.index("k")
        others = [i for i in range(len(mats)) if i not in (qi, ki)]
        groups = [_layer_matrix(data, key, n, mats) for n in ns]

        def gap(m, qi=qi, ki=ki, others=others):
            return np.minimum(m[..., qi], m[..., ki]) - m[..., others].max(-1)

        point, reps = stats.hier_bootstrap(groups)
        p = primary("hierarchical bootstrap over seeds and layers",
                    f"min(q, k) - max(other kinds) of mean {key}", float(gap(point)), gap(reps),
                    needed=0.05, n=len(groups[0]), n_seeds=len(ns), units=key)
        floor = float(np.nanmean([floor_hi(data, n, key) for n in ns]))
        qk = float(min(point[qi], point[ki]))
        gates = [floor_gate(qk, floor, f"{kind}: q/k's {key}")]
        order = sorted(range(len(mats)), key=lambda i: -point[i])
        rel = data.get("relative_change", {}).get(ns[0])
        rel_top = (sorted(rel, key=lambda m: -float(np.nanmean(floats(rel[m]))))[:2]
                   if rel else None)
        numbers[kind] = {"by_matrix": {mats[i]: float(point[i]) for i in range(len(mats))},
                         "top_two": [mats[i] for i in order[:2]], "noise_floor_hi": floor,
                         "top_two_relative_change": rel_top, "gap": p["effect"],
                         "gap_ci95": p["ci95"], "models": ns}
        parts.append({"kind": kind, "primary": p, "gates": gates})
        texts.append(f"{kind}: top two {'/'.join(mats[i] for i in order[:2])} by {key} ("
                     + ", ".join(f"{mats[i]} {point[i]:.3g}" for i in order)
                     + f"; noise floor {floor:.3g}); gap min(q,k) - max(rest) {p['effect']:.3g} "
                       f"[{p['ci95'][0]:.3g}, {p['ci95'][1]:.3g}]"
                     + (f"; by relative change: {'/'.join(rel_top)}" if rel_top else ""))
    # intersection-union: the claim holds for every kind, so its p-value is the largest
    weakest = max(parts, key=lambda x: x["primary"]["p_value"])
    c = claim("C3", title, "; ".join(texts), numbers, dict(weakest["primary"]), [],
              single_seed(min(len(v) for v in kinds.values()))
              + confound_caveats(data, [n for ns in finals.values() for n in ns]))
    c["parts"] = parts
    return redecide(c)


def _mid_layer_groups(data: dict, key: str, names: list[str]):
    """Per SFT replicate, the MLP profile over layers (``key`` averaged over the MLP matrices) and
    the columns C4's ratio is computed from: ``[value x mid, mid, value x rest, rest]`` per layer
    with a finite value. Returns ``(groups, profiles)``."""
    groups, profiles = [], []
    for name in names:
        profile = np.nanmean(np.stack([floats(data[key][name][m]) for m in MLP]), axis=0)
        profiles.append(profile)
        mid = np.zeros(len(profile), bool)
        mid[list(mid_layers(len(profile)))] = True
        finite = np.isfinite(profile)
        value, is_mid = profile[finite], mid[finite].astype(float)
        groups.append(np.stack([value * is_mid, is_mid, value * (1 - is_mid), 1 - is_mid], axis=1))
    return groups, profiles


def _relative_by_third(rel: dict | None, span: range) -> tuple[int | None, list | None]:
    """Beside C4's primary: the layer where the MLPs' relative change peaks and its mean in the
    early, mid and late thirds; ``(None, None)`` without relative change."""
    if not rel:
        return None, None
    profile = np.nanmean(np.stack([floats(rel[m]) for m in MLP]), axis=0)
    bounds = ((0, span.start), (span.start, span.stop), (span.stop, len(profile)))
    return int(np.nanargmax(profile)), [float(np.nanmean(profile[a:b])) if b > a else math.nan
                                        for a, b in bounds]


def c4_sft_mid_mlp(study) -> dict:
    """C4: whether SFT's MLP change concentrates in the mid layers.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.

    Returns:
        The decided claim, or a not-measured one naming what the study lacks.
    """
    title = "SFT's MLP change is highest in the mid layers (update scale / coherence)"
    reps_ = replicates(study, "sft")
    if not reps_:
        return missing("C4", title, "no sft variant")
    data, why = _weights(study)
    if data is None:
        return missing("C4", title, why)
    ns = [study.final_name(v, "weight-change") for v in reps_]
    key = measure_name(data, ns)
    if key is None:
        return missing("C4", title, "neither update_scale nor coherence for the SFT runs")
    groups, profiles = _mid_layer_groups(data, key, ns)
    span = mid_layers(len(profiles[0]))

    def log_ratio(m):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log((m[..., 0] / m[..., 1]) / (m[..., 2] / m[..., 3]))

    point, reps = stats.hier_bootstrap(groups)
    p = primary("hierarchical bootstrap over seeds and layers",
                f"log(mean MLP {key} in the mid layers / in the other layers)",
                float(log_ratio(point)), log_ratio(reps), needed=math.log(1.2),
                n=len(groups[0]), n_seeds=len(ns), units="log ratio")
    mid_mean, rest_mean = float(point[0] / point[1]), float(point[2] / point[3])
    floor = float(np.nanmean([floor_hi(data, n, key) for n in ns]))
    gates = [floor_gate(mid_mean, floor, f"SFT's mid-layer MLP {key}")]
    profile = np.nanmean(np.stack(profiles), axis=0)
    rel_peak, rel_thirds = _relative_by_third(data.get("relative_change", {}).get(ns[0]), span)
    ratio, (lo, hi) = math.exp(p["effect"]), (math.exp(x) for x in p["ci95"])
    numbers = {"measure": key, "mid_layers": [span.start, span.stop - 1],
               "mid_layers_rule": MID_LAYERS_RULE, "mid_mean": mid_mean, "rest_mean": rest_mean,
               "ratio_mid_over_rest": ratio, "ratio_ci95": [lo, hi], "noise_floor_hi": floor,
               "mlp_by_layer": profile.tolist(), "peak_layer": int(np.nanargmax(profile)),
               "relative_change_peak_layer": rel_peak, "relative_change_by_third": rel_thirds,
               "models": ns}
    statement = (f"SFT's mean MLP {key}: mid layers {span.start}-{span.stop - 1} ({MID_LAYERS_RULE}) "
                 f"{mid_mean:.3g}, other layers {rest_mean:.3g}; mid/rest = {ratio:.3g}x "
                 f"[{lo:.3g}, {hi:.3g}] over {len(ns)} seed(s) (noise floor {floor:.3g}); "
                 f"peak layer {int(np.nanargmax(profile))}"
                 + (f"; beside: relative change peaks at layer {rel_peak}" if rel_peak is not None
                    else ""))
    return claim("C4", title, statement, numbers, p, gates,
                 single_seed(len(ns)) + confound_caveats(data, ns))
