"""Activation patching *between* two models of one architecture (e.g. base -> fine-tuned), and
reverting a fine-tuned model's weights to the base's: one engine, :func:`condition_sweep`.

The measurement: run the variant on an item with the base's activation at a site (``mlp_out``,
``attn_out``, ``resid_post``, ...) patched in at one layer or a window of layers, at every position,
and read the item's choice log-likelihoods; or run it with some layers' MLP weights copied back from
the base (a weight revert, which locates where a change *originates* where an activation patch
measures what *mediates* it). Swapping the two models' roles gives noising (the variant's
activation patched into the base) from the same call.

The engine works one item at a time. An item (:class:`ItemRows`) is the scoring rows of lm-eval
(:func:`~mechinterp.evals.loglik.rows_for`: one row per choice, or one row when every choice is a
single token) packed into ONE sequence: the context once, then each row's tail, with an attention
mask that lets a tail see the context and itself only, at its true positions, so every scored token
is predicted from exactly the tokens of its own row. Each condition (:class:`Condition`) is a batch
row of the item; a condition that first differs from the unpatched variant at block ``f`` joins
the batch there with the variant's recorded input of block ``f``, instead of re-running blocks
``0 .. f-1`` (:class:`~mechinterp.analysis.blocks.BlockStack`). The unpatched references
(:func:`item_reference`) run through the same code, so a patched score and its reference differ by
the patch only.

Specialisations are thin: :func:`answer_item` makes the one-choice item "the answer token after a
prompt" (``mlp-patching``'s metric, log p(answer)), :func:`patch_condition` and
:func:`revert_condition` the conditions, :func:`patch_both_ways` the denoising and noising sweeps
of one item. Patches are :mod:`mechinterp.analysis.patching`'s hooks; no second hook mechanism.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..evals.loglik import Request, pad_rows, rows_for
from ..evals.rows import Row
from ..models.loaded import LoadedModel
from .blocks import BlockStack, PrefixKV
from .patching import Patch, hooked, patch_fns


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


@dataclass
class ItemRows:
    """One item's scoring rows (lm-eval's, :func:`~mechinterp.evals.loglik.rows_for`) packed into
    one sequence: the ``P`` leading tokens every row shares (never scored), then each row's tail.
    Tail tokens attend to the shared part and to their own tail (causally), at their true
    positions, so every scored token is predicted from exactly the tokens of its own row."""

    rows: Tensor  # [rows, P + T] the rows, right-padded (embedded, then gathered into the pack)
    gather: Tensor  # [N, 2]: (row, position) of each packed token
    positions: Tensor  # [N] position ids
    segment: Tensor  # [N]: -1 for the shared part, else the row of the tail
    target: Tensor  # [targets, 2]: (packed index, token)
    choice: Tensor  # [targets]: the choice each target belongs to
    n_choices: int

    @property
    def n_tokens(self) -> int:
        """Tokens one condition runs."""
        return self.gather.shape[0]

    @classmethod
    def from_rows(cls, rows: Sequence[Row], n_choices: int, pad_id: int) -> ItemRows:
        P = min(pos for r in rows for _, pos, _ in r.targets)
        head = rows[0].ids[:P]
        if any(r.ids[:P] != head for r in rows):
            raise ValueError("an item's rows do not share their leading tokens")
        padded, _ = pad_rows(rows, pad_id)
        gather = [(0, t) for t in range(P)]
        segment = [-1] * P
        start = []  # packed index of each row's first tail token
        for b, r in enumerate(rows):
            start.append(len(gather))
            gather += [(b, t) for t in range(P, len(r.ids))]
            segment += [b] * (len(r.ids) - P)
        target = [(start[b] + pos - P, tok) for b, r in enumerate(rows) for _, pos, tok in r.targets]
        choice = [j for r in rows for j, _, _ in r.targets]
        g = torch.tensor(gather)
        return cls(padded, g, g[:, 1].clone(), torch.tensor(segment), torch.tensor(target),
                   torch.tensor(choice), n_choices)

    def mask(self, dtype: torch.dtype) -> Tensor:
        """Additive attention mask [1, 1, N, N]: causal, and a tail sees no other tail."""
        seg = self.segment
        n = len(seg)
        causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        ok = causal & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))
        out = torch.zeros(n, n, dtype=dtype)
        out.masked_fill_(~ok, torch.finfo(dtype).min)
        return out[None, None]


def item_rows(model: LoadedModel, requests: Sequence[Request],
              add_special_tokens: bool = True) -> list[ItemRows]:
    """:class:`ItemRows` of each request, tokenised as :func:`~mechinterp.evals.loglik.score` does."""
    by_req: dict[int, list[Row]] = {}
    for row in rows_for(requests, model.tokenizer, add_special_tokens):
        by_req.setdefault(row.req, []).append(row)
    pad = model.tokenizer.pad_token_id or 0
    return [ItemRows.from_rows(by_req[i], len(r.continuations), pad)
            for i, r in enumerate(requests)]


def answer_item(prompt_ids: Sequence[int], answer_id: int, pad_id: int = 0) -> ItemRows:
    """The item "``answer_id`` as the next token after ``prompt_ids``": one choice, one scored
    token, read at the prompt's last position (cross-model patching's log p(answer))."""
    ids = list(prompt_ids)
    return ItemRows.from_rows([Row(0, ids, [(0, len(ids) - 1, int(answer_id))])], 1, pad_id)


@dataclass(frozen=True)
class Condition:
    """Patch the base's activation at ``patch`` = ((site, layer), ...) and/or revert the MLP
    matrices of ``revert`` = (layer, ...) to the base's; all positions."""

    patch: tuple[tuple[str, int], ...] = ()
    revert: tuple[int, ...] = ()

    @property
    def start(self) -> int:
        """The first block whose output differs from the unpatched variant's."""
        return min([layer for _, layer in self.patch] + list(self.revert))


