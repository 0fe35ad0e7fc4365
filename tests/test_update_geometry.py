"""update-geometry: spectral and precision measures of dW against independent float64 numpy
computations and hand counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechinterp.analysis import geometry as G

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthonormal(rng, m: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    return q * np.sign(np.diag(r))


def _base(rng, m: int, n: int, s: np.ndarray):
    """W = U diag(s) V^T with known singular vectors (numpy float64)."""
    u, v = _orthonormal(rng, m), _orthonormal(rng, n)
    r = min(m, n)
    return u[:, :r] @ np.diag(s) @ v[:, :r].T, u, v


def _ref_effective_rank(dw: np.ndarray) -> float:
    s = np.linalg.svd(dw, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _geometry(w_b: np.ndarray, dw: np.ndarray, k: int, method: str = "exact") -> dict:
    wb = torch.from_numpy(w_b)
    base = G.top_svd(wb, k, method)
    return G.update_geometry(base, wb + torch.from_numpy(dw), torch.from_numpy(dw))


def test_planted_rank1_update_effective_rank_and_share():
    """dW = a (cos(al) u_1 + sin(al) u_out)(cos(be) v_2 + sin(be) v_out)^T: rank 1, and the
    share of its energy in the top-k subspace is cos^2(al) cos^2(be) by construction."""
    rng = np.random.default_rng(0)
    m, n, k = 40, 30, 5
    s = np.linspace(10.0, 1.0, n)
    w_b, u, v = _base(rng, m, n, s)
    al, be = 0.7, 0.4
    left = np.cos(al) * u[:, 0] + np.sin(al) * u[:, 20]  # u_20: outside the top 5
    right = np.cos(be) * v[:, 1] + np.sin(be) * v[:, 12]
    dw = 1e-2 * np.outer(left, right)
    got = _geometry(w_b, dw, k)
    assert got["on_principal_share"] == pytest.approx(np.cos(al) ** 2 * np.cos(be) ** 2, rel=1e-9)
    assert got["left_share"] == pytest.approx(np.cos(al) ** 2, rel=1e-9)
    assert got["right_share"] == pytest.approx(np.cos(be) ** 2, rel=1e-9)
    assert got["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert got["stable_rank"] == pytest.approx(1.0, rel=1e-9)
    assert got["random_share"] == pytest.approx(k * k / (m * n))
    # and the other measures against numpy directly
    sb = np.linalg.svd(w_b, compute_uv=False)[:k]
    sv = np.linalg.svd(w_b + dw, compute_uv=False)[:k]
    assert got["spectral_drift"] == pytest.approx(np.mean(np.abs(sv - sb) / sb), rel=1e-6)
    assert got["top_singular_change"] == pytest.approx((sv[0] - sb[0]) / sb[0], rel=1e-6)


def test_update_in_the_orthogonal_complement_has_share_and_rotation_zero():
    rng = np.random.default_rng(1)
    m, n, k = 36, 24, 4
    s = np.concatenate([np.linspace(20.0, 15.0, k), np.linspace(3.0, 0.5, n - k)])
    w_b, u, v = _base(rng, m, n, s)
    pu = np.eye(m) - u[:, :k] @ u[:, :k].T
    pv = np.eye(n) - v[:, :k] @ v[:, :k].T
    dw = 0.3 * pu @ rng.standard_normal((m, n)) @ pv
    got = _geometry(w_b, dw, k)
    assert got["on_principal_share"] == pytest.approx(0.0, abs=1e-24)
    assert got["left_share"] == pytest.approx(0.0, abs=1e-24)
    assert got["right_share"] == pytest.approx(0.0, abs=1e-24)
    for side in ("left", "right"):
        assert got[f"rotation_{side}"] == pytest.approx(0.0, abs=1e-5)
        assert got[f"rotation_{side}_max"] == pytest.approx(0.0, abs=1e-5)
    assert got["spectral_drift"] == pytest.approx(0.0, abs=1e-12)
    assert got["effective_rank"] == pytest.approx(_ref_effective_rank(dw), rel=1e-9)
    ref_stable = np.linalg.norm(dw) ** 2 / np.linalg.norm(dw, 2) ** 2
    assert got["stable_rank"] == pytest.approx(ref_stable, rel=1e-9)


def _ref_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles from the cosines only (numpy float64; fine away from 0)."""
    return np.arccos(np.clip(np.linalg.svd(a.T @ b, compute_uv=False), 0.0, 1.0))


