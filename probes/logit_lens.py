"""``logit-lens`` across models: what each layer of base and variants would predict next.

Per prompt, at its last position, the residual stream after each block (``resid_post``) is read
through the final norm and the unembedding (float32 log-softmax, :mod:`mechinterp.analysis.lens`;
the last layer's lens is the model's own output), for the base and each variant on the same
prompts.

Prompt sets (``n_per_set`` seeded items each; ``limit``, when given, counts prompts in all, shared
equally between the sets): ``knowns`` (ROME facts; gold =
``attribute``), ``mmlu`` (cloze: ``Question: ...\\nAnswer:``, gold = the correct choice's text) and
``task`` (in-domain: the training prompt - think/answer system prompt and the question through the
chat template - followed by ``<think>\\n7 x 8 = ``, the start of the SFT target's reasoning; gold =
the result; held-out items of the ``task`` arithmetic spec). The gold token is the first token
after the prompt's tokens in ``prompt + " " + answer``
(:func:`~mechinterp.analysis.tracing.answer_token_id`).

Result keys:

- ``lens_kl[<variant>]``: list over layers of the mean over prompts (all sets pooled) of
  ``KL(base lens || variant lens)`` (nats), ``lens_kl_ci95`` (percentile bootstrap over prompts),
  ``lens_kl_by_set[<variant>][<set>]``.
- ``answer_rank[<model>]``: list over layers of the *median* over prompts (all sets pooled) of the
  gold token's rank (1 = top-1); ``answer_rank_by_set[<model>][<set>]`` the same per set,
  ``answer_rank_mean_log10_by_set`` the mean of log10(rank) per set (a mean that the vocabulary-size
  tail does not dominate); per-prompt ranks in arrays ``<model>__<set>__rank`` ([layer, item]).
- ``first_top1_layer[<model>]``: the median over prompts of the first layer at which the gold
  token is the lens's top-1, over the prompts where it is top-1 at some layer (null if none);
  ``top1_share[<model>]``: the share of prompts that are (``..._by_set`` per set).
- ``n_prompts``, ``n_prompts_by_set``, ``n_too_long_by_set`` (prompts longer than the model's
  context, left out), ``models``, ``variants``, ``runs``.

The base's lens is recomputed with each variant (one more forward per batch) rather than kept:
its full distributions would take layers x prompts x vocabulary floats.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from mechinterp.analysis.crossmodel import last_positions
from mechinterp.analysis.divergence import kl_rows
from mechinterp.analysis.lens import gold_ranks, lens_log_probs, residual_streams
from mechinterp.analysis.tracing import answer_token_id
from mechinterp.data.arithmetic import is_task
from mechinterp.data.subset import seeded_subset, split_limit
from mechinterp.errors import UserError
from mechinterp.evals.stats import mean_ci
from mechinterp.evals.task import task_prompt
from mechinterp.store.frames import Table
from mechinterp.plotting.style import model_colours, new_axes
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import floats, fmt, interval
from mechinterp.progress import task
from mechinterp.store.results import Result
from mechinterp.data.items import load_items

from .mlp_patching import prompts_for

PROMPT_SETS = ("knowns", "mmlu", "task")


@dataclass
class Config(BaseConfig):
    # knowns (ROME facts), mmlu (cloze: the correct choice's text) and/or task (in-domain items)
    prompt_sets: list[str] = field(default_factory=lambda: list(PROMPT_SETS))
    n_per_set: int = 100  # prompts per set (a seeded selection) when limit is not given
    task: str = "arithmetic"  # the in-domain task spec whose held-out items the task set reads
    mmlu_subjects: list[str] | None = None  # MMLU subjects for the mmlu set (default: all)
    n_bootstrap: int = 1000  # resamples of the prompts for the lens KL's interval
    batch_size: int = 8  # prompts per forward pass
    at_least = {"n_per_set": 1, "batch_size": 1, "n_bootstrap": 1}  # every other number: >= 0


def task_prompts(tokenizer, spec: str, limit: int, seed: int) -> list[tuple[str, int]]:
    """In-domain items: the training prompt, then the SFT target's reasoning up to ``= ``."""
    if not is_task(spec):
        raise UserError(f"task={spec!r} is not an arithmetic task spec",
                        "use arithmetic or arithmetic:ops=...,min=...,max=...")
    items = seeded_subset(load_items(spec, None, "test"), limit, seed)
    out = []
    for i, it in enumerate(items):
        lhs = it.reasoning.rsplit("=", 1)[0].strip()
        head = task_prompt(tokenizer, it.question) + f"<think>\n{lhs} ="
        try:  # "= " then the digits where the space is a token of its own (SmolLM2)
            out.append((head + " ", answer_token_id(tokenizer, head + " ", it.answer)))
        except UserError:  # a tokenizer that merges " 56": the answer's first token after "="
            out.append((head, answer_token_id(tokenizer, head, it.answer, f"task item {i}")))
    return out


