"""Each claim on a planted study whose truth is known: the claim must decide it right.

The weight measures are not typed in: an AdamW-like optimizer is simulated (every entry moves by
lr x sign(g) per step) on matrices whose gradient has a fixed direction (a coherent update) or is
pure noise, and update scale, coherence, relative change, noise floor and scale confound are
computed from the simulated weights in float64, as the weight-change probe defines them. Outputs
(MMLU log-likelihoods, KL per item, revert recoveries) are planted item by item. Every planted
case here was decided wrong by the claims before they read these measures (relative-change
argmaxes, one seed, accuracy intervals on a handful of flips, patching as origin).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mechinterp.evals.stats import mcnemar, mean_ci, spearman
from mechinterp.store.results import Result
from mechinterp.study.claims import (
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
from mechinterp.study.claims.stats import hier_bootstrap, holm, sign_flip_p
from mechinterp.study.folder import Study, VariantInfo

N_LAYERS = 9  # mid layers 3-5
MATS = ("q", "k", "v", "o", "gate", "up", "down")
# the base's RMS per matrix kind: v and o smallest, so relative change ranks them first whatever
# moved (the confound the claims must not read)
BASE_RMS = {"q": 0.19, "k": 0.2, "v": 0.05, "o": 0.065, "gate": 0.1, "up": 0.12, "down": 0.11}
STEPS = 24
N_ENTRIES = 400


def simulate(coherent: dict, lr: float, seed: int, steps: int = STEPS) -> dict:
    """Per (matrix, layer): ``dW`` after ``steps`` sign steps of size ``lr``; the gradient is
    ``strength * u + noise`` with a fixed random direction ``u`` (``coherent[(m, layer)]`` is the
    strength, 0 = pure noise). Returns update_scale, coherence and relative change per matrix."""
    rng = np.random.default_rng(seed)
    out = {k: {m: [] for m in MATS} for k in ("update_scale", "coherence", "relative_change")}
    inv_rms, rel_all = [], []
    for m in MATS:
        for layer in range(N_LAYERS):
            w = rng.normal(0, BASE_RMS[m], N_ENTRIES)
            u = rng.choice((-1.0, 1.0), N_ENTRIES)
            a = coherent.get((m, layer), 0.0)
            steps_ = lr * np.sign(a * u + rng.normal(0, 1, (steps, N_ENTRIES)))
            dw = steps_.sum(0)
            path = np.linalg.norm(steps_, axis=1).sum()
            out["update_scale"][m].append(float(np.sqrt(np.mean(dw**2)) / (lr * steps)))
            out["coherence"][m].append(float(np.linalg.norm(dw) / path))
            rel = float(np.linalg.norm(dw) / np.linalg.norm(w))
            out["relative_change"][m].append(rel)
            inv_rms.append(1 / np.sqrt(np.mean(w**2)))
            rel_all.append(rel)
    out["scale_confound"] = spearman(rel_all, inv_rms)
    return out


def noise_floor(lr: float, steps: int = STEPS, n_sim: int = 40) -> dict:
    """What pure-noise gradients reach with the same optimizer: mean and 95% range over sims."""
    rng = np.random.default_rng(123)
    us, co = [], []
    for _ in range(n_sim):
        st = lr * np.sign(rng.normal(0, 1, (steps, N_ENTRIES)))
        dw = st.sum(0)
        us.append(np.sqrt(np.mean(dw**2)) / (lr * steps))
        co.append(np.linalg.norm(dw) / np.linalg.norm(st, axis=1).sum())
    return {"update_scale": float(np.mean(us)), "coherence": float(np.mean(co)),
            "update_scale_ci95": [float(np.quantile(us, 0.025)), float(np.quantile(us, 0.975))],
            "coherence_ci95": [float(np.quantile(co, 0.025)), float(np.quantile(co, 0.975))],
            "settings": {"optimizer": "sign-sgd (AdamW at few steps)", "lr": lr, "steps": steps}}


def _names(kind: str, seeds: int) -> list[str]:
    return [kind if i == 0 else f"{kind}-s{i}" for i in range(seeds)]


def build_study(tmp_path, results: dict, seeds: int = 1, kinds=("sft", "grpo")) -> Study:
    variants, runs = {}, {}
    for kind in kinds:
        algo = kind.split("-")[0]
        for i, name in enumerate(_names(kind, seeds)):
            ck = [f"{name}@step-{STEPS}"]
            variants[name] = VariantInfo(name, str(tmp_path / name), ck, algo,
                                         "mlp@3-5" if "frozen" in kind else "", {}, i)
            runs[name] = ck
    return Study(tmp_path, "base-model", variants, results, "planted", runs)


def weight_results(plan: dict, seeds: int = 1, lr: dict | None = None) -> Result:
    """``plan[kind] = {(matrix, layer): strength}``; one simulation per kind and seed."""
    data = {k: {} for k in ("update_scale", "coherence", "relative_change", "scale_confound",
                            "noise_floor")}
    for kind, coherent in plan.items():
        rate = (lr or {}).get(kind, 1e-5)
        floor = noise_floor(rate)
        for i, name in enumerate(_names(kind, seeds)):
            model = f"{name}@step-{STEPS}"
            sim = simulate(coherent, rate, seed=hash((kind, i)) % 2**31)
            for k in ("update_scale", "coherence", "relative_change", "scale_confound"):
                data[k][model] = sim[k]
            data["noise_floor"][model] = floor
    data |= {"matrices": list(MATS), "n_layers": N_LAYERS}
    return Result("weight-change", data)


QK_ONLY = {(m, layer): 0.5 for m in ("q", "k") for layer in range(N_LAYERS)}
EVERYWHERE = {(m, layer): 2.0 for m in MATS for layer in range(N_LAYERS)}


# ----- C1 / C3: coherent updates against sign noise ----------------------------------------------

def test_c1_pure_sign_noise_at_twice_the_lr_is_not_held(tmp_path):
    """Both runs are pure sign noise; SFT's lr is twice GRPO's, so its relative change is twice
    as large (the old verdict: held). Per unit of lr x steps nothing differs, and SFT is within
    the noise floor: the claim must not hold."""
    study = build_study(tmp_path, {"weight-change": weight_results(
        {"sft": {}, "grpo": {}}, seeds=3, lr={"sft": 2e-5, "grpo": 1e-5})}, seeds=3)
    c = c1_weight_change(study)
    assert c["numbers"]["relative_change_ratio_sft_over_grpo"] == pytest.approx(2.0, rel=0.05)
    assert c["numbers"]["ratio_sft_over_grpo"] == pytest.approx(1.0, abs=0.05)
    assert c["held"] is not True and c["verdict"] in ("not held", "inconclusive")
    # the base's scale drives the relative-change map: caveat generated from the data
    assert any("reads the base's weight scale" in x for x in c["caveats"])


def test_c1_coherent_sft_update_held_and_compared_with_the_ceiling(tmp_path):
    study = build_study(tmp_path, {"weight-change": weight_results(
        {"sft": EVERYWHERE, "grpo": {}}, seeds=3)}, seeds=3)
    c = c1_weight_change(study)
    n = c["numbers"]
    assert c["verdict"] == "held" and c["held"] is True
    # the ceiling: every entry moving lr each step in one direction gives 1; strength 2 gets
    # P(sign agrees) = Phi(2) = 0.977 per step, so E[dW]/(lr T) = 2 * 0.977 - 1 = 0.954
    assert n["sft_update_scale"] == pytest.approx(0.954, abs=0.02)
    assert n["grpo_update_scale"] == pytest.approx(1 / math.sqrt(STEPS), rel=0.1)
    assert n["ceiling_ratio_over_grpo"] == pytest.approx(1 / n["grpo_update_scale"])
    assert "3-5x" in c["statement"] and "ceiling" in c["statement"]
    assert "10-50x" not in c["statement"]
    p = c["primary"]
    assert p["ci95"][0] > 0 and p["n_seeds"] == 3 and p["n"] == N_LAYERS * len(MATS)


def test_c3_coherent_qk_plus_sign_noise_everywhere_is_held(tmp_path):
    """q/k updated coherently (a weak fixed direction: about twice the noise's update scale),
    every other matrix pure sign noise: q/k are the most changed. Relative change says v and o
    (smallest base RMS, 4x below q/k's), which the old verdict read."""
    study = build_study(tmp_path, {"weight-change": weight_results(
        {"sft": QK_ONLY, "grpo": QK_ONLY}, seeds=2)}, seeds=2)
    c = c3_qk_most_changed(study)
    assert c["verdict"] == "held", c["why"]
    for kind in ("sft", "grpo"):
        assert set(c["numbers"][kind]["top_two"]) == {"q", "k"}
        assert set(c["numbers"][kind]["top_two_relative_change"]) != {"q", "k"}


def test_c3_pure_sign_noise_is_not_held(tmp_path):
    """Nothing coherent anywhere: no matrix kind moved more than noise; q/k cannot be 'most
    changed' (the old verdict read relative change, where the smallest-RMS kinds win)."""
    study = build_study(tmp_path, {"weight-change": weight_results(
        {"sft": {}, "grpo": {}}, seeds=2)}, seeds=2)
    c = c3_qk_most_changed(study)
    assert c["held"] is not True and c["verdict"] in ("not held", "inconclusive")
    assert "noise floor" in c["why"] or c["verdict"] == "not held"


def test_c3_old_relative_change_verdict_is_fooled_by_the_base_scale(tmp_path):
    """Pure noise where q/k have the smallest base RMS: relative change puts q/k on top (what the
    old claim read, and held); the new claim does not hold it."""
    old = dict(BASE_RMS)
    BASE_RMS.update({"q": 0.03, "k": 0.035})
    try:
        study = build_study(tmp_path, {"weight-change": weight_results(
            {"sft": {}, "grpo": {}}, seeds=1)}, seeds=1)
    finally:
        BASE_RMS.update(old)
    c = c3_qk_most_changed(study)
    assert set(c["numbers"]["sft"]["top_two_relative_change"]) == {"q", "k"}
    assert c["held"] is not True


# ----- C4: a mid-layer MLP update against one late-layer spike ------------------------------------

def test_c4_mid_layers_win_on_the_mean_not_on_one_layer(tmp_path):
    """SFT's MLPs updated coherently in the mid layers (3-5) and, more strongly, in the last layer
    only: the old argmax over layers picked layer 8 (not held); mid against the rest, with an
    interval over seeds and layers, is held."""
    plan = {(m, layer): 1.0 for m in ("gate", "up", "down") for layer in (3, 4, 5)}
    plan |= {(m, 8): 8.0 for m in ("gate", "up", "down")}
    study = build_study(tmp_path, {"weight-change": weight_results({"sft": plan}, seeds=3)},
                        seeds=3, kinds=("sft",))
    c = c4_sft_mid_mlp(study)
    assert c["numbers"]["peak_layer"] == 8 and c["numbers"]["mid_layers"] == [3, 5]
    assert c["verdict"] == "held", c["why"]
    assert c["numbers"]["ratio_mid_over_rest"] > 1.5
    assert c["numbers"]["relative_change_peak_layer"] == 8


# ----- C2: KL on neutral reference solutions ----------------------------------------------------

def _kl_result(rng, seeds, template, reference):
    """``template[kind]`` / ``reference[kind]``: mean KL per item, 200 items, per seed."""
    data = {"kl": {}, "kl_items": {}, "kl_reference_items": {}, "kl_direction": "forward"}
    for kind in ("sft", "grpo"):
        for name in _names(kind, seeds):
            model = f"{name}@step-{STEPS}"
            data["kl_items"][model] = list(rng.gamma(4, template[kind] / 4, 200))
            data["kl_reference_items"][model] = list(rng.gamma(4, reference[kind] / 4, 200))
            data["kl"][model] = float(np.mean(data["kl_items"][model]))
    return Result("kl-drift", data)


def test_c2_decided_on_neutral_solutions_not_on_sfts_template(tmp_path):
    """SFT drifts far on its own training template (circular; the old verdict: held) and as far
    as GRPO on neutral reference solutions: not held (the test has power for 25%)."""
    rng = np.random.default_rng(0)
    res = _kl_result(rng, 3, template={"sft": 1.0, "grpo": 0.1},
                     reference={"sft": 0.01, "grpo": 0.01})
    c = c2_kl(build_study(tmp_path, {"kl-drift": res}, seeds=3))
    assert c["numbers"]["kl_items_difference"] > 0.5  # the template KL, shown as secondary
    assert c["verdict"] == "not held", c["why"]
    assert c["held"] is False
    res = _kl_result(rng, 3, template={"sft": 1.0, "grpo": 0.1},
                     reference={"sft": 0.02, "grpo": 0.01})
    assert c2_kl(build_study(tmp_path, {"kl-drift": res}, seeds=3))["verdict"] == "held"


def test_c2_old_result_without_reference_kl_is_not_measured(tmp_path):
    rng = np.random.default_rng(0)
    res = _kl_result(rng, 1, {"sft": 1.0, "grpo": 0.1}, {"sft": 0.01, "grpo": 0.01})
    res.data.pop("kl_reference_items")
    c = c2_kl(build_study(tmp_path, {"kl-drift": res}))
    assert c["verdict"] == "not measured" and "kl_reference_items" in c["statement"]


# ----- C5 / C6: the continuous gold log-probability --------------------------------------------

def _rows(loglik: np.ndarray, gold: np.ndarray) -> str:
    return "".join(json.dumps({"subject": "s", "index": i, "gold": int(g), "pred": int(np.argmax(ll)),
                               "loglik": [float(x) for x in ll]}) + "\n"
                   for i, (ll, g) in enumerate(zip(loglik, gold)))


def _mmlu(models: dict, gold) -> Result:
    return Result("mmlu", {"models": list(models)},
                  files={f"items_{n}_cloze.jsonl": _rows(ll, gold) for n, ll in models.items()})


def _base_mmlu(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 4, n)
    ll = rng.normal(-5, 1, (n, 4))
    ll[np.arange(n), gold] += 2.0  # the base mostly right
    return ll, gold


def test_c5_four_discordant_items_are_inconclusive(tmp_path):
    """SFT flips 4 of 40 items the base and GRPO get right, and changes nothing else. The old
    accuracy bootstrap excluded 0 (held); exact McNemar gives 0.125 and so does the sign-flip
    test on the log-probabilities: the study cannot tell."""
    ll, gold = _base_mmlu(40)
    right = np.flatnonzero(ll.argmax(1) == gold)[:4]
    sft = ll.copy()
    sft[right, gold[right]] -= 5.0
    study = build_study(tmp_path, {"mmlu": _mmlu(
        {"base": ll, f"sft@step-{STEPS}": sft, f"grpo@step-{STEPS}": ll}, gold)})
    c = c5_mmlu(study)
    assert c["numbers"]["flips_sft_right_grpo_wrong"] == 0
    assert c["numbers"]["flips_sft_wrong_grpo_right"] == 4
    assert c["numbers"]["mcnemar_p"] == pytest.approx(mcnemar(0, 4)["p_value"]) == 0.125
    assert c["primary"]["p_value"] == pytest.approx(0.125)
    assert c["verdict"] == "inconclusive" and c["held"] is None


def test_c5_continuous_shift_on_every_item_is_held_and_equals_a_hand_computation(tmp_path):
    ll, gold = _base_mmlu(60)
    rng = np.random.default_rng(1)
    sft = ll.copy()
    sft[np.arange(60), gold] -= rng.uniform(0.1, 0.5, 60)  # small: few items flip
    study = build_study(tmp_path, {"mmlu": _mmlu(
        {"base": ll, f"sft@step-{STEPS}": sft, f"grpo@step-{STEPS}": ll}, gold)})
    c = c5_mmlu(study)

    def g(x):  # float64 reference of loglik[gold] - logsumexp(loglik)
        return np.array([r[k] - np.log(np.exp(r).sum()) for r, k in zip(x, gold)])

    assert c["numbers"]["grpo_minus_sft_logprob"] == pytest.approx((g(ll) - g(sft)).mean())
    assert c["verdict"] == "held"
    assert "single seed" in " ".join(c["caveats"])


def test_c5_seeds_that_disagree_make_it_inconclusive(tmp_path):
    """Within every seed SFT's shift is clear (all items one way), but the seeds disagree in
    sign: the old verdict (first seed only) held it; the interval over seeds spans 0."""
    ll, gold = _base_mmlu(60)
    models = {"base": ll}
    for i, shift in enumerate((0.4, -0.3, 0.4, -0.35)):
        sft = ll.copy()
        sft[np.arange(60), gold] -= shift
        models[f"{_names('sft', 4)[i]}@step-{STEPS}"] = sft
        models[f"{_names('grpo', 4)[i]}@step-{STEPS}"] = ll
    c = c5_mmlu(build_study(tmp_path, {"mmlu": _mmlu(models, gold)}, seeds=4))
    per = c["numbers"]["per_seed_difference"]
    assert len(per) == 4 and min(per) < 0 < max(per)
    lo, hi = c["primary"]["ci95"]
    assert lo < 0 < hi and c["held"] is not True


def test_c6_one_primary_test_on_the_log_probability(tmp_path):
    """Freezing keeps a little more of every item's gold log-prob; no item flips, in-domain
    accuracy identical: the old 'either of two accuracy intervals' found nothing (not held); the
    pre-specified continuous primary holds it."""
    ll, gold = _base_mmlu(80)
    rng = np.random.default_rng(3)
    sft = ll.copy()
    sft[np.arange(80), gold] -= 0.3
    frozen = ll.copy()
    frozen[np.arange(80), gold] -= 0.3 - rng.uniform(0.05, 0.15, 80)
    task = {f"items_{n}@step-{STEPS}.jsonl": "".join(
        json.dumps({"index": i, "correct": i % 2 == 0}) + "\n" for i in range(30))
        for n in ("sft", "sft-frozen")}
    wc = weight_results({"sft-frozen": {}}, seeds=1)
    for m in ("gate", "up", "down"):  # the frozen run's MLPs in layers 3-5 did not move
        for layer in (3, 4, 5):
            wc.data["relative_change"][f"sft-frozen@step-{STEPS}"][m][layer] = 0.0
    study = build_study(tmp_path, {
        "mmlu": _mmlu({"base": ll, f"sft@step-{STEPS}": sft, f"sft-frozen@step-{STEPS}": frozen},
                      gold),
        "task-accuracy": Result("task-accuracy", {"models": [f"{n}@step-{STEPS}" for n in (
            "sft", "sft-frozen")]}, files=task),
        "weight-change": wc}, kinds=("sft", "sft-frozen"))
    c = c6_freezing(study)
    lo, hi = c["numbers"]["mmlu_ci95"]  # accuracy: at most a flip or two, interval spans 0
    assert lo <= 0 <= hi and c["numbers"]["task_frozen_minus_sft"] == 0
    assert c["verdict"] == "held", c["why"]
    assert "frozen minus unfrozen SFT" in c["statement"] and "primary" in c["statement"]
    assert c["numbers"]["frozen_mlp_layers"] == [3, 4, 5] == list(range(3, 6))
    assert not any("not the mid layers" in x for x in c["caveats"])


# ----- C7: the difference of two correlations, with an interval ------------------------------

def test_c7_a_hair_between_two_correlations_is_inconclusive(tmp_path):
    """Forgetting tracks KL and weight change about equally (both follow training time); the old
    point comparison called it held; the interval of the difference spans 0."""
    rng = np.random.default_rng(1)
    n_items, n_kl = 50, 30
    ll, gold = _base_mmlu(n_items)
    models, kl, rel, runs = {"base": ll}, {}, {}, {}
    variants = {}
    for run, speed in (("sft", 1.0), ("grpo", 0.4)):
        names = [f"{run}@step-{s}" for s in range(1, 7)]
        runs[run] = names
        variants[run] = VariantInfo(run, "x", names, run, "", {}, 0)
        for s, name in enumerate(names, 1):
            drop = speed * s * 0.05
            m = ll.copy()
            m[np.arange(n_items), gold] -= drop + rng.normal(0, 0.3, n_items)
            models[name] = m
            kl[name] = list(np.abs(drop + rng.normal(0, 0.15, n_kl)))
            rel[name] = {mm: [drop * (1 + rng.normal(0, 0.4))] * N_LAYERS for mm in MATS}
    study = Study(tmp_path, "b", variants, {
        "mmlu": _mmlu(models, gold),
        "kl-drift": Result("kl-drift", {"kl": {k: float(np.mean(v)) for k, v in kl.items()},
                                        "kl_items": kl}),
        "weight-change": Result("weight-change", {"relative_change": rel})}, "planted", runs)
    c = c7_razor(study)
    n = c["numbers"]
    pts = n["points"]
    assert n["spearman_loss_kl"] == pytest.approx(spearman([p["mmlu_loss"] for p in pts],
                                                           [p["kl"] for p in pts]))
    assert n["spearman_loss_kl"] > n["spearman_loss_weight_change"]  # the old verdict: held
    lo, hi = c["primary"]["ci95"]
    assert lo < 0 < hi
    assert c["verdict"] == "inconclusive" and c["held"] is None


# ----- C8: origin by weight revert, not mediation by patching ----------------------------------

def _damage(rng, windows: dict, net: float, n: int = 40) -> dict:
    """Per-item recoveries ~ N(mean, 0.3) for each third; the margin drop ~ N(net, 0.5)."""
    span = {"early": [0, 2], "mid": [3, 5], "late": [6, 8]}
    out = {}
    for w, mean in windows.items():
        m, ci = mean_ci(rng.normal(mean, 0.3, n), rng, 1000)
        out[w] = {"mean": m, "ci95": ci, "layers": span[w]}
    drop = rng.normal(net, 0.5, n)
    m, ci = mean_ci(drop, rng, 1000)
    return {"windows": out, "net": {"mean": m, "ci95": ci, "p": sign_flip_p(drop), "n": n}}


def _c8_study(tmp_path, net: float, seeds: int = 3):
    rng = np.random.default_rng(7)
    data = {"revert_window_recovery": {}, "net_damage": {}, "n_used": {}, "revert_recovery": {},
            "margin_recovery": {}, "n_damaged": {}, "models": ["base"]}
    for name in _names("sft", seeds):
        d = _damage(rng, {"early": 0.05, "mid": 0.6, "late": 0.1}, net)
        data["revert_window_recovery"][name] = d["windows"]
        data["net_damage"][name] = d["net"]
        data["n_used"][name] = 40
        data["n_damaged"][name] = 40
        # the damage was written in the mid MLPs (origin)...
        data["revert_recovery"][name] = {"mlp": [0.0, 0.0, 0.02, 0.2, 0.25, 0.2, 0.03, 0.02, 0.03]}
        # ...and the last layer, which writes into the logits, carries it (mediation)
        data["margin_recovery"][name] = {"mlp_out": [0.1] * 8 + [0.63]}
        data["models"].append(name)
    return build_study(tmp_path, {"damage-attribution": Result("damage-attribution", data)},
                       seeds=seeds, kinds=("sft",))


def test_c8_origin_picks_the_mid_layers_over_the_mediating_last_layer(tmp_path):
    c = c8_damage_mid_mlp(_c8_study(tmp_path, net=0.5))
    assert c["numbers"]["mediation_top_layer"] == 8  # the old verdict read this: not held
    assert c["numbers"]["revert_top_layer"] == 4
    assert c["verdict"] == "held", c["why"]
    assert "mediation" in c["statement"] and c["numbers"]["n_used"] == [40, 40, 40]


def test_c8_without_significant_net_damage_is_inconclusive(tmp_path):
    c = c8_damage_mid_mlp(_c8_study(tmp_path, net=0.0, seeds=1))
    assert c["verdict"] == "inconclusive" and "net damage" in c["why"]
    assert c["held"] is None  # the old verdict, on patching: False


# ----- the shared statistics -------------------------------------------------------------------

def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.5 -> 4*0.01, 3*0.02, 2*0.03 (running max), 1*0.5
    assert holm([0.03, 0.5, 0.01, 0.02, float("nan")])[:4] == pytest.approx([0.06, 0.5, 0.04, 0.06])


def test_sign_flip_exact_and_hierarchical_bootstrap_sees_seed_variation():
    assert sign_flip_p([1, 1, 1, 1]) == pytest.approx(2 / 16)
    assert sign_flip_p([1, 2, -0.5]) == pytest.approx(4 / 8)  # |sum| >= 2.5: (+,+,+-): 4 of 8
    rng = np.random.default_rng(0)
    same = [rng.normal(1, 0.1, (50, 1)) for _ in range(3)]
    spread = [rng.normal(mu, 0.1, (50, 1)) for mu in (0.0, 1.0, 2.0)]
    w_same = np.ptp(np.quantile(hier_bootstrap(same)[1], [0.025, 0.975]))
    w_spread = np.ptp(np.quantile(hier_bootstrap(spread)[1], [0.025, 0.975]))
    assert w_spread > 10 * w_same


def test_decide_all_applies_holm_and_states_it(tmp_path):
    study = _c8_study(tmp_path, net=0.5)
    claims = decide_all(study)
    c8 = next(c for c in claims if c["id"] == "C8")
    assert c8["primary"]["p_holm"] >= c8["primary"]["p_value"]
    assert c8["primary"]["holm_family"] == 1
    assert {c["verdict"] for c in claims if c["id"] != "C8"} == {"not measured"}


def test_hierarchical_bootstrap_by_hand():
    # constant within each seed: a replicate is the mean of 3 seeds drawn from {0, 1, 2}, so its
    # values are k/3 and its SD is sqrt(var_pop({0,1,2}) / 3) = sqrt(2/9)
    point, reps = hier_bootstrap([np.full((5, 1), float(s)) for s in range(3)], n_boot=20000)
    assert point[0] == 1.0
    assert np.allclose(reps * 3, np.round(reps * 3))
    assert reps.mean() == pytest.approx(1.0, abs=0.02)
    assert reps.std() == pytest.approx(math.sqrt(2 / 9), rel=0.03)
    # one seed: the ordinary bootstrap, SD of the mean = sd_pop / sqrt(n)
    x = np.random.default_rng(1).normal(0, 1, (400, 1))
    _, reps = hier_bootstrap([x], n_boot=4000)
    assert reps.std() == pytest.approx(x.std() / math.sqrt(400), rel=0.06)


def test_sign_flip_monte_carlo_agrees_with_enumeration():
    import itertools

    d = np.random.default_rng(2).normal(0.3, 1, 17)  # one past the exact limit
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=17)))
    exact = float((np.abs(signs @ d) >= abs(d.sum()) - 1e-12).mean())
    assert sign_flip_p(d, n_perm=40000) == pytest.approx(exact, abs=0.01)
