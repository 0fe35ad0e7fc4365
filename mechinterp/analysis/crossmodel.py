"""Activation patching *between* two models of one architecture (e.g. base -> fine-tuned).

:func:`row_group_sweep` is the one engine: it captures the source model's activation at a site in
every layer it needs in one forward pass, then runs the target model with the source's activation
patched in at one layer (or a window of layers) per condition. Conditions are batched as row
groups (condition ``c`` occupies rows ``c*B .. (c+1)*B-1`` for ``B`` rows), so one forward pass
evaluates many layers; the caller says what is read from the patched run.
:func:`cross_model_patch_sweep` reads the log-probability of each item's answer token at its
metric position (``mlp-patching``); :func:`~mechinterp.analysis.crossmodel_sweep.cross_model_sweep`
reads multiple-choice log-likelihoods.

Denoising (base into variant) and noising (variant into base) are the same call with source and
target swapped. Built on :mod:`mechinterp.analysis.patching`; no second hook mechanism.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import UserError
from ..evals.answers import answer_token_sel, token_log_probs
from ..models.loaded import LoadedModel
from .patching import SITES, Patch, capture, patching

Condition = int | Sequence[int]


def as_layer_groups(layers_or_windows: Sequence[Condition]) -> list[tuple[int, ...]]:
    """Normalise ``[3, (4, 5, 6), ...]`` to tuples of layers."""
    out = []
    for c in layers_or_windows:
        group = (int(c),) if isinstance(c, numbers.Integral) else tuple(int(x) for x in c)
        if not group:
            raise UserError("an empty layer window was given", "give each condition >= 1 layer")
        out.append(group)
    return out


def last_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of the last real token of each row (works for left or right padding)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).long().argmax(1)


@torch.no_grad()
def row_group_sweep(source: LoadedModel, target: LoadedModel, input_ids: Int[Tensor, "row pos"],
                    attention_mask: Int[Tensor, "row pos"] | None, site: str,
                    layers_or_windows: Sequence[Condition], per_pass: int,
                    run_groups: Callable[[list[Patch], int], Tensor]) -> Tensor:
    """The cross-model patching engine: ``source``'s ``site`` patched into ``target``.

    The source's activation at every layer the conditions need is captured in one forward pass of
    ``source`` on the rows. Conditions then go ``per_pass`` at a time to ``run_groups(patches,
    n)``, which must run ``target`` on its rows repeated ``n`` times under ``patches`` (condition
    ``c`` of the pass carries the source's activation at each of its layers on rows ``c*R ..
    (c+1)*R - 1``, all positions) and return one entry per condition (dim 0); those are
    concatenated in condition order. ``run_groups`` decides the metric.
    """
    if site not in SITES:
        raise UserError(f"unknown site {site!r}", f"use one of {', '.join(SITES)}")
    if source.n_layers != target.n_layers:
        raise UserError(f"{source.name} has {source.n_layers} layers, {target.name} "
                        f"{target.n_layers}", "patch between models of one architecture")
    groups = as_layer_groups(layers_or_windows)
    needed = sorted({layer for g in groups for layer in g})
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _, acts = capture(source, input_ids.to(source.device), attention_mask.to(source.device),
                      [(site, layer) for layer in needed])
    acts = {k: v.to(target.device) for k, v in acts.items()}
    R = input_ids.shape[0]
    out = []
    for a in range(0, len(groups), per_pass):
        chunk = groups[a:a + per_pass]
        patches = []
        for c, group in enumerate(chunk):
            rows = torch.arange(c * R, (c + 1) * R, device=target.device)
            patches += [Patch(site, layer, acts[(site, layer)], rows=rows) for layer in group]
        out.append(run_groups(patches, len(chunk)))
    return torch.cat(out)


@torch.no_grad()
def cross_model_patch_sweep(
    source: LoadedModel,
    target: LoadedModel,
    input_ids: Int[Tensor, "item pos"],
    attention_mask: Int[Tensor, "item pos"] | None,
    site: str,
    layers_or_windows: Sequence[Condition],
    metric_positions: Int[Tensor, " item"],
    answer_ids: Int[Tensor, " item"],
    max_tokens: int = 8192,
) -> Float[Tensor, "condition item"]:
    """Log-prob of ``answer_ids`` in ``target`` with ``source``'s ``site`` patched in, per condition.

    ``site`` is one of ``resid_pre attn_out mlp_out resid_post``; each condition is a layer or a
    window (sequence) of layers, patched at every position. ``max_tokens`` bounds rows x positions
    per forward pass (conditions are grouped to fit). :func:`row_group_sweep` with the answer
    token's log-probability at ``metric_positions`` as the metric.
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, mask = input_ids.to(target.device), attention_mask.to(target.device)

    def run_groups(patches: list[Patch], n: int) -> Tensor:
        sel = answer_token_sel(metric_positions.repeat(n), answer_ids.repeat(n))
        with patching(target, patches):
            lp = token_log_probs(target, ids.repeat(n, 1), mask.repeat(n, 1), sel)
        return lp.view(n, B).cpu()

    return row_group_sweep(source, target, input_ids, attention_mask, site, layers_or_windows,
                           max(1, max_tokens // max(1, B * T)), run_groups)


@torch.no_grad()
def plain_logprobs(model: LoadedModel, input_ids: Tensor, attention_mask: Tensor | None,
                   metric_positions: Tensor, answer_ids: Tensor) -> Float[Tensor, " item"]:
    """The unpatched metric of ``model`` (the reference ends of a recovery scale)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    sel = answer_token_sel(metric_positions, answer_ids)
    return token_log_probs(model, input_ids, attention_mask, sel).cpu()


def normalised_recovery(patched: Tensor, m_base: Tensor, m_variant: Tensor,
                        min_gap: float) -> tuple[Tensor, Tensor]:
    """``(m_patched - m_variant) / (m_base - m_variant)`` per condition and item, and the kept items.

    The same scale in both directions: 1 = base behaviour, 0 = variant behaviour. Denoising
    (base into variant) starts at 0 and recovers towards 1; noising (variant into base) starts at
    1 and falls towards 0 when the patched activation carries the variant's behaviour. Items with
    ``|m_base - m_variant| < min_gap`` are excluded (``keep`` False, recovery NaN).
    """
    gap = m_base - m_variant
    keep = gap.abs() >= min_gap
    rec = (patched - m_variant) / torch.where(keep, gap, torch.ones_like(gap))
    return torch.where(keep, rec, torch.full_like(rec, float("nan"))), keep