def test_a_rotated_subspace_and_a_random_update_against_numpy():
    """A general update: angles equal numpy's (arccos of the singular values of Ub^T Uv) between
    numpy's singular vectors; shares equal the numpy projections."""
    rng = np.random.default_rng(2)
    m, n, k = 50, 32, 6
    s = np.geomspace(30.0, 0.1, n)
    w_b, _, _ = _base(rng, m, n, s)
    dw = 0.5 * rng.standard_normal((m, n))
    got = _geometry(w_b, dw, k)
    ub, _, vbh = np.linalg.svd(w_b)
    uv, _, vvh = np.linalg.svd(w_b + dw)
    left = np.degrees(_ref_angles(ub[:, :k], uv[:, :k]))
    right = np.degrees(_ref_angles(vbh[:k].T, vvh[:k].T))
    assert got["rotation_left"] == pytest.approx(left.mean(), rel=1e-6)
    assert got["rotation_left_max"] == pytest.approx(left.max(), rel=1e-6)
    assert got["rotation_right"] == pytest.approx(right.mean(), rel=1e-6)
    assert got["rotation_right_max"] == pytest.approx(right.max(), rel=1e-6)
    assert got["rotation_left"] > 1.0  # a real rotation, not a vacuous zero
    two = ub[:, :k].T @ dw @ vbh[:k].T
    assert got["on_principal_share"] == pytest.approx((two**2).sum() / (dw**2).sum(), rel=1e-9)
    assert got["effective_rank"] == pytest.approx(_ref_effective_rank(dw), rel=1e-9)


def test_gram_spectrum_for_large_matrices_matches_svd(monkeypatch):
    rng = np.random.default_rng(3)
    dw = rng.standard_normal((70, 40)) @ np.diag(np.geomspace(1, 1e-3, 40)) @ \
        _orthonormal(rng, 40)
    monkeypatch.setattr(G, "EXACT_MAX_DIM", 10)
    s, how = G.singular_values(torch.from_numpy(dw))
    assert how == "gram-eigvalsh"
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(dw, compute_uv=False), rtol=1e-7)
    assert G.svd_method((70, 40)) == "lowrank"


def test_k_for():
    assert G.k_for((576, 1536), 0.05) == 29  # round(28.8)
    assert G.k_for((10, 3), 0.05) == 1
    assert G.k_for((10, 3), 2.0) == 3


# ----- precision ---------------------------------------------------------------------------------

def _ref_bf16(x: float) -> float:
    """The bfloat16 value nearest to ``x`` (ties to an even last mantissa bit), by enumerating
    the two bfloat16 neighbours in float64: independent of any bit trick."""
    if x == 0:
        return 0.0
    sign, a = np.sign(x), abs(x)
    e = int(np.floor(np.log2(a)))
    ulp = 2.0 ** (e - 7)  # 8 significant bits
    lo = np.floor(a / ulp) * ulp
    hi = lo + ulp
    if a - lo < hi - a:
        r = lo
    elif a - lo > hi - a:
        r = hi
    else:
        r = lo if int(round(lo / ulp)) % 2 == 0 else hi
    return float(sign * r)


