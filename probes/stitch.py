"""``stitch``: which modules carry a fine-tune's new skill, and which carry its damage.

Weight-space module swaps: a *recipe* builds a model from two parents, e.g. ``base+sft:mlp@mid``
(the base with SFT's MLPs in the middle third of the layers) or ``sft+base:attn@early`` (SFT with
the base's early attention); grammar in :mod:`mechinterp.models.stitch` (the freeze-spec language
of ``mechinterp train --freeze``, layers also as ``early`` / ``mid`` / ``late`` thirds). Nothing is
written to disk and no model is copied: the base's module is the working model, its parameters
are pointed at the parents' tensors for each recipe and back afterwards.

``recipes=grid`` (the default) is, for every variant ``V``, ``{attn, mlp} x {early, mid, late}``
in both directions: ``base+V:...`` (does V's block alone bring V's skill / V's damage into the
base?) and ``V+base:...`` (does the base's block alone take them out of V?). Recipes are
separated by ``;`` (``--set "recipes=grid; base+grpo:attn.q,attn.k"``). With ``parents`` the base
and each variant are rows too (the reference points).

Per recipe, on the same items for every recipe:

* ``kl[<parent>]``: teacher-forced ``KL(parent || recipe)`` (nats per answer token, mean over
  ``n_kl`` held-out items of ``kl_items`` with their reference answers, as ``kl-drift`` measures),
  from every model the recipes name;
* MMLU cloze accuracy on a stratified sample of ``n_mmlu`` test items (as the ``mmlu`` probe
  scores ``cloze``), with a 95% Wilson interval;
* in-domain accuracy on ``n_task`` held-out items of ``task_items`` (greedy, training prompt
  format, as ``task-accuracy``), with a 95% Wilson interval;
* with ``parents``: the paired difference to the recipe's host on the same items (bootstrap 95%
  interval), for both accuracies.

``limit`` caps each of the three item counts.

Result keys: ``rows`` (one per recipe: ``recipe``, ``host``, ``donor``, ``spec`` (layers
expanded), ``donor_fraction`` (share of the parameters from the donor), ``kl`` / ``kl_sem``
(per parent), ``mmlu_cloze`` + ``mmlu_cloze_ci95``, ``task_accuracy`` + ``task_accuracy_ci95``,
``task_format_rate``, ``mmlu_vs_host`` / ``task_vs_host`` (difference with interval)); the same
numbers keyed by recipe for the long table: ``kl[<recipe>][<parent>]``,
``mmlu_cloze[<recipe>]``, ``task_accuracy[<recipe>]`` with ``*_ci95``; ``n_items``; arrays
``mmlu_correct`` / ``task_correct`` ([recipe, item], 1 = right) and ``kl_items`` ([recipe, parent,
item]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from mechinterp.analysis.divergence import base_cache_fits, teacher_forced_kl
from mechinterp.data.arithmetic import is_task
from mechinterp.data.mmlu import load_mmlu
from mechinterp.data.subset import seeded_subset
from mechinterp.errors import UserError
from mechinterp.evals.answers import answer_items
from mechinterp.evals.mmlu import MMLUFormat, score_mmlu, stratified_sample
from mechinterp.evals.stats import accuracy_summary, bootstrap_diff
from mechinterp.evals.task import score_task
from mechinterp.store.frames import Table
from mechinterp.models.naming import n_layers
from mechinterp.models.stitch import (
    THIRDS,
    Recipe,
    Stitcher,
    expand_spec,
    grid,
    parse_recipes,
    thirds,
)
from mechinterp.plotting.style import PALETTE, new_axes
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import fmt, interval
from mechinterp.progress import task
from mechinterp.store.results import Result
from mechinterp.data.items import load_items
from mechinterp.data.qa import SYSTEM_PROMPT

from .kl_drift import load_pairs

CLOZE = MMLUFormat("cloze")


@dataclass
class Config(BaseConfig):
    # recipes separated by ';' (HOST+DONOR:SPEC, e.g. base+sft:mlp@mid); "grid" = attn/mlp x
    # early/mid/late thirds, both directions, for every variant (may be mixed with others)
    recipes: str = "grid"
    parents: bool = True  # also score the base and each variant unchanged (reference rows)
    n_kl: int = 32  # held-out items for the KL from each parent (limit caps it)
    n_mmlu: int = 100  # MMLU test items, stratified sample, cloze (limit caps it)
    n_task: int = 50  # held-out in-domain items, greedy (limit caps it)
    kl_items: str = "arithmetic"  # KL items: an arithmetic task spec, "gsm8k" or a .jsonl file
    task_items: str = "arithmetic"  # in-domain items: an arithmetic task spec or "gsm8k"
    max_new_tokens: int = 48  # greedy tokens per in-domain answer at most
    batch_size: int = 16  # prompts per generate call
    kl_batch_size: int = 8  # items per forward pass for the KL
    max_length: int = 512  # tokens per KL item; longer answers are cut
    token_budget: int = 512  # tokens per forward pass when scoring MMLU
    n_bootstrap: int = 2000  # resamples for the paired differences to the host

    at_least = {"n_kl": 1, "n_mmlu": 1, "n_task": 1, "max_new_tokens": 1, "batch_size": 1,
                "kl_batch_size": 1, "max_length": 2, "token_budget": 1, "n_bootstrap": 1}


def _capped(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def recipe_list(config: Config, variants: list[str]) -> list[Recipe]:
    """The rows: with ``parents`` the base and each variant a recipe names first, then the
    recipes as given (``grid`` expanded), each label once."""
    out: list[Recipe] = []
    for part in config.recipes.split(";"):
        part = part.strip()
        if part == "grid":
            out += grid(variants)
        elif part:
            out += parse_recipes(part)
    if not out:
        raise UserError(f"recipes={config.recipes!r} names no recipe",
                        "give recipes like grid or base+sft:mlp@mid, separated by ';'")
    if config.parents:
        named = {n for r in out for n in r.parents}
        out = [Recipe(n, text=n) for n in ["base", *variants] if n == "base" or n in named] + out
    seen: set[str] = set()
    return [r for r in out if not (r.label in seen or seen.add(r.label))]


class Stitch:
    name = "stitch"
    version = "1"
    description = ("module swaps between base and variants (attn/mlp x early/mid/late): KL from "
                   "each parent, MMLU cloze and in-domain accuracy per recipe")
    Config = Config
    frames = (Table("kl", ("recipe", "parent")),
              Table("mmlu_cloze", ("recipe",), ci="mmlu_cloze_ci95"),
              Table("task_accuracy", ("recipe",), ci="task_accuracy_ci95"))

    def run(self, models, data, config: Config) -> Result:
        recipes, involved, stitcher = self._plan(models, config)
        base = models.base
        kl_items = self._kl_items(base, data, config, len(involved))
        mmlu = stratified_sample(load_mmlu(data, "test"), _capped(config.n_mmlu, config.limit),
                                 config.seed)
        task_set = seeded_subset(load_items(config.task_items, data, "test"),
                                 _capped(config.n_task, config.limit), config.seed)
        if not task_set:
            raise UserError(f"no held-out items in {config.task_items!r}",
                            "check the task_items option")
        try:
            for name in involved[1:]:
                stitcher.add(name, models[name].hf)
            scored = self._run_recipes(models, stitcher, recipes, involved,
                                       (kl_items, mmlu, task_set), config)
        finally:
            stitcher.restore()
            for name in involved[1:]:
                stitcher.remove(name)  # no reference left: release frees the weights
        rows, kl_arr, mmlu_ok, task_ok = scored
        _vs_host(rows, mmlu_ok, task_ok, config)
        for name in involved[1:]:
            models.release(name)
        by = {row["recipe"]: row for row in rows}
        return Result(self.name, {
            "rows": rows,
            "recipes": list(by),
            "parents": involved,
            "variants": models.variants,
            "n_layers": base.n_layers,
            "thirds": {k: list(v) for k, v in thirds(base.n_layers).items()},
            **{key: {k: v[key] for k, v in by.items()} for key in
               ("kl", "kl_sem", "mmlu_cloze", "mmlu_cloze_ci95", "task_accuracy",
                "task_accuracy_ci95")},
            "n_items": {"kl": len(kl_items), "mmlu": len(mmlu), "task": len(task_set)},
            "kl_items": config.kl_items,
            "task_items": config.task_items,
            "kl_definition": "KL(parent || recipe), teacher-forced, nats per answer token, mean "
                             "over items",
        }, {"mmlu_correct": np.stack(mmlu_ok).astype(np.int8),
            "task_correct": np.stack(task_ok).astype(np.int8),
            "kl_items": np.stack(kl_arr)})

    @staticmethod
    def _plan(models, config: Config) -> tuple[list, list[str], Stitcher]:
        """The recipes, the models they involve (the base first) and a stitcher on the base that
        has checked every recipe's selection against the model before anything heavy runs."""
        if "grid" in config.recipes and not models.variants:
            raise UserError("the stitch grid swaps modules between the base and variants",
                            "add --variant NAME=SPEC or give recipes")
        recipes = recipe_list(config, models.variants)
        unknown = sorted({n for r in recipes for n in r.parents} - set(models.names), key=str)
        if unknown:
            raise UserError(f"a recipe names model {unknown[0]!r}",
                            f"models here: {', '.join(models.names)}")
        involved = ["base"] + [n for n in models.variants if any(n in r.parents for r in recipes)]
        stitcher = Stitcher({"base": models.base.hf}, "base")
        for r in recipes:
            stitcher.selection(r)
        return recipes, involved, stitcher

    @staticmethod
    def _run_recipes(models, stitcher: Stitcher, recipes: list, involved: list[str],
                     item_sets: tuple, config: Config) -> tuple[list, list, list, list]:
        """Each recipe stitched into the base and measured: ``(rows, KL per parent and item,
        MMLU correct per item, task correct per item)``, one entry per recipe."""
        kl_items, mmlu, task_set = item_sets
        base = models.base
        rows, kl_arr, mmlu_ok, task_ok = [], [], [], []
        scored: dict[str, tuple] = {}  # a parent's accuracy rows, reused where it repeats
        caches: dict[str, dict] = {n: {} for n in involved}
        for name in involved:  # each parent's answer distributions, before any swap
            teacher_forced_kl(models[name], models[name], kl_items, config.kl_batch_size,
                              base_cache=caches[name], variant_cache=caches[name])
        with task("stitch recipes", len(recipes)) as advance:
            for r in recipes:
                with stitcher.stitched(r):  # base.hf now holds the recipe's weights
                    mine: dict = {}  # the recipe's distributions, computed once
                    kl = {p: teacher_forced_kl(models[p], base, kl_items, config.kl_batch_size,
                                               base_cache=caches[p], variant_cache=mine).numpy()
                          for p in involved}
                    pure = r.host if r.donor is None else None
                    if pure in scored:
                        m_rows, t_rows = scored[pure]
                    else:
                        m_rows = score_mmlu(base, mmlu, [], CLOZE, token_budget=config.token_budget)
                        t_rows = score_task(base, task_set, config.max_new_tokens,
                                            config.batch_size)
                        if pure is not None:
                            scored[pure] = (m_rows, t_rows)
                m_ok = np.array([x["pred"] == x["gold"] for x in m_rows])
                t_ok = np.array([bool(x["correct"]) for x in t_rows])
                rows.append(_row(r, stitcher, kl, m_ok, t_ok,
                                 float(np.mean([x["format_ok"] for x in t_rows]))))
                kl_arr.append(np.stack([kl[p] for p in involved]))
                mmlu_ok.append(m_ok)
                task_ok.append(t_ok)
                advance()
        return rows, kl_arr, mmlu_ok, task_ok

    @staticmethod
    def _kl_items(base, data, config: Config, n_parents: int):
        pairs = seeded_subset(load_pairs(SimpleNamespace(items=config.kl_items), data),
                              _capped(config.n_kl, config.limit), config.seed)
        system = SYSTEM_PROMPT if is_task(config.kl_items) else None
        items = answer_items(base.tokenizer, pairs, True, system, config.max_length)
        vocab = base.hf.get_output_embeddings().weight.shape[0]
        if not base_cache_fits(items, vocab, 2e9 / n_parents):
            raise UserError(f"the {n_parents} parents' answer distributions on {len(items)} KL "
                            "items do not fit in 2 GB", "lower n_kl or max_length")
        return items

    def plot(self, result: Result) -> dict:
        d = result.data
        figs = {"stitch_rows": _plot_rows(d)}
        panels = _plot_grid(d)
        if panels is not None:
            figs["stitch_grid"] = panels
        return figs


