"""Planted damage: perturb the MLP of one known layer (or a window of three) of a tiny 8-layer Llama
until MMLU letter answers flip; the damage-attribution probe must point at that layer (window), by
flips and by the gold-answer margin. Cloze formats and the margin measure against naive references:
tests/test_damage_attribution_cloze.py."""

from __future__ import annotations

import math

import pytest
import torch

from mechinterp.models import load
from mechinterp.models.edit import plant_change
from mechinterp.models.modelset import ModelSet
from mechinterp.core.options import make_config
from mechinterp.core.registry import get_probe
from mechinterp.store.results import read_result
from mechinterp.core.runner import run_probe

SUBJECTS = "world_religions,conceptual_physics"  # the shortest MMLU prompts: cheap on bytes


def _config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0,
                       eos_token_id=0, pad_token_id=1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from mechinterp.models.zoo import _tiny

    root = tmp_path_factory.mktemp("planted")
    _tiny(_config)(root / "base")
    for name, layers, rel in [("one", [5], 1.0), ("window", [2, 3, 4], 0.7)]:
        m = load(str(root / "base"), device="cpu", dtype="float32")
        plant_change(m, root / name, {(la, mat): rel for la in layers
                                      for mat in ("gate", "up", "down")}, seed=1)
    return root


@pytest.mark.slow
def test_planted_layer_and_window_rank_first(planted, data_source, tmp_path):
    probe = get_probe("damage-attribution")
    models = ModelSet(str(planted / "base"), {"one": str(planted / "one"),
                                              "window": str(planted / "window")},
                      device="cpu", dtype="float32")
    config = make_config(probe, {"subjects": SUBJECTS, "max_failures": "8", "n_control": "3",
                                 "sites": "mlp_out"}, limit=28)
    result = run_probe(probe, models, data_source, config, out=tmp_path)
    d = result.data
    # one planted layer: patching the base's MLP output there restores the base exactly
    assert d["n_failures"]["one"] > 0
    assert d["top_layers"]["one"][0] == 5
    frac = d["recovered_fraction"]["one"]["mlp_out"]
    assert frac[5] == 1.0 and d["logprob_recovery"]["one"]["mlp_out"][5] == pytest.approx(1.0)
    assert all(f == 0.0 for f in frac[:5])  # earlier layers are identical in both models
    assert d["weight_revert_fraction"]["one"][5] == 1.0
    assert sum(d["weight_revert_fraction"]["one"][:5]) == 0.0
    assert 5 in d["top_third_overlap"]["one"]
    assert d["mlp_weight_change"]["one"][5] > 0 and d["mlp_weight_change"]["one"][0] == 0
    # the margin measure agrees, and the failures are failures on the patching path
    assert d["format"] == "letter-0shot"
    assert d["n_failures_used"]["one"] == min(d["n_failures"]["one"], 8)
    assert d["unpatched_failure_accuracy"]["one"] == 0.0
    assert d["n_damaged"]["one"] >= d["n_failures"]["one"]
    assert d["top_layers_margin"]["one"][0] == 5
    assert d["margin_recovery"]["one"]["mlp_out"][5] == pytest.approx(1.0, abs=1e-4)
    assert d["weight_revert_margin_recovery"]["one"][5] == pytest.approx(1.0, abs=1e-4)
    assert d["window_margin_recovery"]["window"]["mlp_out"][d["windows"].index([2, 3, 4])] == \
        pytest.approx(1.0, abs=1e-4)
    # the recovered shares carry Wilson intervals over the failures used
    from mechinterp.evals.stats import wilson

    n_used = d["n_failures_used"]["one"]
    k5 = round(d["recovered_fraction"]["one"]["mlp_out"][5] * n_used)
    assert d["recovered_fraction_ci95"]["one"]["mlp_out"][5] == pytest.approx(
        list(wilson(k5, n_used)))
    # a planted window of three layers: that window recovers everything, and ranks first
    wins = d["windows"]
    wfrac = d["window_recovered_fraction"]["window"]["mlp_out"]
    assert d["n_failures"]["window"] > 0
    assert wins[d["top_windows"]["window"][0]] == [2, 3, 4]
    assert d["window_logprob_recovery"]["window"]["mlp_out"][wins.index([2, 3, 4])] == \
        pytest.approx(1.0)
    assert wfrac[wins.index([2, 3, 4])] == 1.0
    assert d["top_layers"]["window"][0] in (2, 3, 4)
    assert set(d["top_third_overlap"]["window"]) <= {2, 3, 4}
    # controls (both right) stay right when the base's MLP output is patched at untouched layers
    assert all(k == 1.0 for k in d["control_kept"]["one"]["mlp_out"][:5])
    # stored, re-readable, with figures
    stored = read_result(tmp_path / "damage-attribution")
    assert stored.data["top_layers"]["one"][0] == 5
    assert (tmp_path / "damage-attribution" / "recovery_one.png").is_file()
    assert (tmp_path / "damage-attribution" / "margin_recovery_one.png").is_file()
    assert math.isfinite(d["spearman_vs_weight_change"]["one"])


