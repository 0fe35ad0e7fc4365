"""decide_all, claims.json, the verdict line and the report's verdict / caveats sections, on
planted studies (built by tests/test_claims_planted.py's helpers) and on results stored before
the new measures existed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_claims_planted import (
    EVERYWHERE,
    QK_ONLY,
    STEPS,
    _base_mmlu,
    _c8_study,
    _kl_result,
    _mmlu,
    build_study,
    weight_results,
)

from mechinterp.store.results import Result
from mechinterp.study.claims import CLAIMS, decide_all, verdict_line, write_claims
from mechinterp.study.claims.caveats import saturation
from mechinterp.study.folder import Study, VariantInfo


def test_decide_all_on_an_empty_study_measures_nothing(tmp_path):
    claims = decide_all(Study(tmp_path, "b", {}, {}))
    assert [c["id"] for c in claims] == [f"C{i}" for i in range(1, 9)]
    assert all(c["held"] is None and c["verdict"] == "not measured" for c in claims)
    body = json.loads(write_claims(claims, tmp_path).read_text())
    assert set(body) == {f"C{i}" for i in range(1, 9)}
    assert body["C1"]["held"] is None and body["C1"]["verdict"] == "not measured"


def test_results_stored_before_the_new_measures_are_not_measured_with_the_reason(tmp_path):
    """Relative change only, template KL only, MMLU rows without log-likelihoods, patching only:
    no claim is decided on them, and each says which key is missing."""
    rel = {f"{n}@step-{STEPS}": {m: [0.01] * 9 for m in ("q", "k", "v", "o", "gate", "up", "down")}
           for n in ("sft", "grpo", "sft-frozen")}
    rows = "".join(json.dumps({"subject": "s", "index": i, "gold": 0, "pred": i % 2}) + "\n"
                   for i in range(10))
    results = {
        "weight-change": Result("weight-change", {"relative_change": rel}),
        "kl-drift": Result("kl-drift", {"kl": {k: 0.1 for k in rel},
                                        "kl_items": {k: [0.1] * 5 for k in rel}}),
        "mmlu": Result("mmlu", {"models": ["base", *rel]},
                       files={f"items_{n}_cloze.jsonl": rows for n in ["base", *rel]}),
        "damage-attribution": Result("damage-attribution", {
            "models": ["base", "sft"], "n_damaged": {"sft": 3},
            "margin_recovery": {"sft": {"mlp_out": [0.1] * 9}}}),
    }
    study = build_study(tmp_path, results, kinds=("sft", "grpo", "sft-frozen"))
    claims = {c["id"]: c for c in decide_all(study)}
    assert all(c["verdict"] == "not measured" and c["held"] is None for c in claims.values())
    assert "update_scale" in claims["C1"]["statement"]
    assert "kl_reference_items" in claims["C2"]["statement"]
    assert "log-likelihoods" in claims["C5"]["statement"]
    assert "revert_window_recovery" in claims["C8"]["statement"]


@pytest.fixture
def study(tmp_path):
    """Three seeds; SFT coherent everywhere, GRPO coherent in q/k only; SFT loses MMLU log-prob,
    GRPO keeps it; SFT drifts further on neutral solutions; damage written in the mid MLPs."""
    rng = np.random.default_rng(0)
    wc = weight_results({"sft": EVERYWHERE, "grpo": QK_ONLY}, seeds=3)
    ll, gold = _base_mmlu(60)
    models = {"base": ll}
    for name in ("sft", "sft-s1", "sft-s2"):
        m = ll.copy()
        m[np.arange(60), gold] -= rng.uniform(0.2, 0.6, 60)
        models[f"{name}@step-{STEPS}"] = m
    for name in ("grpo", "grpo-s1", "grpo-s2"):
        models[f"{name}@step-{STEPS}"] = ll + rng.normal(0, 0.01, ll.shape)
    damage = _c8_study(tmp_path, net=0.5).results["damage-attribution"]
    kl = _kl_result(rng, 3, {"sft": 1.0, "grpo": 0.1}, {"sft": 0.05, "grpo": 0.01})
    return build_study(tmp_path, {"weight-change": wc, "kl-drift": kl,
                                  "mmlu": _mmlu(models, gold), "damage-attribution": damage},
                       seeds=3)


def test_verdicts_held_fields_and_holm(study):
    claims = {c["id"]: c for c in decide_all(study)}
    for c in claims.values():
        assert c["held"] is {"held": True, "not held": False}.get(c["verdict"])
        if c["verdict"] != "not measured":
            p = c["primary"]
            assert c["test"] and p["n"] > 0 and p["mde"] > 0
            assert p["p_holm"] >= p["p_value"] and p["holm_family"] == 7
    for cid in ("C1", "C2", "C5", "C8"):
        assert claims[cid]["verdict"] == "held", (cid, claims[cid]["why"])
    # GRPO's q/k lead but SFT moved everything coherently: C3 cannot hold for SFT
    assert claims["C3"]["verdict"] != "held"
    assert claims["C6"]["verdict"] == "not measured"  # no frozen run
    line = verdict_line(claims["C1"])
    assert line.startswith("C1 HELD") and "3-5x" in line
    body = json.loads(write_claims(list(claims.values()), study.out).read_text())
    assert body["C1"]["verdict"] == "held" and body["C1"]["held"] is True
    assert body["C7"]["primary"]["p_holm"] == pytest.approx(claims["C7"]["primary"]["p_holm"])


def test_report_states_verdict_caveats_holm_and_mid_layers(study, tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from mechinterp.study.report import build_html, write_report

    folder = tmp_path / "weight-change"
    folder.mkdir(exist_ok=True)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(folder / "fig.png")
    plt.close(fig)
    claims = decide_all(study)
    md, page = write_report(study, claims)
    text, html = md.read_text(), page.read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert build_html(study, claims) == html
    for needle in ("| **C1**", "| held |", "## Caveats", "Holm", "Mid layers: the middle third",
                   "layers 3-5", "MDE (80% power)"):
        assert needle in text, needle
    c1, c5 = (next(c for c in claims if c["id"] == i) for i in ("C1", "C5"))
    lo, hi = np.exp(c1["primary"]["ci95"])  # C1's log ratio shown as the ratio
    assert f"{np.exp(c1['primary']['effect']):.3f}x [{lo:.3f}, {hi:.3f}]" in text
    lo, hi = c5["primary"]["ci95"]
    assert f"[{lo:.3f}, {hi:.3f}] nats" in text
    assert "reads the base's weight scale" in text  # GRPO's noise matrices: relative change ~ 1/RMS
    assert "<h2>Caveats</h2>" in html and "weight-change/fig.png" in text


def test_saturation_caveat_from_the_training_curves(tmp_path):
    early = VariantInfo("sft", str(tmp_path / "nowhere"), [], "sft", "", {"history": [
        {"step": 2, "loss": 0.4}, {"step": 8, "loss": 0.03}, {"step": 24, "loss": 3e-4}]})
    late = VariantInfo("sft", str(tmp_path / "nowhere"), [], "sft", "", {"history": [
        {"step": 2, "loss": 0.9}, {"step": 20, "loss": 0.2}, {"step": 24, "loss": 0.04}]})
    text = saturation(early)
    assert text and "0.03" in text and "step 8 of 24" in text
    assert saturation(late) is None
    # from the drift log of a training folder
    run = tmp_path / "grpo"
    (run / "training-drift").mkdir(parents=True)
    (run / "training-drift" / "result.json").write_text(json.dumps({"data": {"history": [
        {"step": s, "reward": 1.0, "reward_std": 0.0 if s > 4 else 0.3} for s in range(1, 11)]}}))
    grpo = VariantInfo("grpo", str(run), [], "grpo", "", {})
    assert "reward std" in saturation(grpo)


def test_every_claim_is_registered_once():
    assert [f.__name__[:2] for f in CLAIMS] == [f"c{i}" for i in range(1, 9)]


def test_pytest_claims_map_verdicts_to_outcomes(study, tmp_path):
    """``pytest --pyargs probes.claims --mi-results DIR`` on a stored study: held passes, not held
    fails, inconclusive is XFAIL with its numbers (never a pass), not measured is skipped."""
    import os
    import re
    import subprocess
    import sys

    from mechinterp.store.results import write_result
    from mechinterp.study.claims import write_claims
    from mechinterp.study.folder import STUDY_FILE

    out = tmp_path / "stored"
    out.mkdir()
    (out / STUDY_FILE).write_text(json.dumps(study.to_json()))
    for probe, res in study.results.items():
        write_result(res, out / probe)
    write_claims(decide_all(study), out)  # written last: the folder is a finished compare
    claims = {c["id"]: c for c in decide_all(study)}
    env = dict(os.environ, MECHINTERP_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "probes.claims", "-v", "-rx",
                           "-p", "no:cacheprovider", "-p", "no:xdist", "--mi-results", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    got = dict(re.findall(r"test_claim\[c(\d)_\w+\] (PASSED|FAILED|SKIPPED|XFAIL)", proc.stdout))
    want = {cid[1]: {"held": "PASSED", "not held": "FAILED", "inconclusive": "XFAIL",
                     "not measured": "SKIPPED"}[c["verdict"]] for cid, c in claims.items()}
    assert got == want, proc.stdout[-3000:]
    assert {"PASSED", "FAILED", "XFAIL", "SKIPPED"} <= set(got.values())
    c7 = claims["C7"]["primary"]
    assert re.search(rf"XFAIL .*C7 .*inconclusive.*\[{c7['ci95'][0]:.4g}, ", proc.stdout)
    assert proc.returncode == 1  # a claim that does not hold fails the run


def _primary(effect, lo, hi, p, mde, needed=0.1):
    from mechinterp.study.claims.core import primary

    p_ = primary("t", "m", effect, np.array([lo, hi]), needed, 10, 1, p=p)
    return p_ | {"ci95": [lo, hi], "mde": mde}


@pytest.mark.parametrize(("args", "verdict"), [
    ((0.5, 0.2, 0.8, 0.001, 0.05), "held"),
    ((-0.5, -0.8, -0.2, 0.001, 0.05), "not held"),  # significant the other way
    ((0.01, -0.03, 0.05, 0.6, 0.05), "not held"),  # powered (MDE 0.05 <= 0.1), rules 0.1 out
    ((0.01, -0.03, 0.15, 0.6, 0.05), "inconclusive"),  # powered but 0.1 not ruled out
    ((0.01, -0.3, 0.05, 0.6, 0.3), "inconclusive"),  # MDE 0.3 > needed 0.1: no power
    ((0.3, 0.1, 0.5, 0.125, 0.05), "inconclusive"),  # interval excludes 0, the test does not
])
def test_the_decision_rule(args, verdict):
    from mechinterp.study.claims.core import decide

    assert decide(_primary(*args), [])[0] == verdict


def test_a_failed_gate_blocks_held_or_everything():
    from mechinterp.study.claims.core import decide, gate

    p = _primary(0.5, 0.2, 0.8, 0.001, 0.05)
    assert decide(p, [gate(False, "noise")]) == ("inconclusive", "noise")
    q = _primary(-0.5, -0.8, -0.2, 0.001, 0.05)
    assert decide(q, [gate(False, "noise")])[0] == "not held"  # a 'held' gate leaves it
    assert decide(q, [gate(False, "no damage", blocks="any")])[0] == "inconclusive"


def test_holm_turns_three_borderline_claims_inconclusive(tmp_path, monkeypatch):
    """Three claims each at p = 0.02 with intervals excluding 0: held alone, not after Holm
    (0.06 each)."""
    import mechinterp.study.claims as claims_mod
    from mechinterp.study.claims.core import claim

    def make(cid):
        def fn(study):
            return claim(cid, cid, "planted", {}, _primary(0.5, 0.1, 0.9, 0.02, 0.05))
        fn.__name__ = f"{cid.lower()}_planted"
        return fn

    monkeypatch.setattr(claims_mod, "CLAIMS", [make("C1"), make("C2"), make("C3")])
    alone = make("C1")(None)
    assert alone["verdict"] == "held"
    out = claims_mod.decide_all(Study(tmp_path, "b", {}, {}))
    assert [c["primary"]["p_holm"] for c in out] == pytest.approx([0.06] * 3)
    assert {c["verdict"] for c in out} == {"inconclusive"}
    assert "Holm-adjusted p = 0.06" in out[0]["why"]
