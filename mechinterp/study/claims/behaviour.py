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

from ...core.summary import floats
from ...evals.mmlu import rows_from_jsonl
from ...evals.stats import bootstrap_diff, mcnemar, spearman
from ...models.depth import MID_LAYERS_RULE, mid_layers
from . import stats
from .core import claim, get, missing, pairs, primary, replicates, result, single_seed
from .weights import MLP, mean_change

NEEDED_LOGPROB = 0.05  # nats of gold-answer log-probability: the smallest effect C5/C6 care about
NEEDED_RHO = 0.2  # C7: the smallest difference of two Spearman correlations worth a claim


def gold_logprob(row: dict) -> float:
    """The gold answer's log-probability normalised over the choices."""
    ll = np.asarray(row["loglik"], float)
    top = ll.max()
    return float(ll[row["gold"]] - (top + math.log(np.exp(ll - top).sum())))


def mmlu_rows(study, name: str) -> list[dict] | None:
    """The MMLU cloze item rows of model ``name`` (None when the study has none)."""
    res = result(study, "mmlu")
    key = f"items_{name}_cloze.jsonl"
    if res is None or key not in res.files:
        return None
    return rows_from_jsonl(res.files[key])


def mmlu_logprob(study, name: str) -> dict[tuple, float] | None:
    """``{(subject, index): gold log-prob}`` of model ``name`` (None without per-choice
    log-likelihoods)."""
    rows = mmlu_rows(study, name)
    if rows is None or any("loglik" not in r for r in rows):
        return None
    return {(r["subject"], r["index"]): gold_logprob(r) for r in rows}


def mmlu_correct(study, name: str) -> dict[tuple, bool] | None:
    """``{(subject, index): answered right}`` of model ``name`` on MMLU cloze (None: no rows)."""
    rows = mmlu_rows(study, name)
    return None if rows is None else {(r["subject"], r["index"]): r["pred"] == r["gold"]
                                      for r in rows}


def task_correct(study, name: str) -> dict[Any, bool] | None:
    """``{index: answered right}`` of model ``name`` on the in-domain task (None: no rows)."""
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


def _logprob_claim(study, cid: str, title: str, kinds: tuple[str, str], who: str,
                   measure: str, first_minus_second: bool, required: tuple = ()):
    """The primary test shared by C5 and C6: gold-answer log-probabilities of the final models of
    two kinds, paired item by item per seed (:func:`paired_test`).

    Args:
        study: the study.
        cid, title: the claim's id and title (for a not-measured claim).
        kinds: the two kinds, paired replicate by replicate.
        who: the models named when their log-likelihoods are missing.
        measure: what the difference is, in words.
        first_minus_second: the difference is the first kind's minus the second's (else the
            reverse).
        required: further log-prob dicts the claim reads (missing: None).

    Returns:
        ``(pairs, logprobs, primary, extra)``: the replicate pairs, ``(first, second)``
        log-prob dicts per pair, the primary test and its per-seed numbers; or a not-measured
        claim.
    """
    pr = pairs(study, *kinds)
    if isinstance(pr, str):
        return missing(cid, title, pr)
    lp = [tuple(mmlu_logprob(study, study.final_name(v, "mmlu")) for v in pair) for pair in pr]
    if any(x is None for x in required) or any(None in pair for pair in lp):
        return missing(cid, title, f"MMLU cloze rows with per-choice log-likelihoods of {who} "
                                   "(re-run compare if they predate loglik)")
    diffs = [_diff(b, a) if first_minus_second else _diff(a, b) for a, b in lp]
    got = paired_test(diffs, SIGN_FLIP, measure, NEEDED_LOGPROB, "nats")
    if isinstance(got, str):
        return missing(cid, title, got)
    return (pr, lp, *got)