# (base, variant, exactly unchanged, invisible in bf16), worked by hand. ulp(1) = 2^-7 in bf16.
H = 2.0**-8  # half a bf16 ulp at 1
HAND = [
    (1.0, 1.0, True, True),
    (1.0, 1.0 + 2**-20, False, True),  # far below half an ulp
    (1.0, 1.0 + H, False, True),  # tie; 1.0's mantissa is even: rounds back to 1.0
    (1.0, 1.0 + H + 2**-20, False, False),  # just past the tie
    (1.0 + 2**-7, 1.0 + 2**-7 + H, False, False),  # tie; odd mantissa: rounds up to even
    (1.0 + 2**-7, 1.0 + 2**-7 + H - 2**-20, False, True),  # just short of the tie
    (1.0 + 2**-7, 1.0 + 2**-7 - H, False, False),  # tie downward, rounds to 1.0 (even)
    (1.0, 1.0 - 2**-9, False, True),  # below a power of two the gap halves: tie at ulp/4, even
    (1.0, 1.0 - 2**-9 - 2**-20, False, False),  # just past that tie
    (-3.0, -3.0 + 2**-7 - 2**-20, False, True),  # |d| < half ulp(3) = 2^-7
    (-3.0, -3.0 + 2**-7 + 2**-20, False, False),
    (0.5, 0.5 + 1e-6, False, True),  # tolerance 1e-5 counts it too
    (2.0**-20, 2.0**-20 + 2.0**-27, False, False),  # tiny base: a tiny change is a full ulp
    (0.0, -0.0, True, True),  # -0 == +0: no update at any precision
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_zero_and_bf16_invisible_equal_a_hand_count(dtype):
    b = torch.tensor([h[0] for h in HAND], dtype=dtype)
    v = torch.tensor([h[1] for h in HAND], dtype=dtype)
    for (bb, vv, _, inv) in HAND:  # the hand column agrees with the independent rounding
        assert (_ref_bf16(vv) == _ref_bf16(bb)) == inv, (bb, vv)
    got = G.sparsity_counts(b, v, [1e-5, 1e-7])
    assert got["n"] == len(HAND)
    assert got["exact_zero"] == sum(h[2] for h in HAND) == 2
    assert got["bf16_invisible"] == sum(h[3] for h in HAND) == 8
    # |d| <= 1e-5: 0 (twice), 2^-20 (9.5e-7), 1e-6, 2^-27 (7.5e-9); <= 1e-7: 0, 0 and 2^-27
    assert got["tolerance"] == {1e-5: 5, 1e-7: 3}
    assert got["compared_in"] == str(dtype).removeprefix("torch.")


def test_bf16_rounding_matches_float64_reference_on_random_values():
    """Both input dtypes: float32 values, and float64 values placed a hair off the bf16 ties
    (where rounding through float32 first would round twice and go wrong)."""
    rng = np.random.default_rng(4)
    x32 = (rng.standard_normal(4000) * 10.0 ** rng.uniform(-6, 3, 4000)).astype(np.float32)
    got = G.to_bf16_bits(torch.from_numpy(x32))
    ref = torch.tensor([_ref_bf16(float(x)) for x in x32], dtype=torch.float32)
    ref_bits = (ref.view(torch.int32).to(torch.int64) >> 16) & 0xFFFF
    assert torch.equal(got, ref_bits)
    # float64 just off a bf16 midpoint: float32 rounding would land on the midpoint
    mids = torch.from_numpy(x32).to(torch.bfloat16).double() * (1 + 2.0**-8)
    x64 = mids + torch.where(torch.rand(4000, generator=torch.Generator().manual_seed(0)) < 0.5,
                             mids.abs() * 2.0**-40, -mids.abs() * 2.0**-40)
    got = G.to_bf16_bits(x64)
    ref = torch.tensor([_ref_bf16(float(x)) for x in x64], dtype=torch.float32)
    ref_bits = (ref.view(torch.int32).to(torch.int64) >> 16) & 0xFFFF
    assert torch.equal(got, ref_bits)


def test_mixed_dtypes_compare_in_the_wider():
    """A bf16 base against a float32 variant: compared in float32, where both are exact."""
    b = torch.tensor([1.0, 1.0, 2.0], dtype=torch.bfloat16)
    v = torch.tensor([1.0, 1.0 + 2**-10, 2.0 + 2**-6], dtype=torch.float32)
    got = G.sparsity_counts(b, v, [1e-5])
    assert (got["exact_zero"], got["bf16_invisible"], got["compared_in"]) == (1, 2, "float32")


# ----- svd_lowrank on the default model --------------------------------------------------------

#: stated tolerances of the randomized SVD against the exact one (k = 5% of the smaller side,
#: q = 4k, 8 power iterations): top-k singular values, and the mean principal angle between the
#: two top-k subspaces (measured on these four matrices: at most 2.1e-5 and 0.23 degrees)
LOWRANK_SV_RTOL = 1e-4
LOWRANK_MEAN_ANGLE_DEG = 0.5


@pytest.mark.slow
def test_svd_lowrank_agrees_with_exact_svd_on_default_model_matrices():
    from mechinterp.analysis.weights import CheckpointReader, load_config, matrix_refs
    from mechinterp.models.naming import family_for
    from mechinterp.models.zoo import DEFAULT_MODEL, fetch

    folder = fetch(DEFAULT_MODEL)
    cfg = load_config(folder)
    refs = {(layer, m): ref for layer, m, ref in matrix_refs(family_for(cfg), cfg)}
    with CheckpointReader(folder) as reader:
        for key in ((0, "q"), (15, "gate"), (29, "down"), (10, "k")):
            ref = refs[key]
            w = ref.take(reader.get(ref.name)).double()
            k = G.k_for(tuple(w.shape), 0.05)
            exact = G.top_svd(w, k, "exact")
            low = G.top_svd(w, k, "lowrank")
            ref_s = np.linalg.svd(w.numpy(), compute_uv=False)[:k]
            np.testing.assert_allclose(exact.s.numpy(), ref_s, rtol=1e-10)
            np.testing.assert_allclose(low.s.numpy(), ref_s, rtol=LOWRANK_SV_RTOL, err_msg=str(key))
            for a, b in ((exact.u, low.u), (exact.v, low.v)):
                angles = np.degrees(G.principal_angles(a, b).numpy())
                assert angles.mean() < LOWRANK_MEAN_ANGLE_DEG, (key, angles.mean())


# ----- the probe on checkpoint folders -----------------------------------------------------------

def _save_with(tmp, name: str, edit) -> str:
    """tiny-random-llama with ``edit(model)`` applied in place, saved to ``tmp/name``."""
    from mechinterp.models import load
    from mechinterp.models.edit import plant_change

    model = load("tiny-random-llama", device="cpu", dtype="float32")
    with torch.no_grad():
        edit(model)
    return str(plant_change(model, tmp / name, {}))


def test_probe_over_a_run_against_direct_computation(tmp_path, monkeypatch):
    """A run of two checkpoints and a final variant; every number of one planted matrix against
    numpy on the saved tensors; figures draw from the stored result; to_frame has the rows."""
    import matplotlib.pyplot as plt

    from mechinterp.analysis import weights as W

    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 1000)  # the precision counts over several chunks
    from safetensors.torch import load_file

    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe
    from mechinterp.models.modelset import ModelSet
    from mechinterp.models.zoo import fetch
    from mechinterp.store.results import read_result

    def rank1(scale):
        def edit(model):
            w = model.weight(1, "gate")  # (128, 64)
            u, s, vh = torch.linalg.svd(w.double())
            w += (scale * s[0] * torch.outer(u[:, 0], vh[0])).float()  # on-principal, rank 1
            q = model.weight(2, "q")
            q[0, :8] += 2.0**-12 * q[0, :8].sign()  # a few entries moved, by less than bf16 sees
            q[1, 0] += 1.0
        return edit

    sft = tmp_path / "sft" / "checkpoints"
    for step, scale in ((10, 1e-3), (20, 1e-2)):
        _save_with(sft, f"step-{step}", rank1(scale))
    _save_with(tmp_path, "grpo", lambda m: m.weight(0, "k").mul_(1.5))
    ms = ModelSet("tiny-random-llama", {"sft": f"{tmp_path / 'sft'}@all",
                                        "grpo": str(tmp_path / "grpo")}, device="cpu")
    probe = get_probe("update-geometry")
    out = tmp_path / "out"
    res = run_probe(probe, ms, None, make_config(probe, {"k_fraction": 0.1,
                                                         "tolerances": "1e-5,1e-3"}),
                    out=out, draw=False)
    base = load_file(next(fetch("tiny-random-llama").glob("*.safetensors")))
    var = load_file(tmp_path / "sft" / "checkpoints" / "step-20" / "model.safetensors")
    name = "model.layers.1.mlp.gate_proj.weight"
    b, v = base[name].double().numpy(), var[name].double().numpy()
    dw = v - b
    k = max(1, round(0.1 * 64))
    assert res["k"]["gate"] == k and res["svd"]["gate"] == "exact"
    ck = "sft@step-20"
    assert res["on_principal_share"][ck]["gate"][1] == pytest.approx(1.0, rel=1e-6)
    # float32 storage adds rounding noise to the rank-1 dW: near 1, and numpy's on the stored dW
    assert res["effective_rank"][ck]["gate"][1] == pytest.approx(_ref_effective_rank(dw), rel=1e-9)
    assert res["effective_rank"][ck]["gate"][1] < 1.01
    sb, sv = np.linalg.svd(b, compute_uv=False)[:k], np.linalg.svd(v, compute_uv=False)[:k]
    assert res["spectral_drift"][ck]["gate"][1] == pytest.approx(np.mean(np.abs(sv - sb) / sb),
                                                                 rel=1e-5)
    assert res["top_singular_change"][ck]["gate"][1] == pytest.approx(1e-2, rel=1e-3)
    assert res["exact_zero_fraction"][ck]["gate"][1] == np.mean(dw == 0)
    # layer 2 q: 9 of 64 * 64 entries moved; 8 by 2^-12 (invisible in bf16 where |w| > 2^-5)
    q = "model.layers.2.self_attn.q_proj.weight"
    qb, qv = base[q].float(), var[q].float()
    invisible = (qb.to(torch.bfloat16) == qv.to(torch.bfloat16)).double().mean().item()
    assert res["bf16_invisible_fraction"][ck]["q"][2] == pytest.approx(invisible, abs=0)
    assert res["exact_zero_fraction"][ck]["q"][2] == 1 - 9 / qb.numel()
    assert res["tolerance_fraction"]["1e-05"][ck]["q"][2] == 1 - 9 / qb.numel()
    assert res["tolerance_fraction"]["0.001"][ck]["q"][2] == 1 - 1 / qb.numel()
    # untouched matrices: exactly zero update, undefined ranks (NaN, stored as null)
    assert res["exact_zero_fraction"]["grpo"]["q"][0] == 1.0
    assert res["effective_rank"]["grpo"]["q"][0] is None or np.isnan(
        res["effective_rank"]["grpo"]["q"][0])
    # scaling W by 1.5: no rotation, every singular value +50%
    assert res["spectral_drift"]["grpo"]["k"][0] == pytest.approx(0.5, rel=1e-6)
    assert res["rotation_left"]["grpo"]["k"][0] == pytest.approx(0.0, abs=1e-4)
    h = res["histograms"]
    assert h["zero"][ck]["q"] + h["below"][ck]["q"] + sum(h["counts"][ck]["q"]) \
        + h["above"][ck]["q"] == h["total"][ck]["q"]
    assert res["compared_in"][ck] == "float32" and res["dtypes"]["base"] == "F32"
    # figures re-draw from the stored result; the frame holds every measure
    stored = read_result(out / "update-geometry")
    figs = probe.plot(stored)
    assert {"geometry_trajectory", "precision_histograms", "geometry_by_matrix",
            "geometry_on_principal_share_heatmap"} <= set(figs)
    for fig in figs.values():
        plt.close(fig)
    df = stored.to_frame()
    row = df.query("model == @ck and component == 'gate' and layer == 1 and "
                   "metric == 'on_principal_share'")
    assert len(row) == 1 and row["step"].iloc[0] == 20
    assert "tolerance_fraction.1e-05" in set(df["metric"])


