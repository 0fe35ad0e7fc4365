"""Attribution patching (AtP): a first-order estimate of every cross-model patch at once.

Patching site ``s`` of the source model (the base) into the target model (a variant) changes a
metric ``m`` of the target by ``m(a_tgt + (a_src - a_tgt)) - m(a_tgt)``. AtP (Nanda 2023;
Kramár et al. 2024, arXiv 2403.00745) replaces it by its first-order term

    effect_hat(s) = sum over positions and features of (a_src(s) - a_tgt(s)) * dm / da(s),

the gradient taken on the unpatched target run. One forward pass of the source (its activations)
and one forward-backward pass of the target give the estimate for every site of every layer (and
every attention head: per-head slices of ``attn_z``, the input of the attention output projection)
of a batch, where exact patching needs one forward pass per site.

:func:`atp_scan` is the estimate, on the hooks of :mod:`mechinterp.analysis.patching` (``capture_grads``);
the metric is any function of a forward pass returning one value per item (:func:`answer_logprob`:
log p(answer) after a prompt, the metric of ``mlp-patching``; :func:`choice_margin`: the gold
answer's margin over the other choices, the metric of ``damage-attribution``). :func:`agreement`
compares a scan with exact patching (Spearman over sites, top-k overlap).

AtP* corrections (Kramár et al.). The *QK fix* recomputes the attention softmax exactly when the
node patched is a head's queries or keys, where a gradient through a saturated softmax is near
zero; here every node is an *output* (MLP output, attention output, a head's ``z``), patched whole,
so no softmax lies between a node and the point where it is linearised, and the fix has nothing
to correct (the softmaxes of later heads, which it does not address either, remain a source of
error). *GradDrop* (one extra backward pass per layer, with the gradient through that layer's
residual contribution zeroed, combined as a mean of absolute estimates) is not implemented: it
costs ``n_layers`` backward passes per batch and yields unsigned scores, while the probes rank
signed recoveries. Both are measured against exact patching instead (``agreement``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import einops
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..evals.answers import answer_token_sel, token_log_probs
from ..evals.stats import spearman
from ..models.loaded import LoadedModel
from .patching import SiteKey, capture_grads, hooked

#: ``metric(model, input_ids, attention_mask) -> [items]``: differentiable, hooks apply.
Metric = Callable[[LoadedModel, Tensor, Tensor], Tensor]


def n_heads(model: LoadedModel) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)


def answer_logprob(positions: Int[Tensor, " item"], answer_ids: Int[Tensor, " item"]) -> Metric:
    """log p(answer) at each item's position (:func:`~mechinterp.evals.answers.token_log_probs`):
    the metric of ``mlp-patching``, whose exact patching reads it for a one-choice item
    (:func:`~mechinterp.analysis.crossmodel.answer_item`)."""
    sel = answer_token_sel(positions, answer_ids)

    def metric(model: LoadedModel, ids: Tensor, mask: Tensor) -> Tensor:
        return token_log_probs(model, ids, mask, sel)
    return metric


def choice_margin(sel: Int[Tensor, "targets 3"], owner: Int[Tensor, "targets 2"],
                  n_items: int, n_choices: int, gold: Int[Tensor, " item"],
                  lengths: Tensor | None = None) -> Metric:
    """The gold choice's score minus the best other choice's, per item: the margin of
    ``damage-attribution``. ``sel`` = (row, position, token) of each scored token, ``owner`` =
    (item, choice) it belongs to; scores are summed token log-probs (divided by ``lengths``
    [item, choice] for the length-normalised cloze score)."""
    def metric(model: LoadedModel, ids: Tensor, mask: Tensor) -> Tensor:
        lp = token_log_probs(model, ids, mask, sel)
        flat = (owner[:, 0] * n_choices + owner[:, 1]).to(lp.device)
        scores = torch.zeros(n_items * n_choices, dtype=lp.dtype, device=lp.device)
        scores = scores.index_add(0, flat, lp).view(n_items, n_choices)
        if lengths is not None:
            scores = scores / lengths.to(scores)
        g = gold.to(scores.device)
        is_gold = torch.arange(n_choices, device=scores.device)[None] == g[:, None]
        other = scores.masked_fill(is_gold, float("-inf")).amax(-1)
        return scores.gather(1, g[:, None])[:, 0] - other
    return metric


@dataclass
class Scan:
    """AtP estimates of patching each site from the source into the target, per item."""

    estimate: dict[SiteKey, Tensor]  # (site, layer) -> [item]
    heads: dict[int, Tensor]  # layer -> [item, head] (per-head slices of attn_z)
    target_metric: Tensor  # [item] the unpatched target's metric
    source_metric: Tensor  # [item] the unpatched source's metric (same metric, same inputs)


def atp_scan(source: LoadedModel, target: LoadedModel, input_ids: Int[Tensor, "row pos"],
             attention_mask: Int[Tensor, "row pos"], metric: Metric,
             sites: Sequence[SiteKey], head_layers: Sequence[int] = (),
             row_item: Int[Tensor, " row"] | None = None, n_items: int | None = None) -> Scan:
    """Attribution patching of every ``sites`` entry (and every head of ``head_layers``): one
    forward pass of ``source``, one forward-backward pass of ``target``. Patches cover all
    positions. ``row_item`` maps batch rows to items when an item has several rows (cloze
    scoring); the metric returns one value per item."""
    keys = list(dict.fromkeys(list(sites) + [("attn_z", layer) for layer in head_layers]))
    ids_s, mask_s = input_ids.to(source.device), attention_mask.to(source.device)
    src: dict[SiteKey, Tensor] = {}

    def saver(key):
        def fn(act):
            src[key] = act.detach().clone()
        return fn

    with torch.no_grad(), hooked(source, {k: saver(k) for k in keys}):
        m_src = metric(source, ids_s, mask_s)
    ids_t, mask_t = input_ids.to(target.device), attention_mask.to(target.device)
    m_tgt, acts, grads = capture_grads(target, lambda: metric(target, ids_t, mask_t), keys)

    rows = input_ids.shape[0]
    item = (torch.arange(rows) if row_item is None else row_item.cpu())
    n = rows if n_items is None else n_items

    def per_item(x: Float[Tensor, " row ..."]) -> Tensor:
        x = x.double().cpu()
        return torch.zeros((n, *x.shape[1:]), dtype=torch.float64).index_add_(0, item, x)

    estimate, heads = {}, {}
    for key in keys:
        delta = src[key].to(acts[key]) - acts[key]
        if key in sites:
            estimate[key] = per_item(torch.einsum("rpd,rpd->r", delta, grads[key]))
        if key[0] == "attn_z" and key[1] in head_layers:
            prod = einops.rearrange(delta * grads[key], "r p (h e) -> r p h e",
                                    h=n_heads(target))
            heads[key[1]] = per_item(einops.reduce(prod, "r p h e -> r h", "sum"))
    return Scan(estimate, heads, m_tgt.double().cpu(), m_src.double().cpu())


def pooled_recovery(effect: Float[Tensor, "... item"], gap: Float[Tensor, " item"],
                    keep: Tensor) -> Tensor:
    """``sum_i sign(g_i) effect_i / sum_i |g_i|`` over the kept items: the share of the gap
    ``g = m_source - m_target`` a patch closes (the probes' ratio of means)."""
    g = gap[keep]
    if not len(g):
        return torch.full(effect.shape[:-1], float("nan"), dtype=torch.float64)
    return (effect[..., keep] * g.sign()).sum(-1) / g.abs().sum()


def rank_sites(values: dict, order: Sequence) -> list:
    """Keys of ``values`` by value, largest first (NaN last, ties in ``order``)."""
    idx = {k: i for i, k in enumerate(order)}
    return sorted(order, key=lambda k: (-values[k] if np.isfinite(values[k]) else np.inf, idx[k]))


def agreement(estimate: dict, exact: dict, k: int) -> dict:
    """How well a scan ranks sites as exact patching does: Spearman's rho over the sites with an
    exact value (``n_sites``), and - when every site has one - how many of the scan's top ``k``
    are in the exact top ``k`` (``top_k_overlap``, out of ``k``)."""
    order = list(estimate)
    have = [s for s in order if s in exact and np.isfinite(exact[s])]
    rho = spearman([estimate[s] for s in have], [exact[s] for s in have])
    complete = len(have) == len(order)
    k = min(k, len(order))
    overlap = (len(set(rank_sites(estimate, order)[:k]) & set(rank_sites(exact, order)[:k]))
               if complete else None)
    return {"spearman": rho, "n_sites": len(have), "top_k": k, "top_k_overlap": overlap}


def verify_scan(estimate: dict, exact: Callable[[list], dict], k: int, validate: bool,
                scan_seconds: float) -> dict:
    """Rank the sites of ``estimate`` ({site key: scan value}), patch the top ``k`` exactly
    (``exact(keys) -> {key: value}``, the probe's exact engine) and, with ``validate``, every site
    (timed separately, for the speed ratio). Returns the ranking, the verified sites, the exact
    values, :func:`agreement` and wall times in seconds (``speedup`` = exact every site / (scan +
    verify top k), only with ``validate``)."""
    order = list(estimate)
    ranking = rank_sites(estimate, order)
    top = ranking[:min(k, len(order))]
    t0 = time.perf_counter()
    exact_top = exact(top)
    verify = time.perf_counter() - t0
    exact_all, every = None, None
    if validate:
        t0 = time.perf_counter()
        exact_all = exact(order)
        every = time.perf_counter() - t0
    values = exact_all if validate else exact_top
    agree = agreement(estimate, values, k)
    if validate:  # the top k verified alone must equal the same sites in the full exact run
        agree["verify_max_abs_diff"] = max(abs(exact_top[s] - exact_all[s]) for s in top)
    return {"ranking": ranking, "verified": top, "exact": values, "agreement": agree,
            "seconds": {"scan": scan_seconds, "verify_top_k": verify, "exact_all_sites": every,
                        "speedup": (every / (scan_seconds + verify)) if validate else None}}


def by_site(values: dict, sites: Sequence[str], n_layers: int) -> dict[str, list[float]]:
    """``{(site, layer): value}`` as ``{site: [value per layer]}`` (NaN where absent)."""
    return {s: [float(values.get((s, layer), np.nan)) for layer in range(n_layers)]
            for s in sites}