def lens_prompts(config: Config, data, tokenizer) -> dict[str, list[tuple[str, int]]]:
    bad = [s for s in config.prompt_sets if s not in PROMPT_SETS]
    if bad or not config.prompt_sets:
        raise UserError(f"unknown prompt set {bad[0]!r}" if bad else "no prompt set",
                        f"use some of {', '.join(PROMPT_SETS)}")
    shared = [s for s in config.prompt_sets if s != "task"]
    if config.limit is None:  # n_per_set each
        share = dict.fromkeys(config.prompt_sets, config.n_per_set)
    else:  # limit counts prompts in all, shared equally between the sets (as in every probe)
        share = dict(zip(config.prompt_sets,
                         split_limit(config.limit, [config.limit] * len(config.prompt_sets))))
    out = {}
    if shared:
        if data is None:
            raise UserError("logit-lens's knowns/mmlu sets need a data source", "pass --data-dir")
        cfg = types.SimpleNamespace(prompt_sets=shared, limit=sum(share[s] for s in shared),
                                    seed=config.seed,
                                    mmlu_subjects=config.mmlu_subjects, mmlu_answer="text")
        out |= prompts_for(data, cfg, tokenizer)
    if "task" in config.prompt_sets:
        out["task"] = task_prompts(tokenizer, config.task, share["task"], config.seed)
    return {k: out[k] for k in config.prompt_sets}


def fitting(sets: dict[str, list[tuple[str, int]]], tokenizer, max_tokens: int | None,
            ) -> tuple[dict[str, list[tuple[str, int]]], dict[str, int]]:
    """The prompts that fit the model's context (``max_tokens``), and how many per set did not."""
    if not max_tokens:
        return sets, {s: 0 for s in sets}
    kept, dropped = {}, {}
    for s, items in sets.items():
        kept[s] = [(p, g) for p, g in items
                   if len(tokenizer(p, add_special_tokens=s != "task")["input_ids"]) <= max_tokens]
        dropped[s] = len(items) - len(kept[s])
        if not kept[s]:
            raise UserError(f"no {s} prompt fits the model's {max_tokens} positions",
                            f"leave {s} out of prompt_sets")
    return kept, dropped


