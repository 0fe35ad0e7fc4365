"""Cross-model sweeps over multiple-choice items: patch the base's activations into a variant (or
revert a variant's weights to the base's) and read the log-probability of every choice.

Items are :class:`mechinterp.evals.loglik.Request` objects scored as lm-eval does (one row per item
when every choice is a single token, else one row per choice). A sweep evaluates many conditions
(a layer, a window of layers) in one forward pass by giving each condition its own group of batch
rows (``Patch(rows=...)`` of :mod:`mechinterp.analysis.patching`). Kept behind two small functions
(:func:`cross_model_sweep`, :func:`weight_revert_sweep`) so that it can be unified with the general
cross-model patching of the causal issue.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from ..evals.loglik import Request, pad_rows, rows_for, target_logprobs
from ..models.loaded import LoadedModel
from .patching import Patch, capture, patching


@dataclass
class ChoiceBatch:
    """Padded rows of a set of items, and where each choice's tokens are scored."""

    ids: Tensor  # [rows, pos]
    mask: Tensor  # [rows, pos]
    sel: Tensor  # [targets, 3]: (row, position, token)
    owner: Tensor  # [targets, 2]: (item, choice)
    n_items: int
    n_choices: int

    @classmethod
    def build(cls, model: LoadedModel, requests: Sequence[Request],
              add_special_tokens: bool = True) -> ChoiceBatch:
        rows = rows_for(requests, model.tokenizer, add_special_tokens)
        ids, mask = pad_rows(rows, model.tokenizer.pad_token_id or 0)
        sel, owner = [], []
        for b, row in enumerate(rows):
            for j, pos, tok in row.targets:
                sel.append((b, pos, tok))
                owner.append((row.req, j))
        return cls(ids, mask, torch.tensor(sel), torch.tensor(owner), len(requests),
                   len(requests[0].continuations))

    def reduce(self, values: Float[Tensor, " targets"]) -> Float[Tensor, "items choices"]:
        """Sum token log-probs into ``[item, choice]`` log-likelihoods."""
        out = torch.zeros(self.n_items * self.n_choices, dtype=torch.float64)
        flat = self.owner[:, 0] * self.n_choices + self.owner[:, 1]
        out.index_add_(0, flat, values.double().cpu())
        return out.view(self.n_items, self.n_choices)


@torch.inference_mode()
def choice_logprobs(model: LoadedModel, batch: ChoiceBatch, patches: Sequence[Patch] = (),
                    groups: int = 1) -> Float[Tensor, "groups items choices"]:
    """Choice log-likelihoods with ``patches`` applied; the rows are repeated ``groups`` times
    (group g occupies rows ``g*R .. (g+1)*R - 1``) so that each group can carry its own patch."""
    R = batch.ids.shape[0]
    ids = einops.repeat(batch.ids, "r p -> (g r) p", g=groups)
    mask = einops.repeat(batch.mask, "r p -> (g r) p", g=groups)
    sel = torch.cat([batch.sel + torch.tensor([g * R, 0, 0]) for g in range(groups)])
    with patching(model, patches):
        vals = target_logprobs(model, ids, mask, sel)
    n = batch.sel.shape[0]
    return torch.stack([batch.reduce(vals[g * n:(g + 1) * n]) for g in range(groups)])


@torch.inference_mode()
def cross_model_sweep(base: LoadedModel, variant: LoadedModel, batch: ChoiceBatch, site: str,
                      conditions: Sequence[Sequence[int]], max_rows: int = 64,
                      ) -> Float[Tensor, "conditions items choices"]:
    """For each condition (a set of layers), the variant's choice log-likelihoods with the base's
    ``site`` activation patched in at those layers (all positions). The base's activations are
    captured once for every layer needed; conditions share forward passes as row groups."""
    layers = sorted({layer for c in conditions for layer in c})
    _, acts = capture(base, batch.ids.to(base.device), batch.mask.to(base.device),
                      [(site, layer) for layer in layers])
    R = batch.ids.shape[0]
    per_pass = max(1, max_rows // max(1, R))
    out = []
    for start in range(0, len(conditions), per_pass):
        chunk = conditions[start:start + per_pass]
        patches = [Patch(site, layer, acts[(site, layer)].to(variant.device),
                         rows=torch.arange(g * R, (g + 1) * R, device=variant.device))
                   for g, cond in enumerate(chunk) for layer in cond]
        out.append(choice_logprobs(variant, batch, patches, groups=len(chunk)))
    return torch.cat(out)


@contextmanager
def reverted(variant: LoadedModel, base: LoadedModel, layers: Sequence[int],
             matrices: Sequence[str]):
    """Temporarily copy the base's ``matrices`` of ``layers`` into the variant (weight space)."""
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                for m in matrices:
                    w = variant.weight(layer, m)
                    saved.append((w, w.detach().clone()))
                    w.copy_(base.weight(layer, m).to(w.device, w.dtype))
        yield
    finally:
        with torch.no_grad():
            for w, old in saved:
                w.copy_(old)


def mlp_matrices(model: LoadedModel) -> tuple[str, ...]:
    return tuple(m for m in model.matrices if m in ("gate", "up", "down", "in", "out"))


@torch.inference_mode()
def weight_revert_sweep(base: LoadedModel, variant: LoadedModel, batch: ChoiceBatch,
                        conditions: Sequence[Sequence[int]],
                        matrices: Sequence[str] | None = None,
                        ) -> Float[Tensor, "conditions items choices"]:
    """For each condition, the variant's choice log-likelihoods with only those layers' MLP
    weights (or ``matrices``) reverted to the base's; the variant is restored afterwards."""
    matrices = tuple(matrices or mlp_matrices(variant))
    out = []
    for cond in conditions:
        with reverted(variant, base, cond, matrices):
            out.append(choice_logprobs(variant, batch)[0])
    return torch.stack(out)
