"""Cross-model patching: identities, batched sweep == per-condition loop, and the probe on a
variant with a planted change of known location."""

import json

import numpy as np
import pytest
import torch

from mechinterp.analysis.crossmodel import (
    cross_model_patch_sweep,
    last_positions,
    normalised_recovery,
    plain_logprobs,
)
from mechinterp.analysis.patching import Patch, capture, run_patched
from mechinterp.models import load
from mechinterp.models.edit import plant_change

PROMPTS = ["The capital of France is", "Tokyo is the capital of Japan and", "Answer:"]
PLANTED = {(1, "down"): 0.5, (2, "up"): 0.5}  # MLP changes in layers 1 and 2 of 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = load("tiny-random-llama", device="cpu", dtype="float32", name="base")
    edit = load("tiny-random-llama", device="cpu", dtype="float32")
    folder = plant_change(edit, tmp_path_factory.mktemp("v") / "planted", PLANTED, seed=1)
    return base, load(str(folder), device="cpu", dtype="float32", name="planted"), folder


def _batch(model):
    model.tokenizer.padding_side = "right"
    enc = model.encode(PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = last_positions(mask)
    answers = ids[:, 1]  # any token ids will do
    return ids, mask, pos, answers


def test_last_positions_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = right.flip(1)
    assert last_positions(right).tolist() == [2, 3, 0]
    assert last_positions(left).tolist() == [3, 3, 3]


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "resid_post"])
def test_self_patching_changes_nothing(pair, site):
    base, _, _ = pair
    ids, mask, pos, ans = _batch(base)
    plain = plain_logprobs(base, ids, mask, pos, ans)
    lp = cross_model_patch_sweep(base, base, ids, mask, site, range(base.n_layers), pos, ans)
    torch.testing.assert_close(lp, plain.expand_as(lp), atol=1e-5, rtol=0)


def test_base_resid_at_last_layer_reproduces_base_logits(pair):
    base, var, _ = pair
    ids, mask, pos, ans = _batch(base)
    last = base.n_layers - 1
    b_logits, acts = capture(base, ids, mask, [("resid_post", last)])
    v_logits = var.hf(input_ids=ids, attention_mask=mask).logits
    assert (b_logits - v_logits).abs().max() > 1e-3  # the variant really differs
    patched = run_patched(var, ids, mask, [Patch("resid_post", last, acts[("resid_post", last)])])
    torch.testing.assert_close(patched, b_logits, atol=1e-5, rtol=0)
    lp = cross_model_patch_sweep(base, var, ids, mask, "resid_post", [last], pos, ans)
    torch.testing.assert_close(lp[0], plain_logprobs(base, ids, mask, pos, ans), atol=1e-5, rtol=0)


def test_batched_sweep_equals_one_condition_at_a_time(pair):
    base, var, _ = pair
    ids, mask, pos, ans = _batch(base)
    conds = [0, (1, 2), 3, (0, 1, 2, 3)]
    n = base.n_layers
    _, acts = capture(base, ids, mask, [("mlp_out", layer) for layer in range(n)])
    rows = torch.arange(len(PROMPTS))
    expect = []
    for c in conds:
        group = (c,) if isinstance(c, int) else c
        logits = run_patched(var, ids, mask, [Patch("mlp_out", layer, acts[("mlp_out", layer)])
                                              for layer in group])
        lp = logits[rows, pos].log_softmax(-1)[rows, ans]
        expect.append(lp)
    # max_tokens small enough to force several passes with uneven condition groups
    got = cross_model_patch_sweep(base, var, ids, mask, "mlp_out", conds, pos, ans,
                                  max_tokens=3 * ids.numel())
    torch.testing.assert_close(got, torch.stack(expect), atol=1e-5, rtol=0)


def test_normalised_recovery_by_hand():
    patched = torch.tensor([[-1.0, -2.0, -3.0]])
    m_base = torch.tensor([-1.0, -2.0, -2.0])
    m_var = torch.tensor([-3.0, -2.05, -4.0])
    rec, keep = normalised_recovery(patched, m_base, m_var, min_gap=0.1)
    assert keep.tolist() == [True, False, True]
    assert rec[0, 0].item() == pytest.approx(1.0)  # (-1 - -3) / (-1 - -3)
    assert torch.isnan(rec[0, 1])
    assert rec[0, 2].item() == pytest.approx(0.5)  # (-3 - -4) / (-2 - -4)


