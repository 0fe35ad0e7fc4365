"""Cross-model patching of an answer token: identities, the engine == one plain patched forward
per condition, and the probe on a variant with a planted change of known location."""

import json

import numpy as np
import pytest
import torch

from mechinterp.analysis.crossmodel import (
    answer_item,
    last_positions,
    normalised_recovery,
    patch_both_ways,
    patch_condition,
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


def _items(model):
    """(prompt ids, answer id) per prompt; any answer token will do: the prompt's second."""
    ids = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    return [(x, x[1]) for x in ids]


def _plain(model, prompt_ids, answer_id, patches=()) -> float:
    """log p(answer) after the prompt from one plain (patched) HF forward of the prompt alone."""
    x = torch.tensor([prompt_ids])
    logits = run_patched(model, x, torch.ones_like(x), list(patches))
    return logits[0, -1].double().log_softmax(-1)[answer_id].item()


def test_last_positions_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = right.flip(1)
    assert last_positions(right).tolist() == [2, 3, 0]
    assert last_positions(left).tolist() == [3, 3, 3]


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "resid_post"])
def test_self_patching_changes_nothing(pair, site):
    base, _, _ = pair
    conds = [patch_condition(site, [layer]) for layer in range(base.n_layers)]
    for ids, ans in _items(base):
        sweep = patch_both_ways(base, base, answer_item(ids, ans), conds)
        assert sweep.base[0].item() == pytest.approx(_plain(base, ids, ans), abs=1e-5)
        torch.testing.assert_close(sweep.denoise, sweep.base.expand_as(sweep.denoise), atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(sweep.noise, sweep.base.expand_as(sweep.noise), atol=1e-5,
                                   rtol=0)


def test_base_resid_at_last_layer_reproduces_base_logits(pair):
    base, var, _ = pair
    last = base.n_layers - 1
    for ids, ans in _items(base):
        sweep = patch_both_ways(base, var, answer_item(ids, ans),
                                [patch_condition("resid_post", [last])])
        assert abs(sweep.base[0].item() - sweep.variant[0].item()) > 1e-4  # the variant differs
        assert sweep.denoise[0, 0].item() == pytest.approx(sweep.base[0].item(), abs=1e-5)
        assert sweep.noise[0, 0].item() == pytest.approx(sweep.variant[0].item(), abs=1e-5)
        assert sweep.variant[0].item() == pytest.approx(_plain(var, ids, ans), abs=1e-5)


def test_sweep_equals_one_plain_patched_forward_per_condition(pair):
    base, var, _ = pair
    conds = [[0], [1, 2], [3], [0, 1, 2, 3]]
    conditions = [patch_condition("mlp_out", c) for c in conds]
    for ids, ans in _items(base):
        x = torch.tensor([ids])
        _, base_acts = capture(base, x, torch.ones_like(x), [("mlp_out", la) for la in range(4)])
        _, var_acts = capture(var, x, torch.ones_like(x), [("mlp_out", la) for la in range(4)])
        item = answer_item(ids, ans)
        # a token budget small enough to force several passes with uneven condition groups
        sweep = patch_both_ways(base, var, item, conditions, token_budget=3 * item.n_tokens)
        for c, group in enumerate(conds):
            into_var = [Patch("mlp_out", la, base_acts[("mlp_out", la)]) for la in group]
            into_base = [Patch("mlp_out", la, var_acts[("mlp_out", la)]) for la in group]
            assert sweep.denoise[c, 0].item() == pytest.approx(_plain(var, ids, ans, into_var),
                                                               abs=1e-5)
            assert sweep.noise[c, 0].item() == pytest.approx(_plain(base, ids, ans, into_base),
                                                             abs=1e-5)


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
