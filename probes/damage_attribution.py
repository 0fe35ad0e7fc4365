"""``damage-attribution``: which layers' MLPs carry the damage behind the MMLU items a variant breaks.

Every item of the sample is scored by base and variant in the probe's ``format``: the letter format
(log-prob of " A".." D"), ``cloze`` (summed log-likelihood of each answer text after the question,
argmax as lm-eval's ``acc``) or ``cloze-norm`` (that divided by the answer's length in characters,
lm-eval's ``acc_norm``). Scores come from :func:`~mechinterp.analysis.crossmodel.item_reference`,
the same blocks, packing and float path as the patched runs, so the unpatched variant on a failure is
wrong under the very computation that repairs it (``unpatched_failure_accuracy`` must be 0).

Two item sets, each a seeded uniform sample (one random order of all items; the first ``max_failures``
of each set in that order, so they overlap as much as they can and cost as little):

- failures: the base right, the variant wrong (``n_failures`` found, ``n_failures_used`` patched);
- damaged items: the gold answer's margin ``m = score(gold) - max_other score(choice)`` dropped,
  ``m_base - m_variant > DAMAGE_FLOOR`` (``n_damaged`` found, ``n_damaged_used`` patched). Every
  failure is a damaged item; the margin measure works when nothing flips.

plus ``n_control`` controls both get right. For every layer and every window of ``window``
consecutive layers the base's output at a site (``mlp_out``; ``attn_out`` for comparison) is
patched into the variant at all positions. Flip-based (failures): ``recovered_fraction`` (share
that flip back to gold) and ``logprob_recovery`` (gold's score normalised over the four choices,
``mean(g_patched - g_variant) / mean(g_base - g_variant)``). Margin-based (damaged items):
``margin_recovery`` = ``mean(m_patched - m_variant) / mean(m_base - m_variant)`` (a ratio of means),
with a seeded bootstrap 95% interval over items. Patching an activation measures MEDIATION: a
last-layer MLP that writes straight into the logits "repairs" damage made anywhere upstream.

ORIGIN is measured in weight space: revert layer L's MLP matrices (gate/up/down) to the base's and
score the variant again (``revert_recovery``: the share of the margin drop given back, the same
ratio of means, per layer; ``revert_window_recovery``: all MLPs of one third of the depth at once,
the thirds of :func:`mechinterp.models.depth.thirds`). Whether there is damage to attribute at all
is ``net_damage``: the margin drop over every scored item (not the damaged ones: they are selected
for a positive drop), with a bootstrap interval and a sign-flip p-value. The damaged items used
(``n_used``) are the first ``max_damaged`` of the random order (default: ``max_failures``); the
patched ones the first ``max_failures`` of the same order, so patching reads a subset of the items
the reverts read (all of them when ``max_damaged <= max_failures``). Patching costs about twice a
revert sweep per item (58 against 33 conditions at 30 layers and windows of 3).
Per-layer recovery is related to the per-layer relative change of the MLP weights (mean over the
MLP matrices of ``||dW||_F / ||W||_F``).

Ranking (``top_layers``): MLP recovered fraction, ties broken by log-prob recovery; Spearman and the
top-third overlap use the log-prob recovery. ``top_layers_margin``: layers by MLP margin recovery.

Result keys: ``format``, ``recovered_fraction[<variant>][<site>]`` (list over layers; with
``recovered_fraction_ci95``, Wilson intervals over the failures used; also for windows and reverts),
``n_failures[<variant>]`` (all found), ``n_failures_used``, ``spearman_vs_weight_change``,
``top_layers``, ``top_third_overlap``, ``top_windows`` (indices into ``windows``), ``logprob_recovery``,
``window_recovered_fraction``, ``window_logprob_recovery``, ``windows``, ``control_kept``,
``weight_revert_fraction``, ``weight_revert_logprob_recovery``, ``mlp_weight_change``, ``by_subject``,
``examples``; margin keys ``n_damaged``, ``n_damaged_used``, ``margin_drop`` (mean over the damaged
items used) with ``margin_drop_ci95``, ``margin_drop_failures``, ``margin_drop_all`` (all scored
items) with ``margin_drop_all_ci95``, ``margin_recovery[<variant>][<site>]`` with
``margin_recovery_ci95`` (list of [lo, hi]), ``failure_margin_recovery`` (same on the failures),
``window_margin_recovery`` with ``window_margin_recovery_ci95``, ``weight_revert_margin_recovery``
with ``weight_revert_margin_recovery_ci95``, ``top_layers_margin``, ``top_windows_margin``,
``spearman_margin_vs_weight_change``, ``top_third_overlap_margin``,
``unpatched_failure_accuracy``; ``failure_items`` and ``damaged_items`` ([subject, index] of the
items used); origin keys ``revert_recovery[<variant>]["mlp"]`` (list over layers) with
``revert_recovery_ci95`` (list of [lo, hi]), ``revert_window_recovery[<variant>][early|mid|late]``
(``{"mean", "ci95", "layers": [first, last]}``), ``net_damage[<variant>]`` (``{"mean", "ci95", "p",
"n"}``), ``n_used[<variant>]`` (damaged items reverted; also with ``scan=atp``) and
``reverted_items`` ([subject, index]). NaN (JSON null) where a set is empty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mechinterp.analysis.attribution import atp_scan, by_site, choice_margin, verify_scan
from mechinterp.analysis.crossmodel import (
    Condition,
    ItemRows,
    condition_sweep,
    item_reference,
    item_rows,
    mlp_matrices,
    patch_condition,
    revert_condition,
)
from mechinterp.analysis.weights import weight_change
from mechinterp.data.mmlu import LETTERS, load_mmlu
from mechinterp.errors import UserError
from mechinterp.evals.mmlu import MMLUFormat, build_request, stratified_sample
from mechinterp.evals.stats import mean_ci, ratio_of_means, sign_flip_p, spearman, wilson
from mechinterp.store.frames import Table
from mechinterp.models.depth import thirds
from mechinterp.models.loaded import LoadedModel
from mechinterp.plotting import new_axes
from mechinterp.plotting.scan import scan_figure
from mechinterp.plotting.style import plain_text
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import fmt, interval
from mechinterp.progress import task
from mechinterp.store.results import Result


@dataclass
class Config(BaseConfig):
    format: str = "letter-0shot"  # letter-0shot | letter-5shot | cloze | cloze-norm (+ -5shot, -chat)
    subjects: list[str] | None = None  # MMLU subjects (default: all 57)
    # activations patched from the base: mlp_out, attn_out
    sites: list[str] = field(default_factory=lambda: ["mlp_out", "attn_out"])
    window: int = 3  # layers per window of the window sweep
    max_failures: int = 32  # cap on failures patched, and on damaged items patched
    # cap on damaged items whose MLP weights are reverted (origin); None: max_failures. The
    # patched damaged items are the first max_failures of the same order: among them
    max_damaged: int | None = None
    n_control: int = 16  # items both models get right, patched as a control
    n_bootstrap: int = 1000  # bootstrap resamples of the items for each interval
    token_budget: int = 8192  # tokens per patched forward (conditions x the item's packed tokens)
    # exact: patch every layer and window; atp: attribution-patching scan of every (site, layer)
    # on the damaged items (margin recovery), then exact patching of the top scan_top_k
    scan: str = "exact"
    scan_top_k: int = 5  # scan=atp: sites verified by exact patching
    scan_validate: bool = False  # scan=atp: also patch every site exactly (Spearman, speed ratio)

    # lower bounds; every other number: at least 0
    at_least = {"window": 1, "max_failures": 1, "max_damaged": 1, "token_budget": 1,
                "n_bootstrap": 1, "scan_top_k": 1}


RECOVERY_FLOOR = 1e-3  # log-prob recovery below 0.1% of the gap is float noise, not recovery
DAMAGE_FLOOR = 1e-3  # a margin drop (nats, or nats per character) below this is not damage


def parse_format(text: str) -> tuple[MMLUFormat, bool]:
    """(format, length-normalised): ``cloze-norm`` is ``cloze`` scored as lm-eval's ``acc_norm``."""
    norm = "-norm" in text
    fmt = MMLUFormat.parse(text.replace("-norm", ""))
    if norm and fmt.kind != "cloze":
        raise UserError(f"{text!r}: only the cloze format has a length-normalised score",
                        "use cloze-norm, or a letter format without -norm")
    return fmt, norm