def test_bad_options_are_user_errors():
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.errors import UserError

    probe = get_probe("update-geometry")
    with pytest.raises(UserError, match="k_fraction"):
        make_config(probe, {"k_fraction": "-0.1"})
    with pytest.raises(UserError, match="at least 1"):
        make_config(probe, {"k": "0"})


# ----- the study: report lines over seeds, forgetting against KL ------------------------------------

def _study(tmp_path, results: dict, variants: dict, runs: dict):
    from mechinterp.study.folder import Study, VariantInfo

    info = {n: VariantInfo(n, n, runs[n], algorithm=a, freeze="", seed=s)
            for n, (a, s) in variants.items()}
    return Study(tmp_path, "base", info, results, "default", runs)


def test_report_lines_give_a_t_interval_over_seeds(tmp_path):
    from mechinterp.store.results import Result
    from probes.update_geometry import summary_lines

    def geo(share, zero):
        return {"on_principal_share": {"q": [share, share]}, "exact_zero_fraction": {"q": [zero]}}

    vals = {"sft-1": (0.02, 0.1), "sft-2": (0.04, 0.3), "grpo": (0.001, 0.5)}
    data = {"matrices": ["q"], "variants": list(vals), "shape": {"q": [10, 10]},
            "random_share": {"q": 0.01}, "k": {"q": 1}, "svd": {"q": "exact"},
            "compared_in": dict.fromkeys(vals, "float32"),
            "on_principal_share": {v: {"q": [a, a]} for v, (a, _) in vals.items()},
            "overall": {v: {"exact_zero_fraction": z, "bf16_invisible_fraction": z,
                            "tolerance_fraction": {"1e-05": z}} for v, (_, z) in vals.items()}}
    study = _study(tmp_path, {"update-geometry": Result("update-geometry", data)},
                   {"sft-1": ("sft", 1), "sft-2": ("sft", 2), "grpo": ("grpo", 0)},
                   {v: [v] for v in vals})
    lines = summary_lines(study, data)
    sft = next(x for x in lines if x.startswith("sft"))
    # shares as multiples of the random share: 2 and 4 -> mean 3, t(0.975, 1) = 12.706 * sd/sqrt 2
    half = 12.7062 * np.std([2.0, 4.0], ddof=1) / np.sqrt(2)
    assert "2 seeds" in sft and f"x a random update's) 3.00 [{3 - half:.2f}, {3 + half:.2f}]" in sft
    assert "exactly unchanged 20.0000%" in sft
    grpo = next(x for x in lines if x.startswith("grpo"))
    assert "0.10" in grpo and "[" not in grpo.split(":", 1)[1]  # one seed: no interval


