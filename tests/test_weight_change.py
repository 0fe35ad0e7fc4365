"""Weight change and update sparsity against a direct float64 computation on hand-made variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechinterp.analysis import weights as W
from mechinterp.errors import SpecError

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(b: torch.Tensor, v: torch.Tensor) -> dict:
    """Everything computed directly in float64 / numpy, no chunking."""
    b64, v64 = b.double().numpy().ravel(), v.double().numpy().ravel()
    ratio = np.abs(v64 - b64) / np.maximum(np.abs(b64), 1e-10)
    ints = {4: np.int32, 2: np.int16}[b.element_size()]
    bits_b = b.contiguous().view(torch.int32 if ints is np.int32 else torch.int16).numpy().ravel()
    bits_v = v.contiguous().view(torch.int32 if ints is np.int32 else torch.int16).numpy().ravel()
    hist, _ = np.histogram(ratio[(ratio >= 1e-8) & (ratio < 1)], bins=W.SPARSITY_EDGES)
    return {"rel": np.linalg.norm(v64 - b64) / np.linalg.norm(b64),
            "changed": int((bits_b != bits_v).sum()), "hist": hist,
            "below": int((ratio < 1e-8).sum()), "above": int((ratio >= 1).sum())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_stats_match_float64_reference(dtype, monkeypatch):
    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 1000)  # force many chunks
    g = torch.Generator().manual_seed(1)
    b = torch.randn(97, 61, generator=g).to(dtype)
    # relative perturbations spread over 1e-10..10 (log-uniform), some entries untouched
    scale = 10 ** (torch.rand(97, 61, generator=g) * 11 - 10)
    v = (b.double() * (1 + scale * torch.sign(torch.randn(97, 61, generator=g)))).to(dtype)
    v[:5] = b[:5]
    b[7, :3] = 0.0  # zero base entries: the 1e-10 floor decides their ratio
    v[7, 0] = 0.0
    v[8, 1] = -b[8, 1] if b[8, 1] != 0 else 1.0  # ratio 2 -> above
    ref = _reference(b, v)
    got = W.tensor_stats(b, v)
    assert got.relative == pytest.approx(ref["rel"], rel=1e-6)
    assert got.n_changed == ref["changed"]
    assert got.n_below == ref["below"] and got.n_above == ref["above"]
    np.testing.assert_array_equal(got.hist, ref["hist"])
    assert got.hist.sum() + got.n_below + got.n_above == b.numel()


def test_hand_worked_bins_and_bitwise_change():
    """Ratios placed by hand: 1e-3 -> bin 62 ((-3 + 8) * 12.5 = 62.5), 0.5 -> bin 96, exact edges."""
    b = torch.ones(10, dtype=torch.float64)
    v = b.clone()
    v[0] += 1e-3  # bin floor(62.5) = 62
    v[1] -= 0.5  # log10 0.5 = -0.301 -> (7.699) * 12.5 = 96.2 -> bin 96
    v[2] = 1.0 + W.SPARSITY_EDGES[40]  # exactly on edge 40 -> bin 40 (edges are left-closed)
    v[3] = 2.0  # ratio exactly 1 -> above (bins are half-open)
    v[4] = -0.0 + 1.0  # same value: unchanged
    s = W.chunk_stats(b, v)
    assert s.n_changed == 4
    assert {int(i): int(c) for i, c in enumerate(s.hist) if c} == {40: 1, 62: 1, 96: 1}
    assert s.n_above == 1 and s.n_below == 6
    # -0.0 vs +0.0: equal as numbers but a bitwise change
    z = torch.zeros(4)
    nz = z.clone()
    nz[1] = -0.0
    assert W.chunk_stats(z, nz).n_changed == 1
    # non-finite ratios (inf base -> inf/inf = NaN with the sign bit set; NaN variant) count as above
    odd = W.chunk_stats(torch.tensor([float("inf"), 1.0, 1.0]), torch.tensor([1.0, float("nan"), 1.0]))
    assert (odd.n_above, odd.n_below, int(odd.hist.sum())) == (2, 1, 0)


@pytest.mark.parametrize("model_name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_streamed_checkpoint_diff_matches_direct(model_name, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mechinterp.models import load
    from mechinterp.models.edit import plant_change
    from mechinterp.models.zoo import fetch

    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 300)  # rows in several chunks, also for slices
    model = load(model_name, device="cpu", dtype="float32")
    matrices = model.matrices
    edits = {(1, matrices[0]): 0.02, (2, matrices[-1]): 0.005, (3, "k"): 1e-4}
    with torch.no_grad():
        w = model.weight(0, "v")
        w[0, 0] += 1.0  # one hand-edited entry
        w[3, 5] *= 1.001
    out = plant_change(model, tmp_path / "variant", edits, seed=3)
    base_dir = fetch(model_name)
    diff = W.weight_diff(base_dir, {"v": out})

    base_sd = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        base_sd |= load_file(f)
    var_sd = {}
    for f in sorted(out.glob("*.safetensors")):
        var_sd |= load_file(f)
    changed_somewhere = set()
    for layer in range(model.n_layers):
        for m in matrices:
            ref = model.param_slice(layer, m)
            b, v = ref.take(base_sd[ref.name]), ref.take(var_sd[ref.name])
            expect = _reference(b, v)
            got = diff.stats["v"][m][layer]
            assert got.relative == pytest.approx(expect["rel"], rel=1e-6, abs=1e-12), (layer, m)
            assert got.n_changed == expect["changed"], (layer, m)
            np.testing.assert_array_equal(got.hist, expect["hist"])
            assert (got.n_below, got.n_above) == (expect["below"], expect["above"])
            if got.n_changed:
                changed_somewhere.add((layer, m))
    # the planted sizes come back, and nothing else moved
    for (layer, m), rel in edits.items():
        assert diff.stats["v"][m][layer].relative == pytest.approx(rel, rel=1e-4)
    assert changed_somewhere == set(edits) | {(0, "v")}
    assert diff.stats["v"]["v"][0].n_changed == 2


def test_expand_checkpoints_orders_steps_and_rejects_empty(tmp_path):
    from mechinterp.models.specs import expand_checkpoints

    for name in ("step-40", "step-5", "step-10", "notes"):
        d = tmp_path / "out" / "checkpoints" / name
        d.mkdir(parents=True)
        if name != "notes":
            (d / "config.json").write_text("{}")
    got = expand_checkpoints(f"{tmp_path / 'out'}@all")
    assert [g.rsplit("@", 1)[1] for g in got] == ["step-5", "step-10", "step-40"]
    hf = tmp_path / "trainer"
    for n in (500, 1000):
        (hf / f"checkpoint-{n}").mkdir(parents=True)
        (hf / f"checkpoint-{n}" / "config.json").write_text("{}")
    assert [g.rsplit("@", 1)[1] for g in expand_checkpoints(f"{hf}@all")] == \
        ["checkpoint-500", "checkpoint-1000"]
    assert expand_checkpoints("org/model@v1") == ["org/model@v1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no checkpoints"):
        expand_checkpoints(f"{tmp_path / 'empty'}@all")


def test_probe_trajectory_over_a_run_folder(tmp_path):
    """OUT@all -> run of checkpoints; trajectory, changed fraction and figures from the result."""
    import matplotlib.pyplot as plt

    from mechinterp.models import load
    from mechinterp.models.edit import plant_change
    from mechinterp.models.modelset import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe

    model = load("tiny-random-llama", device="cpu", dtype="float32")
    for step, rel in ((20, 0.01), (10, 0.003)):  # written out of order on purpose
        fresh = load("tiny-random-llama", device="cpu", dtype="float32")
        plant_change(fresh, tmp_path / "sft" / "checkpoints" / f"step-{step}",
                     {(1, "gate"): rel, (2, "q"): rel / 10}, seed=step)
    plant_change(model, tmp_path / "grpo", {(0, "k"): 1e-3})
    ms = ModelSet("tiny-random-llama", {"sft": f"{tmp_path / 'sft'}@all",
                                        "grpo": str(tmp_path / "grpo")}, device="cpu")
    probe = get_probe("weight-change")
    res = run_probe(probe, ms, None, make_config(probe))  # saving figures: the CLI tests
    traj = res["trajectory"]
    assert list(traj["sft"]) == ["sft@step-10", "sft@step-20"]
    assert traj["sft"]["sft@step-10"]["gate"][1] == pytest.approx(0.003, rel=1e-4)
    assert traj["sft"]["sft@step-20"]["gate"][1] == pytest.approx(0.01, rel=1e-4)
    assert traj["grpo"]["grpo"]["k"][0] == pytest.approx(1e-3, rel=1e-4)
    assert res["steps"]["sft@step-20"] == 20
    n_gate = 4 * 128 * 64  # 4 layers of (128, 64); one layer fully changed
    assert res["changed_fraction"]["sft@step-20"]["gate"] == pytest.approx(
        res["changed_fraction_by_layer"]["sft@step-20"]["gate"][1] * 128 * 64 / n_gate)
    assert res["changed_fraction"]["sft@step-20"]["down"] == 0.0
    figs = probe.plot(res)
    assert set(figs) == {"weight_change_heatmap", "weight_change_checkpoints_sft",
                         "weight_change_trajectory", "weight_change_layers_sft",
                         "sparsity_histograms", "coherence_heatmap", "coherence_layers"}
    # no run of ours made these: the path comes from the checkpoints, lr and steps are unknown
    assert res["coherence_source"]["sft@step-20"] == "checkpoints (2)"
    assert res["update_scale"]["sft@step-20"]["gate"][1] is None
    assert res["noise_floor"]["grpo"] is None
    for fig in figs.values():
        plt.close(fig)