def format_label(fmt: MMLUFormat, norm: bool) -> str:
    return fmt.label + ("-norm" if norm else "")


def margins(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """score(gold) - max over the other choices; ``scores`` [..., items, choices]."""
    g = np.take_along_axis(scores, np.broadcast_to(gold[:, None], scores.shape[:-1] + (1,)), -1)
    other = np.where(np.arange(scores.shape[-1]) == gold[:, None], -np.inf, scores)
    return g[..., 0] - other.max(-1)


def gold_norm(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """The gold choice's score normalised over the choices (log-softmax); [..., items]."""
    z = scores - scores.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1)) + scores.max(-1)
    g = np.take_along_axis(scores, np.broadcast_to(gold[:, None], scores.shape[:-1] + (1,)), -1)
    return g[..., 0] - lse


def top_third_overlap(recovery: list[float], change: list[float]) -> list[int]:
    """Layers in the top third of both lists. A layer only counts as "top" with a real value
    (recovery above :data:`RECOVERY_FLOOR`, weight change above 0): untouched layers tie at zero
    and must not enter a top third by index order."""
    k = math.ceil(len(recovery) / 3)

    def top(values: list[float], floor: float) -> set[int]:
        vals = [v if v is not None and math.isfinite(v) else -math.inf for v in values]
        ranked = sorted(range(len(vals)), key=lambda i: (-vals[i], i))[:k]
        return {i for i in ranked if vals[i] > floor}

    return sorted(top(recovery, RECOVERY_FLOOR) & top(change, 0.0))


def rank_layers(fraction: list[float], lp_recovery: list[float]) -> list[int]:
    """Layers by recovered fraction (desc), ties by log-prob recovery (desc), then layer index."""
    def key(L: int) -> tuple:
        return (-fraction[L], -(lp_recovery[L] if math.isfinite(lp_recovery[L]) else -1e9), L)

    return sorted(range(len(fraction)), key=key)


def rank_by(values: list[float]) -> list[int]:
    """Indices by value (desc), NaN last, ties by index."""
    return sorted(range(len(values)),
                  key=lambda i: (-values[i] if math.isfinite(values[i]) else math.inf, i))


def first_in_order(members: np.ndarray, order_rank: np.ndarray, cap: int) -> list[int]:
    """The ``cap`` members that come first in a random order (a uniform sample), sorted."""
    chosen = sorted(members.tolist(), key=lambda i: order_rank[i])[:cap]
    return sorted(chosen)


def _floats(values) -> np.ndarray:
    """A stored list (None for NaN after the JSON round trip) as a float array."""
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def _pairs(values) -> np.ndarray:
    return np.array([[math.nan if x is None else x for x in v] for v in values],
                    dtype=float).reshape(-1, 2)


