"""damage-attribution in the cloze formats and its margin measure, against independent computations.

- A tiny 8-layer Llama whose variant differs only in layer 5's MLP: patching layer 5's mlp_out gives
  back the whole margin drop (share 1), and every layer's share equals a naive float64 reference (one
  full forward per choice with a forward hook replacing that layer's MLP output by the base's).
- The sweep's unpatched scores equal the evals' ``score_mmlu`` cloze log-likelihoods.
- The real default model with layer 12's ``down`` planted: layer 12 ranks first by margin recovery.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_damage_attribution import SUBJECTS, _config  # the same tiny 8-layer Llama

from mechinterp.models import load
from mechinterp.models.edit import plant_change
from mechinterp.models.modelset import ModelSet
from mechinterp.core.options import make_config
from mechinterp.core.registry import get_probe
from mechinterp.store.results import read_result
from mechinterp.core.runner import run_probe

PLANTED = 5


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from mechinterp.models.zoo import _tiny

    root = tmp_path_factory.mktemp("planted_cloze")
    _tiny(_config)(root / "base")
    m = load(str(root / "base"), device="cpu", dtype="float32")
    plant_change(m, root / "one", {(PLANTED, mat): 1.0 for mat in ("gate", "up", "down")}, seed=1)
    return root


def _naive_scores(base, variant, context: str, choices, patch_layer: int | None) -> list[float]:
    """Summed log-prob of each continuation, float64, one full forward per choice; with
    ``patch_layer`` the variant's MLP output there is replaced by the base's (all positions)."""
    from mechinterp.evals.loglik import encode_pair

    out = []
    for cont in choices:
        ctx, tail = encode_pair(base.tokenizer, context, cont)
        ids = torch.tensor([ctx + tail])
        model = variant
        handles = []
        if patch_layer is not None:
            store = {}
            h = base.hf.model.layers[patch_layer].mlp.register_forward_hook(
                lambda mod, args, o, store=store: store.__setitem__("v", o.clone()))
            with torch.no_grad():
                base.hf(input_ids=ids)
            h.remove()
            handles.append(variant.hf.model.layers[patch_layer].mlp.register_forward_hook(
                lambda mod, args, o, store=store: store["v"]))
        try:
            with torch.no_grad():
                lp = torch.log_softmax(model.hf(input_ids=ids).logits[0].double(), -1)
        finally:
            for h in handles:
                h.remove()
        n = len(ctx)
        out.append(sum(float(lp[n - 1 + k, t]) for k, t in enumerate(tail)))
    return out


def _margin(scores, gold: int) -> float:
    return scores[gold] - max(s for j, s in enumerate(scores) if j != gold)


def test_cloze_planted_layer_recovers_fully_and_matches_naive(planted, data_source, tmp_path,
                                                             one_thread):
    from mechinterp.data.mmlu import load_mmlu
    from mechinterp.evals.mmlu import MMLUFormat, build_request, stratified_sample

    probe = get_probe("damage-attribution")
    models = ModelSet(str(planted / "base"), {"one": str(planted / "one")}, device="cpu",
                      dtype="float32")
    limit, cap = 12, 3
    config = make_config(probe, {"subjects": SUBJECTS, "format": "cloze", "max_failures": str(cap),
                                 "n_control": "1", "sites": "mlp_out", "n_bootstrap": "200"},
                         limit=limit)
    result = run_probe(probe, models, data_source, config, out=tmp_path)
    d = result.data
    assert d["format"] == "cloze"
    n_dmg = d["n_damaged"]["one"]
    assert n_dmg > 0 and d["n_damaged_used"]["one"] == min(n_dmg, cap)
    assert d["n_failures_used"]["one"] == min(d["n_failures"]["one"], cap)
    rec = d["margin_recovery"]["one"]["mlp_out"]
    # the only changed layer: its base MLP output restores the base exactly
    assert rec[PLANTED] == pytest.approx(1.0, abs=1e-4)
    assert d["weight_revert_margin_recovery"]["one"][PLANTED] == pytest.approx(1.0, abs=1e-4)
    lo, hi = d["margin_recovery_ci95"]["one"]["mlp_out"][PLANTED]
    assert lo == pytest.approx(1.0, abs=1e-4) and hi == pytest.approx(1.0, abs=1e-4)
    assert all(abs(r) < 1e-4 for r in rec[:PLANTED])  # identical layers: nothing to give back
    assert d["top_layers_margin"]["one"][0] == PLANTED
    if d["n_failures"]["one"]:
        assert d["unpatched_failure_accuracy"]["one"] == 0.0

    # naive float64 reference on the same items: the damaged set, the drop, every layer's share
    base = load(str(planted / "base"), device="cpu", dtype="float64")
    variant = load(str(planted / "one"), device="cpu", dtype="float64")
    fmt = MMLUFormat("cloze")
    items = stratified_sample(load_mmlu(data_source, "test", SUBJECTS.split(",")), limit, 0)
    reqs = {(it.subject, it.index): (it, build_request(fmt, it, [])) for it in items}
    drops = {}
    for key, (it, req) in reqs.items():
        mb = _margin(_naive_scores(base, base, req.context, req.continuations, None), it.answer)
        mv = _margin(_naive_scores(base, variant, req.context, req.continuations, None), it.answer)
        drops[key] = (mb, mv)
    assert n_dmg == sum(mb - mv > 1e-3 for mb, mv in drops.values())
    used = [tuple(k) for k in d["damaged_items"]["one"]]
    assert all(drops[k][0] - drops[k][1] > 1e-3 for k in used)
    den = np.mean([drops[k][0] - drops[k][1] for k in used])
    assert d["margin_drop"]["one"] == pytest.approx(den, abs=1e-4)
    for layer in range(8):
        mp = [_margin(_naive_scores(base, variant, reqs[k][1].context, reqs[k][1].continuations,
                                    layer), reqs[k][0].answer) for k in used]
        share = np.mean([p - drops[k][1] for p, k in zip(mp, used)]) / den
        assert rec[layer] == pytest.approx(share, abs=1e-4), layer

    # stored: the margin figure is drawn from the JSON round trip (NaN as null)
    stored = read_result(tmp_path / "damage-attribution")
    assert stored.data["top_layers_margin"]["one"][0] == PLANTED
    assert (tmp_path / "damage-attribution" / "margin_recovery_one.png").is_file()


def test_sweep_scores_equal_score_mmlu(data_source, one_thread):
    """The unpatched path of the sweep (packed rows, the sweep's own blocks) gives the evals'
    log-likelihoods: cloze 0- and 1-shot and letter, and the same cloze-norm prediction."""
    from mechinterp.analysis.crossmodel import item_reference, item_rows
    from mechinterp.data.mmlu import load_mmlu
    from mechinterp.evals.mmlu import MMLUFormat, build_request, score_mmlu
    from probes.damage_attribution import parse_format

    model = load("tiny-random-llama", device="cpu", dtype="float32")
    items = load_mmlu(data_source, "test", ["world_religions"])[:3]
    dev = load_mmlu(data_source, "dev", ["world_religions"])
    for fmt in (MMLUFormat("cloze"), MMLUFormat("cloze", 1), MMLUFormat("letter", 0)):
        rows = score_mmlu(model, items, dev, fmt)
        reqs = [build_request(fmt, it, dev[:fmt.shots]) for it in items]
        for it, row, packed in zip(items, rows, item_rows(model, reqs)):
            got = item_reference(model, packed).scores.tolist()
            assert got == pytest.approx(row["loglik"], abs=1e-4)
            if fmt.kind == "cloze":
                norm = [v / len(c) for v, c in zip(got, it.choices)]
                assert row["pred_norm"] == max(range(4), key=norm.__getitem__)
    assert parse_format("cloze-norm") == (MMLUFormat("cloze"), True)
    assert parse_format("cloze-5shot-norm") == (MMLUFormat("cloze", 5), True)
    with pytest.raises(Exception, match="length-normalised"):
        parse_format("letter-0shot-norm")


def test_ratio_of_means_and_margins_by_hand():
    from mechinterp.evals.stats import ratio_of_means
    from probes.damage_attribution import margins

    s = np.array([[[0.0, -1.0, -3.0, -2.0], [-5.0, -1.0, -2.0, -4.0]]])
    assert margins(s, np.array([0, 2])).tolist() == [[1.0, -1.0]]
    est, ci = ratio_of_means(np.array([[1.0, 3.0], [0.0, 0.0]]), np.array([2.0, 2.0]),
                             np.random.default_rng(0), 50)
    assert est.tolist() == [1.0, 0.0]
    assert 0.5 <= ci[0, 0] <= 1.0 <= ci[0, 1] <= 1.5 and ci[1].tolist() == [0.0, 0.0]
    est, ci = ratio_of_means(np.zeros((3, 0)), np.zeros(0))
    assert np.isnan(est).all() and np.isnan(ci).all()


def test_plot_from_stored_result_with_nulls(tmp_path):
    """Figures from a stored result where NaN became null (no failures, some undefined layers)."""
    from mechinterp.store.results import Result, write_result
    from probes.damage_attribution import KEYS, PROBE

    L, W = 4, [[0, 1, 2], [1, 2, 3]]
    nan = math.nan
    data = {k: {} for k in KEYS}
    v = "x"
    for key in ("margin_recovery", "window_margin_recovery"):
        n = L if key == "margin_recovery" else len(W)
        data[key][v] = {"mlp_out": [0.0, 1.0, nan, 0.2][:n]}
        data[key + "_ci95"][v] = {"mlp_out": [[0.0, 0.1], [nan, nan], [nan, nan], [0.1, 0.3]][:n]}
    data["weight_revert_margin_recovery"][v] = [0.0, 1.0, 0.0, nan]
    data["weight_revert_margin_recovery_ci95"][v] = [[nan, nan]] * L
    data.update(n_failures={v: 0}, n_failures_used={v: 0}, n_damaged={v: 5},
                n_damaged_used={v: 3}, margin_drop={v: nan}, top_layers={v: []})
    data.update(variants=[v], n_layers=L, sites=["mlp_out"], windows=W, format="cloze")
    write_result(Result("damage-attribution", data), tmp_path / "r")
    stored = read_result(tmp_path / "r")
    assert math.isnan(stored.data["margin_recovery"][v]["mlp_out"][2])  # NaN comes back as NaN
    stored.data["margin_recovery"][v]["mlp_out"][2] = None  # and a plain JSON null draws too
    figs = PROBE.plot(stored)
    assert set(figs) == {"margin_recovery_x"}


@pytest.mark.slow
def test_default_model_planted_layer12_down_cloze(data_source, tmp_path):
    """The real default model with 100% of layer 12's ``down`` moved (plant_change, as the
    planted demo variant is built): in cloze, items lose margin and layer 12's base mlp_out gives
    back the most of it (all of it: the only changed layer)."""
    from mechinterp.models import DEFAULT_MODEL

    m = load(DEFAULT_MODEL, device="cpu", dtype="float32")
    plant_change(m, tmp_path / "p12", {(12, "down"): 1.0}, seed=0)
    del m
    probe = get_probe("damage-attribution")
    models = ModelSet(DEFAULT_MODEL, {"p12": str(tmp_path / "p12")}, device="cpu",
                      dtype="float32")
    config = make_config(probe, {"subjects": SUBJECTS, "format": "cloze", "max_failures": "2",
                                 "n_control": "0", "sites": "mlp_out", "window": "30",
                                 "n_bootstrap": "200"}, limit=6)
    d = run_probe(probe, models, data_source, config, out=tmp_path / "res").data
    assert d["n_damaged"]["p12"] > 0
    rec = d["margin_recovery"]["p12"]["mlp_out"]
    assert d["top_layers_margin"]["p12"][0] == 12
    assert rec[12] == pytest.approx(1.0, abs=1e-3)
    assert max(abs(r) for r in rec[:12]) < 1e-3
    assert d["weight_revert_margin_recovery"]["p12"][12] == pytest.approx(1.0, abs=1e-3)
    if d["n_failures"]["p12"]:
        assert d["unpatched_failure_accuracy"]["p12"] == 0.0
