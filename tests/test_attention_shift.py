"""Attention shift: JS on hand-made rows, one edited head shows up alone, padding, bridge parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechinterp.analysis.attention import (
    attention_patterns,
    attention_shift,
    entropy,
    js_divergence,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The capital of France is", "Tokyo is the capital of Japan. Michael Jordan plays",
         "Question: What is 2 + 3? Answer:", "A. B."]


def test_js_and_entropy_on_hand_made_distributions():
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]],
                     dtype=torch.float64)
    q = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]],
                     dtype=torch.float64)
    js = js_divergence(p, q)
    assert js[0] == 0.0  # identical
    assert js[1] == pytest.approx(math.log(2), abs=1e-15)  # disjoint supports
    # [1, 0] vs [.5, .5]: m = [.75, .25]; 0.5 (ln(4/3) + 0.5 ln(2/3) + 0.5 ln 2)
    assert js[2] == pytest.approx(0.5 * (math.log(4 / 3) + 0.5 * math.log(2 / 3)
                                         + 0.5 * math.log(2)), abs=1e-15)
    assert js[3] == pytest.approx(math.log(2), abs=1e-15)
    assert torch.equal(js_divergence(q, p), js)  # symmetric
    assert entropy(torch.full((4,), 0.25, dtype=torch.float64)) == pytest.approx(math.log(4))
    assert entropy(p)[1] == 0.0


def _prompts(model):
    return [model.tokenizer(t)["input_ids"] for t in TEXTS]


def _edit_rows(model, layer: int, matrix: str, rows: slice, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.weight(layer, matrix)
        w[rows] += torch.randn(w[rows].shape, generator=g) * w.std()


@pytest.mark.parametrize("layer", [1, 3])
def test_one_edited_query_head_shows_up_in_that_head_only(layer):
    from mechinterp.models import load

    base = load("tiny-random-llama", device="cpu", dtype="float32")
    variant = load("tiny-random-llama", device="cpu", dtype="float32")
    hd = base.config.hidden_size // base.config.num_attention_heads  # 16; 4 query heads
    head = 2
    _edit_rows(variant, layer, "q", slice(head * hd, (head + 1) * hd))  # q rows of ONE head
    shift = attention_shift(base, variant, _prompts(base), batch_size=3)
    for metric in (shift.js, shift.entropy_change, shift.first_token_mass_change):
        assert np.all(metric[:layer] == 0.0)  # earlier layers cannot see the edit
        others = np.delete(metric[layer], head)
        assert np.all(others == 0.0)  # same layer, other heads: untouched bit for bit
    assert shift.js[layer, head] > 1e-3
    assert np.all(shift.js >= 0) and np.all(shift.js <= math.log(2))
    if layer < base.n_layers - 1:  # later layers read a changed residual stream
        assert np.all(shift.js[layer + 1:] > 0)


def test_grouped_query_attention_edit_of_a_kv_head_hits_its_query_heads():
    """4 query heads share 2 KV heads: k rows of KV head 1 feed query heads 2 and 3."""
    from mechinterp.models import load

    base = load("tiny-random-llama", device="cpu", dtype="float32")
    variant = load("tiny-random-llama", device="cpu", dtype="float32")
    assert (base.config.num_attention_heads, base.config.num_key_value_heads) == (4, 2)
    hd = 16
    _edit_rows(variant, 3, "k", slice(1 * hd, 2 * hd))
    shift = attention_shift(base, variant, _prompts(base))
    assert shift.js.shape == (4, 4)
    assert np.all(shift.js[3, :2] == 0.0) and np.all(shift.js[3, 2:] > 1e-3)
    assert np.all(shift.js[:3] == 0.0)


def test_batched_equals_one_by_one_and_padding_stays_out(tiny_model):
    from mechinterp.models import load

    variant = load(tiny_model.resolved, device="cpu", dtype="float32")
    _edit_rows(variant, 0, "q", slice(0, None), seed=4)
    prompts = _prompts(tiny_model)
    assert len({len(p) for p in prompts}) > 1
    one = attention_shift(tiny_model, variant, prompts, batch_size=1)
    batched = attention_shift(tiny_model, variant, prompts, batch_size=4, pad_id=3)
    # float32 matmuls of other shapes round differently (~1e-7 absolute on entropies of O(1));
    # a leaked pad key would move values by orders of magnitude more
    for name in ("js", "entropy_change", "first_token_mass_change"):
        np.testing.assert_allclose(getattr(batched, name), getattr(one, name), rtol=1e-4,
                                   atol=2e-6)
    assert one.js.min() >= 0 and one.js.max() > 1e-4


def test_hf_patterns_equal_transformer_lens_hook_pattern():
    """The HF eager patterns we use equal the bridge's ``blocks.L.attn.hook_pattern``."""
    from mechinterp.models import load

    model = load("tiny-random-llama", device="cpu", dtype="float32")  # the bridge wraps it
    ids = torch.tensor([model.tokenizer(TEXTS[1])["input_ids"]])
    hf_pats = attention_patterns(model, ids, torch.ones_like(ids))
    names = [model.hook_name("attn_pattern", layer) for layer in range(model.n_layers)]
    _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    for layer, name in enumerate(names):
        torch.testing.assert_close(cache[name].cpu(), hf_pats[layer], rtol=1e-5, atol=1e-6)


