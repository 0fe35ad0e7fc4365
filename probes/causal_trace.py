"""``causal-trace``: where each model recalls a fact (ROME causal tracing), base vs. variants.

For the same known facts (``knowns/known_1000.json``) and every model of the set: corrupt the
subject's input embeddings with Gaussian noise (``samples`` draws, scale ``noise_mult`` x the std
of the *base's* subject-token embeddings for every model with ``shared_noise``, else each model's
own, or the fixed ``noise_scale``; the draws are seeded per fact, so all models see the same
noise), restore one clean
activation per (token, layer) and kind (``hidden`` state; ``mlp`` / ``attn`` output over a window
of ``window`` layers), and read the probability of the answer token (the first token after the
prompt's tokens in ``prompt + " " + attribute``: :func:`~mechinterp.analysis.tracing.answer_token_id`).
With ``limit`` (and not ``keep_wrong``) the facts are the first ``limit`` of a seeded order that
the *base* knows (``n_screened`` says how many were looked at), so every traced fact counts;
a variant traces the same facts and leaves out those it does not know. Facts a model does not
know are left out unless ``keep_wrong``: ``known="first-token"``
(its top-1 next token starts the attribute) or ``"strict"`` (ROME's: greedy decoding gives the
whole attribute); the result says which rule ran (``known_rule``).
Engine: :mod:`mechinterp.analysis.tracing` (batched, exact).

Result keys: ``aie[<model>][<kind>][<token_group>]`` (list over layers; model ``base`` or a variant),
``n_facts[<model>]`` (facts traced), ``n_filtered[<model>]`` (facts left out as wrong); also
``aie_ci`` (Student-t 95% intervals over facts, with the n of each token group),
``aie_diff[<variant>]`` (base minus variant, per fact on the facts both models traced - both
know them, unless ``keep_wrong`` - then averaged; ``aie_diff_ci`` its t-interval, ``n_paired`` those facts),
``facts[<model>]`` (every selected fact: tokens, subject range, ``correct``; for traced facts
clean/corrupted probability and ``trace_index``) and arrays ``<model>__<kind>`` ([traced fact,
token, layer] restored probabilities, NaN-padded).
"""

from __future__ import annotations

import math
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
    fact_group_effects,
    make_noise,
    mean_t_interval,
    prepare_fact,
    trace_fact,
)
from mechinterp.data.knowns import load_knowns
from mechinterp.data.subset import screened_subset, seeded_subset
from mechinterp.errors import UserError
from mechinterp.store.frames import Table
from mechinterp.plotting.style import PALETTE, model_colours, new_axes, plain_text, token_text
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import floats, fmt
from mechinterp.progress import task
from mechinterp.store.results import Result

KIND_CMAP = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_TITLE = {"hidden": "hidden state", "mlp": "MLP output (window)",
              "attn": "attention output (window)"}
KIND_SHORT = {"hidden": "hidden", "mlp": "MLP (window)", "attn": "attention (window)"}
GROUP_TITLE = {"first_subject": "first subject token", "middle_subject": "middle subject tokens",
               "last_subject": "last subject token", "first_after": "first token after subject",
               "further": "further tokens", "last": "last token"}


@dataclass
class Config(BaseConfig):
    samples: int = 10  # noise draws per fact (ROME: 10)
    noise_mult: float = 3.0  # noise scale in units of the subject embeddings' std (ROME: 3)
    noise_scale: float | None = None  # fixed absolute scale (overrides noise_mult)
    window: int = 10  # layers restored together for the mlp / attn kinds (ROME: 10)
    # what is restored: hidden, mlp, attn
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    keep_wrong: bool = False  # also trace facts the model does not know
    max_fact_figures: int = 3  # per-fact heatmaps drawn per model
    # which facts a model knows: "first-token" (its top-1 next token starts the attribute) or
    # "strict" (ROME's: greedy decoding reproduces every token of the attribute)
    known: str = "first-token"
    # every model traced at the base's noise scale (ROME's 3 x the std of the *base's* subject
    # embeddings), so base-minus-variant compares the same corruption; off: each model its own
    shared_noise: bool = True

    at_least = {"samples": 1, "window": 1}  # lower bounds; every other number: at least 0


