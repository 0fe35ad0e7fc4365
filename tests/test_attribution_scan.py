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
from mechinterp.probe import get_probe, make_config
from mechinterp.runner import redraw, run_probe

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
