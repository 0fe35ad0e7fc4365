"""Causal tracing (Meng et al. 2022, ROME) with a fast, batched engine and a naive reference.

For one fact (a prompt, the subject inside it, the answer):

1. *clean* run: the prompt as is; *corrupted* runs: Gaussian noise added to the input embeddings
   of the subject tokens (``N`` samples, the same draws for every cell and every model);
2. for each cell (token ``t``, layer ``L``) and kind, restore a clean activation in the corrupted
   runs and read the probability of the answer token at the last position (mean over samples):

   - ``hidden``: the residual stream after block ``L`` (``resid_post``) at token ``t``;
   - ``mlp`` / ``attn``: the MLP / attention output at token ``t`` in every layer of the window
     ``range(max(0, L - w//2), min(n, L + w - w//2))`` (ROME's window, ``w`` = 10 by default).

Indirect effect = restored - corrupted probability.

The answer token is the first token after the prompt's tokens in ``prompt + " " + attribute``
(:func:`answer_token_id`; the gold attribute of the fact, not the ``prediction`` field, which is
GPT-2 XL's continuation). A model "knows" a fact when that token is its top-1 prediction after the
clean prompt.

Fast engine (:func:`trace_fact`). Restoring at (``t``, ``L``) cannot change positions ``< t`` (the
model is causal) nor anything before the first layer it touches. So one *recording* run of the
clean and corrupted rows keeps every layer's input and keys/values; each cell then runs only the
blocks from its first changed layer on, only for positions ``>= t``, attending to the recorded
keys/values of positions ``< t`` (:class:`~mechinterp.analysis.blocks.BlockStack`). Cells of all
three kinds and every layer that share ``t`` go in one batch, sorted by first layer, so block
``l`` runs on exactly the rows that have started by then. Positions before the first subject
token are identical in clean and corrupted runs, so their cells need no pass at all (restored ==
corrupted). Only the last position is unembedded.
:func:`trace_fact_naive` is the textbook loop (one full forward of the ``N`` noised rows per cell)
used as the reference in tests and in ``benchmarks/causal_trace.py``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import UserError
from ..models.loaded import LoadedModel
from .blocks import BlockStack, PrefixKV
from .patching import Patch, capture, hooked, patching, run_patched

KINDS = ("hidden", "mlp", "attn")
SITE_OF_KIND = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
TOKEN_GROUPS = ("first_subject", "middle_subject", "last_subject", "first_after", "further",
                "last")


@dataclass
class FactInput:
    """A fact tokenised for tracing: ids, the subject's token range ``[start, end)``, answer id."""

    name: str
    input_ids: list[int]
    subject: tuple[int, int]
    answer_id: int
    tokens: list[str]
    answer_ids: tuple[int, ...] = ()  # every token of the answer after the prompt (strict rule)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class FactTrace:
    """Restored answer probability per kind, ``scores[kind][token, layer]``."""

    clean_prob: float
    corrupted_prob: float
    correct: bool
    scores: dict[str, np.ndarray] = field(default_factory=dict)


# ----- inputs -------------------------------------------------------------------------------------
def prepare_fact(tokenizer, prompt: str, subject: str, answer: str, name: str) -> FactInput:
    """Tokenise ``prompt`` and find the subject's tokens from the tokenizer's character offsets."""
    start = prompt.find(subject) if subject else -1
    if start < 0:
        raise UserError(f"fact {name}: subject {subject!r} does not occur in its prompt {prompt!r}",
                        "fix the fact or leave it out of the fact set")
    end = start + len(subject)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not inside:
        raise UserError(f"fact {name}: no token of the prompt covers the subject {subject!r}",
                        "check the tokenizer's offsets for this prompt")
    answer_ids = answer_token_ids(tokenizer, prompt, answer, name=f"fact {name}")
    tokens = [tokenizer.decode([i]) for i in ids]
    return FactInput(name, ids, (inside[0], inside[-1] + 1), answer_ids[0], tokens,
                     tuple(answer_ids))


def answer_token_id(tokenizer, prompt: str, answer: str, name: str = "an item") -> int:
    """The first token of :func:`answer_token_ids`."""
    return answer_token_ids(tokenizer, prompt, answer, name)[0]