def c2_kl(study) -> dict:
    """C2: KL from the base on held-out problems, SFT against GRPO, paired by item.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.

    Returns:
        The decided claim, or a not-measured one naming what the study lacks.
    """
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
    """C5: change of MMLU gold-answer log-probability, GRPO minus SFT, paired by item.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.

    Returns:
        The decided claim, or a not-measured one naming what the study lacks.
    """
    title = "SFT loses more MMLU than GRPO (gold-answer log-probability, cloze)"
    base = mmlu_logprob(study, "base")
    got = _logprob_claim(study, "C5", title, ("sft", "grpo"), "base, SFT and GRPO",
                         "gold log-prob change, GRPO minus SFT (nats)", first_minus_second=False,
                         required=(base,))
    if isinstance(got, dict):
        return got
    pr, lp, p, extra = got
    sft_change, sft_change_ci = _mean_ci([_diff(base, s) for s, _ in lp])
    grpo_change, grpo_change_ci = _mean_ci([_diff(base, g) for _, g in lp])
    sft_final, grpo_final = (study.final_name(v, "mmlu") for v in pr[0])
    sft_vs_grpo = paired_delta(mmlu_correct(study, sft_final), mmlu_correct(study, grpo_final))
    base_vs_sft = paired_delta(mmlu_correct(study, "base"), mmlu_correct(study, sft_final))
    base_vs_grpo = paired_delta(mmlu_correct(study, "base"), mmlu_correct(study, grpo_final))
    flips = sft_vs_grpo["flips"]
    numbers = {"sft_minus_base_logprob": sft_change, "sft_minus_base_logprob_ci95": sft_change_ci,
               "grpo_minus_base_logprob": grpo_change,
               "grpo_minus_base_logprob_ci95": grpo_change_ci,
               "grpo_minus_sft_logprob": p["effect"], "grpo_minus_sft_logprob_ci95": p["ci95"],
               "n_items": p["n"], "per_seed_difference": extra["per_seed"],
               "base": base_vs_sft["a"], "sft": sft_vs_grpo["a"], "grpo": sft_vs_grpo["b"],
               "sft_minus_base": base_vs_sft["difference"],
               "grpo_minus_base": base_vs_grpo["difference"],
               "grpo_minus_sft": sft_vs_grpo["difference"],
               "grpo_minus_sft_ci95": sft_vs_grpo["ci95"], "mcnemar_p": sft_vs_grpo["mcnemar_p"],
               "flips_sft_right_grpo_wrong": flips[0], "flips_sft_wrong_grpo_right": flips[1]}
    statement = (f"gold-answer log-prob (normalised over choices) on {p['n']} MMLU items, change "
                 f"from base: SFT {sft_change:+.3g} [{sft_change_ci[0]:+.3g}, "
                 f"{sft_change_ci[1]:+.3g}], GRPO {grpo_change:+.3g} [{grpo_change_ci[0]:+.3g}, "
                 f"{grpo_change_ci[1]:+.3g}] nats; GRPO - SFT {p['effect']:+.3g} "
                 f"[{p['ci95'][0]:+.3g}, {p['ci95'][1]:+.3g}] over {len(pr)} seed(s). Beside, "
                 f"accuracy (seed 1): base {base_vs_sft['a']:.3f}, SFT {sft_vs_grpo['a']:.3f}, "
                 f"GRPO {sft_vs_grpo['b']:.3f}; flips SFT-only-right {flips[0]} / GRPO-only-right "
                 f"{flips[1]}, exact McNemar p = {sft_vs_grpo['mcnemar_p']:.3g}")
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
    """C6: MMLU gold-answer log-probability, frozen minus unfrozen SFT, paired by item.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.

    Returns:
        The decided claim, or a not-measured one naming what the study lacks.
    """
    title = ("Freezing SFT's mid-layer MLPs keeps more MMLU (primary: gold-answer log-prob, frozen "
             "minus unfrozen SFT)")
    got = _logprob_claim(study, "C6", title, ("sft-frozen", "sft"), "SFT and frozen SFT",
                         "gold log-prob, frozen minus unfrozen SFT (nats)", first_minus_second=True)
    if isinstance(got, dict):
        return got
    pr, _, p, extra = got
    frozen_final, sft_final = (study.final_name(v, "mmlu") for v in pr[0])
    numbers = {"mmlu_logprob_frozen_minus_sft": p["effect"], "mmlu_logprob_ci95": p["ci95"],
               "n_items": p["n"], "per_seed_difference": extra["per_seed"]}
    beside = []
    mmlu = paired_delta(mmlu_correct(study, sft_final), mmlu_correct(study, frozen_final))
    numbers |= {"mmlu_frozen_minus_sft": mmlu["difference"], "mmlu_ci95": mmlu["ci95"],
                "mmlu_n": mmlu["n"], "mmlu_mcnemar_p": mmlu["mcnemar_p"]}
    beside.append(f"MMLU accuracy {mmlu['difference']:+.3f} [{mmlu['ci95'][0]:+.3f}, "
                  f"{mmlu['ci95'][1]:+.3f}], McNemar p = {mmlu['mcnemar_p']:.3g}")
    task_sft, task_frozen = (task_correct(study, study.final_name(v, "task-accuracy"))
                             for v in (pr[0][1], pr[0][0]))
    if task_sft is not None and task_frozen is not None:
        task = paired_delta(task_sft, task_frozen)
        numbers |= {"task_frozen_minus_sft": task["difference"], "task_ci95": task["ci95"],
                    "task_n": task["n"], "task_mcnemar_p": task["mcnemar_p"]}
        beside.append(f"in-domain accuracy {task['difference']:+.3f} [{task['ci95'][0]:+.3f}, "
                      f"{task['ci95'][1]:+.3f}] (n={task['n']}), McNemar p = "
                      f"{task['mcnemar_p']:.3g}")
    frozen = frozen_mlp_layers(study, pr[0][0])
    caveats = single_seed(len(pr))
    if frozen is not None:
        weights = result(study, "weight-change").data
        n_layers = weights.get("n_layers") or len(weights["relative_change"][
            study.final_name(pr[0][0], "weight-change")]["gate"])
        span = list(mid_layers(n_layers))
        numbers |= {"frozen_mlp_layers": frozen, "mid_layers": [span[0], span[-1]]}
        if frozen != span:
            caveats.append(f"the frozen run's unchanged MLP layers {_span(frozen)} are not the "
                           f"mid layers {_span(span)} ({MID_LAYERS_RULE}) that C4 and C8 test")
    statement = (f"pre-specified primary: gold-answer log-prob on {p['n']} MMLU items, frozen minus "
                 f"unfrozen SFT {p['effect']:+.3g} [{p['ci95'][0]:+.3g}, {p['ci95'][1]:+.3g}] "
                 f"nats over {len(pr)} seed(s); beside (seed 1, frozen - SFT): " + "; ".join(beside))
    return claim("C6", title, statement, numbers, p, [], caveats)


