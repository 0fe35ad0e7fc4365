"""``causal-trace``: where each model recalls a fact (ROME causal tracing), base vs. variants.

For the same known facts (``knowns/known_1000.json``) and every model of the set: corrupt the
subject's input embeddings with Gaussian noise (``samples`` draws, scale ``noise_mult`` x the std
of the model's subject-token embeddings, or the fixed ``noise_scale``), restore one clean
activation per (token, layer) and kind (``hidden`` state; ``mlp`` / ``attn`` output over a window
of ``window`` layers), and read the probability of the answer token (the first token after the
prompt's tokens in ``prompt + " " + attribute``: :func:`~mechinterp.analysis.tracing.answer_token_id`).
Facts the model does not predict (top-1) are left out unless ``keep_wrong``.
Engine: :mod:`mechinterp.analysis.tracing` (batched, exact).

Result keys: ``aie[<model>][<kind>][<token_group>]`` (list over layers; model ``base`` or a variant),
``n_facts[<model>]`` (facts traced), ``n_filtered[<model>]`` (facts left out as wrong); also
``aie_ci`` (95% normal intervals over facts), ``aie_diff[<variant>]`` (base minus variant),
``facts[<model>]`` (every selected fact: tokens, subject range, ``correct``; for traced facts
clean/corrupted probability and ``trace_index``) and arrays ``<model>__<kind>`` ([traced fact,
token, layer] restored probabilities, NaN-padded).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from mechinterp.analysis.blocks import BlockStack
from mechinterp.analysis.tracing import (
    KINDS,
    TOKEN_GROUPS,
    aie_summary,
    embedding_std,
    make_noise,
    prepare_fact,
    trace_fact,
)
from mechinterp.data.knowns import load_knowns
from mechinterp.errors import UserError
from mechinterp.plotting.style import PALETTE, new_axes
from mechinterp.probe import BaseConfig
from mechinterp.progress import task
from mechinterp.results import Result

KIND_CMAP = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_TITLE = {"hidden": "hidden state", "mlp": "MLP output (window)",
              "attn": "attention output (window)"}
GROUP_TITLE = {"first_subject": "first subject token", "middle_subject": "middle subject tokens",
               "last_subject": "last subject token", "first_after": "first token after subject",
               "further": "further tokens", "last": "last token"}


@dataclass
class Config(BaseConfig):
    samples: int = 10
    noise_mult: float = 3.0
    noise_scale: float | None = None  # fixed absolute scale (overrides noise_mult)
    window: int = 10
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    keep_wrong: bool = False
    max_fact_figures: int = 3

    at_least = {"samples": 1, "window": 1}  # lower bounds; every other number: at least 0


def select(items: list, limit: int | None, seed: int) -> list:
    """A fixed, seeded selection of ``limit`` items (in their original order)."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


@torch.no_grad()
def _top1(model, fact) -> int:
    ids = torch.tensor([fact.input_ids], device=model.device)
    return int(model.hf(input_ids=ids).logits[0, -1].argmax())


class CausalTrace:
    name = "causal-trace"
    version = "2"  # 2: answer token read after the prompt (was " " + attribute alone)
    description = "ROME causal tracing (hidden / MLP / attention restoration) per model, AIE by token"
    Config = Config

    def run(self, models, data, config: Config) -> Result:
        bad = [k for k in config.kinds if k not in KINDS]
        if bad or not config.kinds:
            raise UserError(f"unknown trace kind {bad[0] if bad else '(none)'}",
                            f"use some of {', '.join(KINDS)}")
        if config.samples < 1 or config.window < 1:
            raise UserError("samples and window must be >= 1", "e.g. --set samples=10")
        facts = select(load_knowns(data), config.limit, config.seed)
        out = {k: {} for k in ("aie", "aie_ci", "n_facts", "n_filtered", "facts", "noise_scale")}
        arrays: dict[str, np.ndarray] = {}
        n_layers = None
        for name in models.names:
            model = models[name]
            n_layers = model.n_layers
            stack = BlockStack(model)
            prepared = [prepare_fact(model.tokenizer, f.prompt, f.subject, f.attribute,
                                     f"known_id={f.known_id}") for f in facts]
            scale = config.noise_scale
            if scale is None:
                scale = config.noise_mult * embedding_std(model, prepared)
            d_model = model.hf.get_input_embeddings().weight.shape[1]
            traces, rows = [], []
            with task(f"causal trace {name}", len(facts)) as advance:
                for fact, inp in zip(facts, prepared):
                    correct = _top1(model, inp) == inp.answer_id
                    row = {"known_id": fact.known_id, "subject": fact.subject,
                           "prompt": fact.prompt, "answer": fact.attribute,
                           "answer_token": model.tokenizer.decode([inp.answer_id]),
                           "tokens": inp.tokens, "subject_range": list(inp.subject),
                           "correct": correct}
                    if correct or config.keep_wrong:
                        noise = make_noise(inp, config.samples, scale, d_model,
                                           seed=config.seed * 1_000_003 + fact.known_id)
                        tr = trace_fact(model, inp, noise, config.kinds, config.window,
                                        stack=stack)
                        row |= {"clean_prob": tr.clean_prob, "corrupted_prob": tr.corrupted_prob,
                                "trace_index": len(traces)}
                        traces.append((inp, tr))
                    rows.append(row)
                    advance()
            summary = aie_summary(traces, config.kinds) if traces else None
            out["aie"][name] = {k: {g: (summary[k][g]["mean"] if summary else [math.nan] * n_layers)
                                    for g in TOKEN_GROUPS} for k in config.kinds}
            out["aie_ci"][name] = {k: {g: {x: summary[k][g][x] for x in ("lo", "hi", "n")}
                                       for g in TOKEN_GROUPS} for k in config.kinds} if summary else {}
            out["n_facts"][name] = len(traces)
            out["n_filtered"][name] = len(facts) - len(traces)
            out["facts"][name] = rows
            out["noise_scale"][name] = scale
            t_max = max((inp.n_tokens for inp, _ in traces), default=0)
            for k in config.kinds:
                grid = np.full((len(traces), t_max, n_layers), np.nan, dtype=np.float32)
                for i, (inp, tr) in enumerate(traces):
                    grid[i, :inp.n_tokens] = tr.scores[k]
                arrays[f"{name}__{k}"] = grid
            if name != "base":
                models.release(name)
        out["aie_diff"] = {
            v: {k: {g: (np.array(out["aie"]["base"][k][g]) - np.array(out["aie"][v][k][g])).tolist()
                    for g in TOKEN_GROUPS} for k in config.kinds}
            for v in models.variants}
        return Result(self.name, {
            **out, "models": models.names, "variants": models.variants, "kinds": config.kinds,
            "token_groups": list(TOKEN_GROUPS), "n_layers": n_layers, "n_selected": len(facts),
            "max_fact_figures": config.max_fact_figures, "samples": config.samples,
            "window": config.window,
            "answer": "first token after the prompt's tokens in prompt + ' ' + attribute; a "
                      "fact counts as known when it is the model's top-1 prediction",
        }, arrays)

    # ----- figures ---------------------------------------------------------------------------
    def plot(self, result: Result) -> dict:
        d = result.data
        figs = {}
        for name in d["models"]:
            traced = [r for r in d["facts"][name] if "trace_index" in r]
            for row in traced[: d.get("max_fact_figures", 3)]:
                grids = {k: result.arrays[f"{name}__{k}"][row["trace_index"]] for k in d["kinds"]}
                figs[f"trace_{name}_fact{row['known_id']}"] = _fact_figure(name, row, grids)
        for kind in d["kinds"]:
            figs[f"aie_{kind}"] = _aie_figure(d, kind)
        if d["variants"]:
            figs["aie_diff"] = _diff_figure(d)
        return figs