def answer_token_ids(tokenizer, prompt: str, answer: str, name: str = "an item") -> list[int]:
    """The tokens a model must predict after ``prompt`` to say ``answer``: ``prompt + " " +
    answer`` is tokenised whole and the tokens after the prompt's own tokens are taken.

    Encoding ``" " + answer`` alone is wrong for SentencePiece tokenizers (Llama-2, Mistral): the
    dummy prefix makes it ``["▁", "▁Paris"]``, and a lone ``"▁"`` is never the prediction. Special
    tokens are left out of both encodings (they do not move the boundary). A prompt whose tokens
    change when the answer follows (e.g. one ending in a space that merges with the answer) has
    no such token: :class:`UserError`.
    """
    answer = answer.strip()
    if not answer:
        raise UserError(f"{name}: empty answer", "give every item an answer")
    sep = "" if prompt[-1:].isspace() else " "
    p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(prompt + sep + answer, add_special_tokens=False)["input_ids"])
    if whole[:len(p_ids)] != p_ids or len(whole) <= len(p_ids):
        raise UserError(f"{name}: the prompt's tokens change when the answer {answer!r} follows "
                        f"({prompt[-30:]!r})", "end the prompt where a token boundary falls "
                        "(e.g. without a trailing space)")
    return [int(t) for t in whole[len(p_ids):]]


def embedding_std(model: LoadedModel, facts: list[FactInput]) -> float:
    """Standard deviation of the input embeddings of all subject tokens of ``facts`` (ROME)."""
    from accelerate.utils import align_module_device

    module = model.hf.get_input_embeddings()
    ids = [i for f in facts for i in f.input_ids[f.subject[0]:f.subject[1]]]
    with align_module_device(module):  # onloaded for the duration when accelerate offloaded it
        emb = module.weight.detach()
        return float(emb[torch.tensor(ids, device=emb.device)].double().std())


def make_noise(fact: FactInput, n_samples: int, scale: float, d_model: int, seed: int,
               ) -> Float[Tensor, "samples subject d"]:
    """Seeded Gaussian noise for the subject tokens (same draws for every model and cell)."""
    gen = torch.Generator().manual_seed(seed)
    n_subj = fact.subject[1] - fact.subject[0]
    return torch.randn(n_samples, n_subj, d_model, generator=gen, dtype=torch.float32) * scale


