"""compare on tiny models with planted changes of known size: roles from names, claims decided
from what was planted, a second run reuses every result, a changed variant is recomputed."""

from __future__ import annotations

import json

import pytest

from mechinterp.errors import UserError
from mechinterp.study.compare import compare
from mechinterp.study.folder import load_study

PROBES = ["weight-change", "kl-drift", "task-accuracy", "mmlu"]


def test_compare_decides_weight_claims_and_reuses(planted_variants, tmp_path, data_source,
                                                  one_thread):
    said: list[str] = []
    study = compare("tiny-random-llama", planted_variants, tmp_path, preset="smoke",
                    probes=PROBES, echo=said.append)
    claims = {c["id"]: c for c in study.claims}
    # planted q, k (and gate 1.5x) moved by 0.2 vs 0.01 in every layer: relative change says 20x,
    # but a plain model spec records no learning rate or steps, so the update per unit of
    # lr x steps (what C1 is decided on) is unknown: not measured, and it says why
    assert claims["C1"]["verdict"] == "not measured" and claims["C1"]["held"] is None
    assert "update_scale" in claims["C1"]["statement"]
    assert claims["C3"]["held"] is not True  # gate moved as much as q/k: they do not lead
    assert claims["C6"]["held"] is None and "sft-frozen" in claims["C6"]["statement"]
    stored = json.loads((tmp_path / "claims.json").read_text())
    assert stored["C1"]["verdict"] == "not measured" and stored["C6"]["held"] is None
    assert (tmp_path / "report.html").exists() and (tmp_path / "report.md").exists()
    again: list[str] = []
    compare("tiny-random-llama", planted_variants, tmp_path, preset="smoke", probes=PROBES,
            echo=again.append)
    assert sum("reusing" in m for m in again) == len(PROBES)
    loaded = load_study(tmp_path)
    assert set(loaded.results) == set(PROBES) and loaded.role("grpo") == "grpo"


def test_compare_refuses_bad_input(planted_variants, tmp_path, data_source):
    with pytest.raises(UserError, match="at least one --variant"):
        compare("tiny-random-llama", {}, tmp_path)
    with pytest.raises(UserError, match="unknown compare preset"):
        compare("tiny-random-llama", planted_variants, tmp_path, preset="huge")
    with pytest.raises(UserError, match="no step"):
        compare("tiny-random-llama", planted_variants, tmp_path, probes=["weight-chnge"])
