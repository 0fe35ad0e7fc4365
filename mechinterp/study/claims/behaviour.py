"""C2, C5, C6, C7: what the fine-tunes do to the model's outputs, paired item by item.

C2 reads KL on held-out problems rendered with neutral reference solutions (not SFT's own target
template, which SFT was trained to produce); C5 and C6 read the gold answer's log-probability
normalised over the four choices (``loglik[gold] - logsumexp(loglik)``), a continuous measure
that does not rest on the few items whose argmax flips; the exact McNemar test on the flips is
shown beside. Paired claims test with an exact sign-flip permutation test over items (on the
differences averaged over seeds) and give a hierarchical bootstrap interval (seeds, then items).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ...evals.stats import bootstrap_diff, mcnemar, spearman
from ...models.depth import MID_LAYERS_RULE, mid_layers
from . import stats
from .core import claim, floats, get, missing, pairs, primary, replicates, result, single_seed
from .weights import MLP, mean_change

NEEDED_LOGPROB = 0.05  # nats of gold-answer log-probability: the smallest effect C5/C6 care about
NEEDED_RHO = 0.2  # C7: the smallest difference of two Spearman correlations worth a claim


def gold_logprob(row: dict) -> float:
    """The gold answer's log-probability normalised over the choices."""
    ll = np.asarray(row["loglik"], float)
    top = ll.max()
    return float(ll[row["gold"]] - (top + math.log(np.exp(ll - top).sum())))


def mmlu_rows(study, name: str) -> list[dict] | None:
    from ...evals.mmlu import rows_from_jsonl

    res = result(study, "mmlu")
    key = f"items_{name}_cloze.jsonl"
    if res is None or key not in res.files:
        return None
    return rows_from_jsonl(res.files[key])


def mmlu_logprob(study, name: str) -> dict[tuple, float] | None:
    rows = mmlu_rows(study, name)
    if rows is None or any("loglik" not in r for r in rows):
        return None
    return {(r["subject"], r["index"]): gold_logprob(r) for r in rows}


def mmlu_correct(study, name: str) -> dict[tuple, bool] | None:
    rows = mmlu_rows(study, name)
    return None if rows is None else {(r["subject"], r["index"]): r["pred"] == r["gold"]
                                      for r in rows}


def task_correct(study, name: str) -> dict[Any, bool] | None:
    res = result(study, "task-accuracy")
    key = f"items_{name}.jsonl"
    if res is None or key not in res.files:
        return None
    rows = [json.loads(line) for line in res.files[key].splitlines() if line.strip()]
    return {r["index"]: bool(r["correct"]) for r in rows}


def paired_delta(a: dict, b: dict) -> dict:
    """Accuracy of ``b`` minus ``a`` on their common items, with a paired bootstrap interval and
    the exact McNemar test on the flips (``b_flips``: a right, b wrong; ``c_flips``: the reverse)."""
    keys = sorted(set(a) & set(b), key=str)
    x, y = [a[k] for k in keys], [b[k] for k in keys]
    lo, hi = bootstrap_diff(x, y, n_boot=stats.N_BOOT, seed=0)
    n = len(keys)
    flips = (sum(p and not q for p, q in zip(x, y)), sum(q and not p for p, q in zip(x, y)))
    nan = float("nan")
    return {"n": n, "a": sum(x) / n if n else nan, "b": sum(y) / n if n else nan,
            "difference": (sum(y) - sum(x)) / n if n else nan, "ci95": [lo, hi],
            "mcnemar_p": mcnemar(*flips, exact_below=10**9)["p_value"], "flips": list(flips)}