@contextmanager
def noised_embeddings(model: LoadedModel, noise: Tensor, positions: tuple[int, int],
                      first_row: int = 0):
    """Add ``noise[s]`` to rows ``first_row + s`` of the input embeddings at ``positions``."""
    a, b = positions

    def hook(mod, args, out):
        out = out.clone()
        rows = slice(first_row, first_row + noise.shape[0])
        out[rows, a:b] += noise.to(out.dtype).to(out.device)
        return out

    handle = model.hf.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def windows(layer: int, n_layers: int, window: int) -> list[int]:
    """ROME's window of layers around ``layer`` for the mlp/attn kinds."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _layers_of(kind: str, layer: int, n_layers: int, window: int) -> list[int]:
    return [layer] if kind == "hidden" else windows(layer, n_layers, window)


# ----- fast engine --------------------------------------------------------------------------------
@dataclass
class Recording:
    """What the clean (row 0) and corrupted (rows 1..N) runs computed, layer by layer."""

    resid: Tensor  # [n+1, 1+N, T, d]: input of each block, then the last block's output
    kv: dict[int, tuple[Tensor, Tensor]]  # layer -> keys, values [1+N, kv_heads, T, head_dim]
    clean_out: dict[str, list[Tensor]]    # site -> per layer clean output [T, d]
    probs: Tensor                         # [1+N] answer probability at the last position
    top1: Tensor                          # [1+N] top-1 token at the last position


@torch.no_grad()
def record(model: LoadedModel, fact: FactInput, noise: Tensor,
           stack: BlockStack | None = None) -> Recording:
    stack = stack or BlockStack(model)
    n = stack.n_layers
    ids = torch.tensor([fact.input_ids], device=model.device).expand(1 + noise.shape[0], -1)
    with noised_embeddings(model, noise, fact.subject, first_row=1):
        h = stack.embed_input(ids)
    kw = stack.block_kwargs(h, 0)
    cache = PrefixKV(record=True)
    clean_out: dict[str, list[Tensor]] = {"mlp_out": [None] * n, "attn_out": [None] * n}

    def saver(site, layer):
        def fn(act):
            clean_out[site][layer] = act[0].clone()
        return fn

    resid = [h]

    with hooked(model, {(s, layer): saver(s, layer) for s in clean_out for layer in range(n)}):
        for layer in range(n):
            h = stack.layer(layer, h, cache, kw)
            resid.append(h)
    logits = stack.logits(h[:, -1])
    probs = logits.float().softmax(-1)[:, fact.answer_id]
    return Recording(torch.stack(resid), cache.recorded, clean_out, probs, logits.argmax(-1))


@dataclass
class _Rows:
    """Restoration conditions x samples for one token, sorted by the first layer they change."""

    kind: list[str]
    layer: Tensor    # cell layer L
    sample: Tensor   # noise sample index (0..N-1)
    entry: Tensor    # first block to run (hidden: L+1; windows: first window layer)


def _rows_for_token(kinds, n_layers: int, n_samples: int, window: int) -> _Rows:
    kind, layer, sample, entry = [], [], [], []
    for k in kinds:
        for L in range(n_layers):
            e = L + 1 if k == "hidden" else _layers_of(k, L, n_layers, window)[0]
            for s in range(n_samples):
                kind.append(k), layer.append(L), sample.append(s), entry.append(e)
    entry_t = torch.tensor(entry)
    order = torch.argsort(entry_t, stable=True)
    return _Rows([kind[i] for i in order.tolist()], torch.tensor(layer)[order],
                 torch.tensor(sample)[order], entry_t[order])


@torch.no_grad()
def _restore_token(stack: BlockStack, rec: Recording, rows: _Rows, t: int, answer_id: int,
                   window: int) -> Tensor:
    """Answer probability for each row after restoring its condition at token ``t``."""
    model, n = stack.model, stack.n_layers
    resid = rec.resid
    h = resid[rows.entry, 1 + rows.sample, t:].clone()  # corrupted input of the entry block
    hid = torch.tensor([i for i, k in enumerate(rows.kind) if k == "hidden"], dtype=torch.long)
    if len(hid):
        h[hid, 0] = resid[rows.entry[hid], 0, t]  # clean resid_post[L] at token t
    kw = stack.block_kwargs(h[:1], t)
    cache = PrefixKV()
    is_kind = {k: torch.tensor([r == k for r in rows.kind]) for k in ("mlp", "attn")}
    lo = rows.layer - window // 2
    hi = rows.layer - (-window // 2)
    first = int(rows.entry.min())
    for layer in range(first, n):
        k = int(torch.searchsorted(rows.entry, layer, right=True))
        if k == 0:
            continue
        kv_k, kv_v = rec.kv[layer]
        src = 1 + rows.sample[:k]
        cache.prefix[layer] = (kv_k[src, :, :t], kv_v[src, :, :t])
        patches = []
        for kind in ("mlp", "attn"):
            sel = is_kind[kind][:k] & (lo[:k] <= layer) & (hi[:k] > layer)
            idx = sel.nonzero().flatten()
            if len(idx):
                site = SITE_OF_KIND[kind]
                patches.append(Patch(site, layer, rec.clean_out[site][layer][t], rows=idx,
                                     positions=torch.tensor([0])))
        with patching(model, patches):
            h[:k] = stack.layer(layer, h[:k], cache, kw)
        cache.prefix.pop(layer)
    logits = stack.logits(h[:, -1])
    return logits.float().softmax(-1)[:, answer_id]


def trace_fact(model: LoadedModel, fact: FactInput, noise: Tensor, kinds=KINDS,
               window: int = 10, max_rows: int = 1024, stack: BlockStack | None = None,
               ) -> FactTrace:
    """Fast causal trace of one fact (see module docstring); equals :func:`trace_fact_naive`."""
    stack = stack or BlockStack(model)
    n, T, N = stack.n_layers, fact.n_tokens, noise.shape[0]
    rec = record(model, fact, noise, stack)
    clean, corrupted = float(rec.probs[0]), float(rec.probs[1:].mean())
    scores = {k: np.full((T, n), corrupted, dtype=np.float64) for k in kinds}
    rows = _rows_for_token(kinds, n, N, window)
    for t in range(fact.subject[0], T):
        probs = torch.empty(len(rows.kind))
        for a in range(0, len(rows.kind), max_rows):  # contiguous chunks keep the entry order
            b = a + max_rows
            chunk = _Rows(rows.kind[a:b], rows.layer[a:b], rows.sample[a:b], rows.entry[a:b])
            probs[a:b] = _restore_token(stack, rec, chunk, t, fact.answer_id, window)
        for kind in kinds:
            sel = torch.tensor([r == kind for r in rows.kind])
            grid = torch.zeros(n, dtype=torch.float64)
            grid.index_add_(0, rows.layer[sel], probs[sel].double())
            scores[kind][t] = (grid / N).numpy()
    return FactTrace(clean, corrupted, int(rec.top1[0]) == fact.answer_id, scores)


# ----- naive reference ----------------------------------------------------------------------------
@torch.no_grad()
def trace_fact_naive(model: LoadedModel, fact: FactInput, noise: Tensor, kinds=KINDS,
                     window: int = 10, cells: list[tuple[str, int, int]] | None = None,
                     ) -> FactTrace:
    """One full forward of the ``N`` noised rows per (kind, token, layer) cell.

    ``cells`` restricts the loop (for timing a subset); other cells are left NaN.
    """
    n, T, N = model.n_layers, fact.n_tokens, noise.shape[0]
    ids = torch.tensor([fact.input_ids], device=model.device)
    sites = [(s, layer) for s in SITE_OF_KIND.values() for layer in range(n)]
    clean_logits, clean = capture(model, ids, None, sites)
    noised = ids.expand(N, -1)

    def prob(patches) -> float:
        with noised_embeddings(model, noise, fact.subject):
            logits = run_patched(model, noised, None, patches)
        return float(logits[:, -1].float().softmax(-1)[:, fact.answer_id].mean())

    corrupted = prob([])
    clean_p = float(clean_logits[0, -1].float().softmax(-1)[fact.answer_id])
    scores = {k: np.full((T, n), math.nan) for k in kinds}
    todo = cells or [(k, t, L) for k in kinds for t in range(T) for L in range(n)]
    for kind, t, L in todo:
        site = SITE_OF_KIND[kind]
        pos = torch.tensor([t])
        patches = [Patch(site, w, clean[(site, w)][:, t:t + 1], positions=pos)
                   for w in _layers_of(kind, L, n, window)]
        scores[kind][t, L] = prob(patches)
    correct = int(clean_logits[0, -1].argmax()) == fact.answer_id
    return FactTrace(clean_p, corrupted, correct, scores)


# ----- summaries ----------------------------------------------------------------------------------
def token_groups(n_tokens: int, subject: tuple[int, int]) -> dict[str, list[int]]:
    """ROME's token groups; a group may be empty (e.g. no middle token of a 2-token subject)."""
    s, e = subject
    return {
        "first_subject": [s],
        "middle_subject": list(range(s + 1, e - 1)),
        "last_subject": [e - 1],
        "first_after": [e] if e < n_tokens else [],
        "further": list(range(e + 1, n_tokens - 1)),
        "last": [n_tokens - 1],
    }


