"""``scan=atp`` of ``mlp-patching`` and ``damage-attribution`` on tiny variants with one planted
MLP layer: the planted layer ranks first in the scan and is verified by exact patching, and the
exact values the scan reports are the ones ``scan=exact`` computes (an independent path)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mechinterp.models import load
from mechinterp.models.edit import plant_change
from mechinterp.models.modelset import ModelSet
from mechinterp.core.options import make_config
from mechinterp.core.registry import get_probe
from mechinterp.core.runner import redraw, run_probe

PLANTED_LAYER = 2


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    m = load("tiny-random-llama", device="cpu", dtype="float32")
    folder = tmp_path_factory.mktemp("v") / "planted"
    plant_change(m, folder, {(PLANTED_LAYER, mat): 0.8 for mat in ("gate", "up", "down")}, seed=1)
    return folder


def test_mlp_patching_scan_finds_and_verifies_the_planted_layer(planted, data_source, tmp_path,
                                                                one_thread):
    probe = get_probe("mlp-patching")
    opts = {"prompt_sets": "knowns", "sites": "mlp,attn"}
    models = ModelSet("tiny-random-llama", {"planted": str(planted)}, device="cpu",
                      dtype="float32")
    cfg = make_config(probe, {**opts, "scan": "atp", "scan_top_k": "2", "scan_validate": "true"},
                      seed=0, limit=6)
    d = run_probe(probe, models, data_source, cfg, out=tmp_path).data
    est, exact = d["scan_estimate"]["planted"], d["scan_exact"]["planted"]
    assert d["scan_ranking"]["planted"][0] == ["mlp", PLANTED_LAYER]
    assert d["scan_verified"]["planted"][0] == ["mlp", PLANTED_LAYER]
    # patching the base's output of the only changed module gives the base back exactly
    assert exact["mlp"][PLANTED_LAYER] == pytest.approx(1.0, abs=1e-4)
    # upstream of the change both models compute the same activations: estimate exactly 0
    for layer in range(PLANTED_LAYER):
        assert est["mlp"][layer] == 0.0 and est["attn"][layer] == 0.0
    assert est["attn"][PLANTED_LAYER] == 0.0
    ag = d["scan_agreement"]["planted"]
    assert ag["n_sites"] == 2 * models.base.n_layers and math.isfinite(ag["spearman"])
    assert ag["top_k_overlap"] is not None and ag["verify_max_abs_diff"] < 1e-9
    sec = d["scan_seconds"]["planted"]
    assert sec["speedup"] == pytest.approx(sec["exact_all_sites"] / (sec["scan"]
                                                                     + sec["verify_top_k"]))
    heads = np.array(d["scan_head_estimate"]["planted"])
    assert heads.shape == (models.base.n_layers, models.base.config.num_attention_heads)
    # the exact values are those of today's exact run (denoise), computed by its own path
    models = ModelSet("tiny-random-llama", {"planted": str(planted)}, device="cpu",
                      dtype="float32")
    ref = run_probe(probe, models, data_source, make_config(probe, opts, seed=0, limit=6)).data
    for s in ("mlp", "attn"):
        np.testing.assert_allclose(exact[s], ref["recovery"]["planted"][s]["denoise"], atol=1e-5)
    assert "recovery" not in d  # the exact-mode keys belong to scan=exact
    written = redraw(tmp_path)
    assert any(p.name == "scan_planted.png" for p in written)


def _config8(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0,
                       eos_token_id=0, pad_token_id=1)


@pytest.fixture(scope="module")
def planted8(tmp_path_factory):
    """An 8-layer tiny Llama and a copy whose layer-5 MLP moved enough to damage MMLU answers
    (the set-up of tests/test_damage_attribution.py)."""
    from mechinterp.models.zoo import _tiny

    root = tmp_path_factory.mktemp("planted8")
    _tiny(_config8)(root / "base")
    m = load(str(root / "base"), device="cpu", dtype="float32")
    plant_change(m, root / "one", {(5, mat): 1.0 for mat in ("gate", "up", "down")}, seed=1)
    return root


@pytest.mark.slow  # ~25 s on one core: the scan, every site exactly, and scan=exact to compare
@pytest.mark.parametrize("fmt", ["letter-0shot", "cloze-norm"])
def test_damage_attribution_scan_finds_and_verifies_the_planted_layer(planted8, data_source,
                                                                      tmp_path, fmt, one_thread):
    probe = get_probe("damage-attribution")
    opts = {"subjects": "world_religions,conceptual_physics", "max_failures": "6",
            "n_control": "1", "sites": "mlp_out,attn_out", "format": fmt}

    def models():
        return ModelSet(str(planted8 / "base"), {"one": str(planted8 / "one")}, device="cpu",
                        dtype="float32")

    cfg = make_config(probe, {**opts, "scan": "atp", "scan_top_k": "3", "scan_validate": "true"},
                      limit=16)
    d = run_probe(probe, models(), data_source, cfg, out=tmp_path).data
    items = d["scan_items"]["one"]
    assert items["n_damaged_used"] > 0
    # the scan's margin of the unpatched variant (rows unpacked) = the packed path's margin
    assert items["metric_max_abs_diff"] < 1e-4
    est, exact = d["scan_estimate"]["one"], d["scan_exact"]["one"]
    if fmt == "letter-0shot":
        assert d["scan_ranking"]["one"][0] == ["mlp_out", 5]
        assert d["scan_verified"]["one"][0] == ["mlp_out", 5]
    # (cloze-norm: AtP gives the planted layer ~0.04 where the exact recovery is 1 - a false
    # negative of the linear approximation at this large a change, ranked 5th; not asserted
    # either way)
    assert exact["mlp_out"][5] == pytest.approx(1.0, abs=1e-4)
    assert all(est["mlp_out"][la] == 0.0 and est["attn_out"][la] == 0.0 for la in range(5))
    ag = d["scan_agreement"]["one"]
    assert ag["n_sites"] == 16 and ag["verify_max_abs_diff"] < 1e-9
    assert len(d["scan_head_estimate"]["one"]) == 8
    # the exact values are today's margin recovery (scan=exact), on the same damaged items
    ref = run_probe(probe, models(), data_source, make_config(probe, opts, limit=16)).data
    assert ref["damaged_items"]["one"] == items["damaged_items"]
    for s in ("mlp_out", "attn_out"):
        np.testing.assert_allclose(exact[s], ref["margin_recovery"]["one"][s], atol=1e-6)
    # origin by weight revert: the scan's own revert sweep gives what scan=exact gives
    assert d["n_used"]["one"] == ref["n_used"]["one"] == items["n_damaged_used"]
    np.testing.assert_allclose(d["revert_recovery"]["one"]["mlp"],
                               ref["revert_recovery"]["one"]["mlp"], atol=1e-6)
    for name, w in ref["revert_window_recovery"]["one"].items():
        assert d["revert_window_recovery"]["one"][name]["mean"] == pytest.approx(w["mean"])
    assert d["net_damage"]["one"] == ref["net_damage"]["one"]
    assert (tmp_path / "damage-attribution" / "scan_one.png").is_file()
