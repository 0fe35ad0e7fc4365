"""``mlp-patching``: which layers of a fine-tuned model still compute what the base computed.

For each prompt, layer (or window of ``window`` layers around it) and site (``mlp`` = MLP output,
``attn`` = attention output, ``resid`` = residual stream after the block, all positions): run the
variant with the base's activation patched in (``denoise``: base into variant) and the base with
the variant's activation patched in (``noise``: variant into base). Metric: log-probability of the
answer token after the prompt; normalised recovery ``(m_patched - m_variant) / (m_base -
m_variant)``, on one scale for both directions (1 = base behaviour, 0 = variant behaviour).
Items with ``|m_base - m_variant| < min_gap`` (nats) are counted in ``n_tiny`` and left out of the
means. Each prompt is one item of the cross-model engine
(:func:`~mechinterp.analysis.crossmodel.condition_sweep`, via
:func:`~mechinterp.analysis.crossmodel.patch_both_ways`): every (site, layer) condition is a batch
row that starts at its first patched block.

Prompt sets: ``knowns`` (ROME facts; answer = ``attribute``) and ``mmlu`` (0-shot;
``mmlu_answer=letter``: lm-eval's letter format, answer = the gold letter; ``mmlu_answer=text``:
``Question: ...\\nAnswer:``, answer = the gold choice text). The answer token is the first token
after the prompt's tokens in ``prompt + " " + answer``
(:func:`~mechinterp.analysis.tracing.answer_token_id`; not ``" " + answer`` encoded alone, a lone
``"▁"`` for SentencePiece tokenizers). ``limit`` is the number of items over all prompt sets,
shared equally between them (a set too small for its share passes the rest on), each share a
seeded subset of its set. The MMLU prompts come from :mod:`mechinterp.evals.mmlu` (question
stripped, as lm-eval does).

Per layer the recovery pooled over prompts is a ratio of means, ``sum_i sign(g_i) (m_patched -
m_variant)_i / sum_i |g_i|`` with ``g = m_base - m_variant``: the gap-weighted mean of the per-item
recoveries, which a few items with a gap just above ``min_gap`` cannot dominate (a plain mean of
per-item ratios can), with a percentile bootstrap 95% interval over items.

Result keys: ``recovery[<variant>][<site>][<direction>]`` (list over layers, pooled over the
prompts of all sets), ``recovery_ci95`` (same nesting, [lo, hi] per layer), ``n_prompts``; also ``recovery_by_set``, ``n_tiny``, ``logprob`` (base/variant means),
arrays ``<variant>__<set>__<site>__<direction>`` ([layer, item] per-item recovery, NaN
where the gap is tiny) and
``<variant>__<set>__m_base`` / ``__m_variant`` (per-item log-probs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from mechinterp.analysis.attribution import (
    answer_logprob,
    atp_scan,
    by_site,
    pooled_recovery,
    verify_scan,
)
from mechinterp.analysis.crossmodel import (
    ItemRows,
    answer_item,
    condition_sweep,
    item_reference,
    last_positions,
    normalised_recovery,
    patch_both_ways,
    patch_condition,
)
from mechinterp.analysis.tracing import answer_token_id, windows
from mechinterp.data import load_knowns, load_mmlu
from mechinterp.data.subset import seeded_subset, split_limit
from mechinterp.errors import UserError
from mechinterp.evals.mmlu import MMLUFormat, answer_texts, build_request, question_text
from mechinterp.evals.stats import ratio_of_means
from mechinterp.store.frames import Table
from mechinterp.plotting.scan import scan_figure
from mechinterp.plotting.style import model_colours, new_axes
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import floats, fmt
from mechinterp.progress import task
from mechinterp.store.results import Result

SITE = {"mlp": "mlp_out", "attn": "attn_out", "resid": "resid_post"}
DIRECTIONS = ("denoise", "noise")
PROMPT_SETS = ("knowns", "mmlu")


@dataclass
class Config(BaseConfig):
    # knowns (ROME facts) and/or mmlu (0-shot questions)
    prompt_sets: list[str] = field(default_factory=lambda: list(PROMPT_SETS))
    # mlp, attn and/or resid outputs, patched at all positions
    sites: list[str] = field(default_factory=lambda: list(SITE))
    window: int = 1  # layers patched together around each layer
    # items whose base and variant log-probs differ by less (nats) are left out
    min_gap: float = 0.1
    n_bootstrap: int = 1000  # resamples of the items for the 95% interval of each recovery
    mmlu_answer: str = "letter"  # mmlu prompts: letter (lm-eval format) or text (the choice text)
    mmlu_subjects: list[str] | None = None  # MMLU subjects for the mmlu prompt set (default: all)
    batch_size: int = 8  # prompts per forward-backward pass of scan=atp
    max_tokens: int = 4096  # tokens per patched forward pass (conditions x the prompt's tokens)
    # exact: patch every layer (both directions); atp: attribution-patching scan of every
    # (site, layer), base into variant, then exact patching of the scan's top scan_top_k
    scan: str = "exact"
    scan_top_k: int = 5  # scan=atp: sites verified by exact patching
    scan_validate: bool = False  # scan=atp: also patch every site exactly (Spearman, speed ratio)
    # lower bounds; every other number: at least 0
    at_least = {"window": 1, "batch_size": 1, "max_tokens": 1, "n_bootstrap": 1,
                "scan_top_k": 1}


def mmlu_prompt(item, fmt: str) -> tuple[str, str]:
    """(prompt, answer text whose first token is scored) for an MMLU item, built by
    :mod:`mechinterp.evals.mmlu`: ``letter`` its 0-shot lm-eval context, ``text`` the cloze
    question alone (``Question: ...\\nAnswer:``, no description)."""
    f = MMLUFormat("letter" if fmt == "letter" else "cloze")
    prompt = build_request(f, item, ()).context if fmt == "letter" else question_text(f, item)
    return prompt, answer_texts(f, item)[item.answer]


def prompts_for(data, config: Config, tokenizer) -> dict[str, list[tuple[str, int]]]:
    """Per prompt set, ``(prompt, answer token id)``: ``config.limit`` items in all, shared
    between the sets (:func:`~mechinterp.data.subset.split_limit`), each share seeded."""
    loaders = {"knowns": lambda: [(f.prompt, f.attribute) for f in load_knowns(data)],
               "mmlu": lambda: load_mmlu(data, "test", config.mmlu_subjects)}
    bad = [n for n in config.prompt_sets if n not in loaders]
    if bad:
        raise UserError(f"unknown prompt set {bad[0]!r}", f"use {', '.join(PROMPT_SETS)}")
    every = {name: loaders[name]() for name in config.prompt_sets}
    quota = split_limit(config.limit, [len(v) for v in every.values()])
    out = {}
    for (name, items), n in zip(every.items(), quota):
        pairs = seeded_subset(items, n, config.seed)
        if name == "mmlu":
            pairs = [mmlu_prompt(it, config.mmlu_answer) for it in pairs]
        out[name] = [(p, answer_token_id(tokenizer, p, a, f"{name} prompt {i}"))
                     for i, (p, a) in enumerate(pairs)]
    return out


def check_config(models, config: Config) -> None:
    if not models.variants:
        raise UserError("mlp-patching compares models", "add --variant NAME=SPEC")
    bad = [s for s in config.sites if s not in SITE]
    if bad:
        raise UserError(f"unknown site {bad[0]!r}", f"use some of {', '.join(SITE)}")
    if config.mmlu_answer not in ("letter", "text"):
        raise UserError(f"mmlu_answer={config.mmlu_answer!r}", "use letter or text")
    if config.scan not in ("exact", "atp"):
        raise UserError(f"scan={config.scan!r}", "use scan=exact or scan=atp")
    if config.scan == "atp" and config.window != 1:
        raise UserError("scan=atp estimates single layers", "use window=1 with scan=atp")


def prompt_items(tokenizer, prompts: list[tuple[str, int]]) -> list[ItemRows]:
    """Each (prompt, answer token id) as the one-choice item of the patching engine."""
    pad = tokenizer.pad_token_id or 0
    return [answer_item(tokenizer(p)["input_ids"], a, pad) for p, a in prompts]


@dataclass
class SetSweep:
    """One prompt set patched with one variant: log p(answer) unpatched and patched."""

    m_base: np.ndarray  # [item]
    m_variant: np.ndarray  # [item]
    effect: dict[tuple[str, str], np.ndarray]  # (site, direction) -> [layer, item] m_patched - m_variant

    @property
    def gap(self) -> np.ndarray:
        return self.m_base - self.m_variant


def sweep_set(base, variant, items: list[ItemRows], sites: list[str],
              layer_groups: list[list[int]], token_budget: int, advance) -> SetSweep:
    """Every site and layer (group) patched both ways on every item of one set."""
    conditions = [patch_condition(SITE[s], g) for s in sites for g in layer_groups]
    m_base, m_variant, denoise, noise = [], [], [], []
    for item in items:
        sweep = patch_both_ways(base, variant, item, conditions, token_budget)
        m_base.append(sweep.base[0].item())
        m_variant.append(sweep.variant[0].item())
        denoise.append(sweep.denoise[:, 0].numpy())
        noise.append(sweep.noise[:, 0].numpy())
        advance()
    m_base, m_variant = np.array(m_base), np.array(m_variant)
    by_direction = {"denoise": np.stack(denoise, 1), "noise": np.stack(noise, 1)}
    n = len(layer_groups)
    effect = {(s, d): by_direction[d][i * n:(i + 1) * n] - m_variant
              for i, s in enumerate(sites) for d in DIRECTIONS}
    return SetSweep(m_base, m_variant, effect)


def pooled_recovery_ci(sweeps: list[SetSweep], site: str, direction: str, min_gap: float,
                       rng: np.random.Generator, n_boot: int) -> tuple[list, list]:
    """|gap|-weighted recovery over the kept items of ``sweeps``: a ratio of means,
    sum(sign(gap) (m_patched - m_variant)) / sum(|gap|), with a bootstrap interval."""
    effect = np.concatenate([sw.effect[(site, direction)] for sw in sweeps], 1)
    gap = np.concatenate([sw.gap for sw in sweeps])
    keep = np.abs(gap) >= min_gap
    est, ci = ratio_of_means(effect[:, keep] * np.sign(gap[keep]), np.abs(gap[keep]), rng, n_boot)
    return est.tolist(), ci.tolist()


def recovery_keys(sweeps: dict[str, dict[str, SetSweep]], sites: list[str],
                  config: Config) -> dict:
    """``recovery``, ``recovery_ci95`` (all sets pooled) and ``recovery_by_set`` per variant."""
    rng = np.random.default_rng(config.seed)
    recovery, recovery_ci, by_set = {}, {}, {}
    for v, per_set in sweeps.items():
        recovery[v], recovery_ci[v] = {}, {}
        for s in sites:
            recovery[v][s], recovery_ci[v][s] = {}, {}
            for d in DIRECTIONS:
                recovery[v][s][d], recovery_ci[v][s][d] = pooled_recovery_ci(
                    list(per_set.values()), s, d, config.min_gap, rng, config.n_bootstrap)
                for k, sw in per_set.items():
                    by_set.setdefault(k, {}).setdefault(v, {}).setdefault(s, {})[d] = \
                        pooled_recovery_ci([sw], s, d, config.min_gap, rng, config.n_bootstrap)[0]
    return {"recovery": recovery, "recovery_ci95": recovery_ci, "recovery_by_set": by_set}


def item_arrays(sweeps: dict[str, dict[str, SetSweep]], min_gap: float) -> dict[str, np.ndarray]:
    """Per item and layer the recovery of that item alone (NaN where the gap is tiny), and the
    unpatched log-probs, named ``<variant>__<set>__<site>__<direction>`` / ``__m_base``."""
    arrays = {}
    for v, per_set in sweeps.items():
        for k, sw in per_set.items():
            mb, mv = torch.from_numpy(sw.m_base), torch.from_numpy(sw.m_variant)
            for (s, d), effect in sw.effect.items():
                rec, _ = normalised_recovery(torch.from_numpy(effect) + mv, mb, mv, min_gap)
                arrays[f"{v}__{k}__{s}__{d}"] = rec.numpy()
        for k, sw in per_set.items():
            arrays[f"{v}__{k}__m_base"], arrays[f"{v}__{k}__m_variant"] = sw.m_base, sw.m_variant
    return arrays


def prompt_batches(tokenizer, sets: dict[str, list[tuple[str, int]]], batch_size: int) -> list:
    """(ids, mask, last positions, answer ids) per batch of ``batch_size`` prompts, padded right."""
    batches = []
    for items in sets.values():
        for a in range(0, len(items), batch_size):
            batch = items[a:a + batch_size]
            enc = tokenizer([p for p, _ in batch], return_tensors="pt", padding=True,
                            padding_side="right")
            batches.append((enc["input_ids"], enc["attention_mask"],
                            last_positions(enc["attention_mask"]),
                            torch.tensor([x for _, x in batch])))
    return batches


def exact_denoise(base, variant, items: list[ItemRows], chosen: list[tuple[str, int]],
                  gap: torch.Tensor, keep: torch.Tensor) -> dict:
    """Exact denoising recovery of ``chosen`` (site, layer) pairs, pooled over ``items``. One
    condition per pass, so a site's value does not depend on which other sites are verified with
    it (float32 rounding varies with the batch's size)."""
    conditions = [patch_condition(SITE[s], [layer]) for s, layer in chosen]
    effect = torch.zeros(len(chosen), len(items), dtype=torch.float64)
    for j, item in enumerate(items):
        ref_b = item_reference(base, item, capture_sites=sorted({c.patch[0][0] for c in conditions}))
        ref_v = item_reference(variant, item, record_resid=True)
        got = condition_sweep(base, variant, item, conditions, ref_b, ref_v, item.n_tokens)
        effect[:, j] = got[:, 0] - ref_v.scores[0]
    return dict(zip(chosen, pooled_recovery(effect, gap, keep).tolist()))


SCAN_KEYS = ("scan_estimate", "scan_exact", "scan_head_estimate", "scan_ranking", "scan_verified",
             "scan_agreement", "scan_seconds", "n_kept", "logprob")
SCAN_DEFINITION = ("denoising (base into variant) recovery per (site, layer), sum_i sign(g_i) "
                   "effect_i / sum_i |g_i| over items with |g| >= min_gap; scan_estimate: effect_i "
                   "= (a_base - a_variant) . d m / d a on the variant (AtP), scan_exact: effect_i "
                   "= m_patched - m_variant where patched exactly (NaN elsewhere); "
                   "scan_head_estimate: [layer][head], patches of one head's z through the "
                   "variant's o_proj")


class MLPPatching:
    name = "mlp-patching"
    version = "4"
    description = "cross-model activation patching (base <-> variant) per layer and site"
    Config = Config
    frames = (Table("recovery", ("model", "site", "direction", "layer"), ci="recovery_ci95"),
              Table("scan_estimate", ("model", "site", "layer")),
              Table("scan_exact", ("model", "site", "layer")))

    def run(self, models, data, config: Config) -> Result:
        check_config(models, config)
        if config.scan == "atp":
            return self._scan(models, data, config)
        base = models.base
        n = base.n_layers
        groups = [windows(layer, n, config.window) if config.window > 1 else [layer]
                  for layer in range(n)]
        sets = prompts_for(data, config, base.tokenizer)
        items = {k: prompt_items(base.tokenizer, v) for k, v in sets.items()}
        sweeps: dict[str, dict[str, SetSweep]] = {}
        total = len(models.variants) * sum(len(v) for v in sets.values())
        with task("cross-model patching", total) as advance:
            for v in models.variants:
                sweeps[v] = {k: sweep_set(base, models[v], x, config.sites, groups,
                                          config.max_tokens, advance) for k, x in items.items()}
                models.release(v)
        n_tiny = {v: {k: int((np.abs(sw.gap) < config.min_gap).sum()) for k, sw in per.items()}
                  for v, per in sweeps.items()}
        return Result(self.name, {
            **recovery_keys(sweeps, config.sites, config),
            "n_bootstrap": config.n_bootstrap,
            "n_prompts": sum(len(x) for x in sets.values()),
            "n_prompts_by_set": {k: len(x) for k, x in sets.items()},
            "n_tiny": {v: sum(n_tiny[v].values()) for v in n_tiny},
            "n_tiny_by_set": n_tiny,
            "logprob": {v: {k: {"base": float(sw.m_base.mean()),
                                "variant": float(sw.m_variant.mean())} for k, sw in per.items()}
                        for v, per in sweeps.items()},
            "variants": models.variants,
            "sites": config.sites,
            "n_layers": n,
            "window": config.window,
            "min_gap": config.min_gap,
            "metric": "log p(answer token) at the last prompt position",
            "recovery_definition": "sum_i sign(g_i) (m_patched - m_variant)_i / sum_i |g_i|, "
                                   "g = m_base - m_variant over items with |g| >= min_gap (a "
                                   "ratio of means: the |g|-weighted mean of per-item "
                                   "recoveries); 1 = base, 0 = variant, in both directions",
        }, item_arrays(sweeps, config.min_gap))

    def _scan(self, models, data, config: Config) -> Result:
        """``scan=atp``: the attribution-patching estimate of the denoising recovery of every
        (site, layer) (:func:`~mechinterp.analysis.attribution.atp_scan`, one forward-backward
        pass per batch), the top ``scan_top_k`` patched exactly (the engine of ``scan=exact``),
        and with ``scan_validate`` every site patched exactly: Spearman and top-k overlap."""
        base = models.base
        n = base.n_layers
        sets = prompts_for(data, config, base.tokenizer)
        batches = prompt_batches(base.tokenizer, sets, config.batch_size)
        items = [it for x in sets.values() for it in prompt_items(base.tokenizer, x)]
        data_out: dict = {k: {} for k in SCAN_KEYS}
        with task("attribution-patching scan", len(models.variants) * len(batches)) as advance:
            for v in models.variants:
                for key, value in self._scan_variant(base, models[v], batches, items, config,
                                                     advance).items():
                    data_out[key][v] = value
                models.release(v)
        return Result(self.name, {
            "scan": "atp", "scan_top_k": config.scan_top_k, "scan_validate": config.scan_validate,
            **data_out,
            "variants": models.variants, "sites": config.sites, "n_layers": n,
            "n_prompts": sum(len(x) for x in sets.values()),
            "n_prompts_by_set": {k: len(x) for k, x in sets.items()},
            "min_gap": config.min_gap,
            "metric": "log p(answer token) at the last prompt position",
            "scan_definition": SCAN_DEFINITION,
        })

    @staticmethod
    def _scan_variant(base, variant, batches, items, config: Config, advance) -> dict:
        """The scan keys of one variant: AtP over ``batches``, exact over ``items``."""
        n = base.n_layers
        keys = [(s, layer) for s in config.sites for layer in range(n)]
        heads = range(n) if "attn" in config.sites else ()
        t0 = time.perf_counter()
        est, head_est, m_base, m_variant = [], [], [], []
        for ids, mask, pos, ans in batches:
            sc = atp_scan(base, variant, ids, mask, answer_logprob(pos, ans),
                          [(SITE[s], layer) for s, layer in keys], heads)
            est.append(torch.stack([sc.estimate[(SITE[s], la)] for s, la in keys]))
            if heads:
                head_est.append(torch.stack([sc.heads[la] for la in heads]))
            m_base.append(sc.source_metric), m_variant.append(sc.target_metric)
            advance()
        seconds = time.perf_counter() - t0
        m_base, m_variant = torch.cat(m_base), torch.cat(m_variant)
        gap = m_base - m_variant
        keep = gap.abs() >= config.min_gap
        estimate = dict(zip(keys, pooled_recovery(torch.cat(est, 1), gap, keep).tolist()))
        res = verify_scan(estimate, lambda chosen: exact_denoise(
            base, variant, items, chosen, gap, keep),
            config.scan_top_k, config.scan_validate, seconds)
        out = {"scan_estimate": by_site(estimate, config.sites, n),
               "scan_exact": by_site(res["exact"], config.sites, n),
               "scan_ranking": [list(k) for k in res["ranking"]],
               "scan_verified": [list(k) for k in res["verified"]],
               "scan_agreement": res["agreement"], "scan_seconds": res["seconds"],
               "n_kept": int(keep.sum()),
               "logprob": {"base": m_base.mean().item(), "variant": m_variant.mean().item()}}
        if heads:  # [layer, item, head] -> [layer][head]
            out["scan_head_estimate"] = pooled_recovery(torch.cat(head_est, 1).movedim(1, -1),
                                                        gap, keep).tolist()
        return out

    def _plot_scan(self, d: dict) -> dict:
        names = {"mlp": "MLP output", "attn": "attention output", "resid": "residual stream"}
        return {f"scan_{v}": scan_figure(d["scan_estimate"][v], d["scan_exact"][v],
                                         d["scan_agreement"][v], names,
                                         "denoising recovery (base into variant)",
                                         f"{v}: attribution-patching scan vs exact")
                for v in d["variants"]}

    def plot(self, result: Result) -> dict:
        d = result.data
        if d.get("scan") == "atp":
            return self._plot_scan(d)
        sites = d["sites"]
        fig, axes = new_axes(width=4.2 * len(sites) + 1, height=7, nrows=2, ncols=len(sites),
                             squeeze=False, sharex=True)
        layers = np.arange(d["n_layers"])
        what = {"denoise": "base -> variant (denoise)", "noise": "variant -> base (noise)"}
        names = {"mlp": "MLP output", "attn": "attention output", "resid": "residual stream"}
        for r, direction in enumerate(DIRECTIONS):
            for c, s in enumerate(sites):
                ax = axes[r, c]
                for v in d["variants"]:
                    color = model_colours(d["variants"])[v]
                    ax.plot(layers, np.array(d["recovery"][v][s][direction], float), marker=".",
                            color=color, label=f"{v} ({d['n_prompts'] - d['n_tiny'][v]} prompts)")
                    ci = d.get("recovery_ci95", {}).get(v, {}).get(s, {}).get(direction)
                    if ci:
                        band = np.array(ci, float).reshape(-1, 2)
                        ax.fill_between(layers, band[:, 0], band[:, 1], color=color, alpha=0.15,
                                        lw=0)
                ax.axhline(0, color="grey", lw=0.6)
                ax.axhline(1, color="grey", lw=0.6, ls="--")
                ax.set_title(f"{names[s]}: {what[direction]}")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_xlabel("patched layer" + (f" (window {d['window']})"
                                                 if d["window"] > 1 else ""))
            axes[r, 0].set_ylabel("recovery (1 = base, 0 = variant)")
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(f"Cross-model activation patching: log p(answer), {d['n_prompts']} prompts "
                     f"(|m_base - m_variant| < {d['min_gap']:g} nats excluded)")
        return {"recovery_per_layer": fig}


PLAIN = ("Cross-model activation patching: the base's activation at one layer is patched into the "
         "variant; recovery 1 means the variant then answers as the base does.")


def summary(result: Result, study) -> list[str]:
    """Per variant and site: the layer where denoising recovers most, with its interval."""
    data = result.data
    lines = []
    for name, sites in data["recovery"].items():
        parts = []
        for site, directions in sites.items():
            recovery = floats(directions.get("denoise", []))
            if recovery.size and np.isfinite(recovery).any():
                best = int(np.nanargmax(recovery))
                ci = data.get("recovery_ci95", {}).get(name, {}).get(site, {}).get("denoise")
                band = (f" [{fmt(ci[best][0])}, {fmt(ci[best][1])}]"
                        if ci and ci[best] and None not in ci[best] else "")
                parts.append(f"{site} best at layer {best} ({fmt(float(recovery[best]))}{band})")
        lines.append(f"{name}: denoising recovery " + "; ".join(parts)
                     + f" ({data.get('n_prompts')} prompts)")
    return lines


PROBE = declare(MLPPatching(), plain=PLAIN, summary=summary,
                model_names=listed_models("variants", "recovery"))