KNOWN_RULES = {
    "first-token": "the model's top-1 next token is the first token of the attribute",
    "strict": "greedy decoding reproduces every token of the attribute (ROME's rule)",
}


@torch.no_grad()
def knows(model, fact, rule: str) -> bool:
    """Whether ``model`` knows ``fact`` under ``rule`` (:data:`KNOWN_RULES`)."""
    ids = torch.tensor([fact.input_ids], device=model.device)
    if rule == "first-token":
        return int(model.hf(input_ids=ids).logits[0, -1].argmax()) == fact.answer_id
    want = list(fact.answer_ids)
    for tok in want:  # greedy, one token at a time: stop at the first miss
        nxt = int(model.hf(input_ids=ids).logits[0, -1].argmax())
        if nxt != tok:
            return False
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], 1)
    return True


def trace_facts(model, name: str, facts: list, prepared: list, scale: float,
                config: Config) -> tuple[list, list[dict], dict]:
    """Trace every fact ``model`` knows (every fact with ``keep_wrong``): ``(traces [(prepared
    fact, trace)], one row per fact, {known_id: {kind: {token group: [effect per layer]}}})``."""
    stack = BlockStack(model)
    d_model = model.hf.get_input_embeddings().weight.shape[1]
    traces, rows, effects = [], [], {}
    with task(f"causal trace {name}", len(facts)) as advance:
        for fact, inp in zip(facts, prepared):
            correct = knows(model, inp, config.known)
            row = {"known_id": fact.known_id, "subject": fact.subject, "prompt": fact.prompt,
                   "answer": fact.attribute,
                   "answer_token": model.tokenizer.decode([inp.answer_id]),
                   "tokens": inp.tokens, "subject_range": list(inp.subject), "correct": correct}
            if correct or config.keep_wrong:
                noise = make_noise(inp, config.samples, scale, d_model,
                                   seed=config.seed * 1_000_003 + fact.known_id)
                tr = trace_fact(model, inp, noise, config.kinds, config.window, stack=stack)
                row |= {"clean_prob": tr.clean_prob, "corrupted_prob": tr.corrupted_prob,
                        "trace_index": len(traces)}
                traces.append((inp, tr))
                effects[fact.known_id] = {k: fact_group_effects(inp, tr, k) for k in config.kinds}
            rows.append(row)
            advance()
    return traces, rows, effects


def put_model_keys(out: dict, arrays: dict, name: str, traces: list, rows: list[dict],
                   kinds: list[str], n_layers: int) -> None:
    """One model's AIE (mean and interval per kind and token group), facts, and the per-fact
    score grids ``<model>__<kind>`` [fact, token, layer]."""
    summary = aie_summary(traces, kinds) if traces else None
    out["aie"][name] = {k: {g: (summary[k][g]["mean"] if summary else [math.nan] * n_layers)
                            for g in TOKEN_GROUPS} for k in kinds}
    out["aie_ci"][name] = {k: {g: {x: summary[k][g][x] for x in ("lo", "hi", "n")}
                               for g in TOKEN_GROUPS} for k in kinds} if summary else {}
    out["n_facts"][name] = len(traces)
    out["facts"][name] = rows
    t_max = max((inp.n_tokens for inp, _ in traces), default=0)
    for k in kinds:
        grid = np.full((len(traces), t_max, n_layers), np.nan, dtype=np.float32)
        for i, (inp, tr) in enumerate(traces):
            grid[i, :inp.n_tokens] = tr.scores[k]
        arrays[f"{name}__{k}"] = grid


