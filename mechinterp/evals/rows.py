"""Scoring rows: token ids whose next-token predictions are read at chosen positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.loaded import LoadedModel
from .answers import log_probs_at


@dataclass
class Row:
    req: int  # request index
    ids: list[int]  # model input (tokens whose next-token predictions are read)
    targets: list[tuple[int, int, int]]  # (continuation index, position in ids, token id)


def pad_rows(rows: Sequence[Row], pad_id: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` for ``row.ids[start:]`` of each row."""
    longest = max(len(r.ids) - start for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.ids) - start
        ids[b, :n] = torch.tensor(row.ids[start:])
        mask[b, :n] = 1
    return ids, mask


def body(model: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, **kw):
    """The model without its unembedding (``hf.base_model``) on ``ids``; ``kw`` go to its forward."""
    dev = model.device
    return model.hf.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)


def hidden_logprobs(model: LoadedModel, hidden: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """``log p(tok)`` read from final hidden states at ``sel`` = rows of (batch row, position, token):
    only the selected positions go through the unembedding and the log-softmax."""
    lp = log_probs_at(model, hidden, (sel[:, 0], sel[:, 1]))  # float32 whatever the dtype
    return lp.gather(1, sel[:, 2:3].to(lp.device))[:, 0]


def add_target_logprobs(model: LoadedModel, hidden: torch.Tensor, rows: Sequence[Row],
                        offsets: Sequence[int], out: list[list[float]]) -> None:
    """Add each row's target log-probabilities to ``out[req][continuation]``; batch row ``b`` of
    ``hidden`` holds ``rows[b].ids[offsets[b]:]``."""
    meta = [(b, pos - off, tok, row.req, j)
            for b, (row, off) in enumerate(zip(rows, offsets)) for j, pos, tok in row.targets]
    vals = hidden_logprobs(model, hidden, torch.tensor([m[:3] for m in meta])).tolist()
    for (_, _, _, req, j), v in zip(meta, vals):
        out[req][j] += v
