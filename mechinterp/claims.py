"""The paper's claims as small functions of stored results: numbers in, a verdict out.

Each claim takes a :class:`~mechinterp.compare.Study` (the results of one ``compare`` folder and the
roles of its variants) and returns ``{"id", "title", "held", "numbers", "statement"}``. ``held`` is
True or False when the claim could be decided and None when the study lacks what it needs (a role,
a probe, enough points); the statement then says what was missing. The report, ``claims.json`` and
the pytest claims (``pytest --pyargs probes.claims``) all call these functions, so they cannot
disagree.

A claim that compares two models on the same items holds only when its paired 95% interval
excludes zero in the claimed direction; a claim about an ordering (which is larger, where a peak
is) is decided on the point values, and its numbers say by how much.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .evals.stats import bootstrap_diff, spearman

MLP = ("gate", "up", "down")
N_BOOT = 2000


def _claim(cid: str, title: str, held: bool | None, numbers: dict, statement: str) -> dict:
    return {"id": cid, "title": title, "held": held, "numbers": numbers, "statement": statement}


def _missing(cid: str, title: str, what: str) -> dict:
    return _claim(cid, title, None, {}, f"not measured: {what}")


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def mean_change(rel: dict[str, list], matrices=None) -> float:
    """Mean relative change over layers and matrices (NaN entries left out)."""
    vals = np.concatenate([_floats(rel[m]) for m in (matrices or rel)])
    return float(np.nanmean(vals))


def bootstrap_mean(x: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``x``."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _middle_third(n_layers: int) -> range:
    return range(n_layers // 3, (2 * n_layers) // 3)


def _roles(study, *kinds: str) -> dict[str, str] | str:
    """``{kind: variant}`` for the kinds, or a message naming the first one missing."""
    out = {}
    for kind in kinds:
        name = study.role(kind)
        if name is None:
            return f"no {kind} variant (roles come from train-config.json or the variant's name)"
        out[kind] = name
    return out


def _result(study, probe: str):
    return study.results.get(probe)


# ----- the claims ------------------------------------------------------------------------------

def c1_weight_change(study) -> dict:
    title = "SFT moves the weights more than GRPO"
    roles, res = _roles(study, "sft", "grpo"), _result(study, "weight-change")
    if isinstance(roles, str) or res is None:
        return _missing("C1", title, roles if isinstance(roles, str) else "weight-change")
    rel = res.data["relative_change"]
    sft, grpo = (mean_change(rel[study.final_name(roles[k], "weight-change")])
                 for k in ("sft", "grpo"))
    ratio = sft / grpo if grpo > 0 else float("inf")
    return _claim("C1", title, bool(sft > grpo),
                  {"sft_mean_relative_change": sft, "grpo_mean_relative_change": grpo,
                   "ratio_sft_over_grpo": ratio},
                  f"mean ||dW||/||W|| over layers and matrices: SFT {sft:.3g}, GRPO {grpo:.3g} "
                  f"(SFT/GRPO = {ratio:.3g}x; paper: 10-50x)")


def c2_kl(study) -> dict:
    title = "SFT drifts further from the base than GRPO (KL on held-out in-domain items)"
    roles, res = _roles(study, "sft", "grpo"), _result(study, "kl-drift")
    if isinstance(roles, str) or res is None:
        return _missing("C2", title, roles if isinstance(roles, str) else "kl-drift")
    items = res.data["kl_items"]
    s, g = (_floats(items[study.final_name(roles[k], "kl-drift")]) for k in ("sft", "grpo"))
    diff = s - g
    lo, hi = bootstrap_mean(diff)
    return _claim("C2", title, bool(lo > 0),
                  {"kl_sft": float(np.nanmean(s)), "kl_grpo": float(np.nanmean(g)),
                   "difference": float(np.nanmean(diff)), "difference_ci95": [lo, hi],
                   "n_items": int(np.isfinite(diff).sum())},
                  f"KL(base||model) per answer token: SFT {np.nanmean(s):.4g}, GRPO "
                  f"{np.nanmean(g):.4g}; paired difference {np.nanmean(diff):.4g} "
                  f"[{lo:.4g}, {hi:.4g}] over {int(np.isfinite(diff).sum())} items")


def c3_qk_most_changed(study) -> dict:
    title = "q and k are the two most-changed matrix kinds"
    res = _result(study, "weight-change")
    names = [n for n, v in study.variants.items() if v.kind in ("sft", "grpo")]
    if res is None or not names:
        return _missing("C3", title, "weight-change" if res is None else "sft/grpo variants")
    per, held, parts = {}, True, []
    for name in names:
        rel = res.data["relative_change"][study.final_name(name, "weight-change")]
        means = {m: float(np.nanmean(_floats(v))) for m, v in rel.items()}
        top = sorted(means, key=lambda m: -means[m])[:2]
        per[name] = {"by_matrix": means, "top_two": top}
        held &= set(top) == {"q", "k"}
        parts.append(f"{name}: top two {'/'.join(top)} ("
                     + ", ".join(f"{m} {means[m]:.3g}" for m in sorted(means, key=lambda m: -means[m]))
                     + ")")
    return _claim("C3", title, bool(held), per, "; ".join(parts))


def c4_sft_mid_mlp(study) -> dict:
    title = "SFT's MLP change peaks in the middle third of the layers"
    roles, res = _roles(study, "sft"), _result(study, "weight-change")
    if isinstance(roles, str) or res is None:
        return _missing("C4", title, roles if isinstance(roles, str) else "weight-change")
    rel = res.data["relative_change"][study.final_name(roles["sft"], "weight-change")]
    mlp = np.nanmean(np.stack([_floats(rel[m]) for m in MLP]), axis=0)
    n = len(mlp)
    peak = int(np.nanargmax(mlp))
    mid = _middle_third(n)
    thirds = [float(np.nanmean(mlp[a:b])) for a, b in ((0, mid.start), (mid.start, mid.stop),
                                                       (mid.stop, n))]
    return _claim("C4", title, peak in mid,
                  {"peak_layer": peak, "middle_third": [mid.start, mid.stop - 1],
                   "mlp_change_by_layer": mlp.tolist(), "mean_by_third": thirds},
                  f"SFT's mean MLP change peaks at layer {peak} (middle third: layers "
                  f"{mid.start}-{mid.stop - 1}); mean by third early/mid/late "
                  + "/".join(f"{t:.3g}" for t in thirds))


def _mmlu_correct(study, name: str) -> dict[tuple, bool] | None:
    from .evals.mmlu import rows_from_jsonl

    res = _result(study, "mmlu")
    key = f"items_{name}_cloze.jsonl"
    if res is None or key not in res.files:
        return None
    return {(r["subject"], r["index"]): r["pred"] == r["gold"] for r in rows_from_jsonl(res.files[key])}


def _task_correct(study, name: str) -> dict[Any, bool] | None:
    import json

    res = _result(study, "task-accuracy")
    key = f"items_{name}.jsonl"
    if res is None or key not in res.files:
        return None
    rows = [json.loads(line) for line in res.files[key].splitlines() if line.strip()]
    return {r["index"]: bool(r["correct"]) for r in rows}


def paired_delta(a: dict, b: dict) -> dict:
    """Accuracy of ``b`` minus ``a`` on their common items, with a paired bootstrap interval."""
    keys = sorted(set(a) & set(b), key=str)
    x = [a[k] for k in keys]
    y = [b[k] for k in keys]
    lo, hi = bootstrap_diff(x, y, n_boot=N_BOOT, seed=0)
    n = len(keys)
    return {"n": n, "a": sum(x) / n if n else float("nan"), "b": sum(y) / n if n else float("nan"),
            "difference": (sum(y) - sum(x)) / n if n else float("nan"), "ci95": [lo, hi]}


def c5_mmlu(study) -> dict:
    title = "SFT loses more MMLU (cloze) than GRPO"
    roles = _roles(study, "sft", "grpo")
    if isinstance(roles, str):
        return _missing("C5", title, roles)
    base = _mmlu_correct(study, "base")
    sft, grpo = (_mmlu_correct(study, study.final_name(roles[k], "mmlu")) for k in ("sft", "grpo"))
    if base is None or sft is None or grpo is None:
        return _missing("C5", title, "MMLU cloze rows of base, SFT and GRPO")
    d = paired_delta(sft, grpo)  # GRPO - SFT: > 0 when SFT lost more
    ls, lg = paired_delta(base, sft), paired_delta(base, grpo)
    lo, hi = d["ci95"]
    return _claim("C5", title, bool(lo > 0),
                  {"base": ls["a"], "sft": d["a"], "grpo": d["b"], "sft_minus_base": ls["difference"],
                   "sft_minus_base_ci95": ls["ci95"], "grpo_minus_base": lg["difference"],
                   "grpo_minus_base_ci95": lg["ci95"], "grpo_minus_sft": d["difference"],
                   "grpo_minus_sft_ci95": d["ci95"], "n_items": d["n"]},
                  f"MMLU cloze on {d['n']} items: base {ls['a']:.3f}, SFT {d['a']:.3f} "
                  f"({ls['difference']:+.3f}), GRPO {d['b']:.3f} ({lg['difference']:+.3f}); "
                  f"GRPO - SFT {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]")


def c6_freezing(study) -> dict:
    title = "Freezing the mid-layer MLPs changes SFT's MMLU loss and in-domain gain"
    roles = _roles(study, "sft", "sft-frozen")
    if isinstance(roles, str):
        return _missing("C6", title, roles)
    sft_m, frz_m = (_mmlu_correct(study, study.final_name(roles[k], "mmlu"))
                    for k in ("sft", "sft-frozen"))
    sft_t, frz_t = (_task_correct(study, study.final_name(roles[k], "task-accuracy"))
                    for k in ("sft", "sft-frozen"))
    if None in (sft_m, frz_m, sft_t, frz_t):
        return _missing("C6", title, "MMLU and in-domain rows of SFT and frozen SFT")
    m, t = paired_delta(sft_m, frz_m), paired_delta(sft_t, frz_t)

    def excludes_zero(ci):
        return ci[0] > 0 or ci[1] < 0

    held = excludes_zero(m["ci95"]) or excludes_zero(t["ci95"])
    return _claim("C6", title, bool(held),
                  {"mmlu_frozen_minus_sft": m["difference"], "mmlu_ci95": m["ci95"],
                   "mmlu_n": m["n"], "task_frozen_minus_sft": t["difference"],
                   "task_ci95": t["ci95"], "task_n": t["n"]},
                  f"frozen - unfrozen SFT: MMLU {m['difference']:+.3f} [{m['ci95'][0]:+.3f}, "
                  f"{m['ci95'][1]:+.3f}] (n={m['n']}), in-domain {t['difference']:+.3f} "
                  f"[{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] (n={t['n']}); held when either "
                  "interval excludes 0")


def c7_razor(study) -> dict:
    title = "Forgetting tracks KL more than weight change (RL's Razor)"
    wc, kl, mm = (_result(study, p) for p in ("weight-change", "kl-drift", "mmlu"))
    base = _mmlu_correct(study, "base")
    if None in (wc, kl, mm) or base is None:
        return _missing("C7", title, "weight-change, kl-drift and mmlu over checkpoints")
    points = []
    for run, names in study.runs.items():
        for name in names:
            got = _mmlu_correct(study, name)
            if got is None or name not in kl.data["kl"] or name not in wc.data["relative_change"]:
                continue
            loss = -paired_delta(base, got)["difference"]
            points.append({"run": run, "model": name, "mmlu_loss": loss,
                           "kl": kl.data["kl"][name],
                           "weight_change": mean_change(wc.data["relative_change"][name])})
    if len(points) < 3:
        return _missing("C7", title, f"only {len(points)} checkpoints with all three measures")
    loss = [p["mmlu_loss"] for p in points]
    r_kl = spearman(loss, [p["kl"] for p in points])
    r_w = spearman(loss, [p["weight_change"] for p in points])
    held = None if math.isnan(r_kl) or math.isnan(r_w) else bool(r_kl > r_w)
    return _claim("C7", title, held,
                  {"spearman_loss_kl": r_kl, "spearman_loss_weight_change": r_w,
                   "n_checkpoints": len(points), "points": points},
                  f"over {len(points)} checkpoints: Spearman(MMLU loss, KL) = {r_kl:.2f}, "
                  f"Spearman(MMLU loss, weight change) = {r_w:.2f}")


def c8_damage_mid_mlp(study) -> dict:
    title = "SFT's MMLU damage is repaired most by the base's mid-layer MLPs"
    roles, res = _roles(study, "sft"), _result(study, "damage-attribution")
    if isinstance(roles, str) or res is None:
        return _missing("C8", title, roles if isinstance(roles, str) else "damage-attribution")
    d, name = res.data, roles["sft"]
    rec = (d.get("margin_recovery") or {}).get(name, {}).get("mlp_out")
    if rec is None or not d.get("n_damaged", {}).get(name):
        return _missing("C8", title, f"no damaged MMLU items for {name} (margin did not drop)")
    rec = _floats(rec)
    if not np.isfinite(rec).any():
        return _missing("C8", title, "margin recovery is undefined on every layer")
    n = len(rec)
    top = int(np.nanargmax(rec))
    mid = _middle_third(n)
    inside = float(np.nanmax(rec[mid.start:mid.stop]))
    outside = float(np.nanmax(np.concatenate([rec[:mid.start], rec[mid.stop:]])))
    return _claim("C8", title, top in mid,
                  {"top_layer": top, "middle_third": [mid.start, mid.stop - 1],
                   "best_mid_recovery": inside, "best_other_recovery": outside,
                   "n_damaged": d["n_damaged"][name],
                   "n_failures": d.get("n_failures", {}).get(name)},
                  f"patching the base's mlp_out gives back most of SFT's MMLU margin drop at "
                  f"layer {top} ({rec[top]:.2f}); best middle-third layer {inside:.2f}, best "
                  f"elsewhere {outside:.2f} ({d['n_damaged'][name]} damaged items)")


CLAIMS: list[Callable] = [c1_weight_change, c2_kl, c3_qk_most_changed, c4_sft_mid_mlp, c5_mmlu,
                          c6_freezing, c7_razor, c8_damage_mid_mlp]


def decide_all(study) -> list[dict]:
    """Every claim; a claim whose computation fails is reported as not measured, with why."""
    out = []
    for fn in CLAIMS:
        cid = fn.__name__.split("_", 1)[0].upper()
        try:
            out.append(fn(study))
        except (KeyError, ValueError, IndexError) as exc:
            out.append(_missing(cid, cid, f"could not be computed ({type(exc).__name__}: {exc})"))
    return out


def verdict_line(claim: dict) -> str:
    word = {True: "HELD", False: "NOT HELD", None: "N/A"}[claim["held"]]
    return f"{claim['id']} {word:8s} {claim['title']}: {claim['statement']}"