class DamageAttribution:
    name = "damage-attribution"
    version = "4"
    description = ("patch the base's MLP (and attention) outputs into a variant on the MMLU items "
                   "it damaged (margin) or broke (flips); relate recovery per layer to MLP weight "
                   "change")
    Config = Config
    frames = (
        Table("recovered_fraction", ("model", "site", "layer"), ci="recovered_fraction_ci95"),
        Table("margin_recovery", ("model", "site", "layer"), ci="margin_recovery_ci95"),
        Table("weight_revert_fraction", ("model", "layer"), ci="weight_revert_fraction_ci95"),
        Table("weight_revert_margin_recovery", ("model", "layer"),
              ci="weight_revert_margin_recovery_ci95"),
        Table("mlp_weight_change", ("model", "layer")),
        Table("revert_recovery", ("model", "matrices", "layer"), ci="revert_recovery_ci95"),
        Table("margin_drop", ("model",), ci="margin_drop_ci95"),
        Table("scan_estimate", ("model", "site", "layer")),
        Table("scan_exact", ("model", "site", "layer")))

    def run(self, models, data, config: Config) -> Result:
        fmt, norm = parse_format(config.format)
        if not models.variants:
            raise UserError("damage-attribution needs a variant", "add --variant NAME=SPEC")
        if config.scan not in ("exact", "atp"):
            raise UserError(f"scan={config.scan!r}", "use scan=exact or scan=atp")
        base = models.base
        items, requests = mmlu_requests(data, config, fmt, base.tokenizer)
        packed = item_rows(base, requests, not fmt.chat)
        lengths = (np.array([[float(len(c)) for c in it.choices] for it in items])
                   if norm else None)

        def to_scores(ll: np.ndarray, idx) -> np.ndarray:
            """Log-likelihoods [..., len(idx), choices] of items ``idx`` in the format's score."""
            return ll / lengths[idx] if norm else ll

        n_layers = base.n_layers
        windows = [list(range(s, s + config.window))
                   for s in range(n_layers - config.window + 1)]
        out: dict[str, dict] = {k: {} for k in KEYS}
        everything = np.arange(len(items))
        s_base = to_scores(unpatched_scores(base, packed), everything)
        for k, vname in enumerate(models.variants):
            variant = models[vname]
            run = VariantRun(k, vname, base, variant, items, packed,
                             np.array([it.answer for it in items]), s_base,
                             to_scores(unpatched_scores(variant, packed, vname), everything),
                             to_scores, windows, config)
            out["mlp_weight_change"][vname] = mlp_weight_change(models, vname)
            (scan_variant if config.scan == "atp" else exact_variant)(out, run)
            models.release(vname)
        return Result(self.name, {"variants": models.variants, "n_layers": n_layers,
                                  "n_items": len(items), "format": format_label(fmt, norm),
                                  "sites": list(config.sites), "windows": windows,
                                  "damage_floor": DAMAGE_FLOOR, "n_bootstrap": config.n_bootstrap,
                                  **out})

    def plot(self, result: Result) -> dict:
        d = result.data
        figs = {}
        if d.get("scan") == "atp":
            for v in d["variants"]:
                if d["scan_items"][v]["n_damaged_used"]:
                    figs[f"scan_{v}"] = scan_figure(
                        d["scan_estimate"][v], d["scan_exact"][v], d["scan_agreement"][v],
                        {"mlp_out": "MLP output", "attn_out": "attention output"},
                        "share of the margin drop given back",
                        f"{v} ({d.get('format', 'letter')}): attribution-patching scan vs exact")
        layers = np.arange(d["n_layers"])
        for v in d["variants"]:
            if (d.get("n_damaged_used") or {}).get(v):
                figs[f"margin_recovery_{v}"] = self._margin_figure(d, v, layers)
            if not d["top_layers"].get(v):
                continue
            figs[f"recovery_{v}"] = self._recovery_figure(d, v, layers)
            figs[f"by_subject_{v}"] = self._subject_figure(d, v)
            figs[f"examples_{v}"] = self._examples_figure(d, v)
        return figs

    @staticmethod
    def _recovery_figure(d: dict, v: str, layers: np.ndarray):
        """Share of the failures recovered per layer by patching (Wilson bands) and by reverting
        the MLP weights, over the MLP weight change."""
        fig, ax = new_axes(width=7, height=4)
        for s in d["sites"]:
            (line,) = ax.plot(layers, _floats(d["recovered_fraction"][v][s]), "o-", ms=3,
                              label=f"patch base {s} (mediation)")
            ci = (d.get("recovered_fraction_ci95") or {}).get(v, {}).get(s)
            if ci:
                band = _pairs(ci)
                ax.fill_between(layers, band[:, 0], band[:, 1], color=line.get_color(),
                                alpha=0.15, lw=0)
        ax.plot(layers, _floats(d["weight_revert_fraction"][v]), "s--", ms=3,
                label="revert MLP weights (origin)")
        ax.set_xlabel("layer")
        n_used = (d.get("n_failures_used") or {}).get(v, d["n_failures"][v])
        ax.set_ylabel(f"share of {n_used} used of {d['n_failures'][v]} failures recovered\n"
                      "(bands: Wilson 95%)")
        ax.set_ylim(-0.02, 1.02)
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        ax2.plot(layers, _floats(d["mlp_weight_change"][v]), color="grey", lw=2, alpha=0.6,
                 label="MLP weight change")
        ax2.set_ylabel(r"MLP $\|\Delta W\|_F / \|W\|_F$ (grey)")
        rho = d["spearman_vs_weight_change"][v]
        rho = "n/a" if rho is None or not math.isfinite(rho) else f"{rho:.2f}"
        ax.set_title(f"{v} ({d.get('format', 'letter')}): recovery per layer "
                     f"(Spearman vs weight change {rho})")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        return fig

    @staticmethod
    def _subject_figure(d: dict, v: str):
        """Failures per subject, and those the best window and the top layer recover."""
        subj = d["by_subject"][v]
        names = list(subj)
        fig, ax = new_axes(width=7, height=max(2.5, 0.3 * len(names) + 1.2))
        y = np.arange(len(names))
        ax.barh(y, np.array([subj[s]["n_failures"] for s in names]), color="#dddddd",
                label="failures")
        ax.barh(y, [subj[s]["recovered_best_window"] for s in names], height=0.5,
                label="recovered (best MLP window)")
        ax.barh(y, [subj[s]["recovered_top_layer"] for s in names], height=0.25,
                label="recovered (top MLP layer)")
        ax.set_yticks(y, [s.replace("_", " ") for s in names], fontsize=8)
        ax.set_xlabel("items")
        ax.set_title(f"{v}: failures and recoveries per subject")
        ax.legend(fontsize=8)
        return fig

    @staticmethod
    def _examples_figure(d: dict, v: str):
        """A table of the example failures."""
        ex = d["examples"][v]
        cols = ["subject", "question", "gold", "base", "variant", "patched_top_layer",
                "recovered_top_layer", "recovered_best_window"]
        fig, ax = new_axes(width=12, height=0.35 * len(ex) + 1.0)
        ax.axis("off")
        cells = [[plain_text(str(e[c])[:60]) for c in cols] for e in ex]
        table = ax.table(cellText=cells, colLabels=[c.replace("_", " ") for c in cols],
                         loc="center", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        table.auto_set_column_width(list(range(len(cols))))
        ax.set_title(f"{v}: example failures (top layer {d['top_layers'][v][0]})")
        return fig

    @staticmethod
    def _margin_figure(d: dict, v: str, layers: np.ndarray):
        """Share of the margin drop given back per layer (left) and per window (right), with
        bootstrap 95% bands."""
        fig, (ax, axw) = new_axes(width=11, height=4, ncols=2, sharey=True)
        starts = np.array([w[0] for w in d["windows"]])
        for s in d["sites"]:
            for a, x, key in ((ax, layers, "margin_recovery"),
                              (axw, starts, "window_margin_recovery")):
                y = _floats(d[key][v][s])
                (line,) = a.plot(x, y, "o-", ms=3, label=f"patch base {s} (mediation)")
                ci = d.get(f"{key}_ci95", {}).get(v, {}).get(s)
                if ci:
                    band = _pairs(ci)
                    a.fill_between(x, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2,
                                   lw=0)
        y = _floats(d["weight_revert_margin_recovery"][v])
        (line,) = ax.plot(layers, y, "s--", ms=3, label="revert MLP weights (origin)")
        for j, third in enumerate((d.get("revert_window_recovery") or {}).get(v, {}).values()):
            a, b = third["layers"]
            ax.hlines(_floats([third["mean"]]), a - 0.4, b + 0.4, color="black", lw=2,
                      label="revert all MLPs of a third (origin)" if j == 0 else None)
        ci = d.get("weight_revert_margin_recovery_ci95", {}).get(v)
        if ci:
            band = _pairs(ci)
            ax.fill_between(layers, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.12,
                            lw=0)
        for a in (ax, axw):
            a.axhline(0, color="grey", lw=0.8)
            a.axhline(1, color="grey", lw=0.8, ls=":")
        n_used, n_all = d["n_damaged_used"][v], d["n_damaged"][v]
        drop = d.get("margin_drop", {}).get(v)
        drop = "n/a" if drop is None or not math.isfinite(drop) else f"{drop:.3g}"
        ax.set_xlabel("layer")
        axw.set_xlabel(f"first layer of the window of {len(d['windows'][0]) if d['windows'] else 0}")
        ax.set_ylabel(f"share of margin drop given back\n({n_used} used of {n_all} damaged items)")
        nf = (d.get("n_failures") or {}).get(v)
        nfu = (d.get("n_failures_used") or {}).get(v)
        net = (d.get("net_damage") or {}).get(v)
        net = (f"net drop over all {net['n']} items {net['mean']:.3g} (sign-flip p {net['p']:.2g}); "
               if net and net.get("mean") is not None and net.get("p") is not None else "")
        ax.set_title(f"{v} ({d.get('format', 'letter')}): mean margin drop {drop} on the items used"
                     f"\n{net}flips: {nfu} used of {nf} failures", fontsize=9)
        axw.set_title("windows (bands: bootstrap 95% over items)", fontsize=9)
        ax.legend(fontsize=8, loc="best")
        return fig


def mmlu_requests(data, config: Config, fmt: MMLUFormat, tokenizer) -> tuple[list, list]:
    """The stratified sample of MMLU test items and their requests in ``fmt`` (with the format's
    shots from the dev split of each item's subject)."""
    subjects = list(config.subjects) if config.subjects else None
    items = stratified_sample(load_mmlu(data, "test", subjects), config.limit, config.seed)
    shots: dict[str, list] = {}
    for d in load_mmlu(data, "dev", subjects) if fmt.shots else []:
        shots.setdefault(d.subject, []).append(d)
    for s in {it.subject for it in items}:
        if len(shots.get(s, [])) < fmt.shots:
            raise UserError(f"the dev split has {len(shots.get(s, []))} items for {s}, "
                            f"{fmt.shots} shots asked", "use fewer shots")
    return items, [build_request(fmt, it, shots.get(it.subject, [])[:fmt.shots], tokenizer)
                   for it in items]


def unpatched_scores(model, packed: list[ItemRows], name: str | None = None) -> np.ndarray:
    """Choice log-likelihoods [item, choice] of every item, through the sweep's own blocks."""
    out = []
    with task(f"damage attribution: score {len(packed)} items ({name or model.name})",
              len(packed)) as advance:
        for item in packed:
            out.append(item_reference(model, item).scores.numpy())
            advance()
    return np.stack(out)


def mlp_weight_change(models, vname: str) -> list[float]:
    """Per layer, the mean over the MLP matrices of ``||dW||_F / ||W||_F``."""
    change = weight_change(models.specs["base"].path, {vname: models.specs[vname].path})[2][vname]
    matrices = mlp_matrices(models.base)
    return [float(np.mean([change[m][layer] for m in matrices]))
            for layer in range(models.base.n_layers)]


@dataclass
class VariantRun:
    """What the attribution of one variant reads: the items, their packed rows, both models'
    unpatched scores in the format's score, and the settings."""

    index: int  # the variant's position in the model set (seeds its random streams)
    name: str
    base: LoadedModel
    variant: LoadedModel
    items: list  # MMLU items
    packed: list[ItemRows]
    gold: np.ndarray  # [item] the gold choice
    s_base: np.ndarray  # [item, choice]
    s_var: np.ndarray  # [item, choice]
    to_scores: Callable[[np.ndarray, np.ndarray], np.ndarray]  # log-likelihoods -> scores
    windows: list[list[int]]
    config: Config

    def rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.index, *stream])

    def item_ids(self, idx) -> list[list]:
        return [[self.items[i].subject, self.items[i].index] for i in idx]