def _row(r: Recipe, stitcher: Stitcher, kl: dict[str, np.ndarray], m_ok: np.ndarray,
         t_ok: np.ndarray, format_rate: float) -> dict:
    sel = stitcher.selection(r)
    kl_mean, kl_sem = {}, {}
    for p, v in kl.items():
        f = v[np.isfinite(v)]
        kl_mean[p] = float(f.mean()) if f.size else math.nan
        kl_sem[p] = float(f.std(ddof=1) / math.sqrt(f.size)) if f.size > 1 else math.nan
    m, t = accuracy_summary(m_ok.tolist()), accuracy_summary(t_ok.tolist())
    return {"recipe": r.label, "host": r.host, "donor": r.donor,
            "spec": expand_spec(r.spec, _n_layers(stitcher)) if r.donor else "",
            "donor_fraction": sel.n_frozen / sel.total if r.donor else 0.0,
            "kl": kl_mean, "kl_sem": kl_sem,
            "mmlu_cloze": m["accuracy"], "mmlu_cloze_ci95": m["ci95"],
            "task_accuracy": t["accuracy"], "task_accuracy_ci95": t["ci95"],
            "task_format_rate": format_rate, "mmlu_vs_host": None, "task_vs_host": None}


def _n_layers(stitcher: Stitcher) -> int:
    return n_layers(stitcher.module.config)