def test_probe_finds_the_planted_layers_and_redraws(pair, tmp_path, data_source):
    from mechinterp.models.modelset import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import redraw, run_probe

    _, _, folder = pair
    models = ModelSet("tiny-random-llama", {"planted": str(folder)}, device="cpu",
                      dtype="float32")
    probe = get_probe("mlp-patching")
    # limit is the total over the prompt sets: 3 facts + 3 anatomy questions
    cfg = make_config(probe, {"mmlu_subjects": "anatomy"}, seed=0, limit=6)
    result = run_probe(probe, models, data_source, cfg, out=tmp_path)
    rec = result.data["recovery"]["planted"]
    assert result.data["n_prompts"] == 6
    # layers 0 and 3 MLPs are untouched and see identical inputs at layer 0: nothing to recover
    assert rec["mlp"]["denoise"][0] == pytest.approx(0.0, abs=1e-4)
    assert rec["mlp"]["noise"][0] == pytest.approx(1.0, abs=1e-4)
    # the residual stream after the last changed layer (2) carries everything
    for layer in (2, 3):
        assert rec["resid"]["denoise"][layer] == pytest.approx(1.0, abs=1e-4)
        assert rec["resid"]["noise"][layer] == pytest.approx(0.0, abs=1e-4)
    # attention of layers 0 and 1 sees identical inputs in both models
    assert rec["attn"]["denoise"][1] == pytest.approx(0.0, abs=1e-4)
    stored = json.loads((tmp_path / "mlp-patching" / "result.json").read_text())["data"]
    assert set(stored["recovery"]["planted"]) == {"mlp", "attn", "resid"}
    # pooled recovery = the |gap|-weighted mean of the per-item recoveries, recomputed here from
    # the per-item arrays in float64; its bootstrap interval holds the estimate
    arr = result.arrays
    r = np.concatenate([arr[f"planted__{k}__mlp__denoise"] for k in ("knowns", "mmlu")], 1)
    g = np.concatenate([arr[f"planted__{k}__m_base"] - arr[f"planted__{k}__m_variant"]
                        for k in ("knowns", "mmlu")]).astype(np.float64)
    keep = np.abs(g) >= 0.1
    w = np.abs(g[keep])
    ref = (r[:, keep].astype(np.float64) * w).sum(1) / w.sum()
    assert np.allclose(rec["mlp"]["denoise"], ref, atol=1e-5)
    ci = result.data["recovery_ci95"]["planted"]["mlp"]["denoise"]
    assert all(lo - 1e-9 <= e <= hi + 1e-9 for (lo, hi), e in zip(ci, rec["mlp"]["denoise"]))
    for png in (tmp_path / "mlp-patching").glob("*.png"):
        png.unlink()
    written = redraw(tmp_path)
    assert any(p.name == "recovery_per_layer.png" for p in written)


def test_probe_leaves_the_shared_tokenizer_padding_side_alone(pair, data_source):
    """mlp-patching pads right for itself; the tokenizer the models share keeps its setting."""
    from mechinterp.models.modelset import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe

    _, _, folder = pair
    probe = get_probe("mlp-patching")
    cfg = make_config(probe, {"prompt_sets": "knowns", "sites": "mlp"}, seed=0, limit=3)
    got = {}
    for side in ("left", "right"):
        models = ModelSet("tiny-random-llama", {"planted": str(folder)}, device="cpu",
                          dtype="float32")
        tok, vtok = models.base.tokenizer, models["planted"].tokenizer
        tok.padding_side = vtok.padding_side = side
        got[side] = run_probe(probe, models, data_source, cfg).data["recovery"]["planted"]
        assert tok.padding_side == side and vtok.padding_side == side
    assert got["left"] == got["right"]  # the probe's own padding does not depend on the setting