def _span(layers: list[int]) -> str:
    if not layers:
        return "(none)"
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _razor_points(study, kl_items: dict, weights: dict) -> list[dict]:
    """Every checkpoint with all three of C7's measures: its run, model name, seed index, MMLU
    gold log-probs, per-item KL and mean relative weight change."""
    kinds = {n: v.kind for n, v in study.variants.items()}
    seed_of = {n: replicates(study, k).index(n) for n, k in kinds.items() if k}
    points = []
    for run, names in study.runs.items():
        for name in names:
            logprob = mmlu_logprob(study, name)
            kl_values = kl_items.get(name)
            rel = get(weights, "relative_change", name)
            if logprob is None or kl_values is None or rel is None:
                continue
            points.append({"run": run, "model": name, "seed": seed_of.get(run, 0),
                           "lp": logprob, "kl": floats(kl_values),
                           "weight_change": mean_change(rel)})
    return points


def c7_razor(study, n_boot: int = 1000) -> dict:
    """C7 (RL's Razor): whether MMLU forgetting over checkpoints tracks KL more than weight change.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.
        n_boot: bootstrap replicates over seeds and items.

    Returns:
        The decided claim, or a not-measured one naming what the study lacks.
    """
    title = "Forgetting tracks KL more than weight change (RL's Razor)"
    wc, kl = result(study, "weight-change"), result(study, "kl-drift")
    base = mmlu_logprob(study, "base")
    if wc is None or kl is None or base is None:
        return missing("C7", title, "weight-change, kl-drift and MMLU log-likelihoods over "
                                    "checkpoints")
    kl_key = "kl_reference_items" if "kl_reference_items" in kl.data else "kl_items"
    points = _razor_points(study, get(kl.data, kl_key) or {}, wc.data)
    if len(points) < 4:
        return missing("C7", title, f"only {len(points)} checkpoints with all three measures")
    keys = sorted(set(base).intersection(*(set(p["lp"]) for p in points)), key=str)
    n_kl = min(len(p["kl"]) for p in points)
    if not keys or n_kl == 0:
        return missing("C7", title, "no MMLU or KL item common to every checkpoint")
    loss = np.array([[base[k] - p["lp"][k] for k in keys] for p in points])  # [points, items]
    kl_items = np.array([p["kl"][:n_kl] for p in points])
    weight_changes = np.array([p["weight_change"] for p in points])
    seeds = np.array([p["seed"] for p in points])
    uniq = np.unique(seeds)

    def diff(li, ki, sel):
        loss_mean, kl_mean = loss[sel][:, li].mean(1), np.nanmean(kl_items[sel][:, ki], 1)
        rho_gap = spearman(loss_mean, kl_mean) - spearman(loss_mean, weight_changes[sel])
        return rho_gap, loss_mean, kl_mean

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
    rho_kl, rho_weights = spearman(lo_all, kl_all), spearman(lo_all, weight_changes)
    numbers = {"spearman_loss_kl": rho_kl, "spearman_loss_weight_change": rho_weights,
               "difference": p["effect"], "difference_ci95": p["ci95"], "kl_key": kl_key,
               "n_checkpoints": len(points), "n_mmlu_items": len(keys), "n_kl_items": n_kl,
               "points": [{"run": q["run"], "model": q["model"], "mmlu_loss": float(lo_all[i]),
                           "kl": float(kl_all[i]), "weight_change": float(weight_changes[i])}
                          for i, q in enumerate(points)]}
    statement = (f"over {len(points)} checkpoints ({uniq.size} seed(s)): Spearman(MMLU gold "
                 f"log-prob loss, KL) = {rho_kl:.2f}, Spearman(loss, mean relative weight "
                 f"change) = {rho_weights:.2f}; difference {p['effect']:.2f} "
                 f"[{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] "
                 f"({kl_key})")
    return claim("C7", title, statement, numbers, p, [], single_seed(int(uniq.size)))