def patch_condition(site: str, layers: Sequence[int]) -> Condition:
    return Condition(patch=tuple((site, int(layer)) for layer in layers))


def revert_condition(layers: Sequence[int]) -> Condition:
    return Condition(revert=tuple(int(layer) for layer in layers))


@dataclass
class ItemReference:
    """An unpatched run of one item: choice log-likelihoods, optionally the input of every block
    (``resid[layer]``, [1, N, d]) and site outputs (``acts[(site, layer)]``, [1, N, d])."""

    scores: Tensor  # [choices] float64
    resid: list[Tensor] | None = None
    acts: dict[tuple[str, int], Tensor] | None = None


class _Runner:
    """The blocks of one model on one packed item; conditions side by side as batch rows."""

    def __init__(self, model: LoadedModel, item: ItemRows):
        self.model, self.item = model, item
        self.stack = BlockStack(model)
        dev = model.device
        full = self.stack.embed_input(item.rows.to(dev))
        h0 = full[item.gather[:, 0].to(dev), item.gather[:, 1].to(dev)][None]
        self.h0 = h0
        self.kw = {"attention_mask": item.mask(h0.dtype).to(dev)}
        if self.stack.rotary is not None:
            pos = item.positions.to(dev)[None]
            self.kw["position_embeddings"] = self.stack.rotary(h0, pos)
            self.kw["position_ids"] = pos

    def layer(self, layer: int, h: Tensor, fns: dict | None = None) -> Tensor:
        with hooked(self.model, fns or {}):
            return self.stack.layer(layer, h, PrefixKV(), self.kw)

    def scores(self, h: Tensor) -> Float[Tensor, "conditions choices"]:
        """Summed log-probability of each choice's tokens, per batch row (float64)."""
        tgt = self.item.target.to(h.device)
        logits = self.stack.logits(h[:, tgt[:, 0]])  # [n, targets, vocab]
        lp = torch.log_softmax(logits.float(), dim=-1)
        lp = lp.gather(2, tgt[:, 1].expand(h.shape[0], -1)[..., None])[..., 0]
        out = torch.zeros(h.shape[0], self.item.n_choices, dtype=torch.float64)
        out.index_add_(1, self.item.choice, lp.double().cpu())
        return out


@torch.inference_mode()
def item_reference(model: LoadedModel, item: ItemRows, record_resid: bool = False,
                   capture_sites: Sequence[str] = ()) -> ItemReference:
    """The unpatched choice log-likelihoods of ``item`` through the sweep's own blocks; optionally
    the input of every block (for a variant) and ``capture_sites`` outputs (for the base)."""
    with model.fused_attention():
        return _reference(model, item, record_resid, capture_sites)


def _reference(model, item, record_resid, capture_sites) -> ItemReference:
    run = _Runner(model, item)
    h = run.h0
    resid: list[Tensor] = []
    acts: dict = {}

    def saver(key):
        def fn(act):
            acts[key] = act.detach().clone()
        return fn

    for layer in range(model.n_layers):
        if record_resid:
            resid.append(h)
        h = run.layer(layer, h, {(s, layer): saver((s, layer)) for s in capture_sites})
    return ItemReference(run.scores(h)[0], resid if record_resid else None,
                         acts if capture_sites else None)


