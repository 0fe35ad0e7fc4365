"""How a variant's attention patterns differ from the base's, per layer and query head.

Patterns come from the Hugging Face view with ``output_attentions=True`` (models load with eager
attention, which returns the post-softmax pattern per *query* head, key/value heads already
repeated for grouped-query attention; a test checks them against TransformerLens'
``blocks.L.attn.hook_pattern``). For each prompt, layer and head we average over query positions
1..n-1 (row 0 attends only to itself and is always ``[1]``):

* the Jensen-Shannon divergence (nats, in [0, ln 2]) between base and variant rows;
* the change in row entropy, ``H(variant) - H(base)`` (nats);
* the change in attention mass on the first token, ``A_variant[:, 0] - A_base[:, 0]``;

then average over prompts (each prompt weighs the same). Prompts are right-padded: a real query
row only reaches keys at or before it, so padding never enters a row (test: batched = one by one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from ..errors import UserError
from ..evals.answers import as_hf
from ..models.device import input_device
from .divergence import eval_mode

METRICS = ("js", "entropy_change", "first_token_mass_change")


def entropy(p: Float[torch.Tensor, "*batch k"]) -> Float[torch.Tensor, "*batch"]:
    """Shannon entropy (nats) of distributions along the last dim; 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(-1)


def js_divergence(p: Float[torch.Tensor, "*batch k"],
                  q: Float[torch.Tensor, "*batch k"]) -> Float[torch.Tensor, "*batch"]:
    """Jensen-Shannon divergence (nats) between distributions along the last dim."""
    m = 0.5 * (p + q)
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1)
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


@dataclass
class AttentionShift:
    """Per (layer, head) means over prompts; arrays of shape (n_layers, n_heads), float64."""

    js: np.ndarray
    entropy_change: np.ndarray
    first_token_mass_change: np.ndarray
    n_prompts: int
    #: per metric, (prompt, layer): each prompt's value averaged over heads (for intervals)
    per_prompt_layer: dict[str, np.ndarray] | None = None


def attention_patterns(model, ids: torch.Tensor, attn: torch.Tensor) -> list[torch.Tensor]:
    """Post-softmax patterns per layer, each (batch, query head, query, key), on the CPU."""
    hf = as_hf(model)
    dev = input_device(hf)
    out = hf(input_ids=ids.to(dev), attention_mask=attn.to(dev), output_attentions=True,
             use_cache=False)
    if not out.attentions or out.attentions[0] is None:
        raise UserError("the model returned no attention patterns",
                        "load it with attn_implementation='eager' (mechinterp.models.load does)")
    return [a.detach().cpu() for a in out.attentions]


def _pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(list(p))
        attn[i, :len(p)] = 1
    return ids, attn


@torch.no_grad()
def attention_shift(base, variant, prompts: Sequence[Sequence[int]], batch_size: int = 4,
                    pad_id: int = 0,
                    progress: Callable[[int], None] | None = None) -> AttentionShift:
    """Compare attention rows of ``base`` and ``variant`` on tokenised ``prompts``."""
    if not prompts:
        raise UserError("no prompts to compare attention on", "give at least one prompt")
    short = [i for i, p in enumerate(prompts) if len(p) < 2]
    if short:
        raise UserError(f"prompt #{short[0]} has fewer than 2 tokens",
                        "attention rows after the first token need at least 2 tokens")
    hb, hv = as_hf(base), as_hf(variant)
    sums: dict[str, torch.Tensor] | None = None
    prompt_rows: dict[str, list[torch.Tensor]] = {m: [] for m in METRICS}
    with eval_mode(hb, hv):
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo:lo + batch_size]
            ids, attn = _pad(chunk, pad_id)
            # query rows 1..n-1 of each prompt
            qmask = attn.clone().double()
            qmask[:, 0] = 0.0
            nq = qmask.sum(-1)  # (batch,)
            pats_b = attention_patterns(hb, ids, attn)
            pats_v = attention_patterns(hv, ids, attn)
            per_layer = {m: [] for m in METRICS}
            for pb, pv in zip(pats_b, pats_v):
                pb, pv = pb.double(), pv.double()  # (batch, head, query, key)
                vals = {"js": js_divergence(pb, pv),
                        "entropy_change": entropy(pv) - entropy(pb),
                        "first_token_mass_change": pv[..., 0] - pb[..., 0]}
                for m, x in vals.items():  # x: (batch, head, query) -> per prompt (batch, head)
                    per_layer[m].append((x * qmask[:, None, :]).sum(-1) / nq[:, None])
            for m, v in per_layer.items():  # (L, batch, H) -> (batch, L) head means
                prompt_rows[m].append(torch.stack(v, 0).mean(-1).T)
            batch_sums = {m: torch.stack(v, 0).sum(1) for m, v in per_layer.items()}  # (L, H)
            sums = batch_sums if sums is None else {m: sums[m] + batch_sums[m] for m in METRICS}
            if progress is not None:
                progress(len(chunk))
    n = len(prompts)
    return AttentionShift(*(sums[m].numpy() / n for m in METRICS), n_prompts=n,
                          per_prompt_layer={m: torch.cat(prompt_rows[m]).numpy()
                                            for m in METRICS})
