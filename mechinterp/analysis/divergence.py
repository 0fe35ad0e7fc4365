"""Teacher-forced KL divergence between a base model and a variant.

Each item is a prompt and a reference answer. Both models read ``prompt + answer`` (rendered in the
chat template by default); at every position whose next token is an answer token we take the two
predictive distributions and compute ``KL(base || variant) = sum_v p_base (log p_base - log
p_variant)`` (``direction="forward"``, the default; ``"reverse"`` is ``KL(variant || base)``); an
item's value is the mean over its answer positions. The answer span is the answer's own tokens,
appended to the rendered prompt: the chat template's end-of-turn tokens after it are not part of
it. :meth:`TokenisedItems.all_positions` widens it to every position of prompt and answer (the
paper's ``kl_tests.py`` averages over those); :func:`text_items` makes plain texts items whose
every next-token prediction counts.

Batches are right-padded by hand with an attention mask: padding sits after every real token, so a
causal model's outputs at real positions do not depend on it (a test compares batched with
one-by-one). Items whose value is NaN/inf are returned as such; callers count them.

The items and the log-probabilities are :mod:`mechinterp.evals.answers`' (:func:`answer_items`,
:class:`TokenisedItems`, :func:`answer_log_probs`), the same ones a training run's held-out KL
reads; :func:`teacher_forced_kl` takes any two causal LMs sharing a tokenizer (``LoadedModel`` or
HF modules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float

from ..errors import UserError
from ..evals.answers import TokenisedItems, answer_items, answer_log_probs, as_hf


def text_items(tokenizer, texts: Sequence[str], max_length: int) -> TokenisedItems:
    """Plain texts (the tokenizer's own special tokens, e.g. BOS) cut to ``max_length`` tokens, as
    items whose every position predicting a next token counts; texts of one token are left out."""
    ids = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    ids = [x for x in ids if len(x) >= 2]
    if not ids:
        raise UserError("no text has two tokens", "give longer texts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenisedItems(ids, [1] * len(ids), pad)


#: ``forward``: KL(base || variant), the paper's; ``reverse``: KL(variant || base).
DIRECTIONS = ("forward", "reverse")


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise UserError(f"KL direction {direction!r}",
                        "use forward (KL(base || variant)) or reverse (KL(variant || base))")
    return direction


@contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Eval mode (no dropout) for the duration; previous modes restored (training callbacks)."""
    before = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, was in zip(modules, before):
            m.train(was)


@torch.no_grad()
def teacher_forced_kl(base, variant, items: TokenisedItems | Sequence[tuple[str, str]],
                      batch_size: int = 8, tokenizer=None,
                      progress: Callable[[int], None] | None = None,
                      base_cache: dict | None = None, variant_cache: dict | None = None,
                      direction: str = "forward",
                      ) -> Float[torch.Tensor, "n_items"]:  # noqa: F821, UP037
    """Per-item mean over answer positions of ``KL(p_base || p_variant)`` (nats), float64;
    ``direction="reverse"``: of ``KL(p_variant || p_base)``.

    ``base`` / ``variant``: :class:`~mechinterp.models.loaded.LoadedModel` or Hugging Face causal
    LMs with the same vocabulary. ``items``: pre-tokenised, or (prompt, answer) pairs rendered with
    :func:`answer_items` and ``tokenizer`` (default: the base's). Distributions are computed in
    float32 (output layer and log-softmax) whatever the models' dtype. ``progress(n)`` is called
    with the number of items done. ``base_cache``: a dict (empty on the first call) that keeps the
    base's answer log-probs per batch, so comparing one base with many variants runs the base once
    (:func:`base_cache_fits` says whether it fits in memory). ``variant_cache`` does the same
    for the variant (one model compared with several references, as ``stitch`` does).
    """
    reverse = check_direction(direction) == "reverse"
    if not isinstance(items, TokenisedItems):
        tok = tokenizer if tokenizer is not None else getattr(base, "tokenizer", None)
        if tok is None:
            raise UserError("text items need a tokenizer", "pass tokenizer= or LoadedModels")
        items = answer_items(tok, items)
    hb, hv = as_hf(base), as_hf(variant)
    out = torch.full((len(items),), float("nan"), dtype=torch.float64)
    with eval_mode(hb, hv):
        for rows, ids, attn, pred in items.batches(batch_size):
            item_of_row = pred.nonzero()[:, 0]
            key = (rows.start, rows.stop)
            lb = _cached_log_probs(hb, base_cache, key, ids, attn, pred)
            lv = _cached_log_probs(hv, variant_cache, key, ids, attn, pred)
            per_pos = (kl_rows(lv, lb) if reverse else kl_rows(lb, lv)).double()  # (positions,)
            sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, item_of_row, per_pos)
            counts = torch.bincount(item_of_row, minlength=len(rows)).double()
            out[rows.start:rows.stop] = sums / counts
            if progress is not None:
                progress(len(rows))
    return out


def _cached_log_probs(model: torch.nn.Module, cache: dict | None, key: tuple[int, int], ids,
                      attn, pred) -> torch.Tensor:
    """The batch's answer log-probs (on the CPU) from ``cache[key]``, computed (and kept, with a
    cache) where absent."""
    if cache is not None and key in cache:
        return cache[key]
    log_probs = answer_log_probs(model, ids, attn, pred, share_prefix=True).cpu()
    if cache is not None:
        cache[key] = log_probs
    return log_probs


def base_cache_fits(items: TokenisedItems, vocab: int, budget_bytes: float = 2e9) -> bool:
    """Whether the base's float32 answer log-probs of all ``items`` fit in ``budget_bytes``."""
    return sum(items.n_answer_tokens()) * vocab * 4 <= budget_bytes


def kl_rows(lb: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """``sum_v p_b (log p_b - log p_v)`` per row of two log-prob tensors ``(rows, vocab)``.

    Terms with ``p_b = 0`` are 0 (``0 log 0 = 0``, also where both models give a token ``-inf``);
    ``p_b > 0 = p_v`` gives ``+inf``; NaN inputs stay NaN.
    """
    p = lb.exp()
    return torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device),
                       p * (lb - lv)).sum(-1)