class CausalTrace:
    name = "causal-trace"
    version = "4"
    description = "ROME causal tracing (hidden / MLP / attention restoration) per model, AIE by token"
    Config = Config
    frames = (Table("aie", ("model", "component", "token_group", "layer"), ci="aie_ci"),
              Table("aie_diff", ("model", "component", "token_group", "layer"), ci="aie_diff_ci",
                    metric="aie_base_minus_variant"))

    def run(self, models, data, config: Config) -> Result:
        bad = [k for k in config.kinds if k not in KINDS]
        if bad or not config.kinds:
            raise UserError(f"unknown trace kind {bad[0] if bad else '(none)'}",
                            f"use some of {', '.join(KINDS)}")
        if config.known not in KNOWN_RULES:
            raise UserError(f"unknown known-fact rule {config.known!r}",
                            f"use one of {', '.join(KNOWN_RULES)}")
        every = load_knowns(data)
        if config.keep_wrong or config.limit is None:
            facts, n_screened = seeded_subset(every, config.limit, config.seed), None
        else:  # ROME traces facts the model knows: screen a seeded order until limit are known
            facts, n_screened = self._known_by_base(models.base, every, config)
        out = {k: {} for k in ("aie", "aie_ci", "n_facts", "n_filtered", "facts", "noise_scale")}
        arrays: dict[str, np.ndarray] = {}
        effects: dict[str, dict[int, dict]] = {}  # model -> known_id -> kind -> group -> [layer]
        n_layers = None
        base_scale = None
        for name in models.names:
            model = models[name]
            n_layers = model.n_layers
            prepared = [prepare_fact(model.tokenizer, f.prompt, f.subject, f.attribute,
                                     f"known_id={f.known_id}") for f in facts]
            scale = config.noise_scale
            if scale is None and config.shared_noise and base_scale is not None:
                scale = base_scale
            elif scale is None:
                scale = config.noise_mult * embedding_std(model, prepared)
            if name == "base":
                base_scale = scale
            traces, rows, fact_effects = trace_facts(model, name, facts, prepared, scale, config)
            if fact_effects:
                effects[name] = fact_effects
            put_model_keys(out, arrays, name, traces, rows, config.kinds, n_layers)
            out["n_filtered"][name] = len(facts) - len(traces)
            out["noise_scale"][name] = scale
            if name != "base":
                models.release(name)
        out |= self._paired(effects, models.variants, config.kinds, n_layers)
        return Result(self.name, {
            **out, "models": models.names, "variants": models.variants, "kinds": config.kinds,
            "token_groups": list(TOKEN_GROUPS), "n_layers": n_layers, "n_selected": len(facts),
            "max_fact_figures": config.max_fact_figures, "samples": config.samples,
            "window": config.window,
            "known_rule": config.known, "known_definition": KNOWN_RULES[config.known],
            "n_screened": n_screened,
            "shared_noise": config.noise_scale is None and config.shared_noise,
            "answer": "the tokens after the prompt's tokens in prompt + ' ' + attribute",
        }, arrays)

    @staticmethod
    def _known_by_base(base, every: list, config) -> tuple[list, int]:
        """The first ``limit`` facts of a seeded order of all facts that the base knows (under
        ``config.known``), in their original order; and how many were screened."""
        def known(f) -> bool:
            return knows(base, prepare_fact(base.tokenizer, f.prompt, f.subject, f.attribute,
                                            f"known_id={f.known_id}"), config.known)

        with task(f"finding {config.limit} facts the base knows", config.limit) as advance:
            return screened_subset(every, config.limit, config.seed, known, advance)

    @staticmethod
    def _paired(effects: dict, variants: list[str], kinds: list[str], n_layers: int) -> dict:
        """Base minus variant on the same facts, per fact, then the mean with a t-interval. The
        facts are those both models traced: under the default filter the facts both know; with
        ``keep_wrong`` every selected fact (what each model's own AIE averages over too)."""
        diff, ci, n_paired = {}, {}, {}
        base = effects.get("base", {})
        for v in variants:
            mine = effects.get(v, {})
            common = [f for f in base if f in mine]
            n_paired[v] = len(common)
            diff[v], ci[v] = {}, {}
            for k in kinds:
                diff[v][k], ci[v][k] = {}, {}
                for g in TOKEN_GROUPS:
                    rows = [base[f][k][g] - mine[f][k][g] for f in common
                            if g in base[f][k] and g in mine[f][k]]
                    s = mean_t_interval(rows, n_layers)
                    diff[v][k][g] = s["mean"]
                    ci[v][k][g] = {x: s[x] for x in ("lo", "hi", "n")}
        return {"aie_diff": diff, "aie_diff_ci": ci, "n_paired": n_paired}

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
    labels = [token_text(t)[1:-1] + (" *" if s <= i < e else "") for i, t in enumerate(row["tokens"])]
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
        fig.colorbar(im, ax=ax, label=f"p({token_text(row['answer_token'])})", shrink=0.85)
    fig.suptitle(f"{plain_text(model)}: {token_text(row['prompt'])} -> "
                 f"{token_text(row['answer_token'])}  (clean p="
                 f"{row['clean_prob']:.3f}, corrupted p={row['corrupted_prob']:.3f}; * = subject)")
    return fig