@dataclass
class Selection:
    """The items one variant's sweep reads, each set the first of a random order of all items."""

    failures: list[int]  # base right, variant wrong
    damaged: list[int]  # margin dropped by more than DAMAGE_FLOOR (patched)
    reverted: list[int]  # damaged items whose MLP weights are reverted (damaged is a prefix)
    controls: list[int]  # both right


def select_items(run: VariantRun, out: dict) -> Selection:
    """Failures, damaged items, reverted items and controls of ``run``, and their counts (and the
    net damage over every item) in ``out``."""
    config, gold = run.config, run.gold
    pred_b, pred_v = run.s_base.argmax(-1), run.s_var.argmax(-1)
    drop = margins(run.s_base, gold) - margins(run.s_var, gold)
    fail_all = np.flatnonzero((pred_b == gold) & (pred_v != gold))
    ctrl_all = np.flatnonzero((pred_b == gold) & (pred_v == gold))
    dmg_all = np.flatnonzero(drop > DAMAGE_FLOOR)
    rank = np.argsort(run.rng().permutation(len(run.items)))  # one random order of all items
    sel = Selection(first_in_order(fail_all, rank, config.max_failures),
                    first_in_order(dmg_all, rank, config.max_failures),
                    first_in_order(dmg_all, rank, damaged_cap(config)),
                    first_in_order(ctrl_all, rank, config.n_control))
    put_keys(out, run.name, net_damage(drop, run.rng(2), config.n_bootstrap))
    put_keys(out, run.name, {
        "n_base_correct": int((pred_b == gold).sum()), "n_variant_correct": int((pred_v == gold).sum()),
        "n_failures": len(fail_all), "n_failures_used": len(sel.failures),
        "n_damaged": len(dmg_all), "n_damaged_used": len(sel.damaged),
        "n_controls": len(sel.controls), "failure_items": run.item_ids(sel.failures),
        "damaged_items": run.item_ids(sel.damaged)})
    return sel