def paired_test(diffs: list[dict], test: str, measure: str, needed: float,
                units: str) -> tuple[dict, dict] | str:
    """The primary test of a paired claim from one ``{item: difference}`` per seed: sign-flip
    permutation test over the items all seeds share (differences averaged over seeds) and a
    hierarchical bootstrap interval. Returns ``(primary, extra)`` or a message."""
    keys = sorted(set.intersection(*(set(k for k, v in d.items() if math.isfinite(v))
                                     for d in diffs)), key=str)
    if not keys:
        return "no item is scored by every model the claim pairs"
    groups = [np.array([d[k] for k in keys]) for d in diffs]
    point, reps = stats.hier_bootstrap([g[:, None] for g in groups])
    p = stats.sign_flip_p(np.mean(groups, axis=0))
    per_seed = [float(g.mean()) for g in groups]
    return primary(test, measure, float(point[0]), reps[:, 0], needed, len(keys), len(diffs),
                   p=p, units=units), {"per_seed": per_seed}


SIGN_FLIP = ("exact sign-flip permutation test over items (seed-averaged paired differences); "
             "hierarchical bootstrap interval over seeds, then items")


def _mean_ci(diffs: list[dict]) -> tuple[float, list[float]]:
    """Mean paired difference over seeds and its hierarchical interval (a secondary number)."""
    keys = sorted(set.intersection(*(set(d) for d in diffs)), key=str)
    if not keys:
        return math.nan, [math.nan, math.nan]
    point, reps = stats.hier_bootstrap([np.array([d[k] for k in keys])[:, None] for d in diffs])
    return float(point[0]), stats.interval(reps[:, 0])


def _diff(a: dict, b: dict) -> dict:
    """``b - a`` on the common items."""
    return {k: float(b[k]) - float(a[k]) for k in set(a) & set(b)}


def c2_kl(study) -> dict:
    title = ("SFT drifts further from the base than GRPO (KL on held-out problems with neutral "
             "reference solutions)")
    pr, res = pairs(study, "sft", "grpo"), result(study, "kl-drift")
    if isinstance(pr, str) or res is None:
        return missing("C2", title, pr if isinstance(pr, str) else "no kl-drift result in the study")
    d = res.data
    if "kl_reference_items" not in d:
        return missing("C2", title, "the kl-drift result has no kl_reference_items (KL on neutral "
                                    "reference solutions; stored before it was measured): "
                                    "re-run compare")

    def items(key, name):
        v = get(d, key, study.final_name(name, "kl-drift"))
        return None if v is None else dict(enumerate(floats(v).tolist()))

    ref = [(items("kl_reference_items", s), items("kl_reference_items", g)) for s, g in pr]
    if any(a is None or b is None for a, b in ref):
        return missing("C2", title, "kl_reference_items of every SFT and GRPO replicate")
    mean_g = float(np.nanmean([v for _, b in ref for v in b.values()]))
    mean_s = float(np.nanmean([v for a, _ in ref for v in a.values()]))
    got = paired_test([_diff(b, a) for a, b in ref], SIGN_FLIP,
                      "KL(SFT) - KL(GRPO) per answer token, neutral reference solutions",
                      needed=0.25 * mean_g, units="nats/token")
    if isinstance(got, str):
        return missing("C2", title, got)
    p, extra = got
    direction = d.get("kl_direction", "forward")
    kl_txt = "KL(base || model)" if direction == "forward" else "KL(model || base)"
    numbers = {"kl_direction": direction, "kl_sft": mean_s, "kl_grpo": mean_g,
               "difference": p["effect"], "difference_ci95": p["ci95"], "n_items": p["n"],
               "per_seed_difference": extra["per_seed"]}
    secondary = []
    for key, label in (("kl_items", "template (SFT's target format)"),
                       ("kl_text_items", "neutral text")):
        sec = [(items(key, s), items(key, g)) for s, g in pr]
        if all(a is not None and b is not None for a, b in sec):
            m, ci = _mean_ci([_diff(b, a) for a, b in sec])
            numbers[f"{key}_difference"], numbers[f"{key}_difference_ci95"] = m, ci
            secondary.append(f"{label}: {m:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]")
    statement = (f"{kl_txt} per answer token on {p['n']} held-out problems with neutral reference "
                 f"solutions: SFT {mean_s:.4g}, GRPO {mean_g:.4g}; paired difference "
                 f"{p['effect']:.4g} [{p['ci95'][0]:.4g}, {p['ci95'][1]:.4g}] over {len(pr)} "
                 f"seed(s)" + ("; secondary, same difference on " + "; ".join(secondary)
                               if secondary else ""))
    return claim("C2", title, statement, numbers, p, [], single_seed(len(pr)))


