"""Batched log-likelihood of continuations given a context, tokenised as lm-evaluation-harness does.

One request = a context and several continuations (e.g. the four MMLU answers). Tokenisation follows
lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation, the whole text
is encoded and split at the length of the encoded context. When every continuation of a request is a
single token appended to the context's tokens (MMLU letters " A".." D"), the request costs ONE row:
the four log-probabilities are read from the last position. Otherwise each continuation gets its own
row (full scoring). Rows are sorted by length and batched under a token budget with right padding
(causal attention makes right padding exact); only the positions that are scored go through the
unembedding and the log-softmax. Rows sharing a long token prefix (the k-shot examples of one MMLU
subject; the context of a cloze item's four answers) run it once and the rest on its KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from ..models.loaded import LoadedModel
from ..progress import task
from .prefix import best_plan, plan_groups, shared_jobs
from .rows import Row, add_target_logprobs, body, pad_rows
from .workers import cpu_workers, run_jobs


@dataclass(frozen=True)
class Request:
    context: str
    continuations: tuple[str, ...]


def _split(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves the context's trailing whitespace to the front of the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str,
                add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """lm-eval's split of ``context + continuation`` into (context ids, continuation ids): the
    continuation is the whole text's tokens after as many as the context alone encodes to."""
    context, continuation = _split(context, continuation)
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
    ctx = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    return ctx, whole[len(ctx):]


def _encode_many(tokenizer, texts: list[str], add_special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"]


def build_rows(requests: Sequence[Request], tokenizer,
               add_special_tokens: bool = True) -> tuple[list[Row], int]:
    """Rows for ``requests`` (tokenised in one batched call, as :func:`encode_pair` splits them)
    and the number of requests on the one-row fast path."""
    contexts, wholes = [], []
    for req in requests:
        contexts.append(_split(req.context, "")[0])
        wholes += ["".join(_split(req.context, c)) for c in req.continuations]
    ctx_ids = _encode_many(tokenizer, contexts, add_special_tokens)
    whole_ids = iter(_encode_many(tokenizer, wholes, add_special_tokens))
    rows: list[Row] = []
    n_fast = 0
    for i, (req, ctx) in enumerate(zip(requests, ctx_ids)):
        pairs = [(ctx, next(whole_ids)[len(ctx):]) for _ in req.continuations]
        if ctx and all(len(cont) == 1 for _, cont in pairs):
            last = len(ctx) - 1
            rows.append(Row(i, ctx, [(j, last, cont[0]) for j, (_, cont) in enumerate(pairs)]))
            n_fast += 1
            continue
        for j, (c, cont) in enumerate(pairs):
            if not c:  # lm-eval conditions an empty context on the EOS/BOS token
                c = [tokenizer.eos_token_id]
            rows.append(Row(i, (c + cont)[:-1], [(j, len(c) - 1 + k, t) for k, t in enumerate(cont)]))
    return rows, n_fast


def score(model: LoadedModel, requests: Sequence[Request], token_budget: int = 512,
          max_rows: int = 64, add_special_tokens: bool = True, share_prefix: int | None = None,
          kv_budget: int = 16384, workers: int | None = None,
          desc: str = "scoring") -> tuple[list[list[float]], int]:
    """Summed log-likelihood of each continuation, ``out[request][continuation]``, and the number
    of requests that took the one-row fast path.

    Rows that share at least ``share_prefix`` leading tokens (few-shot examples of one subject, the
    context of one request's continuations) run that prefix once and the rest on its KV cache
    (:mod:`.prefix`); ``None`` picks the threshold whose plan runs fewest tokens
    (:func:`.prefix.best_plan`), ``0`` scores every row in full. Batches run on ``workers`` CPU
    threads side by side (:mod:`.workers`; default one per torch thread on a CPU, one on a GPU).
    """
    rows, n_fast = build_rows(requests, model.tokenizer, add_special_tokens)
    out = [[0.0] * len(r.continuations) for r in requests]
    if share_prefix is None:
        groups = best_plan(rows)
    else:
        groups = plan_groups(rows, share_prefix) if share_prefix else []
    alone = [k for g in groups if len(g.rows) == 1 for k in g.rows] if groups else range(len(rows))
    with (task(desc, len(rows)) as advance, model.fused_attention(),
          cpu_workers(model.device, workers) as n_workers):
        order = sorted(alone, key=lambda k: -len(rows[k].ids))
        jobs = []
        start = 0
        while start < len(order):
            longest = len(rows[order[start]].ids)
            n = max(1, min(max_rows, token_budget // max(1, longest)))
            jobs.append(partial(_score_batch, model, [rows[k] for k in order[start:start + n]],
                                out, advance))
            start += n
        jobs += shared_jobs(model, rows, [g for g in groups if len(g.rows) > 1], out,
                            token_budget, kv_budget, advance)
        run_jobs(jobs, n_workers)
    return out, n_fast


def _score_batch(model: LoadedModel, batch: list[Row], out: list[list[float]],
                 advance: Callable[[int], None]) -> None:
    ids, mask = pad_rows(batch, model.tokenizer.pad_token_id or 0)
    hidden = body(model, ids, mask, use_cache=False).last_hidden_state
    add_target_logprobs(model, hidden, batch, [0] * len(batch), out)
    advance(len(batch))


def rows_for(requests: Sequence[Request], tokenizer, add_special_tokens: bool = True) -> list[Row]:
    """The rows :func:`score` runs for ``requests`` (one per request on the fast path)."""
    return build_rows(requests, tokenizer, add_special_tokens)[0]