def _vs_host(rows: list[dict], mmlu_ok: list, task_ok: list, config: Config) -> None:
    """Paired difference (recipe - host) on the same items, where the host has a row."""
    at = {row["recipe"]: i for i, row in enumerate(rows)}
    for i, row in enumerate(rows):
        h = at.get(row["host"])
        if row["donor"] is None or h is None:
            continue
        for key, ok in (("mmlu_vs_host", mmlu_ok), ("task_vs_host", task_ok)):
            lo, hi = bootstrap_diff(ok[h], ok[i], config.n_bootstrap, config.seed)
            row[key] = {"difference": float(ok[i].mean() - ok[h].mean()), "ci95": [lo, hi]}


PLAIN = ("Weight-space module swaps: a model that takes one block of modules (attention or MLP, "
         "early/mid/late third of the layers) from the fine-tune and the rest from the base, or "
         "the reverse; KL from each parent, MMLU cloze and in-domain accuracy on the same items - "
         "which modules carry the new skill, which carry the damage.")


def summary(result: Result, study) -> list[str]:
    """Per recipe: MMLU cloze and in-domain accuracy with intervals, and KL from each parent."""
    return [f"{r['recipe']}: MMLU cloze {fmt(r['mmlu_cloze'])} {interval(r['mmlu_cloze_ci95'])}, "
            f"in-domain {fmt(r['task_accuracy'])} {interval(r['task_accuracy_ci95'])}, KL from "
            + ", ".join(f"{parent} {fmt(kl)}" for parent, kl in r["kl"].items())
            for r in result.data["rows"]]


