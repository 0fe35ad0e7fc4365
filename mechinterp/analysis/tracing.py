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
keys/values of positions ``< t``. Every cell x sample of a fact is one row; rows are sorted by
their first block and their tokens packed (row ``r``: positions ``t_r..T-1``), so block ``l`` runs
ONCE on the packed tokens of the rows started by then, whatever their ``t``
(:class:`~mechinterp.analysis.blocks.PackedBlocks`: fused attention over one preallocated
key/value buffer; patches written in place). A window (mlp/attn) row's first window layer sees the
corrupted input everywhere, so it changes only position ``t`` and the row starts one block later;
the last block computes only the last position. Positions before the first subject token are
identical in clean and corrupted runs, so their cells need no pass at all (restored ==
corrupted). Only the last position is unembedded.
:func:`trace_fact_naive` is the textbook loop (one full forward of the ``N`` noised rows per cell)
used as the reference in tests and in ``benchmarks/causal_trace.py``.
"""

from __future__ import annotations

import functools
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import align_module_device
from jaxtyping import Float
from torch import Tensor

from ..errors import UserError
from ..evals.stats import t_quantile
from ..models.loaded import LoadedModel
from .blocks import BlockStack, PackedBlocks, PrefixKV, packed_unsupported
from .patching import Patch, capture, hooked, run_patched

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
    out: dict[str, Tensor]                # site -> [n, 1+N, T, d] attn_out / mlp_out per layer
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
    out: dict[str, list[Tensor]] = {"mlp_out": [None] * n, "attn_out": [None] * n}

    def saver(site, layer):
        def fn(act):
            out[site][layer] = act.clone()
        return fn

    resid = [h]
    with hooked(model, {(s, layer): saver(s, layer) for s in out for layer in range(n)}):
        for layer in range(n):
            h = stack.layer(layer, h, cache, kw)
            resid.append(h)
    logits = stack.logits(h[:, -1])
    probs = logits.float().softmax(-1)[:, fact.answer_id]
    return Recording(torch.stack(resid), cache.recorded,
                     {s: torch.stack(v) for s, v in out.items()}, probs, logits.argmax(-1))


@dataclass
class _Rows:
    """One row per (kind, token, layer, sample) cell, sorted by the first block it must run.

    A row restores its condition at token ``t``; ``entry`` is the first block run on positions
    ``t..T-1``; its input is the corrupted run's with position ``t`` set to the row's start vector
    (:func:`_start_vectors`). ``[lo, hi)`` is the row's window (mlp/attn): layers ``entry..hi-1``
    are still patched at ``t`` (hidden: ``[L, L+1)``, nothing left to patch).
    """

    kind: Tensor    # 0 hidden, 1 mlp, 2 attn
    token: Tensor
    layer: Tensor   # cell layer L
    sample: Tensor  # noise sample index (0..N-1)
    entry: Tensor
    lo: Tensor
    hi: Tensor

    def take(self, idx) -> _Rows:
        return _Rows(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.kind)


def _all_rows(kinds, tokens: range, n_layers: int, n_samples: int, window: int) -> _Rows:
    cols = {f: [] for f in _Rows.__dataclass_fields__}
    for k in kinds:
        for t in tokens:
            for L in range(n_layers):
                if k == "hidden":
                    lo, hi, entry = L, L + 1, L + 1
                else:
                    w = windows(L, n_layers, window)
                    lo, hi, entry = w[0], w[-1] + 1, w[0] + 1
                for s in range(n_samples):
                    for f, v in zip(cols, (KINDS.index(k), t, L, s, entry, lo, hi)):
                        cols[f].append(v)
    rows = _Rows(*(torch.tensor(v) for v in cols.values()))
    return rows.take(torch.argsort(rows.entry, stable=True))


@torch.no_grad()
def _start_vectors(packed: PackedBlocks, rec: Recording, rows: _Rows) -> Float[Tensor, "R d"]:
    """Input of block ``entry`` at token ``t`` for each row.

    hidden: the clean ``resid_post[L]``. A window row's first window layer ``a`` sees the
    corrupted input everywhere, so it changes only position ``t``: mlp gives corrupted
    ``resid_mid + clean mlp_out``; attn gives ``v + mlp(v)`` with ``v`` = corrupted resid_pre +
    clean attn_out (one token through one MLP). All other positions of block ``a``'s output are
    the corrupted run's.
    """
    t, s1, a = rows.token, 1 + rows.sample, rows.lo
    out = rec.resid[rows.entry, 0, t]  # hidden: clean resid_post[L] = resid[L + 1]
    attn, mlp = rec.out["attn_out"], rec.out["mlp_out"]
    sel = (rows.kind == 1).nonzero().flatten()
    if len(sel):
        out[sel] = (rec.resid[a[sel], s1[sel], t[sel]] + attn[a[sel], s1[sel], t[sel]]) \
            + mlp[a[sel], 0, t[sel]]
    sel = (rows.kind == 2).nonzero().flatten()
    for layer in a[sel].unique().tolist():
        idx = sel[a[sel] == layer]
        v = rec.resid[layer, s1[idx], t[idx]] + attn[layer, 0, t[idx]]
        out[idx] = v + packed.mlp_out(layer, v)
    return out


@torch.no_grad()
def _finish_block(packed: PackedBlocks, layer: int, x: Tensor, o: Tensor, rows: _Rows, k: int,
                  sel_at: Tensor | None, T: int, patched: dict[str, Tensor]) -> None:
    """The rest of block ``layer`` after the attention core, in place on ``x`` (the first ``k``
    rows' packed tokens; only their last position when ``sel_at`` is None, the top block):
    attention output, then MLP, each added to ``x``. Rows whose restored window still covers
    the layer get the clean output at their restore position (``sel_at``: the packed index of
    each row's token t)."""
    top = sel_at is None
    outs = {"attn_out": packed.attn_out(layer, o)}
    live = (rows.lo[:k] < layer) & (rows.hi[:k] > layer)
    if top:
        live &= rows.token[:k] == T - 1
    for kind, site in ((2, "attn_out"), (1, "mlp_out")):
        if site == "mlp_out":
            x.add_(outs["attn_out"])
            outs[site] = packed.mlp_out(layer, x)
        sel = (live & (rows.kind[:k] == kind)).nonzero().flatten()
        if len(sel):
            at = sel if top else sel_at[sel]
            outs[site][at] = patched[site][layer, rows.token[sel]]
    x.add_(outs["mlp_out"])


@torch.no_grad()
def _restore_rows(packed: PackedBlocks, rec: Recording, rows: _Rows, n_tokens: int,
                  answer_id: int) -> Tensor:
    """Answer probability for each row (sorted by entry) after restoring its condition.

    Tokens of all rows are packed ``[row, position >= t]`` in row order, so the tokens of the rows
    that have started by block ``l`` are a prefix: one call per layer covers every token and
    restore position. Positions ``< t`` of a row come from the recording (its keys/values are
    copied into the preallocated buffer before the new ones are written). The last block computes
    only the last position's output (nothing reads the others).
    """
    n, T = packed.stack.n_layers, n_tokens
    R = len(rows)
    length = T - rows.token
    first = torch.cumsum(length, 0) - length        # packed index of each row's token t
    tok_row = torch.repeat_interleave(torch.arange(R), length)
    tok_pos = torch.arange(int(length.sum())) - first[tok_row] + rows.token[tok_row]
    last = first + length - 1                      # each row's last position
    s1 = 1 + rows.sample
    h = rec.resid[rows.entry[tok_row], s1[tok_row], tok_pos]  # corrupted input of the entry block
    h[first] = _start_vectors(packed, rec, rows)
    kv_rows = min(R, int(torch.searchsorted(rows.entry, n - 1, right=True)))
    dtype = h.dtype
    shape = (kv_rows, packed.kv_heads, T, packed.head_dim)
    k_buf, v_buf = h.new_empty(shape), h.new_empty(shape)
    q_buf = h.new_zeros(kv_rows, packed.heads, T, packed.head_dim)
    patched = {site: rec.out[site][:, 0].to(dtype) for site in ("attn_out", "mlp_out")}
    for layer in range(int(rows.entry[0]), n):
        k = int(torch.searchsorted(rows.entry, layer, right=True))
        if k == 0:
            continue
        A = int(first[k - 1] + length[k - 1])
        r, p = tok_row[:A], tok_pos[:A]
        xn = packed.normed(layer, h[:A])
        key, val = packed.kv(layer, xn, p)
        rec_k, rec_v = rec.kv[layer]
        torch.index_select(rec_k, 0, s1[:k], out=k_buf[:k])
        torch.index_select(rec_v, 0, s1[:k], out=v_buf[:k])
        k_buf[r, :, p] = key
        v_buf[r, :, p] = val
        top = layer == n - 1
        q_idx = last[:k] if top else torch.arange(A)  # packed tokens whose output is needed
        q_row, q_pos = tok_row[q_idx], tok_pos[q_idx]
        q_buf[q_row, :, q_pos] = packed.queries(layer, xn[q_idx], q_pos)
        o = packed.attend(layer, q_buf[:k], k_buf[:k], v_buf[:k])[q_row, :, q_pos]
        x = h[q_idx] if top else h[:A]
        _finish_block(packed, layer, x, o, rows, k, sel_at=None if top else first, T=T,
                      patched=patched)
        if top:
            h[q_idx] = x
    logits = packed.stack.logits(h[last]).float()
    return (logits[:, answer_id] - logits.logsumexp(-1)).exp()  # softmax of one entry


def trace_fact(model: LoadedModel, fact: FactInput, noise: Tensor, kinds=KINDS,
               window: int = 10, max_rows: int = 4096, max_tokens: int | None = None,
               stack: BlockStack | None = None) -> FactTrace:
    """Fast causal trace of one fact (see module docstring); equals :func:`trace_fact_naive`.

    Rows (cells x samples) are sorted by their first block and cut into chunks of at most
    ``max_rows`` rows and ``max_tokens`` packed tokens; each chunk is one call per layer.
    ``max_tokens`` defaults to 1024 on a CPU, where a chunk's MLP activations (tokens x
    d_mlp floats) must stay in cache: at 16384 the elementwise ops turn memory-bound and the
    trace took 20% longer (58 against 47 CPU s, SmolLM2-135M, 10 samples), and
    to 16384 on a GPU (fewer, larger launches).
    """
    stack = stack or BlockStack(model)
    if max_tokens is None:
        max_tokens = 1024 if torch.device(model.device).type == "cpu" else 16384
    n, T, N = stack.n_layers, fact.n_tokens, noise.shape[0]
    if (why := packed_unsupported(stack, T)) is not None:  # e.g. OLMo-2 blocks: same numbers,
        _warn_naive(why)                                   # one forward per cell
        return trace_fact_naive(model, fact, noise, kinds, window)
    with model.fused_attention():
        rec = record(model, fact, noise, stack)
    clean, corrupted = float(rec.probs[0]), float(rec.probs[1:].mean())
    scores = {k: np.full((T, n), corrupted, dtype=np.float64) for k in kinds}
    rows = _all_rows(kinds, range(fact.subject[0], T), n, N, window)
    packed = PackedBlocks(stack, T)
    probs = torch.empty(len(rows))
    ntok = torch.cumsum(T - rows.token, 0)
    a = 0
    while a < len(rows):
        before = int(ntok[a - 1]) if a else 0
        b = int(torch.searchsorted(ntok, before + max_tokens, right=True))
        b = min(max(b, a + 1), a + max_rows, len(rows))
        probs[a:b] = _restore_rows(packed, rec, rows.take(slice(a, b)), T, fact.answer_id)
        a = b
    for kind in kinds:
        sel = rows.kind == KINDS.index(kind)
        grid = torch.zeros(T * n, dtype=torch.float64)
        grid.index_add_(0, (rows.token * n + rows.layer)[sel], probs[sel].double())
        g = (grid / N).view(T, n).numpy()
        scores[kind][fact.subject[0]:] = g[fact.subject[0]:]
    return FactTrace(clean, corrupted, int(rec.top1[0]) == fact.answer_id, scores)


@functools.cache
def _warn_naive(why: str) -> None:
    warnings.warn(f"causal tracing falls back to the naive loop (one forward per cell, several "
                  f"times slower): {why}", stacklevel=3)


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
