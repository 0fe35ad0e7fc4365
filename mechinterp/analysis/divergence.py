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

Reusable pieces: :func:`answer_items` (chat template + answer-position bookkeeping),
:class:`TokenisedItems` (pre-tokenised, e.g. built once by a training callback) and
:func:`teacher_forced_kl` (any two causal LMs sharing a tokenizer: ``LoadedModel`` or HF modules).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float

from ..errors import UserError
from ..models.unembed import final_hidden, log_probs_fp32


@dataclass(frozen=True)
class TokenisedItems:
    """Token ids of ``prompt + answer`` per item, and where each answer starts."""

    input_ids: list[list[int]]
    answer_start: list[int]  # index of the first answer token in input_ids[i]
    pad_id: int = 0
    n_truncated: int = 0  # items whose answer was cut to fit max_length

    def __post_init__(self):
        for ids, start in zip(self.input_ids, self.answer_start):
            if not 0 < start < len(ids):
                raise UserError(f"an item has answer start {start} in {len(ids)} tokens",
                                "each item needs at least one prompt token and one answer token")

    def __len__(self) -> int:
        return len(self.input_ids)

    def all_positions(self) -> TokenisedItems:
        """The same items with every next-token prediction counted (prompt and answer)."""
        return TokenisedItems(self.input_ids, [1] * len(self), self.pad_id, self.n_truncated)

    def n_answer_tokens(self) -> list[int]:
        return [len(ids) - s for ids, s in zip(self.input_ids, self.answer_start)]

    def batches(self, batch_size: int) -> Iterator[tuple[range, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]]:
        """``(item indices, ids, attention_mask, predict_mask)``, right-padded.

        ``predict_mask[b, t]`` is True where the logits at ``t`` predict an answer token
        (``answer_start - 1 <= t < len - 1``).
        """
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} must be at least 1", "use 1 or more")
        for lo in range(0, len(self), batch_size):
            rows = range(lo, min(len(self), lo + batch_size))
            width = max(len(self.input_ids[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            pred = torch.zeros((len(rows), width), dtype=torch.bool)
            for b, i in enumerate(rows):
                n = len(self.input_ids[i])
                ids[b, :n] = torch.tensor(self.input_ids[i])
                attn[b, :n] = 1
                pred[b, self.answer_start[i] - 1: n - 1] = True
            yield rows, ids, attn, pred


def answer_items(tokenizer, pairs: Sequence[tuple[str, str]], chat_template: bool = True,
                 system: str | None = None, max_length: int | None = None) -> TokenisedItems:
    """Tokenise (prompt, answer) pairs; the answer's tokens are appended to the prompt's.

    With ``chat_template`` the prompt is a user turn rendered with the generation prompt (so the
    answer sits where the assistant's reply goes); otherwise the prompt is tokenised as plain text
    (with the tokenizer's own special tokens, e.g. BOS). The answer is tokenised on its own without
    special tokens, so the prompt/answer boundary is exact. Items longer than ``max_length`` lose
    answer tokens from the end (counted in ``n_truncated``).
    """
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template",
                        "set chat_template=false to read items as plain text")
    ids_all, starts, truncated = [], [], 0
    for prompt, answer in pairs:
        if chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
            p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            p_ids = tokenizer(prompt)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not p_ids or not a_ids:
            raise UserError(f"an item has an empty {'prompt' if not p_ids else 'answer'} "
                            f"({prompt[:40]!r})", "give every item a prompt and an answer")
        ids = list(p_ids) + list(a_ids)
        if max_length is not None and len(ids) > max_length:
            if len(p_ids) >= max_length:
                raise UserError(f"a prompt has {len(p_ids)} tokens, max_length is {max_length}",
                                "raise max_length")
            ids = ids[:max_length]
            truncated += 1
        ids_all.append(ids)
        starts.append(len(p_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenisedItems(ids_all, starts, pad, truncated)


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


def as_hf(model) -> torch.nn.Module:
    """The Hugging Face module of a ``LoadedModel``, or the module itself."""
    return getattr(model, "hf", model)


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


def model_device(module: torch.nn.Module) -> torch.device:
    """Where the model's inputs go (also for a model placed across devices by accelerate)."""
    from ..models.device import input_device

    return input_device(module)


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
            if base_cache is not None and key in base_cache:
                lb = base_cache[key]
            else:
                lb = answer_log_probs(hb, ids, attn, pred)
                if base_cache is not None:
                    base_cache[key] = lb
            if variant_cache is not None and key in variant_cache:
                lv = variant_cache[key]
            else:
                lv = answer_log_probs(hv, ids, attn, pred)
                if variant_cache is not None:
                    variant_cache[key] = lv
            per_pos = (kl_rows(lv, lb) if reverse else kl_rows(lb, lv)).double()  # (positions,)
            sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, item_of_row, per_pos)
            counts = torch.bincount(item_of_row, minlength=len(rows)).double()
            out[rows.start:rows.stop] = sums / counts
            if progress is not None:
                progress(len(rows))
    return out


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


def answer_log_probs(model: torch.nn.Module, ids, attn, pred) -> torch.Tensor:
    """log-softmax at the answer-predicting positions, (positions, vocab), float32 on the CPU.

    Only those positions are unembedded, and in float32 whatever the model's dtype
    (:func:`~mechinterp.models.unembed.log_probs_fp32`: final hidden states x unembedding).
    """
    dev = model_device(model)
    hidden = final_hidden(model, ids.to(dev), attn.to(dev), use_cache=False)
    return log_probs_fp32(model, hidden[pred.to(dev)]).cpu()