def c5_mmlu(study) -> dict:
    title = "SFT loses more MMLU than GRPO (gold-answer log-probability, cloze)"
    pr = pairs(study, "sft", "grpo")
    if isinstance(pr, str):
        return missing("C5", title, pr)
    base = mmlu_logprob(study, "base")
    lp = [tuple(mmlu_logprob(study, study.final_name(v, "mmlu")) for v in pair) for pair in pr]
    if base is None or any(None in pair for pair in lp):
        return missing("C5", title, "MMLU cloze rows with per-choice log-likelihoods of base, SFT "
                                    "and GRPO (re-run compare if they predate loglik)")
    got = paired_test([_diff(s, g) for s, g in lp], SIGN_FLIP,
                      "gold log-prob change, GRPO minus SFT (nats)", NEEDED_LOGPROB, "nats")
    if isinstance(got, str):
        return missing("C5", title, got)
    p, extra = got
    ds, cs = _mean_ci([_diff(base, s) for s, _ in lp])
    dg, cg = _mean_ci([_diff(base, g) for _, g in lp])
    s0, g0 = (study.final_name(v, "mmlu") for v in pr[0])
    acc = paired_delta(mmlu_correct(study, s0), mmlu_correct(study, g0))
    ls = paired_delta(mmlu_correct(study, "base"), mmlu_correct(study, s0))
    lg = paired_delta(mmlu_correct(study, "base"), mmlu_correct(study, g0))
    numbers = {"sft_minus_base_logprob": ds, "sft_minus_base_logprob_ci95": cs,
               "grpo_minus_base_logprob": dg, "grpo_minus_base_logprob_ci95": cg,
               "grpo_minus_sft_logprob": p["effect"], "grpo_minus_sft_logprob_ci95": p["ci95"],
               "n_items": p["n"], "per_seed_difference": extra["per_seed"],
               "base": ls["a"], "sft": acc["a"], "grpo": acc["b"],
               "sft_minus_base": ls["difference"], "grpo_minus_base": lg["difference"],
               "grpo_minus_sft": acc["difference"], "grpo_minus_sft_ci95": acc["ci95"],
               "mcnemar_p": acc["mcnemar_p"], "flips_sft_right_grpo_wrong": acc["flips"][0],
               "flips_sft_wrong_grpo_right": acc["flips"][1]}
    statement = (f"gold-answer log-prob (normalised over choices) on {p['n']} MMLU items, change "
                 f"from base: SFT {ds:+.3g} [{cs[0]:+.3g}, {cs[1]:+.3g}], GRPO {dg:+.3g} "
                 f"[{cg[0]:+.3g}, {cg[1]:+.3g}] nats; GRPO - SFT {p['effect']:+.3g} "
                 f"[{p['ci95'][0]:+.3g}, {p['ci95'][1]:+.3g}] over {len(pr)} seed(s). Beside, "
                 f"accuracy (seed 1): base {ls['a']:.3f}, SFT {acc['a']:.3f}, GRPO {acc['b']:.3f};"
                 f" flips SFT-only-right {acc['flips'][0]} / GRPO-only-right {acc['flips'][1]}, "
                 f"exact McNemar p = {acc['mcnemar_p']:.3g}")
    return claim("C5", title, statement, numbers, p, [], single_seed(len(pr)))