@torch.inference_mode()
def condition_sweep(base: LoadedModel, variant: LoadedModel, item: ItemRows,
                    conditions: Sequence[Condition], base_ref: ItemReference,
                    variant_ref: ItemReference, token_budget: int = 8192,
                    matrices: Sequence[str] | None = None,
                    ) -> Float[Tensor, "conditions choices"]:
    """The variant's choice log-likelihoods on ``item`` under each condition.

    ``base`` is the model whose activations are patched in and whose MLP weights a revert copies;
    ``variant`` the model they go into (swap the two, and their references, for noising).
    ``base_ref`` must hold the base's output of every patched site (``capture_sites``) and
    ``variant_ref`` the variant's block inputs (``record_resid``), both from
    :func:`item_reference` on this item. Conditions run side by side as batch rows, sorted by
    their first changed block: a condition joins the batch at that block with the variant's
    recorded input, so nothing before it is recomputed. Rows per pass: ``token_budget`` tokens
    (:attr:`ItemRows.n_tokens` per condition). Attention runs fused (SDPA), as in
    :func:`item_reference` and in the evals' scoring; the hooks see the same module outputs."""
    with variant.fused_attention():
        return _sweep(base, variant, item, conditions, base_ref, variant_ref, token_budget,
                      tuple(matrices or mlp_matrices(variant)))


def _sweep(base, variant, item, conditions, base_ref, variant_ref, token_budget, matrices):
    run = _Runner(variant, item)
    resid, acts = variant_ref.resid, base_ref.acts
    order = sorted(range(len(conditions)), key=lambda c: conditions[c].start)
    per_pass = max(1, token_budget // max(1, item.n_tokens))
    out = torch.empty(len(conditions), item.n_choices, dtype=torch.float64)
    for lo in range(0, len(order), per_pass):
        chunk = [conditions[c] for c in order[lo:lo + per_pass]]
        starts = [c.start for c in chunk]
        h = torch.cat([resid[s] for s in starts])
        for layer in range(starts[0], variant.n_layers):
            k = sum(s <= layer for s in starts)  # active rows (sorted by start)
            plain = [c for c in range(k) if layer not in chunk[c].revert]
            rev = [c for c in range(k) if layer in chunk[c].revert]
            for members, reverting in ((plain, False), (rev, True)):
                if not members:
                    continue
                patches = []
                for s in sorted({s for c in members for s, la in chunk[c].patch if la == layer}):
                    rows = [j for j, c in enumerate(members) if (s, layer) in chunk[c].patch]
                    patches.append(Patch(s, layer, acts[(s, layer)],
                                         rows=torch.tensor(rows, device=h.device)))
                whole = len(members) == k and not rev
                sub = h[:k] if whole else h[torch.tensor(members, device=h.device)]
                with reverted(variant, base, [layer], matrices) if reverting else nullcontext():
                    new = run.layer(layer, sub, patch_fns(patches))
                if whole:
                    h[:k] = new
                else:
                    h[torch.tensor(members, device=h.device)] = new
        out[order[lo:lo + per_pass]] = run.scores(h)
    return out


@dataclass
class TwoWaySweep:
    """One item patched both ways: the unpatched scores and, per condition, the patched ones."""

    base: Tensor  # [choices] the base's unpatched scores
    variant: Tensor  # [choices] the variant's
    denoise: Tensor  # [conditions, choices]: the base's activations patched into the variant
    noise: Tensor  # [conditions, choices]: the variant's patched into the base


def patch_both_ways(base: LoadedModel, variant: LoadedModel, item: ItemRows,
                    conditions: Sequence[Condition], token_budget: int = 8192) -> TwoWaySweep:
    """:func:`condition_sweep` of ``conditions`` (patches only) base into variant and variant into
    base, from one reference run of each model."""
    sites = sorted({s for c in conditions for s, _ in c.patch})
    ref_b = item_reference(base, item, record_resid=True, capture_sites=sites)
    ref_v = item_reference(variant, item, record_resid=True, capture_sites=sites)
    return TwoWaySweep(ref_b.scores, ref_v.scores,
                       condition_sweep(base, variant, item, conditions, ref_b, ref_v, token_budget),
                       condition_sweep(variant, base, item, conditions, ref_v, ref_b, token_budget))


def last_positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of the last real token of each row (works for left or right padding)."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).long().argmax(1)


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
