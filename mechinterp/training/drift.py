"""How far training has moved the model: teacher-forced KL from the base on a fixed held-out set.

Definition (the paper's, computed by ``mechinterp.analysis.divergence``): for each item, the mean
over its answer positions of ``sum_v p_base(v) (log p_base(v) - log p_ft(v))``, then the mean over
items. "Answer positions" are the positions whose next token is one of the reference answer's own
tokens (:mod:`mechinterp.evals.answers`: not the end-of-turn tokens the chat template appends), so
the prompt is context only and ``kl-drift`` reads the same span.

The base distributions are computed once (:func:`answer_logprobs`) and kept only at answer positions,
so a checkpoint costs one forward pass of the fine-tuned model over the held-out set.
"""

from __future__ import annotations

import contextlib

import torch
from jaxtyping import Float
from torch import Tensor

from ..analysis.divergence import eval_mode, kl_rows
from ..evals.answers import TokenisedItems, answer_items, answer_log_probs


def build_heldout(tokenizer, prompts: list[list[dict]], answers: list[str],
                  max_length: int = 512) -> TokenisedItems:
    """The held-out items: each prompt's chat messages rendered with the generation prompt, then
    the reference answer's own tokens (:func:`~mechinterp.evals.answers.answer_items`, the span
    ``kl-drift`` reads). Answers are cut to ``max_length`` tokens in all; an item whose prompt
    alone fills it is left out."""
    return answer_items(tokenizer, list(zip(prompts, answers, strict=True)),
                        max_length=max_length, drop_long_prompts=True)


@torch.no_grad()
def answer_logprobs(model: torch.nn.Module, heldout: TokenisedItems,
                    batch_size: int = 8) -> list[Float[Tensor, "answer vocab"]]:
    """Log-probabilities (float32) predicting each answer token, one tensor per item: the batches
    of :class:`~mechinterp.evals.answers.TokenisedItems` read by
    :func:`~mechinterp.evals.answers.answer_log_probs`, as ``kl-drift`` reads them."""
    out: list[Tensor] = []
    with eval_mode(model):
        for _, ids, attn, predict in heldout.batches(batch_size):
            rows = answer_log_probs(model, ids, attn, predict, share_prefix=True).cpu()
            out.extend(rows.split(predict.sum(-1).tolist()))
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