def _aie_figure(d: dict, kind: str):
    fig, axes = new_axes(width=12, height=6.5, nrows=2, ncols=3, sharey=True)
    layers = np.arange(d["n_layers"])
    for ax, group in zip(axes.flat, d["token_groups"]):
        for name in d["models"]:
            mean = np.array(d["aie"][name][kind][group], dtype=float)
            ci = d["aie_ci"].get(name, {}).get(kind, {}).get(group)
            colour = model_colours(d["models"])[name]
            ax.plot(layers, mean, color=colour, label=f"{name} (n={d['n_facts'][name]})")
            if ci and name == d["models"][0]:  # one band (the base's): stacked bands hide it all
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
                 f"(band: {d['models'][0]}'s Student-t 95% interval over facts)")
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
                colour = PALETTE[j % len(PALETTE)]
                ax.plot(layers, np.array(d["aie_diff"][v][k][g], float), color=colour,
                        label=GROUP_TITLE[g])
                band = d.get("aie_diff_ci", {}).get(v, {}).get(k, {}).get(g)
                if band and g in ("last_subject", "last"):  # the two ROME reads; more clutter
                    ax.fill_between(layers, np.array(band["lo"], float),
                                    np.array(band["hi"], float), color=colour, alpha=0.15, lw=0)
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_title(f"base - {v}: {KIND_SHORT[k]}, n={d.get('n_paired', {}).get(v, '?')}",
                         fontsize=10)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[r, 0].set_ylabel("AIE difference")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Base minus variant indirect effect on the same facts (n = facts both know) at "
                 "the same noise; positive: the base relies more on this site; bands: t 95% "
                 "(last subject token, last token)", fontsize=10)
    return fig


PLAIN = ("ROME causal tracing: subject tokens are corrupted with noise and the clean hidden state / "
         "MLP / attention output restored at one (token, layer); the average indirect effect "
         "shows where a fact is recalled.")


def summary(result: Result, study) -> list[str]:
    """Per model and restored component: the peak average indirect effect and where it is."""
    data = result.data
    lines = []
    for name, kinds in data["aie"].items():
        parts = []
        for kind, groups in kinds.items():
            best = max(((float(np.nanmax(floats(v))), group, int(np.nanargmax(floats(v))))
                        for group, v in groups.items() if np.isfinite(floats(v)).any()),
                       default=None)
            if best:
                parts.append(f"{kind} peak AIE {fmt(best[0])} at {best[1]} layer {best[2]}")
        lines.append(f"{name} ({data['n_facts'].get(name)} facts): " + "; ".join(parts))
    return lines


PROBE = declare(CausalTrace(), plain=PLAIN, summary=summary, model_names=listed_models("models"))