def frozen_mlp_layers(study, name: str) -> list[int] | None:
    """MLP layers whose weights did not move at all in ``name`` (a frozen run), from weight-change."""
    res = result(study, "weight-change")
    rel = get(res.data if res else None, "relative_change", study.final_name(name, "weight-change"))
    if not rel or not all(m in rel for m in MLP):
        return None
    a = np.stack([floats(rel[m]) for m in MLP])
    return [int(i) for i in np.flatnonzero((a == 0).all(0))]


def c6_freezing(study) -> dict:
    title = ("Freezing SFT's mid-layer MLPs keeps more MMLU (primary: gold-answer log-prob, frozen "
             "minus unfrozen SFT)")
    pr = pairs(study, "sft-frozen", "sft")
    if isinstance(pr, str):
        return missing("C6", title, pr)
    lp = [tuple(mmlu_logprob(study, study.final_name(v, "mmlu")) for v in pair) for pair in pr]
    if any(None in pair for pair in lp):
        return missing("C6", title, "MMLU cloze rows with per-choice log-likelihoods of SFT and "
                                    "frozen SFT (re-run compare if they predate loglik)")
    got = paired_test([_diff(s, f) for f, s in lp], SIGN_FLIP,
                      "gold log-prob, frozen minus unfrozen SFT (nats)", NEEDED_LOGPROB, "nats")
    if isinstance(got, str):
        return missing("C6", title, got)
    p, extra = got
    f0, s0 = (study.final_name(v, "mmlu") for v in pr[0])
    numbers = {"mmlu_logprob_frozen_minus_sft": p["effect"], "mmlu_logprob_ci95": p["ci95"],
               "n_items": p["n"], "per_seed_difference": extra["per_seed"]}
    beside = []
    m = paired_delta(mmlu_correct(study, s0), mmlu_correct(study, f0))
    numbers |= {"mmlu_frozen_minus_sft": m["difference"], "mmlu_ci95": m["ci95"], "mmlu_n": m["n"],
                "mmlu_mcnemar_p": m["mcnemar_p"]}
    beside.append(f"MMLU accuracy {m['difference']:+.3f} [{m['ci95'][0]:+.3f}, "
                  f"{m['ci95'][1]:+.3f}], McNemar p = {m['mcnemar_p']:.3g}")
    ts, tf = (task_correct(study, study.final_name(v, "task-accuracy")) for v in (pr[0][1], pr[0][0]))
    if ts is not None and tf is not None:
        t = paired_delta(ts, tf)
        numbers |= {"task_frozen_minus_sft": t["difference"], "task_ci95": t["ci95"],
                    "task_n": t["n"], "task_mcnemar_p": t["mcnemar_p"]}
        beside.append(f"in-domain accuracy {t['difference']:+.3f} [{t['ci95'][0]:+.3f}, "
                      f"{t['ci95'][1]:+.3f}] (n={t['n']}), McNemar p = {t['mcnemar_p']:.3g}")
    frozen = frozen_mlp_layers(study, pr[0][0])
    cav = single_seed(len(pr))
    if frozen is not None:
        wc = result(study, "weight-change")
        n_layers = wc.data.get("n_layers") or len(wc.data["relative_change"][
            study.final_name(pr[0][0], "weight-change")]["gate"])
        span = list(mid_layers(n_layers))
        numbers |= {"frozen_mlp_layers": frozen, "mid_layers": [span[0], span[-1]]}
        if frozen != span:
            cav.append(f"the frozen run's unchanged MLP layers {_span(frozen)} are not the mid "
                       f"layers {_span(span)} ({MID_LAYERS_RULE}) that C4 and C8 test")
    statement = (f"pre-specified primary: gold-answer log-prob on {p['n']} MMLU items, frozen minus "
                 f"unfrozen SFT {p['effect']:+.3g} [{p['ci95'][0]:+.3g}, {p['ci95'][1]:+.3g}] "
                 f"nats over {len(pr)} seed(s); beside (seed 1, frozen - SFT): " + "; ".join(beside))
    return claim("C6", title, statement, numbers, p, [], cav)


