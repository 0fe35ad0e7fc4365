"""Attribution patching (AtP) against exact patching on tiny models in float64: the estimate is
the first-order term of the exact patch, exact where the metric is linear in the site, and the
per-head split adds up to the attention-output estimate. The probes' ``scan=atp`` mode end to end:
tests/test_attribution_scan.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mechinterp.analysis.attribution import atp_scan, n_heads
from mechinterp.analysis.patching import Patch, hooked, patching
from mechinterp.models import load
from mechinterp.models.edit import plant_change
from mechinterp.models.unembed import final_hidden

PROMPTS = ["The capital of France is", "Tokyo is the capital of Japan and", "Answer: B"]
# MLP, attention value/output and query changes in layers 0 and 1
PLANTED = {(1, "down"): 0.5, (0, "v"): 0.4, (1, "o"): 0.4, (0, "q"): 0.5}
# GPT-2 computes in float64 throughout: a one-sided difference at a tiny eps is exact to ~1e-6.
# Llama's RMSNorm and rotary embeddings round to float32 even in a float64 model: a central
# difference at eps = 1e-3 (truncation ~eps^2, rounding ~1e-7 / eps).
FAMILIES = {"tiny-random-gpt2": dict(eps=1e-6, central=False, rtol=1e-4, atol=1e-6),
            "tiny-random-llama": dict(eps=1e-3, central=True, rtol=5e-3, atol=5e-3)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair64(request, tmp_path_factory):
    name = request.param
    base = load(name, device="cpu", dtype="float64", name="base")
    edit = load(name, device="cpu", dtype="float64")
    planted = {(la, {"down": edit.matrices[-1]}.get(m, m)): r for (la, m), r in PLANTED.items()}
    folder = plant_change(edit, tmp_path_factory.mktemp("v") / "planted", planted, seed=3)
    variant = load(str(folder), device="cpu", dtype="float64", name="planted")
    base.tokenizer.padding_side = "right"
    if base.tokenizer.pad_token is None:
        base.tokenizer.pad_token = base.tokenizer.eos_token
    enc = base.encode(PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = mask.sum(1) - 1
    answers = ids[:, 1]
    return base, variant, ids, mask, pos, answers, FAMILIES[name]


def logprob64(pos, ans):
    """log p(answer) in float64 end to end (the library's metric reads float32 logits)."""
    def metric(model, ids, mask):
        h = final_hidden(model.hf, ids, mask)
        rows = torch.arange(ids.shape[0])
        logits = F.linear(h[rows, pos], model.hf.get_output_embeddings().weight)
        return logits.log_softmax(-1)[rows, ans]
    return metric


def acts(model, ids, mask, keys, metric):
    store = {}

    def saver(key):
        return lambda a: store.__setitem__(key, a.detach().clone())

    with torch.no_grad(), hooked(model, {k: saver(k) for k in keys}):
        value = metric(model, ids, mask)
    return value, store


@torch.no_grad()
def patched_metric(model, ids, mask, metric, key, value):
    with patching(model, [Patch(key[0], key[1], value)]):
        return metric(model, ids, mask)


@pytest.mark.slow  # ~10 s CPU per family: ~100 patched forward passes
def test_atp_is_the_first_order_term_of_exact_patching(pair64):
    base, var, ids, mask, pos, ans, tol = pair64
    metric = logprob64(pos, ans)
    n = base.n_layers
    sites = [(s, layer) for layer in range(n) for s in ("mlp_out", "attn_out", "resid_pre")]
    scan = atp_scan(base, var, ids, mask, metric, sites, head_layers=range(n))
    m0, tgt = acts(var, ids, mask, sites + [("attn_z", layer) for layer in range(n)], metric)
    _, src = acts(base, ids, mask, list(tgt), metric)
    torch.testing.assert_close(scan.target_metric, m0, rtol=0, atol=1e-12)
    eps, close = tol["eps"], dict(rtol=tol["rtol"], atol=tol["atol"])

    def first_order(key, step):
        """(exact(eps) - m0) / eps, or the central difference; ``step(e)`` = the patched value."""
        up = patched_metric(var, ids, mask, metric, key, step(eps))
        if not tol["central"]:
            return (up - m0) / eps
        return (up - patched_metric(var, ids, mask, metric, key, step(-eps))) / (2 * eps)

    nonzero = 0
    for key in sites:
        delta = src[key] - tgt[key]
        fd = first_order(key, lambda e, key=key, delta=delta: tgt[key] + e * delta)
        torch.testing.assert_close(scan.estimate[key], fd, **close)
        nonzero += int(scan.estimate[key].abs().max() > 1e-3)
    assert nonzero >= len(sites) // 2  # the variant really differs at most sites
    h = n_heads(var)
    for layer in range(n):  # one head at a time: patch its slice of attn_z only
        key = ("attn_z", layer)
        d_head = tgt[key].shape[-1] // h
        for head in range(h):
            sl = slice(head * d_head, (head + 1) * d_head)

            def step(e, key=key, sl=sl):
                value = tgt[key].clone()
                value[..., sl] += e * (src[key] - tgt[key])[..., sl]
                return value

            fd = first_order(key, step)
            torch.testing.assert_close(scan.heads[layer][:, head], fd, **close)
    # at eps = 1 (the real patch) AtP is an approximation, not the exact effect
    key = ("resid_pre", n - 1)
    exact = patched_metric(var, ids, mask, metric, key, src[key]) - m0
    assert (exact - scan.estimate[key]).abs().max() > 1e-6


def test_atp_is_exact_when_the_metric_is_linear_in_the_site(pair64):
    """Metric w . (residual stream after the last block) at the last position: linear in the last
    block's MLP output, so AtP = w . (mlp_src - mlp_tgt)[last position] = the exact effect."""
    base, var, ids, mask, pos, _, _ = pair64
    last = base.n_layers - 1
    w = torch.randn(base.config.hidden_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))

    def metric(model, ids, mask):
        store = {}
        with hooked(model, {("resid_post", last): lambda a: store.__setitem__("h", a)}):
            final_hidden(model.hf, ids, mask)
        rows = torch.arange(ids.shape[0])
        return store["h"][rows, pos] @ w

    key = ("mlp_out", last)
    scan = atp_scan(base, var, ids, mask, metric, [key])
    m0, tgt = acts(var, ids, mask, [key], metric)
    _, src = acts(base, ids, mask, [key], metric)
    rows = torch.arange(ids.shape[0])
    hand = (src[key] - tgt[key])[rows, pos] @ w
    exact = patched_metric(var, ids, mask, metric, key, src[key]) - m0
    assert hand.abs().min() > 1e-3
    torch.testing.assert_close(scan.estimate[key], hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact, hand, rtol=1e-10, atol=1e-12)


