"""End to end on the real default model: `mechinterp run` for the three probes, then `figures`.

The variant is the demo's planted one (layers 12-17 MLP and q/k of every layer moved by known
relative amounts, nothing else), so the weight numbers have a known answer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_cli_runs_weight_change_kl_drift_attention_shift_then_redraws(tmp_path, data_source):
    from mechinterp.cli import main
    from mechinterp.planted import (
        PLANTED_MLP_LAYERS,
        PLANTED_MLP_REL,
        PLANTED_QK_REL,
        planted_variant,
    )
    from mechinterp.store.results import read_result

    variant = planted_variant()
    out = tmp_path / "res"
    common = ["--variant", f"planted={variant}", "--out", str(out), "--device", "cpu",
              "--dtype", "float32", "--data-dir", str(data_source.root)]
    runs = {"weight-change": [],
            "kl-drift": ["--limit", "1"],
            "attention-shift": ["--set", "n_mmlu=1", "--set", "n_knowns=1",
                                "--set", "max_tokens=64"]}
    for probe, extra in runs.items():
        assert main(["run", probe, *common, *extra]) == 0, probe

    wc = read_result(out / "weight-change").data
    rel = wc["relative_change"]["planted"]
    assert len(rel["gate"]) == 30
    for layer in range(30):
        want_mlp = PLANTED_MLP_REL if layer in PLANTED_MLP_LAYERS else 0.0
        assert rel["up"][layer] == pytest.approx(want_mlp, rel=1e-3, abs=1e-12)
        assert rel["q"][layer] == pytest.approx(PLANTED_QK_REL, rel=1e-3)
        assert rel["v"][layer] == 0.0 and rel["o"][layer] == 0.0
    assert wc["changed_fraction"]["planted"]["v"] == 0.0
    assert wc["changed_fraction"]["planted"]["down"] == pytest.approx(6 / 30, abs=1e-3)
    assert wc["trajectory"]["planted"]["planted"] == rel

    kl = read_result(out / "kl-drift").data
    assert kl["n_items"] == 1 and kl["n_nonfinite"] == {"planted": 0}
    assert 0 < kl["kl"]["planted"] < 1 and math.isfinite(kl["kl"]["planted"])
    assert kl["kl"]["planted"] == pytest.approx(np.mean(kl["kl_items"]["planted"]))

    att = read_result(out / "attention-shift").data
    js = np.array(att["js"]["planted"])
    assert js.shape == (30, 9) and att["n_prompts"] == 2
    assert np.all(js > 0) and np.all(js <= math.log(2))  # q/k moved in every layer

    pngs = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    for p in pngs:
        (out / p).unlink()
    assert main(["figures", str(out)]) == 0
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == pngs
    assert {p.stem for p in pngs} >= {"weight_change_heatmap", "sparsity_histograms", "kl_drift",
                                      "attention_js_heatmap", "attention_shift_layers"}