@dataclass
class ConditionPlan:
    """The conditions of the exact sweep: per site the layers, then the windows; then the weight
    reverts (per layer, then per third); and which of them each kind of item runs."""

    conditions: list[Condition]
    per_site: int  # conditions of one site: layers + windows
    thirds: dict[str, range]  # the thirds of the revert-all-MLPs-of-a-third conditions
    control_only: list[int]  # what a control runs: the single-layer patches
    revert_only: list[int]  # what a reverted (not patched) item runs: the reverts

    @classmethod
    def build(cls, sites: list[str], n_layers: int, windows: list[list[int]]) -> ConditionPlan:
        conditions: list[Condition] = []
        for s in sites:
            conditions += [patch_condition(s, [layer]) for layer in range(n_layers)]
            conditions += [patch_condition(s, w) for w in windows]
        reverts, spans = revert_conditions(n_layers)
        per_site = n_layers + len(windows)
        return cls(conditions + reverts, per_site, spans,
                   [i * per_site + j for i in range(len(sites)) for j in range(n_layers)],
                   list(range(len(sites) * per_site, len(conditions) + len(reverts))))

    def site_layers(self, i: int, n_layers: int) -> list[int]:
        return list(range(i * self.per_site, i * self.per_site + n_layers))

    def site_windows(self, i: int, n_layers: int) -> list[int]:
        return list(range(i * self.per_site + n_layers, (i + 1) * self.per_site))


def sweep_chosen(run: VariantRun, sel: Selection, plan: ConditionPlan):
    """Choice log-likelihoods of every chosen item under the conditions it needs (NaN elsewhere):
    ``(chosen items, patched [cond, chosen, choice], base [chosen, choice], variant [...])``."""
    sites = list(run.config.sites)
    targets = set(sel.failures) | set(sel.damaged)
    chosen = sorted(targets | set(sel.controls) | set(sel.reverted))
    n_choices = run.s_base.shape[-1]
    patched = np.full((len(plan.conditions), len(chosen), n_choices), np.nan)
    ref_b = np.full((len(chosen), n_choices), np.nan)
    ref_v = np.full_like(ref_b, np.nan)
    with task(f"damage attribution ({run.name}): {len(chosen)} items x "
              f"{len(plan.conditions)} conditions", len(chosen)) as advance:
        for j, i in enumerate(chosen):
            br = item_reference(run.base, run.packed[i], capture_sites=sites)
            vr = item_reference(run.variant, run.packed[i], record_resid=True)
            ref_b[j], ref_v[j] = br.scores.numpy(), vr.scores.numpy()
            which = list(range(len(plan.conditions))) if i in targets else sorted(
                set(plan.control_only if i in sel.controls else [])
                | set(plan.revert_only if i in sel.reverted else []))
            got = condition_sweep(run.base, run.variant, run.packed[i],
                                  [plan.conditions[c] for c in which], br, vr,
                                  run.config.token_budget)
            patched[which, j] = got.numpy()
            advance()
    return chosen, patched, ref_b, ref_v


class Recovery:
    """The measures of one variant's sweep on the chosen items: margins and gold-normalised scores
    (base, variant, patched) and the recoveries over a set of item columns."""

    def __init__(self, run: VariantRun, boot: np.random.Generator, chosen: list[int], patched,
                 ref_b, ref_v):
        idx = np.array(chosen)
        self.column = {i: j for j, i in enumerate(chosen)}
        self.scores = run.to_scores(patched, idx)  # [cond, chosen, choice]
        self.s_base, self.s_var = run.to_scores(ref_b, idx), run.to_scores(ref_v, idx)
        self.gold = run.gold[chosen]
        self.margin_base, self.margin_var, self.margin_patched = (
            margins(s, self.gold) for s in (self.s_base, self.s_var, self.scores))
        self.norm_base, self.norm_var, self.norm_patched = (
            gold_norm(s, self.gold) for s in (self.s_base, self.s_var, self.scores))
        self.correct = self.scores.argmax(-1) == self.gold  # [cond, chosen]
        self.boot, self.n_boot = boot, run.config.n_bootstrap

    def columns(self, items: list[int]) -> list[int]:
        return [self.column[i] for i in items]

    def fraction(self, rows: list[int], cols: list[int]) -> list[float]:
        """Share of the items ``cols`` answered right under each condition ``rows``."""
        return self.correct[rows][:, cols].mean(-1).tolist() if cols else [math.nan] * len(rows)

    def fraction_ci(self, rows: list[int], cols: list[int]) -> list[list[float]]:
        """Wilson 95% interval of each recovered share (k of ``cols``)."""
        k = self.correct[rows][:, cols].sum(-1) if cols else [0] * len(rows)
        return [list(wilson(int(x), len(cols))) for x in k]

    def logprob(self, rows: list[int], cols: list[int]) -> list[float]:
        """``mean(g_patched - g_variant) / mean(g_base - g_variant)``, g gold-normalised."""
        if not cols:
            return [math.nan] * len(rows)
        est, _ = ratio_of_means(self.norm_patched[rows][:, cols] - self.norm_var[cols],
                                self.norm_base[cols] - self.norm_var[cols])
        return est.tolist()

    def margin(self, rows: list[int], cols: list[int]) -> tuple[list[float], list[list[float]]]:
        """``mean(m_patched - m_variant) / mean(m_base - m_variant)`` and its bootstrap interval."""
        est, ci = ratio_of_means(self.margin_patched[rows][:, cols] - self.margin_var[cols],
                                 self.margin_base[cols] - self.margin_var[cols], self.boot,
                                 self.n_boot)
        return est.tolist(), ci.tolist()