def test_probe_on_tiny_model_with_data(tmp_path, data_source):
    from mechinterp.models import load
    from mechinterp.models.edit import plant_change
    from mechinterp.models.modelset import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe

    variant = load("tiny-random-llama", device="cpu", dtype="float32")
    plant_change(variant, tmp_path / "v", {(2, "q"): 0.3})
    ms = ModelSet("tiny-random-llama", {"v": str(tmp_path / "v")}, device="cpu")
    probe = get_probe("attention-shift")
    cfg = make_config(probe, {"n_mmlu": "2", "n_knowns": "2", "max_tokens": "48"})
    res = run_probe(probe, ms, data_source, cfg)
    js = np.array(res["js"]["v"])
    assert js.shape == (4, 4) and res["n_prompts"] == 4
    assert np.all(js[:2] == 0.0) and np.all(js[2] > 0)
    assert set(res.data) >= {"js", "entropy_change", "first_token_mass_change"}


def _h(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_entropy_sign_and_first_key_on_hand_built_patterns(monkeypatch):
    """attention_shift's aggregation on patterns built by hand: entropy_change = H(variant) -
    H(base) (> 0 when the variant spreads out), first_token_mass_change reads KEY 0, query row 0
    and padded query rows are left out, prompts weigh the same."""
    import mechinterp.analysis.attention as A

    base_pat = torch.tensor([[  # prompt 0 (3 tokens): head 0, head 1; rows are queries
        [[1, 0, 0], [1, 0, 0], [1, 0, 0]],
        [[1, 0, 0], [.5, .5, 0], [.2, .3, .5]]],
        [  # prompt 1 (2 tokens + 1 pad): the pad query rows differ between models
        [[1, 0, 0], [1, 0, 0], [.5, .5, 0]],
        [[1, 0, 0], [.5, .5, 0], [.5, .5, 0]]]], dtype=torch.float32)
    var_pat = torch.tensor([[
        [[0, 0, 1], [.5, .5, 0], [1 / 3, 1 / 3, 1 / 3]],  # row 0 changed: must not count
        [[1, 0, 0], [0, 1, 0], [.6, .3, .1]]],
        [
        [[1, 0, 0], [1, 0, 0], [0, 0, 1]],
        [[1, 0, 0], [.5, .5, 0], [0, 1, 0]]]], dtype=torch.float32)
    base, variant = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    monkeypatch.setattr(A, "attention_patterns",
                        lambda m, ids, attn: [base_pat if m is base else var_pat])
    shift = A.attention_shift(base, variant, [[5, 6, 7], [5, 6]], batch_size=2)
    # prompt 1 is unchanged, so each value is half of prompt 0's mean over query rows 1 and 2
    h0 = ((_h(.5, .5) - 0) + (_h(1 / 3, 1 / 3, 1 / 3) - 0)) / 2 / 2
    h1 = ((0 - _h(.5, .5)) + (_h(.6, .3, .1) - _h(.2, .3, .5))) / 2 / 2
    np.testing.assert_allclose(shift.entropy_change[0], [h0, h1], rtol=1e-6)
    assert shift.entropy_change[0, 0] > 0  # attention spread out: entropy up
    assert shift.entropy_change[0, 1] < 0  # attention sharpened: entropy down
    # key 0: head 0 (.5 - 1) + (1/3 - 1); head 1 (0 - .5) + (.6 - .2)  (the last key moved -.4)
    np.testing.assert_allclose(shift.first_token_mass_change[0],
                               [((.5 - 1) + (1 / 3 - 1)) / 4, ((0 - .5) + (.6 - .2)) / 4],
                               rtol=1e-6)
    assert np.isfinite(shift.js).all() and shift.js[0, 0] > shift.js[0, 1] > 0
    assert shift.n_prompts == 2


def test_per_prompt_rows_average_to_the_means_and_give_t_intervals(tiny_model):
    """Each prompt's per-layer head mean, averaged over prompts, is the layer mean of the
    reported (layer, head) array; the probe's interval is the t-interval of those rows."""
    from mechinterp.evals.stats import t_interval
    from mechinterp.models import load

    variant = load(tiny_model.resolved, device="cpu", dtype="float32")
    _edit_rows(variant, 1, "q", slice(0, None), seed=5)
    prompts = _prompts(tiny_model)
    shift = attention_shift(tiny_model, variant, prompts, batch_size=2)
    for name in ("js", "entropy_change", "first_token_mass_change"):
        rows = shift.per_prompt_layer[name]
        assert rows.shape == (len(prompts), tiny_model.n_layers)
        np.testing.assert_allclose(rows.mean(0), getattr(shift, name).mean(1), atol=1e-12)
    m, lo, hi = t_interval(shift.per_prompt_layer["js"][:, 1])
    assert lo < m < hi