def test_forgetting_vs_kl_plots_every_checkpoint(tmp_path):
    import matplotlib.pyplot as plt

    from mechinterp.store.results import Result
    from mechinterp.study.paper_figures import forgetting_vs_kl

    runs = {"sft": ["sft@step-1", "sft@step-2"], "grpo": ["grpo@step-1", "grpo@step-2"]}
    acc = {"base": 0.5, "sft@step-1": 0.45, "sft@step-2": 0.40, "grpo@step-1": 0.5,
           "grpo@step-2": 0.48}
    kl = {"sft@step-1": 0.1, "sft@step-2": 0.3, "grpo@step-1": 0.01, "grpo@step-2": 0.02}
    mm = Result("mmlu", {"formats": ["cloze"], "n_items": 100,
                         "accuracy": {k: {"cloze": a} for k, a in acc.items()},
                         "paired": {k: {"cloze": {"difference_ci95": [a - 0.5 - 0.05,
                                                                      a - 0.5 + 0.05]}}
                                    for k, a in acc.items() if k != "base"}})
    study = _study(tmp_path, {"mmlu": mm, "kl-drift": Result("kl-drift", {"kl": kl})},
                   {"sft": ("sft", 0), "grpo": ("grpo", 0)}, runs)
    fig = forgetting_vs_kl(study)
    got = {}
    for bars in fig.axes[0].containers:  # one errorbar container per run (and the base)
        xs, ys = bars.lines[0].get_data()
        for x, y in zip(xs, ys):
            got[round(float(x), 6)] = round(float(y), 6)
    want = {round(kl[n], 6): round(acc[n] - 0.5, 6) for n in kl} | {0.0: 0.0}
    assert {x: got[x] for x in want} == want
    plt.close(fig)