def exact_variant(out: dict, run: VariantRun) -> None:
    """``scan=exact``: every layer and window patched (and reverted) on the chosen items."""
    sel = select_items(run, out)
    boot = run.rng(1)
    drop_all = margins(run.s_base, run.gold) - margins(run.s_var, run.gold)
    out["margin_drop_all"][run.name], out["margin_drop_all_ci95"][run.name] = mean_ci(
        drop_all, boot, run.config.n_bootstrap)
    plan = ConditionPlan.build(list(run.config.sites), run.base.n_layers, run.windows)
    rec = Recovery(run, boot, *sweep_chosen(run, sel, plan))
    fail, dmg = rec.columns(sel.failures), rec.columns(sel.damaged)
    # the unpatched variant on the failures, through the path the patched runs start from
    out["unpatched_failure_accuracy"][run.name] = (
        float((rec.s_var[fail].argmax(-1) == rec.gold[fail]).mean()) if fail else math.nan)
    out["margin_drop"][run.name], out["margin_drop_ci95"][run.name] = mean_ci(
        rec.margin_base[dmg] - rec.margin_var[dmg], boot, run.config.n_bootstrap)
    out["margin_drop_failures"][run.name] = (
        float((rec.margin_base[fail] - rec.margin_var[fail]).mean()) if fail else math.nan)
    site_keys(out, run, sel, plan, rec)
    revert_keys(out, run, sel, plan, rec)
    ranking_keys(out, run, sel, plan, rec)


def site_keys(out: dict, run: VariantRun, sel: Selection, plan: ConditionPlan,
              rec: Recovery) -> None:
    """Per site: recovered fractions, log-prob and margin recoveries, per layer and window."""
    n_layers = run.base.n_layers
    fail, dmg, ctrl = (rec.columns(x) for x in (sel.failures, sel.damaged, sel.controls))
    for i, s in enumerate(run.config.sites):
        lay, win = plan.site_layers(i, n_layers), plan.site_windows(i, n_layers)

        def put(key, value, s=s):
            out[key].setdefault(run.name, {})[s] = value

        put("recovered_fraction", rec.fraction(lay, fail))
        put("recovered_fraction_ci95", rec.fraction_ci(lay, fail))
        put("logprob_recovery", rec.logprob(lay, fail))
        put("window_recovered_fraction", rec.fraction(win, fail))
        put("window_recovered_fraction_ci95", rec.fraction_ci(win, fail))
        put("window_logprob_recovery", rec.logprob(win, fail))
        put("control_kept", rec.fraction(lay, ctrl))
        put("margin_recovery", (m := rec.margin(lay, dmg))[0])
        put("margin_recovery_ci95", m[1])
        put("window_margin_recovery", (m := rec.margin(win, dmg))[0])
        put("window_margin_recovery_ci95", m[1])
        put("failure_margin_recovery", rec.margin(lay, fail)[0])


def revert_keys(out: dict, run: VariantRun, sel: Selection, plan: ConditionPlan,
                rec: Recovery) -> None:
    """Weight reverts: origin keys on the reverted items, and the per-layer reverts measured as
    the patches are."""
    n_layers = run.base.n_layers
    rev = plan.revert_only[:n_layers]
    fail, dmg, reverted = (rec.columns(x) for x in (sel.failures, sel.damaged, sel.reverted))
    out.setdefault("reverted_items", {})[run.name] = run.item_ids(sel.reverted)
    put_keys(out, run.name, origin_keys(
        rec.margin_patched[plan.revert_only][:, reverted] - rec.margin_var[reverted],
        rec.margin_base[reverted] - rec.margin_var[reverted], plan.thirds, run.rng(3),
        run.config.n_bootstrap))
    out["weight_revert_fraction"][run.name] = rec.fraction(rev, fail)
    out["weight_revert_fraction_ci95"][run.name] = rec.fraction_ci(rev, fail)
    out["weight_revert_logprob_recovery"][run.name] = rec.logprob(rev, fail)
    est, ci = rec.margin(rev, dmg)
    out["weight_revert_margin_recovery"][run.name] = est
    out["weight_revert_margin_recovery_ci95"][run.name] = ci


def ranking_keys(out: dict, run: VariantRun, sel: Selection, plan: ConditionPlan,
                 rec: Recovery) -> None:
    """Layers and windows ranked (by margin on the damaged items, by flips on the failures), their
    overlap and correlation with the MLP weight change, and the failures by subject."""
    v, sites = run.name, list(run.config.sites)
    site = "mlp_out" if "mlp_out" in sites else sites[0]
    change = out["mlp_weight_change"][v]
    margin = out["margin_recovery"][v][site]
    damaged = bool(sel.damaged)
    out["top_layers_margin"][v] = rank_by(margin) if damaged else []
    out["top_windows_margin"][v] = (rank_by(out["window_margin_recovery"][v][site])
                                    if damaged else [])
    out["spearman_margin_vs_weight_change"][v] = spearman(margin, change) if damaged else math.nan
    out["top_third_overlap_margin"][v] = top_third_overlap(margin, change) if damaged else []
    if not sel.failures:
        for key in ("top_layers", "top_windows", "top_third_overlap", "examples"):
            out[key][v] = []
        out["spearman_vs_weight_change"][v] = math.nan
        out["by_subject"][v] = {}
        return
    logprob = out["logprob_recovery"][v][site]
    ranking = rank_layers(out["recovered_fraction"][v][site], logprob)
    out["top_layers"][v] = ranking
    out["top_windows"][v] = rank_layers(out["window_recovered_fraction"][v][site],
                                        out["window_logprob_recovery"][v][site])
    out["spearman_vs_weight_change"][v] = spearman(logprob, change)
    out["top_third_overlap"][v] = top_third_overlap(logprob, change)
    offset = sites.index(site) * plan.per_site
    best = offset + ranking[0]
    best_window = offset + run.base.n_layers + out["top_windows"][v][0]
    out["by_subject"][v] = failures_by_subject(run, sel, rec, best, best_window)
    out["examples"][v] = failure_examples(run, sel, rec, best, best_window)


def failures_by_subject(run: VariantRun, sel: Selection, rec: Recovery, best: int,
                        best_window: int) -> dict:
    """Per subject: failures, and those the top layer / the best window recovers."""
    answer = rec.scores.argmax(-1)
    by_subject: dict[str, dict] = {}
    for i in sel.failures:
        item, j = run.items[i], rec.column[i]
        d = by_subject.setdefault(item.subject, {"n_failures": 0, "recovered_top_layer": 0,
                                                 "recovered_best_window": 0})
        d["n_failures"] += 1
        d["recovered_top_layer"] += int(answer[best, j] == item.answer)
        d["recovered_best_window"] += int(answer[best_window, j] == item.answer)
    return dict(sorted(by_subject.items()))