def _span(layers: list[int]) -> str:
    if not layers:
        return "(none)"
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def c7_razor(study, n_boot: int = 1000) -> dict:
    title = "Forgetting tracks KL more than weight change (RL's Razor)"
    wc, kl = result(study, "weight-change"), result(study, "kl-drift")
    base = mmlu_logprob(study, "base")
    if wc is None or kl is None or base is None:
        return missing("C7", title, "weight-change, kl-drift and MMLU log-likelihoods over "
                                    "checkpoints")
    kl_key = "kl_reference_items" if "kl_reference_items" in kl.data else "kl_items"
    kinds = {n: v.kind for n, v in study.variants.items()}
    seed_of = {n: replicates(study, k).index(n) for n, k in kinds.items() if k}
    points = []
    for run, names in study.runs.items():
        for name in names:
            lp = mmlu_logprob(study, name)
            kli = get(kl.data, kl_key, name)
            rel = get(wc.data, "relative_change", name)
            if lp is None or kli is None or rel is None:
                continue
            points.append({"run": run, "model": name, "seed": seed_of.get(run, 0),
                           "lp": lp, "kl": floats(kli), "weight_change": mean_change(rel)})
    if len(points) < 4:
        return missing("C7", title, f"only {len(points)} checkpoints with all three measures")
    keys = sorted(set(base).intersection(*(set(p["lp"]) for p in points)), key=str)
    n_kl = min(len(p["kl"]) for p in points)
    if not keys or n_kl == 0:
        return missing("C7", title, "no MMLU or KL item common to every checkpoint")
    loss = np.array([[base[k] - p["lp"][k] for k in keys] for p in points])  # [points, items]
    klm = np.array([p["kl"][:n_kl] for p in points])
    wch = np.array([p["weight_change"] for p in points])
    seeds = np.array([p["seed"] for p in points])
    uniq = np.unique(seeds)

    def diff(li, ki, sel):
        lo_, kl_ = loss[sel][:, li].mean(1), np.nanmean(klm[sel][:, ki], 1)
        return spearman(lo_, kl_) - spearman(lo_, wch[sel]), lo_, kl_

    point, lo_all, kl_all = diff(np.arange(len(keys)), np.arange(n_kl), np.arange(len(points)))
    rng = np.random.default_rng(0)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        chosen = rng.choice(uniq, size=uniq.size)
        sel = np.concatenate([np.flatnonzero(seeds == s) for s in chosen])
        reps[b] = diff(rng.integers(0, len(keys), len(keys)), rng.integers(0, n_kl, n_kl), sel)[0]
    p = primary("bootstrap over seeds and items (MMLU and KL items resampled)",
                "Spearman(MMLU loss, KL) - Spearman(MMLU loss, weight change) over checkpoints",
                float(point), reps, NEEDED_RHO, len(points), int(uniq.size), units="rho")
    r_kl, r_w = spearman(lo_all, kl_all), spearman(lo_all, wch)
    numbers = {"spearman_loss_kl": r_kl, "spearman_loss_weight_change": r_w,
               "difference": p["effect"], "difference_ci95": p["ci95"], "kl_key": kl_key,
               "n_checkpoints": len(points), "n_mmlu_items": len(keys), "n_kl_items": n_kl,
               "points": [{"run": q["run"], "model": q["model"], "mmlu_loss": float(lo_all[i]),
                           "kl": float(kl_all[i]), "weight_change": float(wch[i])}
                          for i, q in enumerate(points)]}
    statement = (f"over {len(points)} checkpoints ({uniq.size} seed(s)): Spearman(MMLU gold log-prob "
                 f"loss, KL) = {r_kl:.2f}, Spearman(loss, mean relative weight change) = {r_w:.2f};"
                 f" difference {p['effect']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] "
                 f"({kl_key})")
    return claim("C7", title, statement, numbers, p, [], single_seed(int(uniq.size)))
