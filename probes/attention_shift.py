"""``attention-shift``: which attention heads read differently after fine-tuning.

Per variant (every checkpoint of every run), layer and query head, averaged over query positions
(after the first) and prompts: the Jensen-Shannon divergence between base and variant attention
rows, the change in row entropy and the change in attention mass on the first token (see
:mod:`mechinterp.analysis.attention`). Prompts: MMLU test questions in the lm-evaluation-harness
format (0-shot, without the answer; :mod:`mechinterp.evals.mmlu`'s builder) and ROME known-fact
prompts, ``n_mmlu`` + ``n_knowns`` of them (a seeded selection of each; small by default for CPU),
as plain text, cut to ``max_tokens``. ``limit``, when set, caps the total: at most ``limit``
prompts, shared equally between the two sets as far as ``n_mmlu`` / ``n_knowns`` allow
(:func:`~mechinterp.data.subset.split_limit`).

Result keys: ``js[<variant>]``, ``entropy_change[<variant>]``, ``first_token_mass_change[<variant>]``
(each a list over layers of lists over heads), ``<metric>_layer_ci95[<variant>]`` (per layer,
the Student-t 95% interval over prompts of the mean over heads), plus ``n_prompts``, ``runs``,
``steps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mechinterp.analysis.attention import METRICS, attention_shift
from mechinterp.data import load_knowns, load_mmlu
from mechinterp.data.subset import seeded_subset, split_limit
from mechinterp.errors import UserError
from mechinterp.evals.mmlu import MMLUFormat, build_request
from mechinterp.evals.stats import t_interval
from mechinterp.store.frames import Table
from mechinterp.plotting import heatmap_grid, new_axes
from mechinterp.plotting.trajectories import run_steps
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import fmt, nested_floats
from mechinterp.progress import task
from mechinterp.store.results import Result

LABELS = {
    "js": "JS divergence (nats)",
    "entropy_change": r"$\Delta$ entropy (nats)",
    "first_token_mass_change": r"$\Delta$ mass on first token",
}


@dataclass
class Config(BaseConfig):
    n_mmlu: int = 16  # MMLU test questions (seeded selection over all subjects)
    n_knowns: int = 16  # known-fact prompts (limit, when set, caps n_mmlu + n_knowns)
    max_tokens: int = 256  # prompts are cut to this many tokens
    batch_size: int = 4  # prompts per forward pass
    at_least = {"max_tokens": 1, "batch_size": 1}  # lower bounds; every other number: at least 0


def load_prompts(data, config: Config) -> list[str]:
    if data is None:
        raise UserError("attention-shift needs a data source", "pass --data-dir")
    n_mmlu, n_knowns = split_limit(config.limit, [config.n_mmlu, config.n_knowns])
    texts = []
    if n_mmlu:
        texts += [build_request(MMLUFormat(), it, ()).context
                  for it in seeded_subset(load_mmlu(data, "test"), n_mmlu, config.seed)]
    if n_knowns:
        texts += [f.prompt for f in seeded_subset(load_knowns(data), n_knowns, config.seed)]
    if not texts:
        raise UserError("no prompts selected", "set n_mmlu or n_knowns above 0")
    return texts


class AttentionShiftProbe:
    name = "attention-shift"
    version = "3"
    description = ("per layer and head: JS divergence of attention rows, entropy change and "
                   "first-token mass change vs the base (MMLU + known facts)")
    Config = Config
    frames = tuple(Table(m, ("model", "layer", "head")) for m in METRICS)

    def run(self, models, data, config: Config) -> Result:
        texts = load_prompts(data, config)
        tok = models.base.tokenizer
        prompts = [tok(t)["input_ids"][:config.max_tokens] for t in texts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = {m: {} for m in METRICS}
        ci = {m: {} for m in METRICS}
        with task("attention shift", len(prompts) * len(models.variants)) as advance:
            for name in models.variants:
                shift = attention_shift(models.base, models[name], prompts, config.batch_size,
                                        pad, progress=advance)
                for m in METRICS:
                    out[m][name] = getattr(shift, m).tolist()
                    # per layer, the mean over heads with a t-interval over prompts
                    rows = shift.per_prompt_layer[m]
                    ci[m][name] = [list(t_interval(rows[:, layer])[1:])
                                   for layer in range(rows.shape[1])]
                models.release(name)
        return Result(self.name, {
            "variants": models.variants,
            "runs": models.runs,
            "steps": run_steps(models.runs),
            **out,
            **{f"{m}_layer_ci95": ci[m] for m in METRICS},
            "n_prompts": len(prompts),
            "n_tokens": int(sum(len(p) for p in prompts)),
        })

    def plot(self, result: Result) -> dict:
        data = result.data
        variants = data["variants"]
        if not variants:
            return {}
        figs = {}
        arrays = {m: {v: _arr(data[m][v]) for v in variants} for m in METRICS}
        n_heads = next(iter(arrays["js"].values())).shape[1]
        heads = [str(h) for h in range(n_heads)]
        for m in METRICS:
            figs[f"attention_{m}_heatmap"] = heatmap_grid(
                [(v, arrays[m][v]) for v in variants], heads, "layer", LABELS[m],
                title=f"{LABELS[m]} per layer and head, vs base "
                      f"({data['n_prompts']} prompts; x = query head)",
                cmap="magma" if m == "js" else "viridis", diverging=m != "js", ncols=5)
            for ax in figs[f"attention_{m}_heatmap"].axes:
                if ax.get_label() != "<colorbar>" and ax.get_visible():
                    ax.set_xlabel("query head")
        fig, axes = new_axes(13.0, 3.8, ncols=3)
        for ax, m in zip(axes, METRICS):
            for v in variants:
                arr = arrays[m][v]
                (line,) = ax.plot(range(arr.shape[0]), np.nanmean(arr, axis=1), marker="o",
                                  markersize=3, label=v)
                band = data.get(f"{m}_layer_ci95", {}).get(v)
                if band and len(variants) <= 4:  # bands for a few curves; more only clutter
                    b = np.array(band, float).reshape(-1, 2)
                    ax.fill_between(range(arr.shape[0]), b[:, 0], b[:, 1],
                                    color=line.get_color(), alpha=0.15, lw=0)
            ax.set_xlabel("layer")
            ax.set_ylabel(LABELS[m] + ", mean over heads")
            ax.grid(True, alpha=0.3)
            if m != "js":
                ax.axhline(0.0, color="0.5", linewidth=0.8)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Attention shift per layer ({data['n_prompts']} prompts; bands: t 95% "
                     "over prompts)")
        figs["attention_shift_layers"] = fig
        return figs


def _arr(rows) -> np.ndarray:
    return np.array([[np.nan if x is None else x for x in r] for r in rows], float)


PLAIN = ("How differently each head attends: Jensen-Shannon divergence between the base's and "
         "the variant's attention patterns on the same prompts.")


def summary(result: Result, study) -> list[str]:
    """Per variant: the mean divergence and the head where it is largest."""
    data = result.data
    lines = []
    for name, js in data["js"].items():
        grid = np.asarray(nested_floats(js))
        layer, head = np.unravel_index(np.nanargmax(grid), grid.shape)
        lines.append(f"{name}: mean JS {fmt(float(np.nanmean(grid)))}, largest at layer {layer} "
                     f"head {head} ({fmt(float(grid[layer, head]))}) over "
                     f"{data.get('n_prompts')} prompts")
    return lines


PROBE = declare(AttentionShiftProbe(), plain=PLAIN, summary=summary,
                model_names=listed_models("variants", "js"))
