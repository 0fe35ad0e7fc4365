"""Causal tracing: the fast engine equals the naive loop; identities that must hold exactly."""

import numpy as np
import pytest
import torch

from mechinterp.analysis.blocks import BlockStack
from mechinterp.analysis.patching import Patch, capture, run_patched
from mechinterp.analysis.tracing import (
    KINDS,
    FactInput,
    FactTrace,
    aie_summary,
    embedding_std,
    make_noise,
    noised_embeddings,
    prepare_fact,
    token_groups,
    trace_fact,
    trace_fact_naive,
    windows,
)
from mechinterp.errors import UserError
from mechinterp.models import load

PROMPT, SUBJECT, ANSWER = "Tokyo is the capital of", "Tokyo", "Japan"


@pytest.fixture(scope="module", params=["tiny-random-llama", "tiny-random-gpt2"])
def tiny(request):
    return load(request.param, device="cpu", dtype="float32")


def _fact(model, prompt=PROMPT, subject=SUBJECT, answer=ANSWER):
    return prepare_fact(model.tokenizer, prompt, subject, answer, "test-fact")


def _noise(model, fact, n=3, mult=3.0, seed=0):
    d = model.hf.get_input_embeddings().weight.shape[1]
    return make_noise(fact, n, mult * embedding_std(model, [fact]), d, seed)


def test_subject_located_from_offsets(tiny):
    f = _fact(tiny, "The Eiffel Tower is located in Paris", "Eiffel Tower", "France")
    s, e = f.subject
    text = "".join(f.tokens[s:e])
    assert "Eiffel Tower" in text and "The" not in text and "located" not in text
    assert "".join(f.tokens) == "The Eiffel Tower is located in Paris"


def test_missing_subject_is_a_user_error_naming_the_fact(tiny):
    with pytest.raises(UserError, match="fact test-fact: subject 'Kyoto'"):
        _fact(tiny, subject="Kyoto")


def test_fast_equals_naive(tiny):
    """Every cell of every kind, with the subject in mid-prompt (prefix cells skipped)."""
    f = _fact(tiny, "The capital of Japan is Tokyo", "Japan", "Tokyo")
    assert f.subject[0] > 0  # exercises the skipped prefix
    noise = _noise(tiny, f, mult=10.0)
    fast = trace_fact(tiny, f, noise, KINDS, window=2, max_rows=7)  # odd chunks on purpose
    naive = trace_fact_naive(tiny, f, noise, KINDS, window=2)
    assert fast.clean_prob == pytest.approx(naive.clean_prob, abs=1e-6)
    assert fast.corrupted_prob == pytest.approx(naive.corrupted_prob, abs=1e-6)
    for k in KINDS:
        assert np.abs(fast.scores[k] - naive.scores[k]).max() <= 1e-5, k
        # the grid is not trivially constant: restorations do change the probability
        assert np.ptp(naive.scores[k]) > 1e-4, k


def test_clean_and_corrupted_match_independent_hf_runs(tiny):
    """Clean p from plain HF logits; corrupted p from inputs_embeds with the noise added by hand."""
    f = _fact(tiny)
    noise = _noise(tiny, f)
    tr = trace_fact(tiny, f, noise, ("hidden",), window=2)
    ids = torch.tensor([f.input_ids])
    with torch.no_grad():
        clean = tiny.hf(input_ids=ids).logits[0, -1].softmax(-1)[f.answer_id]
        emb = tiny.hf.get_input_embeddings()(ids).repeat(noise.shape[0], 1, 1)
        emb[:, f.subject[0]:f.subject[1]] += noise
        corrupted = tiny.hf(inputs_embeds=emb).logits[:, -1].softmax(-1)[:, f.answer_id].mean()
    assert tr.clean_prob == pytest.approx(float(clean), abs=1e-6)
    assert tr.corrupted_prob == pytest.approx(float(corrupted), abs=1e-6)
    assert abs(tr.clean_prob - tr.corrupted_prob) > 1e-5  # the noise does something
    # restoring the last layer's hidden state at the last token gives the clean logits exactly
    assert tr.scores["hidden"][-1, -1] == pytest.approx(tr.clean_prob, abs=1e-6)