PROBE = declare(Stitch(), plain=PLAIN, summary=summary, model_names=listed_models("variants"))


def _kind(row: dict) -> tuple[str, str]:
    """(legend label, colour) of a row: a parent, a block of a variant in the base, or the
    reverse."""
    if row["donor"] is None:
        return "parent model", "#000000"
    if row["host"] == "base":
        return "variant's block in the base", PALETTE[0]
    if row["donor"] == "base":
        return "base's block in the variant", PALETTE[1]
    return "between variants", PALETTE[2]


def _plot_rows(d: dict):
    """One line per recipe: KL from each parent, MMLU cloze and in-domain accuracy with 95%
    intervals, the base's accuracies as dashed lines."""
    rows = d["rows"]
    n = len(rows)
    y = np.arange(n)[::-1]
    fig, axes = new_axes(width=13, height=max(3.5, 0.27 * n + 1.6), ncols=3, sharey=True,
                         gridspec_kw={"width_ratios": [1.2, 1, 1]})
    ax_kl, ax_m, ax_t = axes
    markers = "osD^vP*X"
    for j, p in enumerate(d["parents"]):
        ax_kl.plot([np.nan if r["kl"].get(p) is None else r["kl"][p] for r in rows], y,
                   markers[j % len(markers)], color=PALETTE[j % len(PALETTE)], ms=5,
                   mfc="none", label=f"KL({p} || recipe)")
    ax_kl.set_xscale("symlog", linthresh=1e-3)
    ax_kl.set_xlim(left=0)
    ax_kl.set_xlabel("KL, nats per answer token (symlog)")
    base_row = next((r for r in rows if r["recipe"] == "base"), None)
    for ax, key, what in ((ax_m, "mmlu_cloze", "MMLU cloze accuracy"),
                          (ax_t, "task_accuracy", "in-domain accuracy")):
        shown = set()
        for yi, r in zip(y, rows):
            label, colour = _kind(r)
            val = np.nan if r[key] is None else r[key]
            lo, hi = (np.nan if v is None else v for v in r[f"{key}_ci95"])
            ax.errorbar([val], [yi], xerr=[[val - lo], [hi - val]], fmt="s" if
                        r["donor"] is None else "o", color=colour, ms=4, capsize=2, lw=1,
                        label=None if label in shown else label)
            shown.add(label)
        if base_row is not None:
            ax.axvline(base_row[key], color="grey", ls="--", lw=0.8)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(f"{what} (95% Wilson)")
        ax.grid(True, axis="x", alpha=0.3)
    handles, labels = (a + b for a, b in zip(ax_kl.get_legend_handles_labels(),
                                             ax_t.get_legend_handles_labels()))
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)),
               fontsize=8, frameon=False)
    ax_kl.set_yticks(y, [r["recipe"] for r in rows], fontsize=8)
    ax_kl.set_ylim(-0.7, n - 0.3)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.15)
    ni = d["n_items"]
    fig.suptitle(f"Module stitching: KL on {ni['kl']} held-out items, MMLU cloze on {ni['mmlu']} "
                 f"items, in-domain on {ni['task']} items (dashed: the base)", fontsize=11)
    return fig


