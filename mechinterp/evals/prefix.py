"""Shared-prefix scoring: rows with a common leading token block run it once, the rest on its KV cache.

Exactness does not rest on how a text splits into tokens: groups are formed from the rows' *token*
ids, so every row still sees exactly the tokens lm-eval would feed it; only the computation of the
common leading tokens is shared (causal attention makes their keys and values identical in every row).

A chunk of groups runs its prefixes as one right-padded batch with the cache on; then the groups' rows
run their remaining tokens in batches over a copy of their group's cache rows. Prefixes of different
lengths leave padded slots inside the cache: the attention mask hides them and ``position_ids`` carry
each row's true positions, so nothing depends on the padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache

from ..models.loaded import LoadedModel
from .rows import Row, add_target_logprobs, body, pad_rows
from .workers import Job


@dataclass
class Group:
    rows: list[int]  # row indices
    prefix: int  # leading tokens all rows share and none of them scores


def _lcp(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_groups(rows: Sequence[Row], min_shared: int) -> list[Group]:
    """Partition rows into groups sharing a prefix of at least ``min_shared`` tokens (singletons
    otherwise). Rows are taken in lexicographic token order; a row joins the open group while the
    tokens saved (prefix x (rows - 1)) do not shrink. A prefix never reaches a scored position."""
    order = sorted(range(len(rows)), key=lambda k: rows[k].ids)
    groups: list[Group] = []
    for k in order:
        cap = min(pos for _, pos, _ in rows[k].targets)
        if groups:
            g = groups[-1]
            p = _lcp(rows[g.rows[0]].ids, rows[k].ids, min(g.prefix, cap))
            if p >= min_shared and p * len(g.rows) >= g.prefix * (len(g.rows) - 1):
                g.rows.append(k)
                g.prefix = p
                continue
        groups.append(Group([k], cap))
    for g in groups:
        if len(g.rows) == 1:
            g.prefix = 0
    return groups


def tokens_to_run(rows: Sequence[Row], groups: Sequence[Group]) -> int:
    """Tokens the model runs for ``groups``: each prefix once, then every row's remainder."""
    return sum(g.prefix + sum(len(rows[k].ids) - g.prefix for k in g.rows) for g in groups)


def best_plan(rows: Sequence[Row], candidates: Sequence[int] = (8, 16, 32, 64)) -> list[Group]:
    """The :func:`plan_groups` plan, over the ``min_shared`` candidates, that runs fewest tokens.

    One threshold does not fit every prompt set: in 0-shot MMLU every item shares the 11-token
    description opening, its subject's items ~17 tokens; a low threshold makes one group of all
    items over the short opening, a higher one a group per subject over the longer one."""
    plans = [plan_groups(rows, m) for m in candidates]
    return min(plans, key=lambda p: tokens_to_run(rows, p))


def shared_jobs(model: LoadedModel, rows: Sequence[Row], groups: Sequence[Group],
                out: list[list[float]], token_budget: int, kv_budget: int,
                advance: Callable[[int], None]) -> list[Job]:
    """Jobs (:mod:`.workers`) adding each row's target log-probabilities to
    ``out[req][continuation]``: one per chunk of groups, which runs the chunk's prefixes and
    returns the batches that run on their cache."""
    groups = sorted(groups, key=lambda g: -g.prefix)
    jobs = []
    start = 0
    while start < len(groups):
        n = max(1, token_budget // groups[start].prefix)
        jobs.append(partial(_prefix_chunk, model, rows, groups[start:start + n], out,
                            token_budget, kv_budget, advance))
        start += n
    return jobs


def _prefix_chunk(model, rows, chunk, out, token_budget, kv_budget, advance) -> list[Job]:
    pad = model.tokenizer.pad_token_id or 0
    heads = [Row(-1, rows[g.rows[0]].ids[:g.prefix], []) for g in chunk]
    ids, pmask = pad_rows(heads, pad)
    res = body(model, ids, pmask, use_cache=True)
    cache = res.cache if getattr(res, "cache", None) is not None else res.past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    members = sorted(((gi, k) for gi, g in enumerate(chunk) for k in g.rows),
                     key=lambda m: -(len(rows[m[1]].ids) - chunk[m[0]].prefix))
    width = ids.shape[1]
    batches = []
    i = 0
    while i < len(members):
        longest = len(rows[members[i][1]].ids) - chunk[members[i][0]].prefix
        m = max(1, min(token_budget // longest, kv_budget // (width + longest)))
        batches.append(partial(_score_suffixes, model, rows, chunk, members[i:i + m], kv, pmask,
                               out, pad, advance))
        i += m
    return batches


def _score_suffixes(model, rows, chunk, batch, kv, pmask, out, pad, advance) -> None:
    sel = torch.tensor([gi for gi, _ in batch], device=kv[0][0].device)
    prefix = torch.tensor([chunk[gi].prefix for gi, _ in batch])
    tails = [Row(rows[k].req, rows[k].ids[chunk[gi].prefix:], []) for gi, k in batch]
    ids, smask = pad_rows(tails, pad)
    mask = torch.cat([pmask[sel.cpu()], smask], dim=1)
    pos = prefix[:, None] + torch.arange(ids.shape[1])[None]
    # a model placed over several devices keeps each layer's cache on that layer's device
    cache = DynamicCache([(k.index_select(0, sel.to(k.device)), v.index_select(0, sel.to(v.device)))
                          for k, v in kv])
    hidden = body(model, ids, mask, position_ids=pos.to(model.device), cache=cache,
                  use_cache=True).last_hidden_state
    add_target_logprobs(model, hidden, [rows[k] for _, k in batch],
                        [chunk[gi].prefix for gi, _ in batch], out)
    advance(len(batch))
