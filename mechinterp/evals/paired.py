"""Paired comparison of two models on the same items: accuracy difference with a seeded bootstrap
interval, McNemar's test on the discordant pairs, and the flips (right->wrong, wrong->right) per
group (e.g. MMLU subject)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from .stats import bootstrap_diff, mcnemar


def paired_comparison(ids: Sequence, groups: Sequence[str], base_correct: Sequence[bool],
                      variant_correct: Sequence[bool], seed: int = 0,
                      n_boot: int = 2000) -> dict:
    """Compare correctness vectors aligned item by item (``ids`` name the items in flip lists)."""
    if not (len(ids) == len(groups) == len(base_correct) == len(variant_correct)):
        raise ValueError("paired comparison needs aligned sequences of equal length")
    n = len(ids)
    a = [bool(x) for x in base_correct]
    b = [bool(x) for x in variant_correct]
    flips: dict[str, dict[str, list]] = defaultdict(lambda: {"right_to_wrong": [],
                                                             "wrong_to_right": []})
    for i, g, x, y in zip(ids, groups, a, b):
        if x and not y:
            flips[g]["right_to_wrong"].append(i)
        elif y and not x:
            flips[g]["wrong_to_right"].append(i)
    n_rw = sum(len(f["right_to_wrong"]) for f in flips.values())
    n_wr = sum(len(f["wrong_to_right"]) for f in flips.values())
    lo, hi = bootstrap_diff(a, b, n_boot=n_boot, seed=seed)
    return {
        "n": n,
        "base_accuracy": sum(a) / n if n else float("nan"),
        "variant_accuracy": sum(b) / n if n else float("nan"),
        "difference": (sum(b) - sum(a)) / n if n else float("nan"),
        "difference_ci95": [lo, hi],
        "mcnemar": mcnemar(n_rw, n_wr),
        "right_to_wrong": n_rw,
        "wrong_to_right": n_wr,
        "flips": {g: flips[g] for g in sorted(flips)},
    }


def paired_rows(base_rows: Sequence[dict], variant_rows: Sequence[dict], pred_key: str = "pred",
                seed: int = 0) -> dict:
    """:func:`paired_comparison` over item rows (``subject``, ``index``, ``gold``, ``pred_key``)."""
    def key(r: dict) -> tuple:
        return r.get("subject", ""), r["index"]

    vmap = {key(r): r for r in variant_rows}
    if len(vmap) != len(base_rows) or any(key(r) not in vmap for r in base_rows):
        raise ValueError("base and variant were scored on different items")
    ids = [r["index"] for r in base_rows]
    groups = [r.get("subject", "all") for r in base_rows]

    def ok(r: dict) -> bool:
        return r["correct"] if "correct" in r else r[pred_key] == r["gold"]

    return paired_comparison(ids, groups, [ok(r) for r in base_rows],
                             [ok(vmap[key(r)]) for r in base_rows], seed=seed)