def test_heads_sum_to_the_attention_output_estimate(pair64):
    """attn_out = W_o z (+ a bias, GPT-2's, which cancels in the difference): where both models
    share W_o (layer 0) the per-head terms of the z estimate add up to the attn_out estimate;
    Llama's o_proj has no bias. A head patch goes through the *target's* W_o, so where the
    variant's W_o was changed (layer 1) the heads miss (W_o_src - W_o_tgt) z_src . grad."""
    base, var, ids, mask, pos, ans, _ = pair64
    if var.family.name == "llama":
        assert var.hf.get_submodule("model.layers.0.self_attn.o_proj").bias is None
    n = base.n_layers
    scan = atp_scan(base, var, ids, mask, logprob64(pos, ans),
                    [("attn_out", layer) for layer in range(n)], head_layers=range(n))
    assert scan.estimate[("attn_out", 0)].abs().max() > 1e-4
    torch.testing.assert_close(scan.heads[0].sum(-1), scan.estimate[("attn_out", 0)],
                               rtol=1e-9, atol=1e-12)
    assert torch.equal(base.weight(0, "o"), var.weight(0, "o"))
    assert not torch.equal(base.weight(1, "o"), var.weight(1, "o"))  # planted
    assert (scan.heads[1].sum(-1) - scan.estimate[("attn_out", 1)]).abs().max() > 1e-3


def test_scan_leaves_no_parameter_gradients(pair64):
    base, var, ids, mask, pos, ans, tol = pair64
    atp_scan(base, var, ids, mask, logprob64(pos, ans), [("mlp_out", 0)])
    assert all(p.grad is None for p in var.hf.parameters())