def test_restore_everything_is_clean_restore_nothing_is_corrupted(tiny):
    f = _fact(tiny)
    noise = _noise(tiny, f)
    ids = torch.tensor([f.input_ids])
    n = tiny.n_layers
    _, clean = capture(tiny, ids, None, [("resid_post", layer) for layer in range(n)])
    noised = ids.expand(noise.shape[0], -1)
    everything = [Patch("resid_post", layer, clean[("resid_post", layer)]) for layer in range(n)]
    with noised_embeddings(tiny, noise, f.subject):
        all_restored = run_patched(tiny, noised, None, everything)[:, -1].softmax(-1)
        nothing = run_patched(tiny, noised, None, [])[:, -1].softmax(-1)
    tr = trace_fact(tiny, f, noise, ("hidden",), window=2)
    assert float(all_restored[:, f.answer_id].mean()) == pytest.approx(tr.clean_prob, abs=1e-6)
    assert float(nothing[:, f.answer_id].mean()) == pytest.approx(tr.corrupted_prob, abs=1e-6)


def test_block_stack_reproduces_hf_logits(tiny):
    """Running the blocks ourselves, in two halves with recorded keys/values, equals HF."""
    from mechinterp.analysis.blocks import PrefixKV

    ids = torch.tensor([_fact(tiny).input_ids])
    stack = BlockStack(tiny)
    with torch.no_grad():
        ref = tiny.hf(input_ids=ids).logits[0, -1]
        h = stack.embed_input(ids)
        rec = PrefixKV(record=True)
        kw = stack.block_kwargs(h, 0)
        for layer in range(tiny.n_layers):
            h = stack.layer(layer, h, rec, kw)
        t = 3  # now positions >= t only, attending to recorded keys/values of positions < t
        h2 = stack.embed_input(ids)[:, t:]
        pre = PrefixKV()
        kw2 = stack.block_kwargs(h2, t)
        for layer in range(tiny.n_layers):
            pre.prefix[layer] = tuple(x[:, :, :t] for x in rec.recorded[layer])
            h2 = stack.layer(layer, h2, pre, kw2)
    torch.testing.assert_close(stack.logits(h[:, -1])[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(stack.logits(h2[:, -1])[0], ref, atol=1e-5, rtol=0)


def test_noise_is_seeded_and_scaled():
    f = FactInput("f", [1, 2, 3, 4], (1, 3), 5, ["a", "b", "c", "d"])
    a, b = make_noise(f, 4, 2.0, 8, seed=7), make_noise(f, 4, 2.0, 8, seed=7)
    assert torch.equal(a, b) and a.shape == (4, 2, 8)
    assert not torch.equal(a, make_noise(f, 4, 2.0, 8, seed=8))
    big = make_noise(f, 2000, 2.0, 64, seed=0)
    assert float(big.std()) == pytest.approx(2.0, rel=0.01)


def test_windows_match_rome():
    assert windows(0, 30, 10) == list(range(5))
    assert windows(12, 30, 10) == list(range(7, 17))
    assert windows(29, 30, 10) == list(range(24, 30))
    assert windows(3, 4, 1) == [3]


def test_token_groups_and_aie_by_hand():
    groups = token_groups(8, (1, 4))  # tokens 0 | 1 2 3 (subject) | 4 5 6 7
    assert groups == {"first_subject": [1], "middle_subject": [2], "last_subject": [3],
                      "first_after": [4], "further": [5, 6], "last": [7]}
    assert token_groups(4, (0, 1))["middle_subject"] == []
    # two facts, 8 tokens x 2 layers; fact B has a one-token subject (no middle)
    fa = FactInput("a", list(range(8)), (1, 4), 0, [""] * 8)
    fb = FactInput("b", list(range(6)), (2, 3), 0, [""] * 6)
    sa = np.arange(16, dtype=float).reshape(8, 2) / 100
    sb = np.full((6, 2), 0.5)
    sb[4:] = 0.9  # further = [4], last = [5]
    traces = [(fa, FactTrace(0.9, 0.1, True, {"hidden": sa})),
              (fb, FactTrace(0.9, 0.2, True, {"hidden": sb}))]
    out = aie_summary(traces, ("hidden",))["hidden"]
    # first subject: fact a token 1 -> [0.02, 0.03] - 0.1; fact b token 2 -> 0.5 - 0.2
    np.testing.assert_allclose(out["first_subject"]["mean"],
                               [((0.02 - 0.1) + 0.3) / 2, ((0.03 - 0.1) + 0.3) / 2])
    assert out["middle_subject"]["n"] == 1  # fact b has no middle token
    np.testing.assert_allclose(out["middle_subject"]["mean"], [0.04 - 0.1, 0.05 - 0.1])
    # further: fact a tokens 5, 6 averaged; fact b token 4
    fa_further = (sa[5] + sa[6]) / 2 - 0.1
    np.testing.assert_allclose(out["further"]["mean"], (fa_further + (0.9 - 0.2)) / 2)
    vals = np.array([fa_further, [0.7, 0.7]])
    half = 12.7062 * vals.std(0, ddof=1) / np.sqrt(2)  # t(0.975, df=1) from the table: n = 2
    np.testing.assert_allclose(out["further"]["hi"], vals.mean(0) + half, rtol=1e-5)


def test_embedding_std_by_hand():
    """Std (n - 1, as ROME's torch.std) of all coordinates of the subject tokens' embeddings,
    each occurrence counted; tokens outside the subjects do not enter."""
    from types import SimpleNamespace

    emb = torch.nn.Embedding(5, 2)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, -2.0], [4.0, 4.0],
                                       [9.0, 9.0]]))
    model = SimpleNamespace(hf=SimpleNamespace(get_input_embeddings=lambda: emb))
    facts = [FactInput("a", [0, 1, 2, 3], (1, 3), 0, []),  # tokens 1, 2
             FactInput("b", [4, 3, 1], (1, 2), 0, []),  # token 3
             FactInput("c", [1, 4], (0, 1), 0, [])]  # token 1 again
    # values 1 3 2 -2 4 4 1 3: mean 2, squared deviations 1 1 0 16 4 4 1 1 = 28, / 7 = 4
    assert embedding_std(model, facts) == pytest.approx(2.0, abs=1e-12)
    # one fact: values 1 3 2 -2, mean 1, squared deviations 0 4 1 9 = 14, / 3
    assert embedding_std(model, facts[:1]) == pytest.approx((14 / 3) ** 0.5, abs=1e-12)


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-gpt2"])
def test_packed_blocks_reproduce_hf_hidden_states(name):
    """Two copies of a prompt packed as tokens 2.. and 4.. (earlier positions' keys/values from a
    recorded run, written into one buffer), run one PackedBlocks call per layer: every packed token's
    residual stream equals HF's hidden state of that layer and position."""
    from mechinterp.analysis.blocks import PackedBlocks, PrefixKV

    model = load(name, device="cpu", dtype="float32")
    ids = torch.tensor([_fact(model).input_ids])
    T = ids.shape[1]
    stack = BlockStack(model)
    packed = PackedBlocks(stack, T)
    starts = torch.tensor([2, 4])
    row = torch.repeat_interleave(torch.arange(2), T - starts)
    pos = torch.cat([torch.arange(s, T) for s in starts.tolist()])
    with torch.no_grad():
        ref = model.hf(input_ids=ids, output_hidden_states=True).hidden_states
        rec = PrefixKV(record=True)
        h0 = stack.embed_input(ids)
        kw = stack.block_kwargs(h0, 0)
        for layer in range(model.n_layers):
            h0 = stack.layer(layer, h0, rec, kw)
        h = ref[0][0, pos].clone()
        shape = (2, packed.kv_heads, T, packed.head_dim)
        kb, vb = torch.empty(shape), torch.empty(shape)
        qb = torch.zeros(2, packed.heads, T, packed.head_dim)
        for layer in range(model.n_layers):
            xn = packed.normed(layer, h)
            k, v = packed.kv(layer, xn, pos)
            kb[:] = rec.recorded[layer][0]
            vb[:] = rec.recorded[layer][1]
            kb[row, :, pos], vb[row, :, pos] = k, v
            qb[row, :, pos] = packed.queries(layer, xn, pos)
            o = packed.attend(layer, qb, kb, vb)[row, :, pos]
            h = h + packed.attn_out(layer, o)
            h = h + packed.mlp_out(layer, h)
            if layer < model.n_layers - 1:  # HF's last hidden state is after the final norm
                torch.testing.assert_close(h, ref[layer + 1][0, pos], atol=1e-4, rtol=0)
        torch.testing.assert_close(h, h0[0, pos], atol=1e-4, rtol=0)  # float32 GEMM order


def test_unsupported_blocks_fall_back_to_the_naive_loop(tiny, monkeypatch):
    """A block class the packed engine does not know (OLMo-2's, say) is traced by the naive loop,
    with a warning, instead of failing: the same grid as the packed engine gives."""
    import mechinterp.analysis.blocks as blocks
    import mechinterp.analysis.tracing as tracing

    f = _fact(tiny)
    noise = _noise(tiny, f)
    packed = trace_fact(tiny, f, noise, ("hidden",), window=2)
    monkeypatch.setattr(blocks, "PACKED_BLOCKS", ())
    tracing._warn_naive.cache_clear()
    with pytest.warns(UserWarning, match="naive loop"):
        fallback = trace_fact(tiny, f, noise, ("hidden",), window=2)
    assert fallback.corrupted_prob == pytest.approx(packed.corrupted_prob, abs=1e-6)
    assert np.nanmax(np.abs(fallback.scores["hidden"] - packed.scores["hidden"])) <= 1e-5