def _fact_figure(model: str, row: dict, grids: dict[str, np.ndarray]):
    n_tok = len(row["tokens"])
    s, e = row["subject_range"]
    labels = [repr(t)[1:-1] + (" *" if s <= i < e else "") for i, t in enumerate(row["tokens"])]
    kinds = list(grids)
    fig, axes = new_axes(width=4.2 * len(kinds) + 0.8, height=0.32 * n_tok + 1.8,
                         ncols=len(kinds), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        g = grids[k][:n_tok]
        im = ax.imshow(g, aspect="auto", cmap=KIND_CMAP[k], interpolation="nearest",
                       vmin=min(row["corrupted_prob"], float(np.nanmin(g))),
                       vmax=max(float(np.nanmax(g)), row["corrupted_prob"] + 1e-6))
        ax.set_yticks(range(n_tok), labels if ax is axes[0][0] else [""] * n_tok)
        ax.set_xlabel("layer")
        ax.set_title(f"restore {KIND_TITLE[k]}")
        fig.colorbar(im, ax=ax, label=f"p({row['answer_token']!r})", shrink=0.85)
    fig.suptitle(f"{model}: {row['prompt']!r} -> {row['answer_token']!r}  (clean p="
                 f"{row['clean_prob']:.3f}, corrupted p={row['corrupted_prob']:.3f}; * = subject)")
    return fig


def _aie_figure(d: dict, kind: str):
    fig, axes = new_axes(width=12, height=6.5, nrows=2, ncols=3, sharey=True)
    layers = np.arange(d["n_layers"])
    for ax, group in zip(axes.flat, d["token_groups"]):
        for j, name in enumerate(d["models"]):
            mean = np.array(d["aie"][name][kind][group], dtype=float)
            ci = d["aie_ci"].get(name, {}).get(kind, {}).get(group)
            colour = PALETTE[j % len(PALETTE)]
            ax.plot(layers, mean, color=colour, label=f"{name} (n={d['n_facts'][name]})")
            if ci:
                ax.fill_between(layers, np.array(ci["lo"], float), np.array(ci["hi"], float),
                                color=colour, alpha=0.18, linewidth=0)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(GROUP_TITLE[group])
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("AIE (restored - corrupted p)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Average indirect effect of restoring the {KIND_TITLE[kind]} "
                 f"(95% interval over facts)")
    return fig


def _diff_figure(d: dict):
    variants, kinds = d["variants"], d["kinds"]
    fig, axes = new_axes(width=4.2 * len(kinds) + 1, height=3.2 * len(variants) + 0.6,
                         nrows=len(variants), ncols=len(kinds), squeeze=False, sharey=True)
    layers = np.arange(d["n_layers"])
    for r, v in enumerate(variants):
        for c, k in enumerate(kinds):
            ax = axes[r, c]
            for j, g in enumerate(d["token_groups"]):
                ax.plot(layers, np.array(d["aie_diff"][v][k][g], float),
                        color=PALETTE[j % len(PALETTE)], label=GROUP_TITLE[g])
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_title(f"base - {v}: {KIND_TITLE[k]}")
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[r, 0].set_ylabel("AIE difference")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Base minus variant average indirect effect (positive: the base relies more "
                 "on this site)")
    return fig


PROBE = CausalTrace()