def _plain_choice_scores(model, base, req, patch_site=None, layers=(), revert=()):
    """A naive reference for one condition: lm-eval's rows of ``req`` padded into one batch, one
    plain forward of ``model`` with the base's ``patch_site`` output (captured on the same batch)
    patched in at ``layers`` and/or the MLP weights of ``revert`` copied from the base; the
    choice log-likelihoods summed from the scored tokens."""
    from mechinterp.analysis.crossmodel import mlp_matrices, reverted
    from mechinterp.analysis.patching import Patch, capture, patching
    from mechinterp.evals.answers import token_log_probs
    from mechinterp.evals.loglik import pad_rows, rows_for

    rows = rows_for([req], model.tokenizer)
    ids, mask = pad_rows(rows, model.tokenizer.pad_token_id or 0)
    targets = [(b, pos, tok, j) for b, row in enumerate(rows) for j, pos, tok in row.targets]
    patches = []
    if patch_site is not None:
        _, acts = capture(base, ids, mask, [(patch_site, la) for la in layers])
        patches = [Patch(patch_site, la, acts[(patch_site, la)]) for la in layers]
    with torch.no_grad(), reverted(model, base, revert, mlp_matrices(model)), \
            patching(model, patches):
        lp = token_log_probs(model, ids, mask, torch.tensor([t[:3] for t in targets]))
    scores = torch.zeros(len(req.continuations), dtype=torch.float64)
    return scores.index_add_(0, torch.tensor([t[3] for t in targets]), lp.double())


@pytest.mark.parametrize("family", ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-gpt2"])
def test_condition_sweep_matches_one_plain_forward_per_condition(family, tmp_path, one_thread):
    """The packed one-item sweep (tails beside one shared context, conditions entering at their
    first changed block) gives what one plain patched (or reverted) forward per condition gives,
    patches and reverts mixed, token budgets small enough to split the conditions into several
    passes; swapping the models' roles patches the variant into the base."""
    from mechinterp.analysis.crossmodel import (
        condition_sweep,
        item_reference,
        item_rows,
        mlp_matrices,
        patch_both_ways,
        patch_condition,
        revert_condition,
    )
    from mechinterp.evals.loglik import Request, score

    base = load(family, device="cpu", dtype="float32")
    variant = load(family, device="cpu", dtype="float32")
    mats = mlp_matrices(variant)
    plant_change(variant, tmp_path / "v", {(1, mats[-1]): 0.8, (2, mats[0]): 0.8}, seed=2)
    reqs = [Request("Question: the sky is\nAnswer:", (" blue", " green", " red")),
            Request("2 + 2 =", (" 4", " five", " 22")), Request("The letter", (" A", " B", " C"))]
    conds = [[0], [1], [2], [1, 2], [3]]
    sites = ("mlp_out", "attn_out")
    mixed = [patch_condition(s, c) for s in sites for c in conds] + \
        [revert_condition(c) for c in conds]
    clean_base, _ = score(base, reqs)  # the evals' scorer: an independent reference
    for k, (req, item) in enumerate(zip(reqs, item_rows(base, reqs))):
        br = item_reference(base, item, capture_sites=sites)
        vr = item_reference(variant, item, record_resid=True)
        torch.testing.assert_close(br.scores, torch.tensor(clean_base[k], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(vr.scores, _plain_choice_scores(variant, base, req), atol=1e-5,
                                   rtol=0)
        got = condition_sweep(base, variant, item, mixed, br, vr,
                              token_budget=3 * item.n_tokens)
        want = torch.stack([_plain_choice_scores(variant, base, req, s, c) for s in sites
                            for c in conds]
                           + [_plain_choice_scores(variant, base, req, revert=c) for c in conds])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        # both damaged layers patched or reverted: the base comes back; an untouched layer's
        # revert leaves the variant as it is
        torch.testing.assert_close(got[3], br.scores, atol=2e-5, rtol=0)
        torch.testing.assert_close(got[-2], br.scores, atol=2e-5, rtol=0)
        torch.testing.assert_close(got[-5], vr.scores, atol=1e-6, rtol=0)
        assert not torch.allclose(vr.scores, br.scores, atol=1e-3)
        # noising: the variant's MLP outputs patched into the base
        both = patch_both_ways(base, variant, item, mixed[:len(conds)], 3 * item.n_tokens)
        noised = torch.stack([_plain_choice_scores(base, variant, req, "mlp_out", c)
                              for c in conds])
        torch.testing.assert_close(both.noise, noised, atol=2e-5, rtol=0)
        torch.testing.assert_close(both.denoise, got[:len(conds)], atol=1e-6, rtol=0)


def test_top_third_overlap_ignores_zero_ties():
    """A single edited layer (15 of 30): untouched layers tie at zero weight change and at float-
    noise recovery, and must not enter either top third by index order (seen on the default model:
    the overlap came out [0, 1, 2, 15])."""
    from probes.damage_attribution import top_third_overlap

    change = [0.0] * 30
    change[15] = 1.0
    recovery = [1.7e-7] * 15 + [1.0, 0.2, -0.1, 0.4] + [-0.05] * 11
    assert top_third_overlap(recovery, change) == [15]
    # a real overlap beyond the edited layer counts
    change[18] = 0.3
    assert top_third_overlap(recovery, change) == [15, 18]
    # nothing recovers: no overlap, whatever the weights did
    assert top_third_overlap([0.0] * 30, change) == []