def fact_group_effects(fact: FactInput, tr: FactTrace, kind: str) -> dict[str, np.ndarray]:
    """One fact's indirect effect per token group (mean over the group's tokens of restored minus
    corrupted probability), per layer; groups the fact does not have are absent."""
    out = {}
    for group, pos in token_groups(fact.n_tokens, fact.subject).items():
        if pos:
            out[group] = (tr.scores[kind][pos] - tr.corrupted_prob).mean(0)
    return out


def mean_t_interval(rows: list[np.ndarray], n_layers: int) -> dict[str, list[float] | int]:
    """``{"mean", "lo", "hi", "n"}`` per layer over ``rows`` (one per fact): Student-t 95%
    intervals, which at the handful of facts a CPU traces are much wider than normal ones."""
    from ..evals.stats import t_quantile

    if not rows:
        nan = [math.nan] * n_layers
        return {"mean": nan, "lo": nan, "hi": nan, "n": 0}
    arr = np.stack(rows)
    mean = arr.mean(0)
    if len(arr) > 1:
        half = t_quantile(0.975, len(arr) - 1) * arr.std(0, ddof=1) / math.sqrt(len(arr))
    else:
        half = np.full_like(mean, math.nan)
    return {"mean": mean.tolist(), "lo": (mean - half).tolist(), "hi": (mean + half).tolist(),
            "n": len(arr)}


def aie_summary(traces: list[tuple[FactInput, FactTrace]], kinds=KINDS,
                ) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Average indirect effect per kind and token group, with a Student-t 95% interval over facts.

    A fact's value for a group is the mean indirect effect over the group's tokens; facts whose
    group is empty do not count for that group. Returns ``{kind: {group: {"mean", "lo", "hi",
    "n"}}}`` with lists over layers (``n`` is the number of facts per group).
    """
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for kind in kinds:
        n_layers = traces[0][1].scores[kind].shape[1] if traces else 0
        per = [fact_group_effects(f, tr, kind) for f, tr in traces]
        out[kind] = {g: mean_t_interval([e[g] for e in per if g in e], n_layers)
                     for g in TOKEN_GROUPS}
    return out
