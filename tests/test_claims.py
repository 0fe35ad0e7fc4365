"""Claims C1-C8 and the report on hand-built results whose verdicts are known in advance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechinterp.claims import (
    c1_weight_change,
    c2_kl,
    c3_qk_most_changed,
    c4_sft_mid_mlp,
    c5_mmlu,
    c6_freezing,
    c7_razor,
    c8_damage_mid_mlp,
    decide_all,
)
from mechinterp.compare import Study, VariantInfo, write_claims
from mechinterp.results import Result

N_LAYERS = 9
MATS = ("q", "k", "v", "o", "gate", "up", "down")
RUNS = {"sft": ["sft@step-1", "sft@step-2"], "grpo": ["grpo@step-1", "grpo@step-2"],
        "sft-frozen": ["sft-frozen@step-1", "sft-frozen@step-2"]}


def _rel(scale: float, mlp_peak: int | None = None) -> dict:
    """q/k largest; MLP change peaking at ``mlp_peak``."""
    out = {m: [scale * (3.0 if m in "qk" else 1.0)] * N_LAYERS for m in MATS}
    if mlp_peak is not None:
        for m in ("gate", "up", "down"):
            out[m] = [scale * (2.5 if i == mlp_peak else 0.5) for i in range(N_LAYERS)]
    return out


def _mmlu_rows(correct: list[bool]) -> str:
    return "".join(json.dumps({"subject": "s", "index": i, "gold": 0, "pred": 0 if c else 1}) + "\n"
                   for i, c in enumerate(correct))


def _task_rows(correct: list[bool]) -> str:
    return "".join(json.dumps({"index": i, "correct": c}) + "\n" for i, c in enumerate(correct))


@pytest.fixture
def study(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    base = rng.random(n) < 0.5
    # SFT loses 30 items, GRPO 2, frozen SFT 10; in-domain: SFT and frozen both gain
    sft = base.copy()
    sft[np.flatnonzero(base)[:30]] = False
    grpo = base.copy()
    grpo[np.flatnonzero(base)[:2]] = False
    frozen = base.copy()
    frozen[np.flatnonzero(base)[:10]] = False
    rel = {"sft@step-1": _rel(1e-3, 4), "sft@step-2": _rel(2e-3, 4),
           "grpo@step-1": _rel(5e-5), "grpo@step-2": _rel(1e-4),
           "sft-frozen@step-1": _rel(8e-4, 1), "sft-frozen@step-2": _rel(1.5e-3, 1)}
    kl_items = {"sft@step-2": list(1.0 + rng.random(50)), "grpo@step-2": list(0.1 * rng.random(50))}
    kl = {"sft@step-1": 0.8, "sft@step-2": 1.5, "grpo@step-1": 0.02, "grpo@step-2": 0.05,
          "sft-frozen@step-1": 0.4, "sft-frozen@step-2": 0.7}
    mmlu_files = {"items_base_cloze.jsonl": _mmlu_rows(base)}
    # checkpoints: forgetting grows with KL, not with weight change (frozen run moves more weight
    # per unit of KL than SFT does at step 1)
    for name, model in (("sft@step-2", sft), ("grpo@step-2", grpo), ("sft-frozen@step-2", frozen)):
        mmlu_files[f"items_{name}_cloze.jsonl"] = _mmlu_rows(model)
    for name, k in (("sft@step-1", 20), ("grpo@step-1", 1), ("sft-frozen@step-1", 5)):
        m = base.copy()
        m[np.flatnonzero(base)[:k]] = False
        mmlu_files[f"items_{name}_cloze.jsonl"] = _mmlu_rows(m)
    t = 60
    task = {"items_base.jsonl": _task_rows([False] * t),
            "items_sft@step-2.jsonl": _task_rows([i % 2 == 0 for i in range(t)]),
            "items_sft-frozen@step-2.jsonl": _task_rows([i % 2 == 0 for i in range(t)]),
            "items_grpo@step-2.jsonl": _task_rows([i % 5 == 0 for i in range(t)])}
    margin = [0.1] * N_LAYERS
    margin[4] = 0.7
    results = {
        "weight-change": Result("weight-change", {"relative_change": rel, "runs": RUNS}),
        "kl-drift": Result("kl-drift", {"kl": kl, "kl_items": kl_items}),
        "mmlu": Result("mmlu", {"models": ["base", *rel]}, files=mmlu_files),
        "task-accuracy": Result("task-accuracy", {"models": ["base", *rel]}, files=task),
        "damage-attribution": Result("damage-attribution", {
            "models": ["base", "sft", "grpo", "sft-frozen"], "n_damaged": {"sft": 12},
            "n_failures": {"sft": 3}, "margin_recovery": {"sft": {"mlp_out": margin}}}),
    }
    variants = {"sft": VariantInfo("sft", "x", RUNS["sft"], "sft", ""),
                "grpo": VariantInfo("grpo", "y", RUNS["grpo"], "grpo", ""),
                "sft-frozen": VariantInfo("sft-frozen", "z", RUNS["sft-frozen"], "sft",
                                          "paper-mid-mlp")}
    return Study(tmp_path, "base-model", variants, results, "smoke", RUNS)


def test_c1_ratio_of_mean_changes(study):
    c = c1_weight_change(study)
    sft = np.mean([v for m in MATS for v in _rel(2e-3, 4)[m]])
    grpo = np.mean([v for m in MATS for v in _rel(1e-4)[m]])
    assert c["held"] is True
    assert c["numbers"]["ratio_sft_over_grpo"] == pytest.approx(sft / grpo)


def test_c2_paired_interval_over_items(study):
    c = c2_kl(study)
    s = np.array(study.results["kl-drift"].data["kl_items"]["sft@step-2"])
    g = np.array(study.results["kl-drift"].data["kl_items"]["grpo@step-2"])
    assert c["held"] is True
    assert c["numbers"]["difference"] == pytest.approx((s - g).mean())
    lo, hi = c["numbers"]["difference_ci95"]
    assert lo < (s - g).mean() < hi and lo > 0


def test_c2_not_held_when_grpo_drifts_as_far(study):
    items = study.results["kl-drift"].data["kl_items"]
    items["grpo@step-2"] = list(items["sft@step-2"])
    assert c2_kl(study)["held"] is False


def test_c3_and_c4(study):
    c3 = c3_qk_most_changed(study)
    # means: q = k = 3s per layer; gate/up/down = s * (2.5 + 8 * 0.5) / 9; v = o = s
    assert c3["held"] is True
    assert all(set(c3["numbers"][n]["top_two"]) == {"q", "k"} for n in ("sft", "grpo"))
    study.results["weight-change"].data["relative_change"]["grpo@step-2"]["up"] = [1.0] * N_LAYERS
    c3 = c3_qk_most_changed(study)
    assert c3["held"] is False and c3["numbers"]["grpo"]["top_two"][0] == "up"
    c4 = c4_sft_mid_mlp(study)
    assert c4["held"] is True and c4["numbers"]["peak_layer"] == 4
    assert c4["numbers"]["middle_third"] == [3, 5]


def test_c5_c6_paired_on_the_same_items(study):
    c5 = c5_mmlu(study)
    assert c5["numbers"]["sft_minus_base"] == pytest.approx(-30 / 200)
    assert c5["numbers"]["grpo_minus_sft"] == pytest.approx(28 / 200)
    assert c5["held"] is True
    c6 = c6_freezing(study)
    assert c6["numbers"]["mmlu_frozen_minus_sft"] == pytest.approx(20 / 200)
    assert c6["numbers"]["task_frozen_minus_sft"] == 0.0
    assert c6["held"] is True  # MMLU interval excludes 0 (20 discordant pairs, all one way)


def test_c7_spearman_by_hand(study):
    c = c7_razor(study)
    pts = {p["model"]: p for p in c["numbers"]["points"]}
    assert len(pts) == 6
    assert pts["sft@step-2"]["mmlu_loss"] == pytest.approx(30 / 200)
    # losses 20,30,1,2,5,10 ; KL .8,1.5,.02,.05,.4,.7 -> identical orders -> rho = 1
    assert c["numbers"]["spearman_loss_kl"] == pytest.approx(1.0)
    assert c["numbers"]["spearman_loss_weight_change"] < 1.0
    assert c["held"] is True


def test_c8_and_missing_roles(study):
    c = c8_damage_mid_mlp(study)
    assert c["held"] is True and c["numbers"]["top_layer"] == 4
    study.variants.pop("sft-frozen")
    assert c6_freezing(study)["held"] is None
    study.results.pop("damage-attribution")
    assert c8_damage_mid_mlp(study)["held"] is None


def test_decide_all_on_an_empty_study_measures_nothing(tmp_path):
    claims = decide_all(Study(tmp_path, "b", {}, {}))
    assert [c["id"] for c in claims] == [f"C{i}" for i in range(1, 9)]
    assert all(c["held"] is None for c in claims)
    path = write_claims(claims, tmp_path)
    body = json.loads(path.read_text())
    assert set(body) == {f"C{i}" for i in range(1, 9)} and body["C1"]["held"] is None


def test_report_is_self_contained(study, tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from mechinterp.report import build_html, write_report

    folder = tmp_path / "weight-change"
    folder.mkdir()
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(folder / "fig.png")
    plt.close(fig)
    claims = decide_all(study)
    md, page = write_report(study, claims)
    text = page.read_text()
    assert "data:image/png;base64," in text and "http://" not in text and "https://" not in text
    assert "C1" in md.read_text() and "weight-change/fig.png" in md.read_text()
    assert build_html(study, claims) == text
