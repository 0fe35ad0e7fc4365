"""activation-diff: exact zeros before a changed layer, a planted additive bias recovered by the
difference, its readout and steering, and the held-out KL against a float64 loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechinterp as mi
from mechinterp.analysis.lens import decode_direction
from mechinterp.data import DataSource
from mechinterp.errors import UserError
from mechinterp.models import load
from mechinterp.models.edit import plant_change

PLANTED_LAYER = 1


@pytest.fixture(scope="module")
def planted_bias(tmp_path_factory, one_thread):
    """tiny GPT-2 with a seeded vector added to layer 1's MLP output bias: every position's
    residual stream after block 1 moves by exactly that vector."""
    folder = tmp_path_factory.mktemp("bias") / "planted"
    m = load("tiny-random-gpt2", device="cpu", dtype="float32")
    vec = torch.randn(m.hf.config.n_embd, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.hf.transformer.h[PLANTED_LAYER].mlp.c_proj.bias.add_(vec)
    m.hf.save_pretrained(folder)
    m.tokenizer.save_pretrained(folder)
    return folder, vec.double().numpy()


@pytest.fixture(scope="module")
def bias_result(planted_bias, tmp_path_factory):
    folder, _ = planted_bias
    return mi.run("activation-diff", base="tiny-random-gpt2", variants={"p": str(folder)},
                  out=tmp_path_factory.mktemp("out"), device="cpu", dtype="float32",
                  n_texts=8, n_heldout=6, max_length=24, n_bootstrap=200, draw=False)


@pytest.mark.slow
def test_planted_bias_is_recovered_and_steering_removes_the_kl(bias_result, planted_bias):
    _, vec = planted_bias
    d = bias_result.data
    delta = bias_result.arrays["p__delta"]
    assert d["diff_norm"]["p"][0] == 0.0  # before the planted layer: exactly nothing
    # at the planted layer every position moved by vec: the mean difference is vec itself
    np.testing.assert_allclose(delta[PLANTED_LAYER], vec, rtol=1e-4, atol=1e-4)
    cos = delta[PLANTED_LAYER] @ vec / np.linalg.norm(delta[PLANTED_LAYER]) / np.linalg.norm(vec)
    assert cos > 0.9999
    assert d["diff_norm"]["p"][PLANTED_LAYER] == pytest.approx(np.linalg.norm(vec), rel=1e-4)
    assert d["kl_before"]["p"] > 1e-3
    red = d["steering_kl_reduction"]["p"]
    assert red[PLANTED_LAYER] > 0.999  # steering with the planted vector *is* the variant
    assert red[0] == 0.0  # a zero difference steers nothing
    lo, hi = d["steering_kl_reduction_ci95"]["p"][PLANTED_LAYER]
    assert lo <= red[PLANTED_LAYER] <= hi
    assert d["lens_top"]["p"][0] == {"promoted": [], "suppressed": []}
    assert len(d["lens_top"]["p"][PLANTED_LAYER]["promoted"]) == 10
    frame = bias_result.to_frame()
    assert set(frame.metric) >= {"diff_norm", "steering_kl_reduction", "kl_before"}
    assert len(frame.query("metric == 'diff_norm'")) == 4


@pytest.mark.slow
def test_lens_readout_matches_a_float64_layernorm_without_bias(bias_result, planted_bias):
    """The readout of the planted vector: GPT-2's ln_f (centre, scale by gamma, no beta) and the
    unembedding in float64, by hand."""
    _, vec = planted_bias
    m = load("tiny-random-gpt2", device="cpu", dtype="float32")
    delta = bias_result.arrays["p__delta"][PLANTED_LAYER]
    x = torch.from_numpy(delta)
    ln = m.hf.transformer.ln_f
    xc = x - x.mean()
    normed = xc / torch.sqrt((xc * xc).mean() + ln.eps) * ln.weight.detach().double()
    ref = m.hf.lm_head.weight.detach().double() @ normed.detach()
    got = decode_direction(m, x.float())
    np.testing.assert_allclose(got.double().numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    top = bias_result.data["lens_top"]["p"][PLANTED_LAYER]
    assert [t["id"] for t in top["promoted"]] == torch.topk(ref, 10).indices.tolist()
    assert [t["id"] for t in top["suppressed"]] == torch.topk(-ref, 10).indices.tolist()


@pytest.mark.slow
def test_kl_before_matches_a_float64_loop_over_texts(bias_result, planted_bias):
    """Each held-out text alone (no padding), both models in float64."""
    from probes.activation_diff import Config, neutral_texts, split_texts

    folder, _ = planted_bias
    cfg = Config(n_texts=8, n_heldout=6, max_length=24)
    src = DataSource.from_option(None)
    _, held = split_texts(neutral_texts(cfg, src), 8, 6)
    base = load("tiny-random-gpt2", device="cpu", dtype="float64")
    var = load(str(folder), device="cpu", dtype="float64")
    ref = []
    for text in held:
        ids = base.tokenizer(text, return_tensors="pt", truncation=True, max_length=24)["input_ids"]
        with torch.no_grad():
            lb = base.hf(ids).logits[0].log_softmax(-1)
            lv = var.hf(ids).logits[0].log_softmax(-1)
        ref.append(float((lb.exp() * (lb - lv)).sum(-1).mean()))
    np.testing.assert_allclose(bias_result.arrays["p__kl_before"], ref, rtol=1e-4, atol=1e-7)


def test_a_change_in_layer_l_leaves_earlier_layers_exactly_equal(tmp_path, one_thread):
    m = load("tiny-random-llama", device="cpu", dtype="float32")
    plant_change(m, tmp_path / "v", {(2, "down"): 0.05, (2, "q"): 0.05}, seed=1)
    r = mi.run("activation-diff", base="tiny-random-llama", variants={"v": str(tmp_path / "v")},
               device="cpu", dtype="float32", n_texts=6, n_heldout=4, max_length=16,
               steer_layers=[1, 2], n_bootstrap=50, draw=False)
    norms = r["diff_norm"]["v"]
    assert norms[0] == 0.0 and norms[1] == 0.0
    assert norms[2] > 0 and norms[3] > 0
    assert not r.arrays["v__delta"][:2].any()
    red = r["steering_kl_reduction"]["v"]
    assert red[0] is None and red[3] is None  # not steered
    assert r["steer_layers"] == [1, 2]
    assert red[1] == 0.0
    assert r["kl_after"]["v"][1] == pytest.approx(r["kl_before"]["v"], abs=0)


@pytest.mark.slow
def test_per_position_and_pooled_means_match_a_float64_loop(tmp_path, one_thread):
    """Each text alone, unpadded, float64 hidden states; the pooled mean leaves out position 0."""
    from probes.activation_diff import Config, neutral_texts, split_texts

    m = load("tiny-random-llama", device="cpu", dtype="float32")
    plant_change(m, tmp_path / "v", {(1, "up"): 0.2}, seed=4)
    k = 5
    r = mi.run("activation-diff", base="tiny-random-llama", variants={"v": str(tmp_path / "v")},
               device="cpu", dtype="float32", n_texts=6, n_heldout=2, first_k=k, skip_first=1,
               steer_layers=[1], n_bootstrap=10, draw=False)
    texts, _ = split_texts(neutral_texts(Config(n_texts=6, n_heldout=2),
                                         DataSource.from_option(None)), 6, 2)
    base = load("tiny-random-llama", device="cpu", dtype="float64")
    var = load(str(tmp_path / "v"), device="cpu", dtype="float64")
    n = base.n_layers
    sums, counts = torch.zeros(n - 1, k, base.hf.config.hidden_size, dtype=torch.float64), [0] * k
    for text in texts:
        ids = base.tokenizer(text, return_tensors="pt")["input_ids"][:, :k]
        with torch.no_grad():
            hb = base.hf(ids, output_hidden_states=True).hidden_states
            hv = var.hf(ids, output_hidden_states=True).hidden_states
        for layer in range(n - 1):  # the last hidden state is after the final norm: left out
            sums[layer, :ids.shape[1]] += (hv[layer + 1] - hb[layer + 1])[0]
        for t in range(ids.shape[1]):
            counts[t] += 1
    per_pos = sums / torch.tensor(counts, dtype=torch.float64)[None, :, None]
    pooled = sums[:, 1:].sum(1) / sum(counts[1:])
    np.testing.assert_allclose(r.arrays["v__delta_by_position"][:n - 1], per_pos.numpy(),
                               atol=2e-5)
    np.testing.assert_allclose(r.arrays["v__delta"][:n - 1], pooled.numpy(), atol=2e-5)
    assert r["n_texts_by_position"] == counts
    assert r["n_positions"] == sum(counts[1:])
    assert not per_pos[0].any() and per_pos[1].abs().max() > 1e-3


def test_bad_options_are_user_errors(planted_bias):
    folder, _ = planted_bias
    r = mi.run("activation-diff", base="tiny-random-gpt2", variants={"p": str(folder)},
               device="cpu", n_texts=2, n_heldout=2, max_length=8, steer_stride=2,
               n_bootstrap=5, draw=False)
    assert r["steer_layers"] == [0, 2, 3]  # every second layer and the last
    assert [x is None for x in r["steering_kl_reduction"]["p"]] == [False, True, False, False]
    with pytest.raises(UserError, match="steer layer 9"):
        mi.run("activation-diff", base="tiny-random-gpt2", variants={"p": str(folder)},
               device="cpu", steer_layers=[9], draw=False)
    with pytest.raises(UserError, match="compares models"):
        mi.run("activation-diff", base="tiny-random-gpt2", device="cpu", draw=False)
    with pytest.raises(UserError, match="neither"):
        mi.run("activation-diff", base="tiny-random-gpt2", variants={"p": str(folder)},
               device="cpu", texts="/nonexistent.txt", draw=False)


@pytest.mark.slow
def test_cli_runs_both_probes_across_two_variants(planted_bias, tmp_path, one_thread):
    """One call: base + two variants (the planted one and the base itself) from the CLI."""
    import json

    from mechinterp.cli import main

    folder, _ = planted_bias
    out = tmp_path / "o"
    common = ["--base", "tiny-random-gpt2", "--variant", f"p={folder}", "--variant",
              "same=tiny-random-gpt2", "--out", str(out), "--device", "cpu", "--no-figures"]
    assert main(["run", "activation-diff", *common, "--set", "n_texts=4", "--set",
                 "n_heldout=3", "--set", "steer_layers=1,2", "--set", "n_bootstrap=10"]) == 0
    assert main(["run", "logit-lens", *common, "--limit", "2", "--set", "prompt_sets=knowns",
                 "--set", "n_bootstrap=10"]) == 0
    ad = json.loads((out / "activation-diff" / "result.json").read_text())["data"]
    assert ad["diff_norm"]["same"] == [0.0] * 4 and ad["diff_norm"]["p"][1] > 0
    assert ad["steering_kl_reduction"]["p"][1] > 0.999
    ll = json.loads((out / "logit-lens" / "result.json").read_text())["data"]
    assert set(ll["answer_rank"]) == {"base", "p", "same"}
    assert main(["run", "activation-diff", *common, "--set", "first_k=0"]) == 2