def failure_examples(run: VariantRun, sel: Selection, rec: Recovery, best: int,
                     best_window: int) -> list[dict]:
    """The first eight failures: question, answers of base, variant and top-layer patch."""
    answer = rec.scores.argmax(-1)
    examples = []
    for i in sel.failures[:8]:
        item, j = run.items[i], rec.column[i]
        examples.append({
            "subject": item.subject, "index": item.index,
            "question": " ".join(item.question.split())[:90],
            "gold": LETTERS[item.answer], "base": LETTERS[int(rec.s_base[j].argmax())],
            "variant": LETTERS[int(rec.s_var[j].argmax())],
            "patched_top_layer": LETTERS[int(answer[best, j])],
            "recovered_top_layer": bool(answer[best, j] == item.answer),
            "recovered_best_window": bool(answer[best_window, j] == item.answer),
            "margin_base": round(float(rec.margin_base[j]), 4),
            "margin_variant": round(float(rec.margin_var[j]), 4),
            "margin_patched_top_layer": round(float(rec.margin_patched[best, j]), 4)})
    return examples


def scan_variant(out: dict, run: VariantRun) -> None:
    """``scan=atp``: the attribution-patching estimate of the margin recovery of every
    (site, layer) on the damaged items ``scan=exact`` would use (one forward-backward pass
    per item), the top ``scan_top_k`` patched exactly (:func:`condition_sweep`), and with
    ``scan_validate`` every site: Spearman and top-k overlap. Origin (the weight reverts) is
    measured exactly, as ``scan=exact`` does."""
    config, sites = run.config, list(run.config.sites)
    drop = margins(run.s_base, run.gold) - margins(run.s_var, run.gold)
    rank = np.argsort(run.rng().permutation(len(run.items)))  # the same order as scan=exact
    damaged_all = np.flatnonzero(drop > DAMAGE_FLOOR)
    dmg = first_in_order(damaged_all, rank, config.max_failures)
    reverted = first_in_order(damaged_all, rank, damaged_cap(config))
    put_keys(out, run.name, net_damage(drop, run.rng(2), config.n_bootstrap))
    put_keys(out, run.name, revert_origin(run, reverted))
    out.setdefault("reverted_items", {})[run.name] = run.item_ids(reverted)
    keys = [(s, layer) for s in sites for layer in range(run.base.n_layers)]
    heads = range(run.base.n_layers) if "attn_out" in sites else ()
    t0 = time.perf_counter()
    estimates, head_estimates, check = atp_damaged(run, dmg, keys, heads)
    seconds = time.perf_counter() - t0
    estimate = dict(zip(keys, ratio_of_means(estimates, drop[dmg])[0].tolist()))
    res = verify_scan(estimate, lambda chosen: exact_margin_recovery(run, dmg, chosen, drop[dmg]),
                      config.scan_top_k, config.scan_validate, seconds)
    out["scan"], out["scan_top_k"] = "atp", config.scan_top_k
    out["scan_validate"] = config.scan_validate
    n_layers = run.base.n_layers
    put_keys(out, run.name, {
        "scan_estimate": by_site(estimate, sites, n_layers),
        "scan_exact": by_site(res["exact"], sites, n_layers),
        "scan_head_estimate": (ratio_of_means(np.stack(head_estimates, -1), drop[dmg])[0].tolist()
                               if heads and dmg else []),
        "scan_ranking": [list(x) for x in res["ranking"]],
        "scan_verified": [list(x) for x in res["verified"]],
        "scan_agreement": res["agreement"], "scan_seconds": res["seconds"],
        "scan_items": {"n_damaged": len(damaged_all), "n_damaged_used": len(dmg),
                       "damaged_items": run.item_ids(dmg),
                       "metric_max_abs_diff": max(check, default=0.0)}})


def atp_damaged(run: VariantRun, dmg: list[int], keys: list, heads) -> tuple:
    """AtP of the margin at every (site, layer) of ``keys`` (and every head of ``heads``) on each
    damaged item: ``(estimates [key, item], head estimates [layer, head] per item, |AtP's
    unpatched margin - the sweep's| per item)``."""
    estimates = np.zeros((len(keys), len(dmg)))
    head_estimates, check = [], []
    margin_var = margins(run.s_var, run.gold)
    with task(f"attribution-patching scan ({run.name}): {len(dmg)} damaged items",
              len(dmg)) as advance:
        for j, i in enumerate(dmg):
            item = run.packed[i]
            # the item's rows unpacked: (row, position, token) of each scored token
            sel = torch.cat([item.gather[item.target[:, 0]], item.target[:, 1:]], 1)
            owner = torch.stack([torch.zeros_like(item.choice), item.choice], 1)
            scale = run.to_scores(np.ones((1, item.n_choices)), np.array([i]))  # 1 / length
            metric = choice_margin(sel, owner, 1, item.n_choices, torch.tensor([run.gold[i]]),
                                   torch.from_numpy(1.0 / scale))
            scan = atp_scan(run.base, run.variant, item.rows, torch.ones_like(item.rows), metric,
                            keys, heads, torch.zeros(len(item.rows), dtype=torch.long), 1)
            estimates[:, j] = [scan.estimate[key][0].item() for key in keys]
            if heads:
                head_estimates.append(torch.stack([scan.heads[la][0] for la in heads]).numpy())
            check.append(abs(scan.target_metric[0].item() - margin_var[i]))
            advance()
    return estimates, head_estimates, check


def exact_margin_recovery(run: VariantRun, dmg: list[int], chosen: list,
                          drop: np.ndarray) -> dict:
    """Exact margin recovery of ``chosen`` (site, layer) pairs on the damaged items."""
    conditions = [patch_condition(s, [layer]) for s, layer in chosen]
    effect = np.zeros((len(chosen), len(dmg)))
    for j, i in enumerate(dmg):
        br = item_reference(run.base, run.packed[i], capture_sites=list(run.config.sites))
        vr = item_reference(run.variant, run.packed[i], record_resid=True)
        got = condition_sweep(run.base, run.variant, run.packed[i], conditions, br, vr,
                              run.config.token_budget)
        idx, gold = np.array([i]), run.gold[[i]]
        margin_var = margins(run.to_scores(vr.scores.numpy()[None], idx), gold)[0]
        effect[:, j] = margins(run.to_scores(got.numpy()[:, None], idx), gold)[:, 0] - margin_var
    return dict(zip(chosen, ratio_of_means(effect, drop)[0].tolist()))


