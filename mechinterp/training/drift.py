"""How far training has moved the model: teacher-forced KL from the base on a fixed held-out set.

Definition (the paper's, computed by ``mechinterp.analysis.divergence``): for each item, the mean over its answer positions of
``sum_v p_base(v) (log p_base(v) - log p_ft(v))``, then the mean over items. "Answer positions" are
the positions whose next token is part of the rendered reference answer (the assistant turn), so the
prompt is context only.

The base distributions are computed once (:func:`base_logprobs`) and kept only at answer positions,
so a checkpoint costs one forward pass of the fine-tuned model over the held-out set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..analysis.divergence import TokenisedItems, answer_log_probs, eval_mode, kl_rows


@dataclass
class HeldOut:
    """Tokenised held-out items: ids and, per item, the answer span ``[start, stop)`` of tokens."""

    input_ids: list[Int[Tensor, " pos"]]
    spans: list[tuple[int, int]]  # stop is always len(input_ids[i])

    def to_items(self) -> TokenisedItems:
        return TokenisedItems([x.tolist() for x in self.input_ids], [a for a, _ in self.spans])


def build_heldout(tokenizer, prompts: list[list[dict]], answers: list[str],
                  max_length: int = 512) -> HeldOut:
    """Render prompt + reference answer through the chat template; locate the answer tokens."""
    ids, spans = [], []
    for messages, answer in zip(prompts, answers, strict=True):
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
        full_ids = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False)
        prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else prompt_ids)
        full_ids = list(full_ids["input_ids"] if isinstance(full_ids, dict) else full_ids)
        start = len(prompt_ids)
        if full_ids[:start] != prompt_ids:  # template re-tokenises across the boundary
            start = next(i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b)
        full_ids = full_ids[:max_length]
        if start >= len(full_ids):
            continue  # no answer left after truncation
        ids.append(torch.tensor(full_ids))
        spans.append((max(start, 1), len(full_ids)))
    return HeldOut(ids, spans)


@torch.no_grad()
def answer_logprobs(model: torch.nn.Module, heldout: HeldOut,
                    batch_size: int = 4) -> list[Float[Tensor, "answer vocab"]]:
    """Log-probabilities (float32) predicting each answer token, one tensor per item.

    Batching, padding and the answer-position mask are :mod:`mechinterp.analysis.divergence`'s,
    so training drift and the ``kl-drift`` probe compute KL the same way.
    """
    items = heldout.to_items()
    out: list[Tensor] = []
    with eval_mode(model):
        for _, ids, attn, pred in items.batches(batch_size):
            rows = answer_log_probs(model, ids, attn, pred)
            out.extend(rows.split(pred.sum(-1).tolist()))
    return out


@contextlib.contextmanager
def without_autocast(model: torch.nn.Module):
    """Run ``model``'s own forward inside the block. Under mixed precision accelerate wraps a
    prepared model's forward in autocast; the drift KL compares with base log-probs computed
    before training in the parameters' dtype, so the checkpoint's side must be computed the same
    way (float32 master weights, float32 matmuls)."""
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if original is None or wrapped is None:
        yield model
        return
    model.forward = original
    try:
        yield model
    finally:
        model.forward = wrapped


def kl_per_item(base: list[Float[Tensor, "answer vocab"]],
                tuned: list[Float[Tensor, "answer vocab"]]) -> list[float]:
    """Per item: mean over answer positions of ``sum_v p_base (log p_base - log p_ft)``."""
    return [float(kl_rows(lb, lf).double().mean()) for lb, lf in zip(base, tuned, strict=True)]


def kl_from_base(base: list[Tensor], tuned: list[Tensor]) -> float:
    """The held-out KL(base || fine-tuned): mean over items of :func:`kl_per_item`."""
    per = kl_per_item(base, tuned)
    return float(sum(per) / len(per)) if per else float("nan")
