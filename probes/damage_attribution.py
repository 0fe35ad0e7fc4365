"""``damage-attribution``: which layers' MLPs carry the damage behind the MMLU items a variant breaks.

Items the base answers correctly and the variant does not (failures), plus a control set both get
right, all in lm-eval's letter format. For every layer (and every window of ``window`` consecutive
layers) the base's activation at a site (``mlp_out``; ``attn_out`` for comparison) is patched into
the variant at all positions; we record the share of failures that flip back to the gold answer and
the recovery of the gold answer's log-probability normalised over the four choices,
``mean(lp_patched - lp_variant) / mean(lp_base - lp_variant)``. A weight-space counterpart reverts
only layer L's MLP matrices to the base's. Per-layer recovery is related to the per-layer relative
change of the MLP weights (mean over the MLP matrices of ``||dW||_F / ||W||_F``).

Ranking (``top_layers``): MLP recovered fraction, ties broken by log-prob recovery. Spearman and the
top-third overlap use the log-prob recovery (continuous; the fraction has many ties).

Result keys: ``recovered_fraction[<variant>][<site>]`` (list over layers), ``n_failures[<variant>]``,
``spearman_vs_weight_change[<variant>]``, ``top_layers[<variant>]``, ``top_third_overlap[<variant>]``,
plus ``top_windows`` (indices into ``windows``, same ranking), ``logprob_recovery``,
``window_recovered_fraction``, ``window_logprob_recovery``, ``windows``,
``control_kept``, ``weight_revert_fraction``, ``mlp_weight_change``, ``by_subject``, ``examples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mechinterp.analysis.crossmodel_sweep import (
    ChoiceBatch,
    choice_logprobs,
    cross_model_sweep,
    mlp_matrices,
    weight_revert_sweep,
)
from mechinterp.analysis.weights import weight_change
from mechinterp.data.mmlu import LETTERS, load_mmlu
from mechinterp.errors import UserError
from mechinterp.evals.mmlu import MMLUFormat, build_request, score_mmlu, stratified_sample
from mechinterp.evals.stats import spearman
from mechinterp.plotting import new_axes
from mechinterp.probe import BaseConfig
from mechinterp.progress import task
from mechinterp.results import Result


@dataclass
class Config(BaseConfig):
    format: str = "letter-0shot"
    subjects: list[str] | None = None
    sites: list[str] = field(default_factory=lambda: ["mlp_out", "attn_out"])
    window: int = 3
    max_failures: int = 32
    n_control: int = 16
    items_per_pass: int = 4  # items per patched forward (times the number of conditions)
    max_rows: int = 64


RECOVERY_FLOOR = 1e-3  # log-prob recovery below 0.1% of the gap is float noise, not recovery


def top_third_overlap(recovery: list[float], change: list[float]) -> list[int]:
    """Layers in the top third of both lists. A layer only counts as "top" with a real value
    (recovery above :data:`RECOVERY_FLOOR`, weight change above 0): untouched layers tie at zero
    and must not enter a top third by index order."""
    k = math.ceil(len(recovery) / 3)

    def top(values: list[float], floor: float) -> set[int]:
        ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
        return {i for i in ranked if values[i] > floor}

    return sorted(top(recovery, RECOVERY_FLOOR) & top(change, 0.0))


def _gold_norm_lp(lp: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """log p(gold) normalised over the choices; ``lp`` is [..., items, choices]."""
    norm = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
    return norm.gather(-1, gold.expand(*lp.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def rank_layers(fraction: list[float], lp_recovery: list[float]) -> list[int]:
    """Layers by recovered fraction (desc), ties by log-prob recovery (desc), then layer index."""
    def key(L: int) -> tuple:
        return (-fraction[L], -(lp_recovery[L] if math.isfinite(lp_recovery[L]) else -1e9), L)

    return sorted(range(len(fraction)), key=key)


class DamageAttribution:
    name = "damage-attribution"
    version = "1"
    description = ("patch the base's MLP (and attention) outputs into a variant on the MMLU items "
                   "it broke; relate recovery per layer to MLP weight change")
    Config = Config

    def run(self, models, data, config: Config) -> Result:
        fmt = MMLUFormat.parse(config.format)
        if fmt.kind != "letter":
            raise UserError(f"damage-attribution scores the letter format, not {config.format!r}",
                            "use --set format=letter-0shot (or letter-5shot)")
        if not models.variants:
            raise UserError("damage-attribution needs a variant", "add --variant NAME=SPEC")
        if config.window < 1:
            raise UserError(f"window {config.window} must be at least 1", "e.g. --set window=3")
        subjects = list(config.subjects) if config.subjects else None
        items = stratified_sample(load_mmlu(data, "test", subjects), config.limit, config.seed)
        dev = load_mmlu(data, "dev", subjects) if fmt.shots else []
        shots = {}
        for d in dev:
            shots.setdefault(d.subject, []).append(d)
        base = models.base
        base_rows = score_mmlu(base, items, dev, fmt)
        out: dict[str, dict] = {k: {} for k in (
            "recovered_fraction", "logprob_recovery", "window_recovered_fraction",
            "window_logprob_recovery", "control_kept", "weight_revert_fraction",
            "weight_revert_logprob_recovery", "n_failures", "n_controls", "n_base_correct",
            "mlp_weight_change", "spearman_vs_weight_change", "top_layers", "top_windows",
            "top_third_overlap",
            "by_subject", "examples")}
        L = base.n_layers
        windows = [list(range(s, s + config.window)) for s in range(L - config.window + 1)]
        rng = np.random.default_rng(config.seed)
        for vname in models.variants:
            variant = models[vname]
            v_rows = score_mmlu(variant, items, dev, fmt)
            fail = [i for i, (b, v) in enumerate(zip(base_rows, v_rows))
                    if b["pred"] == b["gold"] and v["pred"] != v["gold"]]
            ctrl = [i for i, (b, v) in enumerate(zip(base_rows, v_rows))
                    if b["pred"] == b["gold"] and v["pred"] == v["gold"]]
            out["n_base_correct"][vname] = sum(b["pred"] == b["gold"] for b in base_rows)
            out["n_failures"][vname] = len(fail)
            if len(fail) > config.max_failures:
                fail = sorted(rng.choice(fail, config.max_failures, replace=False).tolist())
            if len(ctrl) > config.n_control:
                ctrl = sorted(rng.choice(ctrl, config.n_control, replace=False).tolist())
            out["n_controls"][vname] = len(ctrl)
            wc = weight_change(models.specs["base"].path, {vname: models.specs[vname].path})[2][vname]
            mlp_change = [float(np.mean([wc[m][layer] for m in mlp_matrices(base)]))
                          for layer in range(L)]
            out["mlp_weight_change"][vname] = mlp_change
            if not fail:
                self._empty(out, vname, config.sites, L, len(windows))
                models.release(vname)
                continue
            self._attribute(out, vname, base, variant, items, shots, fmt, fail, ctrl, base_rows,
                            v_rows, windows, config)
            models.release(vname)
        return Result(self.name, {"variants": models.variants, "n_layers": L,
                                  "n_items": len(items), "format": fmt.label,
                                  "sites": list(config.sites), "windows": windows, **out})

    @staticmethod
    def _empty(out, vname, sites, L, n_windows):
        nan = float("nan")
        for k in ("recovered_fraction", "logprob_recovery", "control_kept"):
            out[k][vname] = {s: [nan] * L for s in sites}
        for k in ("window_recovered_fraction", "window_logprob_recovery"):
            out[k][vname] = {s: [nan] * n_windows for s in sites}
        out["weight_revert_fraction"][vname] = [nan] * L
        out["weight_revert_logprob_recovery"][vname] = [nan] * L
        out["spearman_vs_weight_change"][vname] = nan
        out["top_layers"][vname] = []
        out["top_windows"][vname] = []
        out["top_third_overlap"][vname] = []
        out["by_subject"][vname] = {}
        out["examples"][vname] = []

    def _attribute(self, out, vname, base, variant, items, shots, fmt, fail, ctrl, base_rows,
                   v_rows, windows, config):
        L = base.n_layers
        chosen = fail + ctrl
        gold = torch.tensor([items[i].answer for i in chosen])
        requests = [build_request(fmt, items[i], shots.get(items[i].subject, [])[:fmt.shots],
                                  base.tokenizer) for i in chosen]
        conds = [[layer] for layer in range(L)] + windows
        sweeps = {s: [] for s in config.sites}
        step = max(1, config.items_per_pass)
        n_passes = len(config.sites) * math.ceil(len(chosen) / step) + L
        with task(f"damage attribution ({vname})", n_passes) as advance:
            for start in range(0, len(chosen), step):
                batch = ChoiceBatch.build(base, requests[start:start + step], not fmt.chat)
                for s in config.sites:
                    sweeps[s].append(cross_model_sweep(base, variant, batch, s, conds,
                                                       config.max_rows))
                    advance()
            full = ChoiceBatch.build(base, requests, not fmt.chat)
            revert = weight_revert_sweep(base, variant, full, [[layer] for layer in range(L)])
            # references through the same forward as the patched runs, so a full recovery is 1
            # up to float32 rounding of one computation, not of two different ones
            with torch.inference_mode():
                lp_base = choice_logprobs(base, full)[0].double()
                lp_var = choice_logprobs(variant, full)[0].double()
            advance(L)
        nf = len(fail)
        g_base, g_var = _gold_norm_lp(lp_base, gold), _gold_norm_lp(lp_var, gold)
        denom = float((g_base[:nf] - g_var[:nf]).mean())
        denom = denom if denom > 0 else math.nan  # no damage in log-prob to recover

        def summary(lp):  # lp: [conditions, items, 4]
            pred = lp.argmax(-1)
            correct = pred == gold
            frac = correct[:, :nf].double().mean(1)
            kept = correct[:, nf:].double().mean(1) if ctrl else torch.full_like(frac, math.nan)
            rec = (_gold_norm_lp(lp, gold)[:, :nf] - g_var[:nf]).mean(1) / denom
            return frac.tolist(), rec.tolist(), kept.tolist(), pred

        patched_pred = {}
        for s in config.sites:
            frac, rec, kept, pred = summary(torch.cat(sweeps[s], dim=1))
            out["recovered_fraction"].setdefault(vname, {})[s] = frac[:L]
            out["logprob_recovery"].setdefault(vname, {})[s] = rec[:L]
            out["window_recovered_fraction"].setdefault(vname, {})[s] = frac[L:]
            out["window_logprob_recovery"].setdefault(vname, {})[s] = rec[L:]
            out["control_kept"].setdefault(vname, {})[s] = kept[:L]
            patched_pred[s] = pred
        frac, rec, _, _ = summary(revert)
        out["weight_revert_fraction"][vname] = frac
        out["weight_revert_logprob_recovery"][vname] = rec
        site = "mlp_out" if "mlp_out" in config.sites else config.sites[0]
        mfrac, mrec = out["recovered_fraction"][vname][site], out["logprob_recovery"][vname][site]
        ranking = rank_layers(mfrac, mrec)
        out["top_layers"][vname] = ranking
        out["top_windows"][vname] = rank_layers(out["window_recovered_fraction"][vname][site],
                                                out["window_logprob_recovery"][vname][site])
        change = out["mlp_weight_change"][vname]
        out["spearman_vs_weight_change"][vname] = spearman(mrec, change)
        out["top_third_overlap"][vname] = top_third_overlap(mrec, change)
        pp = patched_pred[site]
        best, wbest = ranking[0], out["top_windows"][vname][0]
        by_subject: dict[str, dict] = {}
        for j, i in enumerate(fail):
            d = by_subject.setdefault(items[i].subject, {"n_failures": 0, "recovered_top_layer": 0,
                                                         "recovered_best_window": 0})
            d["n_failures"] += 1
            d["recovered_top_layer"] += int(pp[best, j] == items[i].answer)
            d["recovered_best_window"] += int(pp[L + wbest, j] == items[i].answer)
        out["by_subject"][vname] = dict(sorted(by_subject.items()))
        out["examples"][vname] = [{
            "subject": items[i].subject, "index": items[i].index,
            "question": " ".join(items[i].question.split())[:90],
            "gold": LETTERS[items[i].answer], "base": LETTERS[base_rows[i]["pred"]],
            "variant": LETTERS[v_rows[i]["pred"]],
            "patched_top_layer": LETTERS[int(pp[best, j])],
            "recovered_top_layer": bool(pp[best, j] == items[i].answer),
            "recovered_best_window": bool(pp[L + wbest, j] == items[i].answer),
        } for j, i in enumerate(fail[:8])]

    def plot(self, result: Result) -> dict:
        d = result.data
        figs = {}
        layers = np.arange(d["n_layers"])
        for v in d["variants"]:
            if not d["top_layers"].get(v):
                continue
            fig, ax = new_axes(width=7, height=4)
            for s in d["sites"]:
                ax.plot(layers, d["recovered_fraction"][v][s], "o-", ms=3,
                        label=f"patch base {s}")
            ax.plot(layers, d["weight_revert_fraction"][v], "s--", ms=3,
                    label="revert MLP weights")
            ax.set_xlabel("layer")
            ax.set_ylabel(f"share of {d['n_failures'][v]} failures recovered")
            ax.set_ylim(-0.02, 1.02)
            ax2 = ax.twinx()
            ax2.spines["right"].set_visible(True)
            ax2.plot(layers, d["mlp_weight_change"][v], color="grey", lw=2, alpha=0.6,
                     label="MLP weight change")
            ax2.set_ylabel(r"MLP $\|\Delta W\|_F / \|W\|_F$ (grey)")
            ax.set_title(f"{v}: recovery per layer (Spearman vs weight change "
                         f"{d['spearman_vs_weight_change'][v]:.2f})")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
            figs[f"recovery_{v}"] = fig

            subj = d["by_subject"][v]
            names = list(subj)
            fig, ax = new_axes(width=7, height=max(2.5, 0.3 * len(names) + 1.2))
            y = np.arange(len(names))
            nf = np.array([subj[s]["n_failures"] for s in names])
            ax.barh(y, nf, color="#dddddd", label="failures")
            ax.barh(y, [subj[s]["recovered_best_window"] for s in names], height=0.5,
                    label="recovered (best MLP window)")
            ax.barh(y, [subj[s]["recovered_top_layer"] for s in names], height=0.25,
                    label="recovered (top MLP layer)")
            ax.set_yticks(y, [s.replace("_", " ") for s in names], fontsize=8)
            ax.set_xlabel("items")
            ax.set_title(f"{v}: failures and recoveries per subject")
            ax.legend(fontsize=8)
            figs[f"by_subject_{v}"] = fig

            ex = d["examples"][v]
            cols = ["subject", "question", "gold", "base", "variant", "patched_top_layer",
                    "recovered_top_layer", "recovered_best_window"]
            fig, ax = new_axes(width=12, height=0.35 * len(ex) + 1.0)
            ax.axis("off")
            cells = [[str(e[c])[:60] for c in cols] for e in ex]
            table = ax.table(cellText=cells, colLabels=[c.replace("_", " ") for c in cols],
                             loc="center", cellLoc="left")
            table.auto_set_font_size(False)
            table.set_fontsize(7)
            table.auto_set_column_width(list(range(len(cols))))
            ax.set_title(f"{v}: example failures (top layer {d['top_layers'][v][0]})")
            figs[f"examples_{v}"] = fig
        return figs


PROBE = DamageAttribution()
