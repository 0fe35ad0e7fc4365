"""``activation-diff``: the activation-difference lens of arXiv 2510.13900, per layer.

Texts: neutral text, by default a seeded mix of MMLU test questions (the question only) and ROME
known-fact prompts, half each (``texts=FILE`` reads a ``.txt`` file, one text per line, or a
``.jsonl`` file of ``{"text": ...}`` rows). A seeded shuffle splits them into ``n_texts`` texts for
the difference and ``n_heldout`` *other* texts for steering (``limit`` caps both).

Per variant and layer L (``resid_post``: the residual stream after block L):

- ``delta[L]`` = mean over texts and their first ``first_k`` token positions (less the first
  ``skip_first``) of ``resid(variant) - resid(base)`` (float64); ``diff_norm`` is its L2 norm,
  ``diff_norm_by_position`` the norm of the mean at each position 0..first_k-1 (the paper reads
  positions separately), ``base_norm`` the mean norm of the base's
  residual stream on the same positions (the scale to read it against).
- ``lens_top``: ``delta[L]`` decoded through the final norm and the unembedding
  (:func:`~mechinterp.analysis.lens.decode_direction`: the diffing-toolkit's ``lm_head(ln_final(
  delta))`` with a LayerNorm's additive bias removed; RMSNorm models get the toolkit's readout
  exactly): the ``top_tokens`` largest logits (promoted) and smallest (suppressed).
- steering: ``scale * delta[L]`` is added to the base's resid_post of layer L at every position of
  the held-out texts; per text the mean over positions of ``KL(base || variant)`` before and of
  ``KL(steered base || variant)`` after. ``steering_kl_reduction`` = ``(sum before - sum after) /
  sum before`` over texts (1: the difference explains the variant's whole shift on held-out
  text; 0: nothing; negative: steering moves the base further away), with a percentile bootstrap
  95% interval over texts (``steering_kl_reduction_ci95``).

Result keys: ``diff_norm[<variant>]`` (list over layers), ``base_norm[<variant>]``,
``lens_top[<variant>][<layer>]`` (``{"promoted": [{"token", "id", "logit"}], "suppressed":
[...]}``; empty lists where the difference is exactly zero), ``steering_kl_reduction[<variant>]`` (list over layers, null where not steered),
``steering_kl_reduction_ci95``, ``diff_norm_by_position[<variant>]`` ([layer][position]),
``n_texts_by_position``, ``kl_before[<variant>]`` (mean over held-out texts, nats per
token), ``kl_after[<variant>]`` (list over layers), ``steer_layers``, ``n_texts``, ``n_heldout``,
``n_positions``; arrays ``<variant>__delta`` ([layer, d_model], float64),
``<variant>__delta_by_position`` ([layer, position, d_model]), ``<variant>__kl_before`` /
``<variant>__kl_after`` ([item] / [steered layer, item]).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from mechinterp.analysis.actdiff import mean_difference, steering_kl, text_batches
from mechinterp.analysis.lens import decode_direction
from mechinterp.data import load_knowns, load_mmlu
from mechinterp.data.base import read_jsonl
from mechinterp.data.subset import seeded_subset
from mechinterp.errors import DataError, UserError
from mechinterp.evals.stats import ratio_of_means
from mechinterp.store.frames import Table
from mechinterp.plotting.style import heatmap_grid, model_colours, new_axes, token_text
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import floats, fmt, interval
from mechinterp.progress import task
from mechinterp.store.results import Result


@dataclass
class Config(BaseConfig):
    # "default" (a seeded mix of MMLU questions and known-fact prompts) or a .txt (one text per
    # line) / .jsonl ({"text": ...}) file
    texts: str = "default"
    n_texts: int = 64  # texts the mean difference is taken over
    n_heldout: int = 32  # other texts (disjoint) the steering KL is measured on
    first_k: int = 8  # token positions per text (from the first) the difference is averaged over
    # leading positions left out of the pooled mean (1: without the first token, whose residual
    # stream has an outlier norm in many models); per-position results keep them
    skip_first: int = 0
    max_length: int = 64  # tokens per held-out text at most (the steering KL's positions)
    top_tokens: int = 10  # promoted and suppressed tokens listed per layer
    steer_layers: list[int] | None = None  # layers to steer at (default: see steer_stride)
    # without steer_layers: steer at layers 0, s, 2s, ... and the last (1: every layer)
    steer_stride: int = 1
    scale: float = 1.0  # the difference is added times this (negative: subtracted)
    n_bootstrap: int = 1000  # resamples of the held-out texts for each reduction's interval
    batch_size: int = 8  # texts per forward pass
    # lower bounds; every other number: at least 0
    at_least = {"n_texts": 1, "n_heldout": 1, "first_k": 1, "max_length": 2, "top_tokens": 1,
                "steer_stride": 1,
                "batch_size": 1, "n_bootstrap": 1}
    signed = ("scale",)  # may be negative


def neutral_texts(config: Config, data) -> list[str]:
    """The text pool (distinct texts, in a seeded order)."""
    need = _cap(config.n_texts, config.limit) + _cap(config.n_heldout, config.limit)
    if config.texts == "default":
        if data is None:
            raise UserError("activation-diff's default texts need a data source", "pass --data-dir")
        half = (need + 1) // 2
        questions = [it.question for it in seeded_subset(load_mmlu(data, "test"), half, config.seed)]
        facts = [f.prompt for f in seeded_subset(load_knowns(data), need - half, config.seed)]
        pool = questions + facts
    else:
        path = Path(config.texts).expanduser()
        if not path.is_file():
            raise UserError(f"texts={config.texts!r} is neither 'default' nor a file",
                            "pass a .txt file (one text per line) or a .jsonl file of "
                            '{"text": ...} rows')
        if path.suffix == ".jsonl":
            pool = [row["text"] for _, row in read_jsonl(path, {"text": (str,)})]
        else:
            pool = path.read_text(encoding="utf-8").splitlines()
        if data is not None:
            data.log.record_file(path)
    pool = list(dict.fromkeys(t for t in pool if t.strip()))
    random.Random(config.seed).shuffle(pool)
    if len(pool) < 2:
        raise DataError(f"activation-diff needs at least 2 distinct texts, found {len(pool)}",
                        "add texts")
    return pool


def _cap(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def split_texts(pool: list[str], n_texts: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """The first ``n_texts`` for the difference and the next ``n_heldout`` for steering: disjoint;
    a pool too small for both is split in proportion."""
    if len(pool) < n_texts + n_heldout:
        n_texts = max(1, round(len(pool) * n_texts / (n_texts + n_heldout)))
        n_texts = min(n_texts, len(pool) - 1)
    return pool[:n_texts], pool[n_texts:n_texts + n_heldout]


def lens_readout(model, delta: torch.Tensor, k: int) -> list[dict]:
    """Per layer: the ``k`` most promoted and most suppressed tokens of ``delta[layer]``."""
    logits = decode_direction(model, delta).cpu()  # [layer, vocab]
    out = []
    for d, row in zip(delta, logits):
        entry = {"promoted": [], "suppressed": []}
        if not d.any():  # no difference (e.g. before the first changed layer): nothing to read
            out.append(entry)
            continue
        for name, sign in (("promoted", 1.0), ("suppressed", -1.0)):
            vals, ids = torch.topk(sign * row, k)
            entry[name] = [{"token": model.tokenizer.decode([int(i)]), "id": int(i),
                            "logit": float(sign * v)} for v, i in zip(vals, ids)]
        out.append(entry)
    return out


def steer_layers(n_layers: int, config: Config) -> list[int]:
    """The layers steered: ``steer_layers``, or every ``steer_stride``-th and the last."""
    steer = (sorted(set(range(0, n_layers, config.steer_stride)) | {n_layers - 1})
             if config.steer_layers is None else sorted(set(config.steer_layers)))
    bad = [layer for layer in steer if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"steer layer {bad[0]} is out of range ({n_layers} layers)",
                        f"use 0..{n_layers - 1}")
    return steer


def steering_keys(before, after: dict, n_layers: int, rng: np.random.Generator,
                  n_boot: int) -> dict:
    """Per steered layer the KL reduction (a ratio of means over texts) with its bootstrap
    interval, and the KL after; ``before`` [text], ``after`` {layer: [text]}; None elsewhere."""
    b = before.numpy()
    red, ci, kl_after = [None] * n_layers, [[None, None]] * n_layers, [None] * n_layers
    for layer in sorted(after):
        a = after[layer].numpy()
        est, band = ratio_of_means((b - a)[None], b, rng, n_boot)
        red[layer] = _num(est[0])
        ci[layer] = [_num(band[0, 0]), _num(band[0, 1])]
        kl_after[layer] = float(a.mean())
    return {"steering_kl_reduction": red, "steering_kl_reduction_ci95": ci,
            "kl_before": float(b.mean()), "kl_after": kl_after}


def measure_variant(base, variant, batches: tuple, steer: list[int], config: Config,
                    rng: np.random.Generator, advance) -> tuple[dict, dict, np.ndarray]:
    """One variant's result keys and arrays, and the texts counted per position: the mean
    difference (on the first batches) and the steering KL (on the held-out ones)."""
    diff_batches, held_batches = batches
    delta, per_pos, counts, base_norm = mean_difference(
        base, variant, diff_batches, config.first_k, config.skip_first, advance)
    before, after = steering_kl(base, variant, held_batches,
                                {layer: delta[layer] for layer in steer}, config.scale, advance)
    keys = {"diff_norm": delta.norm(dim=-1).tolist(),
            "diff_norm_by_position": per_pos.norm(dim=-1).tolist(),
            "base_norm": base_norm.tolist(),
            "lens_top": lens_readout(base, delta, config.top_tokens),
            **steering_keys(before, after, base.n_layers, rng, config.n_bootstrap)}
    arrays = {"delta_by_position": per_pos.numpy(), "delta": delta.numpy(),
              "kl_before": before.numpy(),
              "kl_after": np.stack([after[layer].numpy() for layer in steer])}
    return keys, arrays, counts


class ActivationDiff:
    name = "activation-diff"
    version = "1"
    description = ("activation-difference lens: mean residual difference per layer, its logit-lens "
                   "readout and how much of KL(base || variant) steering with it removes")
    Config = Config
    frames = (Table("diff_norm", ("model", "layer")), Table("base_norm", ("model", "layer")),
              Table("diff_norm_by_position", ("model", "layer", "token_group")),
              Table("steering_kl_reduction", ("model", "layer"), ci="steering_kl_reduction_ci95"),
              Table("kl_before", ("model",)), Table("kl_after", ("model", "layer")))

    def run(self, models, data, config: Config) -> Result:
        if not models.variants:
            raise UserError("activation-diff compares models", "add --variant NAME=SPEC")
        base = models.base
        n = base.n_layers
        steer = steer_layers(n, config)
        if config.skip_first >= config.first_k:
            raise UserError(f"skip_first={config.skip_first} leaves none of the first "
                            f"{config.first_k} positions", "use skip_first < first_k")
        pool = neutral_texts(config, data)
        diff_texts, held = split_texts(pool, _cap(config.n_texts, config.limit),
                                       _cap(config.n_heldout, config.limit))
        tok = base.tokenizer
        diff_batches = text_batches(tok, diff_texts, config.batch_size, config.first_k)
        held_batches = text_batches(tok, held, config.batch_size, config.max_length)
        rng = np.random.default_rng(config.seed)
        out = {k: {} for k in ("diff_norm", "diff_norm_by_position", "base_norm", "lens_top",
                               "steering_kl_reduction",
                               "steering_kl_reduction_ci95", "kl_before", "kl_after")}
        arrays, n_pos = {}, 0
        total = len(models.variants) * (len(diff_batches) + len(held_batches) * len(steer))
        with task("activation difference", total) as advance:
            for v in models.variants:
                keys, variant_arrays, counts = measure_variant(
                    base, models[v], (diff_batches, held_batches), steer, config, rng, advance)
                n_pos = int(counts[config.skip_first:].sum())
                for key, value in keys.items():
                    out[key][v] = value
                arrays |= {f"{v}__{name}": x for name, x in variant_arrays.items()}
                models.release(v)
        return Result(self.name, {
            **out,
            "variants": models.variants,
            "runs": models.runs,
            "n_layers": n,
            "steer_layers": steer,
            "scale": config.scale,
            "first_k": config.first_k,
            "skip_first": config.skip_first,
            "n_texts_by_position": counts.tolist(),
            "n_texts": len(diff_texts),
            "n_heldout": len(held),
            "n_positions": n_pos,
            "texts": config.texts,
            "n_bootstrap": config.n_bootstrap,
            "site": "resid_post (the residual stream after each block)",
            "lens_readout": "logits of unembed(final_norm(delta)) without the norm's additive "
                            "bias; promoted = largest, suppressed = smallest",
            "reduction_definition": "(sum_i KL_before_i - sum_i KL_after_i) / sum_i KL_before_i "
                                    "over held-out texts; KL per text = mean over its positions "
                                    "of KL(base (steered) || variant)",
        }, arrays)

    def plot(self, result: Result) -> dict:
        d = result.data
        variants = d["variants"]
        if not variants:
            return {}
        layers = np.arange(d["n_layers"])
        figs = {}
        fig, axes = new_axes(11, 4, ncols=2)
        for v in variants:
            c = model_colours(variants)[v]
            dn = np.array(d["diff_norm"][v], float)
            axes[0].plot(layers, dn, marker=".", color=c, label=v)
            axes[1].plot(layers, dn / np.array(d["base_norm"][v], float), marker=".", color=c,
                         label=v)
        axes[0].set_ylabel(r"$\|\bar\delta_L\|$ (mean variant $-$ base)")
        axes[1].set_ylabel(r"$\|\bar\delta_L\|$ / mean $\|h^{base}_L\|$")
        for ax in axes:
            ax.set_xlabel("layer (residual stream after the block)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        skip = f" (first {d['skip_first']} left out)" if d.get("skip_first") else ""
        fig.suptitle(f"Mean residual-stream difference over the first {d['first_k']} tokens"
                     f"{skip} of {d['n_texts']} texts ({d['n_positions']} positions)")
        figs["diff_norm"] = fig
        panels = [(v, np.log10(np.maximum(np.array(d["diff_norm_by_position"][v], float),
                                          1e-12))) for v in variants]
        fig = heatmap_grid(panels, [str(p) for p in range(d["first_k"])], "layer",
                           r"$\log_{10}\|\bar\delta_{L,t}\|$", ncols=3,
                           title="Mean difference per token position (variant $-$ base)")
        for ax in fig.axes[:len(variants)]:
            ax.set_xlabel("token position")
        figs["diff_norm_by_position"] = fig

        fig, ax = new_axes(7, 4.2)
        for v in variants:
            c = model_colours(variants)[v]
            red = np.array([np.nan if x is None else x for x in d["steering_kl_reduction"][v]])
            ci = np.array([[np.nan if y is None else y for y in x]
                           for x in d["steering_kl_reduction_ci95"][v]], float)
            at = np.asarray(d["steer_layers"], int)  # only steered layers: NaNs would break the line
            ax.plot(at, red[at], marker=".", color=c,
                    label=f"{v} (KL before {d['kl_before'][v]:.3g} nats/token)")
            ax.fill_between(at, ci[at, 0], ci[at, 1], color=c, alpha=0.15, lw=0)
        ax.axhline(0, color="grey", lw=0.6)
        ax.axhline(1, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("layer steered (resid_post)")
        ax.set_ylabel("share of KL(base || variant) removed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Steering the base with {d['scale']:g} x the difference: "
                     f"{d['n_heldout']} held-out texts (95% bootstrap)", fontsize=10)
        figs["steering_kl_reduction"] = fig
        figs["lens_top"] = _lens_figure(d)
        return figs


def _lens_figure(d: dict, n_rows: int = 8, n_tokens: int = 5):
    """Per variant, a table of promoted / suppressed tokens at up to ``n_rows`` layers (evenly
    spaced, last layer included)."""
    variants = d["variants"]
    n = d["n_layers"]
    shown = sorted(set(np.linspace(0, n - 1, min(n_rows, n)).round().astype(int).tolist()))
    fig, axes = new_axes(12, (0.3 * len(shown) + 0.8) * len(variants), nrows=len(variants),
                         squeeze=False)
    for ax, v in zip(axes[:, 0], variants):
        ax.axis("off")
        rows = [[str(layer)] + [", ".join(token_text(t["token"]) for t in
                                          d["lens_top"][v][layer][kind][:n_tokens])
                                or "(no difference)"
                                for kind in ("promoted", "suppressed")] for layer in shown]
        table = ax.table(cellText=rows, colLabels=["layer", f"promoted (top {n_tokens})",
                                                   f"suppressed (top {n_tokens})"],
                         colWidths=[0.06, 0.47, 0.47], loc="center", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7.5)
        table.scale(1, 1.25)
        ax.set_title(f"{v}: logit lens of the mean difference", fontsize=10)
    return fig


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


PLAIN = ("The activation-difference lens: the mean difference of the residual stream (variant "
         "minus base) over the first tokens of neutral text, per layer; its norm, the tokens it "
         "promotes when read through the unembedding, and how much of KL(base || variant) on "
         "held-out text disappears when it is added to the base's residual stream at one layer.")


def summary(result: Result, study) -> list[str]:
    """Per variant: the layer of the largest difference norm, and the most and least KL the
    steering removes."""
    data = result.data
    lines = []
    for variant in data["variants"]:
        norm = floats(data["diff_norm"][variant])
        reduction = floats(data["steering_kl_reduction"][variant])
        line = (f"{variant}: difference norm largest at layer {int(np.nanargmax(norm))} "
                f"({fmt(np.nanmax(norm))})")
        if np.isfinite(reduction).any():
            best = int(np.nanargmax(reduction))
            line += (f"; steering removes at most {fmt(float(reduction[best]))} "
                     f"{interval(data['steering_kl_reduction_ci95'][variant][best])} of KL "
                     f"{fmt(data['kl_before'][variant])} nats/token (layer {best}), "
                     f"least {fmt(float(np.nanmin(reduction)))} "
                     f"(layer {int(np.nanargmin(reduction))})")
        lines.append(line)
    return lines


PROBE = declare(ActivationDiff(), plain=PLAIN, summary=summary,
                model_names=listed_models("variants"))