def _plot_grid(d: dict):
    """Per variant, the thirds grid as heatmaps of the accuracy change against the host: the
    variant's block in the base (skill / damage it carries) and the base's block in the variant
    (what restoring it takes away)."""
    by = {r["recipe"]: r for r in d["rows"]}
    variants = [v for v in d["variants"]
                if all(f"{h}+{g}:{k}@{t}" in by for h, g in (("base", v), (v, "base"))
                       for k in ("attn", "mlp") for t in THIRDS)]
    if not variants or "base" not in by:
        return None
    cols = [("task_accuracy", "base", "in-domain: variant's block in base"),
            ("mmlu_cloze", "base", "MMLU cloze: variant's block in base"),
            ("task_accuracy", "variant", "in-domain: base's block in variant"),
            ("mmlu_cloze", "variant", "MMLU cloze: base's block in variant")]
    fig, axes = new_axes(width=14, height=1.9 * len(variants) + 1.4, nrows=len(variants),
                         ncols=4, squeeze=False)
    vals = {}
    for v in variants:
        for c, (key, host, _) in enumerate(cols):
            h, g = ("base", v) if host == "base" else (v, "base")
            ref = by[h][key]
            vals[v, c] = np.array([[by[f"{h}+{g}:{k}@{t}"][key] - ref for t in THIRDS]
                                   for k in ("attn", "mlp")], float)
    lim = max(0.05, float(np.nanmax([np.nanmax(np.abs(a)) for a in vals.values()])))
    im = None
    span = d.get("thirds", {})
    xlab = [f"{t}\n({span[t][0]}-{span[t][1]})" if t in span else t for t in THIRDS]
    for i, v in enumerate(variants):
        for c, (_, _, title) in enumerate(cols):
            ax = axes[i, c]
            a = vals[v, c]
            im = ax.imshow(a, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
            for (yy, xx), val in np.ndenumerate(a):
                ax.text(xx, yy, "n/a" if not np.isfinite(val) else f"{val:+.2f}", ha="center",
                        va="center", fontsize=9, color="black" if abs(val) < 0.6 * lim
                        else "white")
            ax.set_xticks(range(3), xlab, fontsize=8)
            ax.set_yticks(range(2), ["attn", "mlp"])
            if i == 0:
                ax.set_title(title, fontsize=9)
        axes[i, 0].set_ylabel(f"{v}\n(block swapped)")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9,
                 label="accuracy - host's accuracy (RdBu: blue = higher)")
    fig.suptitle("Which modules carry the skill and the damage: accuracy change against the host "
                 "when one block of layers is swapped", fontsize=11)
    return fig