def revert_origin(run: VariantRun, dmg: list[int]) -> dict:
    """:func:`origin_keys` from a sweep of the weight reverts alone on the damaged items ``dmg``
    (``scan=atp``, which patches no activation exactly but still decides origin)."""
    reverts, spans = revert_conditions(run.base.n_layers)
    effect = np.zeros((len(reverts), len(dmg)))
    m_b, m_v = margins(run.s_base, run.gold), margins(run.s_var, run.gold)
    with task(f"weight revert: {len(dmg)} damaged items x {len(reverts)} reverts",
              len(dmg)) as advance:
        for j, i in enumerate(dmg):
            vr = item_reference(run.variant, run.packed[i], record_resid=True)
            got = condition_sweep(run.base, run.variant, run.packed[i], reverts, vr, vr,
                                  run.config.token_budget).numpy()
            effect[:, j] = margins(run.to_scores(got[:, None], np.array([i])),
                                   run.gold[[i]])[:, 0] - m_v[i]
            advance()
    return origin_keys(effect, m_b[dmg] - m_v[dmg], spans, run.rng(3), run.config.n_bootstrap)


def damaged_cap(config: Config) -> int:
    return config.max_damaged if config.max_damaged is not None else config.max_failures


def revert_conditions(n_layers: int) -> tuple[list[Condition], dict[str, range]]:
    """Weight reverts of the MLP matrices: one per layer, then one per (non-empty) third of the
    depth (:func:`~mechinterp.models.depth.thirds`, all its layers at once); and the thirds."""
    spans = {name: r for name, r in thirds(n_layers).items() if len(r)}
    return ([revert_condition([layer]) for layer in range(n_layers)]
            + [revert_condition(list(r)) for r in spans.values()]), spans


def origin_keys(gain: np.ndarray, drop: np.ndarray, spans: dict[str, range],
                rng: np.random.Generator, n_boot: int) -> dict:
    """Origin of the damage: the share of the margin drop that reverting MLP weights to the
    base's gives back, ``mean(m_reverted - m_variant) / mean(m_base - m_variant)`` over the
    damaged items (a ratio of means, as ``margin_recovery``), with a bootstrap 95% interval over
    items. ``gain`` [L + thirds, items]: ``m_reverted - m_variant`` per revert condition of
    :func:`revert_conditions`; ``drop``: ``m_base - m_variant`` per item."""
    est, ci = ratio_of_means(gain, drop, rng, n_boot)
    n_layers = len(est) - len(spans)
    return {"revert_recovery": {"mlp": est[:n_layers].tolist()},
            "revert_recovery_ci95": {"mlp": ci[:n_layers].tolist()},
            "revert_window_recovery": {
                name: {"mean": float(est[n_layers + j]), "ci95": ci[n_layers + j].tolist(),
                       "layers": [r.start, r.stop - 1]}
                for j, (name, r) in enumerate(spans.items())},
            "n_used": int(len(drop))}


def net_damage(drop: np.ndarray, rng: np.random.Generator, n_boot: int) -> dict:
    """The margin drop ``m_base - m_variant`` over every scored item (not only the damaged ones,
    which are selected for a positive drop and would make any test circular): mean, bootstrap
    95% interval, two-sided sign-flip p-value, n."""
    mean, ci = mean_ci(drop, rng, n_boot)
    return {"net_damage": {"mean": mean, "ci95": ci, "p": sign_flip_p(drop, rng), "n": len(drop)}}


def put_keys(out: dict, vname: str, values: dict) -> None:
    """``out[key][vname] = value`` for each key of ``values``."""
    for key, value in values.items():
        out.setdefault(key, {})[vname] = value


KEYS = ("recovered_fraction", "recovered_fraction_ci95", "window_recovered_fraction_ci95",
        "weight_revert_fraction_ci95", "logprob_recovery", "window_recovered_fraction",
        "window_logprob_recovery", "control_kept", "weight_revert_fraction",
        "weight_revert_logprob_recovery", "n_failures", "n_failures_used", "n_controls",
        "n_base_correct", "n_variant_correct", "mlp_weight_change", "spearman_vs_weight_change",
        "top_layers", "top_windows", "top_third_overlap", "by_subject", "examples",
        "n_damaged", "n_damaged_used", "margin_drop", "margin_drop_ci95", "margin_drop_failures",
        "margin_drop_all", "margin_drop_all_ci95", "margin_recovery", "margin_recovery_ci95",
        "failure_margin_recovery", "window_margin_recovery", "window_margin_recovery_ci95",
        "weight_revert_margin_recovery", "weight_revert_margin_recovery_ci95",
        "top_layers_margin", "top_windows_margin", "spearman_margin_vs_weight_change",
        "top_third_overlap_margin", "unpatched_failure_accuracy", "failure_items",
        "damaged_items")


PLAIN = ("Which layers carry SFT's MMLU damage: items whose gold-answer margin dropped are "
         "re-scored with the base's MLP (or attention) output patched in per layer; the share of "
         "the margin drop each layer gives back.")


def summary(result: Result, study) -> list[str]:
    """The format and, per variant: flipped failures, damaged items with the mean margin drop,
    and the layers that give back most."""
    data = result.data
    lines = [f"format {data.get('format', 'letter')}"]
    for name in data.get("n_failures", {}):
        line = f"{name}: {data['n_failures'][name]} flipped failures"
        if "n_damaged" in data:
            line += (f", {data['n_damaged'].get(name)} items with a margin drop (mean drop "
                     f"{fmt(data.get('margin_drop', {}).get(name))} "
                     f"{interval(data.get('margin_drop_ci95', {}).get(name))})")
        top = (data.get("top_layers_margin") or data.get("top_layers") or {}).get(name)
        if top:
            line += f"; layers that give back most: {top[:5]}"
        lines.append(line)
    return lines


PROBE = declare(DamageAttribution(), plain=PLAIN, summary=summary,
                model_names=listed_models("variants"))