@torch.no_grad()
def last_position_lens(model, tokenizer, prompts: list[str],
                       add_special_tokens: bool = True) -> torch.Tensor:
    """[layer, prompt, vocab] float32 lens log-probs at each prompt's last token (chat-rendered
    prompts carry their own special tokens: ``add_special_tokens=False``)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right",
                    add_special_tokens=add_special_tokens)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    _, resid = residual_streams(model, ids, mask)
    pos = last_positions(mask).to(resid.device)
    rows = torch.arange(len(prompts), device=resid.device)
    return lens_log_probs(model, resid[:, rows, pos]).cpu()


def lens_passes(models, sets: dict, batch_size: int) -> tuple[dict, dict]:
    """The lens at the last prompt position of every model, batch by batch: the gold token's rank
    ``{model: {set: [layer, prompt]}}`` and KL(base lens || variant lens) ``{variant: {set:
    [layer, prompt]}}``; the base runs beside each variant, its ranks kept from the first."""
    base, tok = models.base, models.base.tokenizer
    n_layers = base.n_layers
    batches = [(s, items[a:a + batch_size]) for s, items in sets.items()
               for a in range(0, len(items), batch_size)]
    ranks = {m: {s: [] for s in sets} for m in models.names}
    kls = {v: {s: [] for s in sets} for v in models.variants}
    with task("logit lens", len(batches) * (2 * len(models.variants) or 1)) as advance:
        for v in models.variants or [None]:
            var = models[v] if v else None
            for s, batch in batches:
                gold = torch.tensor([g for _, g in batch])
                texts, special = [p for p, _ in batch], s != "task"
                lb = last_position_lens(base, tok, texts, special)
                if v is None or v == models.variants[0]:
                    ranks["base"][s].append(gold_ranks(lb, gold.expand(n_layers, -1)))
                advance()
                if var is None:
                    continue
                lv = last_position_lens(var, tok, texts, special)
                ranks[v][s].append(gold_ranks(lv, gold.expand(n_layers, -1)))
                kls[v][s].append(kl_rows(lb, lv).double())  # [layer, prompt]
                advance()
            if v:
                models.release(v)
    return ({m: {s: torch.cat(ranks[m][s], 1).numpy() for s in sets} for m in models.names},
            {v: {s: torch.cat(kls[v][s], 1).numpy() for s in sets} for v in kls})


def lens_kl_keys(kl_arr: dict, rng: np.random.Generator, n_boot: int) -> dict:
    """Per variant the lens KL per layer pooled over sets (with a bootstrap interval) and per set."""
    out: dict = {"lens_kl": {}, "lens_kl_ci95": {}, "lens_kl_by_set": {}}
    for v, by in kl_arr.items():
        pooled = np.concatenate(list(by.values()), 1)  # [layer, prompt]
        cis = [mean_ci(row, rng, n_boot) for row in pooled]
        out["lens_kl"][v] = [m for m, _ in cis]
        out["lens_kl_ci95"][v] = [c for _, c in cis]
        out["lens_kl_by_set"][v] = {s: x.mean(1).tolist() for s, x in by.items()}
    return out


def rank_keys(rank_arr: dict) -> dict:
    """Per model the gold token's median rank per layer, the first layer it is top-1 and the
    share of prompts that reach it, pooled over sets and per set."""
    out: dict = {k: {} for k in ("answer_rank", "answer_rank_by_set",
                                 "answer_rank_mean_log10_by_set", "first_top1_layer",
                                 "first_top1_layer_by_set", "top1_share", "top1_share_by_set")}
    for m, by in rank_arr.items():
        pooled = np.concatenate(list(by.values()), 1)
        out["answer_rank"][m] = np.median(pooled, 1).tolist()
        out["answer_rank_by_set"][m] = {s: np.median(x, 1).tolist() for s, x in by.items()}
        out["answer_rank_mean_log10_by_set"][m] = {
            s: np.log10(x).mean(1).tolist() for s, x in by.items()}
        out["first_top1_layer"][m], out["top1_share"][m] = first_top1(pooled)
        per = {s: first_top1(x) for s, x in by.items()}
        out["first_top1_layer_by_set"][m] = {s: f for s, (f, _) in per.items()}
        out["top1_share_by_set"][m] = {s: sh for s, (_, sh) in per.items()}
    return out


class LogitLens:
    name = "logit-lens"
    version = "2"
    description = ("logit lens per layer for base and variants on the same prompts: lens KL, gold "
                   "rank, first top-1 layer")
    Config = Config
    frames = (Table("lens_kl", ("model", "layer"), ci="lens_kl_ci95"),
              Table("answer_rank", ("model", "layer")),
              Table("answer_rank_by_set", ("model", "token_group", "layer")),
              Table("first_top1_layer", ("model",)), Table("top1_share", ("model",)))

    def run(self, models, data, config: Config) -> Result:
        base = models.base
        tok = base.tokenizer
        cfg = base.config
        sets, too_long = fitting(lens_prompts(config, data, tok), tok,
                                 getattr(cfg, "n_positions", None)
                                 or getattr(cfg, "max_position_embeddings", None))
        n_layers = base.n_layers
        names = models.names
        rank_arr, kl_arr = lens_passes(models, sets, config.batch_size)
        data_out = {**lens_kl_keys(kl_arr, np.random.default_rng(config.seed), config.n_bootstrap),
                    **rank_keys(rank_arr)}
        arrays = {f"{m}__{s}__rank": x for m, by in rank_arr.items() for s, x in by.items()}
        arrays |= {f"{v}__{s}__lens_kl": x for v, by in kl_arr.items() for s, x in by.items()}
        return Result(self.name, {
            **data_out,
            "models": names,
            "variants": models.variants,
            "runs": models.runs,
            "n_layers": n_layers,
            "prompt_sets": list(sets),
            "n_prompts": sum(len(x) for x in sets.values()),
            "n_prompts_by_set": {s: len(x) for s, x in sets.items()},
            "n_too_long_by_set": too_long,
            "task": config.task,
            "n_bootstrap": config.n_bootstrap,
            "rank_aggregation": "median over prompts of the gold first token's rank (1 = top-1), "
                                "pooled over sets (answer_rank) and per set",
            "first_top1_definition": "per prompt the first layer where the gold token is the "
                                     "lens's top-1; median over prompts that reach it",
        }, arrays)

    def plot(self, result: Result) -> dict:
        d = result.data
        layers = np.arange(d["n_layers"])
        colors = model_colours(d["models"])
        figs = {}
        if d["variants"]:
            fig, ax = new_axes(7, 4.2)
            for v in d["variants"]:
                ci = np.array(d["lens_kl_ci95"][v], float)
                ax.plot(layers, d["lens_kl"][v], marker=".", color=colors[v], label=v)
                ax.fill_between(layers, ci[:, 0], ci[:, 1], color=colors[v], alpha=0.15, lw=0)
            ax.set_yscale("log")
            ax.set_xlabel("layer (residual stream after the block)")
            ax.set_ylabel("KL(base lens || variant lens), nats")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_title(f"Logit-lens divergence at the last prompt token, {d['n_prompts']} "
                         "prompts (mean, 95% bootstrap)", fontsize=10)
            figs["lens_kl"] = fig
        sets = d["prompt_sets"]
        fig, axes = new_axes(4.2 * len(sets) + 0.6, 4.2, ncols=len(sets), squeeze=False,
                             sharey=True)
        for ax, s in zip(axes[0], sets):
            for m in d["models"]:
                f = d["first_top1_layer_by_set"][m][s]
                share = d["top1_share_by_set"][m][s]
                note = f"top-1 from L{f:g} in {share:.0%}" if f is not None else "never top-1"
                ax.plot(layers, d["answer_rank_by_set"][m][s], marker=".", color=colors[m],
                        label=f"{m} ({note})")
            ax.set_yscale("log")
            ax.set_title(f"{s} ({d['n_prompts_by_set'][s]} prompts)", fontsize=10)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[0, 0].set_ylabel("median rank of the gold first token (1 = top)")
        fig.suptitle("Logit lens: where the answer surfaces (median over prompts)")
        figs["answer_rank"] = fig
        return figs


def first_top1(ranks: np.ndarray) -> tuple[float | None, float]:
    """(median over prompts of the first layer with rank 1, among prompts that have one; the
    share of prompts that have one) from ``ranks`` [layer, prompt]."""
    top = ranks == 1
    hit = top.any(0)
    if not hit.any():
        return None, 0.0
    first = top.argmax(0)[hit]
    return float(np.median(first)), float(hit.mean())


PLAIN = ("The logit lens across models: each layer's residual stream read through the final norm "
         "and unembedding, for base and variants on the same prompts; KL(base lens || variant "
         "lens) per layer and the gold answer's rank per layer.")


def summary(result: Result, study) -> list[str]:
    """Per variant: where the lens KL from the base peaks and its last-layer value; per model:
    the median first layer where the gold answer ranks first."""
    data = result.data
    lines = []
    for variant in data["variants"]:
        kl = floats(data["lens_kl"][variant])
        lines.append(f"{variant}: lens KL from the base peaks at layer {int(np.nanargmax(kl))} "
                     f"({fmt(np.nanmax(kl))} nats), last layer {fmt(kl[-1])} "
                     f"{interval(data['lens_kl_ci95'][variant][-1])}")
    lines.append("median first top-1 layer of the gold answer: " + ", ".join(
        f"{m} {fmt(data['first_top1_layer'][m])}" for m in data["models"])
        + f" ({data['n_prompts']} prompts)")
    return lines


PROBE = declare(LogitLens(), plain=PLAIN, summary=summary, model_names=listed_models("models"))