def test_compare_runs_update_geometry_and_reports_it(tmp_path, data_source):
    """compare's default plan runs the probe (spectral measures on); the report carries its key
    numbers, equal to the probe's own means; dense random updates sit about where a random
    update would (share / random share near 1) and are dense at every precision."""
    from mechinterp.models import load
    from mechinterp.models.edit import plant_change
    from mechinterp.study.compare import compare
    from probes.update_geometry import final_means

    variants = {}
    for name, rel in (("sft", 0.2), ("grpo", 0.01)):
        model = load("tiny-random-llama", device="cpu", dtype="float32")
        edits = {(layer, m): rel for layer in range(model.n_layers) for m in ("q", "gate")}
        variants[name] = str(plant_change(model, tmp_path / "models" / name, edits, seed=1))
    study = compare("tiny-random-llama", variants, tmp_path / "out", preset="default",
                    probes=["update-geometry"], echo=lambda m: None)
    d = study.results["update-geometry"].data
    assert d["svd"]["q"] == "exact" and d["k"]["gate"] == max(1, round(0.05 * 64))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## update-geometry" in md
    for name in ("sft", "grpo"):
        means = final_means(d, name)
        assert 0.5 < means["on_principal_share"] < 1.5, means
        assert f"x a random update's) {means['on_principal_share']:.2f}" in md
        # untouched matrices are exactly zero, the planted ones changed in (almost) every entry:
        # noise below half a float32 ulp of an entry leaves it as it was
        n_all = sum(d["histograms"]["total"][name].values())
        n_planted = d["histograms"]["total"][name]["q"] + d["histograms"]["total"][name]["gate"]
        assert -1e-12 <= means["exact_zero_fraction"] - (1 - n_planted / n_all) < 1e-4


def test_checkpoint_x_by_step_fraction_and_kl():
    from mechinterp.plotting.trajectories import checkpoint_x, x_label

    names = ["sft@step-10", "sft@step-40"]
    steps = {"sft@step-10": 10, "sft@step-40": 40}
    assert checkpoint_x(names, steps) == ([10.0, 40.0], True)
    assert checkpoint_x(names, steps, "fraction") == ([0.25, 1.0], True)
    assert checkpoint_x(names, steps, "kl", {"sft@step-10": 0.2, "sft@step-40": 0.5}) == \
        ([0.2, 0.5], True)
    # a checkpoint without KL (or a label without a step): the checkpoint index, said so
    xs, ok = checkpoint_x(names, steps, "kl", {"sft@step-10": 0.2})
    assert (xs, ok, x_label("kl", ok)) == ([1.0, 2.0], False, "checkpoint")
    assert checkpoint_x(["a", "b"], {}, "fraction") == ([1.0, 2.0], False)
    with pytest.raises(ValueError, match="x_axis"):
        checkpoint_x(names, steps, "epoch")
