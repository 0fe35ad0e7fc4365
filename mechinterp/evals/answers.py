"""Answer spans and their log-probabilities: the one tokeniser and the one read-out.

An item is a prompt and a reference answer. :func:`answer_items` renders the prompt (a user turn,
or a list of chat messages, through the chat template with the generation prompt; or plain text)
and appends the answer's own tokens, tokenised alone: the *answer span* is exactly those tokens.
The tokens a chat template appends after an assistant reply (end of turn, newline) are not part
of it, so every reader of an answer span (``kl-drift``, the KL of a training run, its
``training-drift`` probe) measures the same positions.

:func:`answer_log_probs` is the one read-out of a model at chosen positions: the final hidden
states there go through the output layer in float32 (:mod:`mechinterp.models.unembed`) and a
float32 log-softmax, whatever the model's dtype. It returns whole distributions (teacher-forced
KL); :func:`token_log_probs` reads one token per position from them (``log p(answer)`` of
cross-model patching and attribution patching, choice log-likelihoods). Neither detaches: under
hooks and with gradients enabled, attribution patching differentiates through them.

Example::

    m = load("tiny-random-llama")
    items = answer_items(m.tokenizer, [("What is 2 + 3?", "5")])
    (_, ids, mask, predict), = items.batches(8)
    answer_log_probs(m, ids, mask, predict)  # (answer tokens, vocab), float32
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..models.device import input_device
from ..models.unembed import final_hidden, log_probs_fp32

#: Positions to read: a boolean mask ``[batch, pos]`` or a pair of index tensors (rows, positions).
Positions = Tensor | tuple[Tensor, Tensor]
#: A prompt: the user's turn as text, or the chat messages before the answer.
Prompt = str | list[dict[str, str]]


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

    def batches(self, batch_size: int) -> Iterator[tuple[range, Tensor, Tensor, Tensor]]:
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
            predict = torch.zeros((len(rows), width), dtype=torch.bool)
            for b, i in enumerate(rows):
                n = len(self.input_ids[i])
                ids[b, :n] = torch.tensor(self.input_ids[i])
                attn[b, :n] = 1
                predict[b, self.answer_start[i] - 1: n - 1] = True
            yield rows, ids, attn, predict


def _prompt_ids(tokenizer, prompt: Prompt, chat_template: bool, system: str | None) -> list[int]:
    if not chat_template:
        if not isinstance(prompt, str):
            raise UserError("a prompt given as chat messages needs the chat template",
                            "set chat_template=true or give the prompt as text")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, str):
        prompt = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_items(tokenizer, pairs: Sequence[tuple[Prompt, str]], chat_template: bool = True,
                 system: str | None = None, max_length: int | None = None,
                 drop_long_prompts: bool = False) -> TokenisedItems:
    """Tokenise (prompt, answer) pairs; the answer's tokens are appended to the prompt's.

    Args:
        tokenizer: the models' tokenizer.
        pairs: (prompt, answer); a prompt is the user's turn as text, or (chat template only) the
            list of chat messages before the answer.
        chat_template: render the prompt with the chat template and its generation prompt, so the
            answer sits where the assistant's reply goes; otherwise the prompt is plain text
            tokenised with the tokenizer's own special tokens (e.g. BOS).
        system: a system turn put before a text prompt (chat template only).
        max_length: items longer than this lose answer tokens from the end (counted in
            ``n_truncated``).
        drop_long_prompts: leave out an item whose prompt alone fills ``max_length`` (a training
            run's held-out set); otherwise that is an error.

    Returns:
        :class:`TokenisedItems`: the answer is tokenised on its own without special tokens, so the
        prompt/answer boundary is exact and the answer span holds the answer's tokens only.
    """
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template",
                        "set chat_template=false to read items as plain text")
    ids_all, starts, truncated = [], [], 0
    for prompt, answer in pairs:
        p_ids = _prompt_ids(tokenizer, prompt, chat_template, system)
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not p_ids or not a_ids:
            raise UserError(f"an item has an empty {'prompt' if not p_ids else 'answer'} "
                            f"({str(prompt)[:40]!r})", "give every item a prompt and an answer")
        ids = p_ids + list(a_ids)
        if max_length is not None and len(ids) > max_length:
            if len(p_ids) >= max_length:
                if drop_long_prompts:
                    continue
                raise UserError(f"a prompt has {len(p_ids)} tokens, max_length is {max_length}",
                                "raise max_length")
            ids = ids[:max_length]
            truncated += 1
        ids_all.append(ids)
        starts.append(len(p_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenisedItems(ids_all, starts, pad, truncated)


def as_hf(model) -> torch.nn.Module:
    """The Hugging Face module of a ``LoadedModel``, or the module itself."""
    return getattr(model, "hf", model)


def log_probs_at(model, hidden: Tensor, at: Positions) -> Tensor:
    """float32 log-softmax over the vocabulary of final hidden states ``hidden[at]``,
    ``(positions, vocab)``: only those positions go through the output layer."""
    at = tuple(a.to(hidden.device) for a in at) if isinstance(at, tuple) else at.to(hidden.device)
    return log_probs_fp32(as_hf(model), hidden[at])


def answer_log_probs(model, input_ids: Tensor, attention_mask: Tensor,
                     at: Positions, share_prefix: bool = False) -> Tensor:
    """The model's next-token log-probabilities at positions ``at`` of a batch.

    Args:
        model: a ``LoadedModel`` or a Hugging Face causal LM (also one placed across devices).
        input_ids, attention_mask: ``[batch, pos]``, moved to the model's input device.
        at: a boolean mask ``[batch, pos]`` or (row indices, position indices).
        share_prefix: run the leading tokens every row shares (a chat template's system prompt)
            once and the rest of each row on their key/value cache (:func:`shared_prefix_hidden`);
            only for a plain forward pass: hooks that index positions would see two calls.

    Returns:
        ``(positions, vocab)`` float32 log-probabilities on the output layer's device, in the
        order of ``at`` (row-major for a mask).
    """
    hf = as_hf(model)
    dev = input_device(hf)
    ids, mask = input_ids.to(dev), attention_mask.to(dev)
    hidden = shared_prefix_hidden(hf, ids, mask) if share_prefix else None
    if hidden is None:
        hidden = final_hidden(hf, ids, mask, use_cache=False)
    return log_probs_at(hf, hidden, at)


#: shortest shared prefix worth a second forward call
MIN_SHARED = 16


def shared_prefix(input_ids: Tensor, attention_mask: Tensor) -> int:
    """Leading columns that are identical and unmasked in every row, short of every row's last
    token (each row keeps at least one token of its own)."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    return min(int(same.long().cumprod(0).sum()), int(attention_mask.sum(1).min()) - 1)


def shared_prefix_hidden(model: torch.nn.Module, input_ids: Tensor,
                         attention_mask: Tensor) -> Tensor | None:
    """Final hidden states of a right-padded batch with the shared prefix (:func:`shared_prefix`)
    run once: its key/value cache is indexed out to every row and the rows' remaining tokens run
    on it at their true positions. Causal attention makes the prefix's keys and values the same in
    every row, so this is the full pass up to the order of floating-point sums
    (``tests/test_kl_reference.py`` checks it). ``None`` where it does not apply: one row, a
    prefix under :data:`MIN_SHARED` tokens, or a model without a separate backbone or placed
    across devices (then run the full pass)."""
    body = getattr(model, "base_model", None)
    p = shared_prefix(input_ids, attention_mask) if input_ids.size(0) > 1 else 0
    if p < MIN_SHARED or body is None or body is model or getattr(model, "hf_device_map", None):
        return None
    n = input_ids.size(0)
    first = body(input_ids=input_ids[:1, :p], use_cache=True)
    cache = first.cache if hasattr(first, "cache") else first.past_key_values
    cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=input_ids.device))
    pos = torch.arange(p, input_ids.size(1), device=input_ids.device).expand(n, -1)
    rest = body(input_ids=input_ids[:, p:], attention_mask=attention_mask, cache=cache,
                position_ids=pos, use_cache=True)
    return torch.cat([first.last_hidden_state.expand(n, -1, -1), rest.last_hidden_state], 1)


def token_log_probs(model, input_ids: Tensor, attention_mask: Tensor, sel: Tensor) -> Tensor:
    """``log p(token | prefix)`` at ``sel`` = rows of (batch row, position, token): one value per
    row of ``sel``, from :func:`answer_log_probs`."""
    lp = answer_log_probs(model, input_ids, attention_mask, (sel[:, 0], sel[:, 1]))
    return lp.gather(1, sel[:, 2:3].to(lp.device))[:, 0]


def answer_token_sel(positions: Tensor, answer_ids: Tensor) -> Tensor:
    """``sel`` for :func:`token_log_probs` reading ``answer_ids[i]`` at ``positions[i]`` of row
    ``i`` (one scored token per row: the answer token after a prompt)."""
    rows = torch.arange(len(positions), device=positions.device)
    return torch.stack([rows, positions, answer_ids.to(positions.device)], 1)
