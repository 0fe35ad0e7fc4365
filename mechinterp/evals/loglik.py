"""Batched log-likelihood of continuations given a context, tokenised as lm-evaluation-harness does.

One request = a context and several continuations (e.g. the four MMLU answers). Tokenisation follows
lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation, the whole text
is encoded and split at the length of the encoded context. When every continuation of a request is a
single token appended to the context's tokens (MMLU letters " A".." D"), the request costs ONE row:
the four log-probabilities are read from the last position. Otherwise each continuation gets its own
row (full scoring). Rows are sorted by length and batched under a token budget with right padding
(causal attention makes right padding exact); only the positions that are scored go through the
unembedding and the log-softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.loaded import LoadedModel
from ..progress import task


@dataclass(frozen=True)
class Request:
    context: str
    continuations: tuple[str, ...]


@dataclass
class Row:
    req: int  # request index
    ids: list[int]  # model input (tokens whose next-token predictions are read)
    targets: list[tuple[int, int, int]]  # (continuation index, position in ids, token id)


def encode_pair(tokenizer, context: str, continuation: str,
                add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """lm-eval's split of ``context + continuation`` into (context ids, continuation ids)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
    ctx = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    return ctx, whole[len(ctx):]


def _rows_for(i: int, req: Request, tokenizer, add_special: bool) -> tuple[list[Row], bool]:
    pairs = [encode_pair(tokenizer, req.context, c, add_special) for c in req.continuations]
    ctx0 = pairs[0][0]
    if ctx0 and all(len(cont) == 1 and ctx == ctx0 for ctx, cont in pairs):
        last = len(ctx0) - 1
        return [Row(i, ctx0, [(j, last, cont[0]) for j, (_, cont) in enumerate(pairs)])], True
    rows = []
    for j, (ctx, cont) in enumerate(pairs):
        if not ctx:  # lm-eval conditions an empty context on the EOS/BOS token
            ctx = [tokenizer.eos_token_id]
        ids = (ctx + cont)[:-1]
        start = len(ctx) - 1
        rows.append(Row(i, ids, [(j, start + k, t) for k, t in enumerate(cont)]))
    return rows, False


@torch.inference_mode()
def score(model: LoadedModel, requests: Sequence[Request], token_budget: int = 4096,
          max_rows: int = 64, add_special_tokens: bool = True,
          desc: str = "scoring") -> tuple[list[list[float]], int]:
    """Summed log-likelihood of each continuation, ``out[request][continuation]``, and the number
    of requests that took the one-row fast path."""
    rows: list[Row] = []
    n_fast = 0
    for i, req in enumerate(requests):
        r, fast = _rows_for(i, req, model.tokenizer, add_special_tokens)
        rows += r
        n_fast += fast
    out = [[0.0] * len(r.continuations) for r in requests]
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k].ids))
    with task(desc, len(rows)) as advance:
        start = 0
        while start < len(order):
            longest = len(rows[order[start]].ids)
            n = max(1, min(max_rows, token_budget // max(1, longest)))
            batch = [rows[k] for k in order[start:start + n]]
            start += n
            _score_batch(model, batch, out)
            advance(len(batch))
    return out, n_fast


def pad_rows(rows: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` for rows."""
    longest = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row.ids)] = torch.tensor(row.ids)
        mask[b, :len(row.ids)] = 1
    return ids, mask


def target_logprobs(model: LoadedModel, ids: torch.Tensor, mask: torch.Tensor,
                    sel: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``log p(tok | prefix)`` at ``sel`` = rows of (batch row, position, token).

    Runs the model body, then the unembedding and log-softmax on the selected positions only.
    """
    dev = model.device
    hidden = model.hf.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
    sel = sel.to(dev)
    logits = model.hf.get_output_embeddings()(hidden[sel[:, 0], sel[:, 1]])
    return torch.log_softmax(logits.float(), dim=-1).gather(1, sel[:, 2:3])[:, 0]


def _score_batch(model: LoadedModel, batch: list[Row], out: list[list[float]]) -> None:
    ids, mask = pad_rows(batch, model.tokenizer.pad_token_id or 0)
    meta = [(b, pos, tok, row.req, j) for b, row in enumerate(batch) for j, pos, tok in row.targets]
    vals = target_logprobs(model, ids, mask, torch.tensor([m[:3] for m in meta])).tolist()
    for (_, _, _, req, j), v in zip(meta, vals):
        out[req][j] += v


def rows_for(requests: Sequence[Request], tokenizer, add_special_tokens: bool = True) -> list[Row]:
    """The rows :func:`score` runs for ``requests`` (one per request on the fast path)."""
    return [row for i, r in enumerate(requests)
            for row in _rows_for(i, r, tokenizer, add_special_tokens)[0]]
