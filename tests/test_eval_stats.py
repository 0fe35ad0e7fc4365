"""Statistics of the evaluations against hand-worked cases and, where installed, scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mechinterp.evals.paired import paired_comparison
from mechinterp.evals.stats import bootstrap_diff, mcnemar, rankdata, spearman, wilson


def test_wilson_hand_worked():
    # k=8, n=10, z=1.96: centre (0.8 + 0.192) / 1.384, half 1.96*sqrt(0.016 + 0.0096)/1.384
    lo, hi = wilson(8, 10, z=1.96)
    centre = (0.8 + 1.96**2 / 20) / (1 + 1.96**2 / 10)
    half = 1.96 * math.sqrt(0.8 * 0.2 / 10 + 1.96**2 / 400) / (1 + 1.96**2 / 10)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # published table value
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0


def test_mcnemar_exact_hand_worked():
    # b=1, c=6: two-sided exact p = 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128 = 0.125
    r = mcnemar(1, 6)
    assert r["method"] == "exact" and r["p_value"] == pytest.approx(0.125)
    assert mcnemar(3, 3)["p_value"] == 1.0
    assert mcnemar(0, 0)["p_value"] == 1.0


def test_mcnemar_large_counts_chi2():
    r = mcnemar(40, 20)
    assert r["method"] == "chi2-cc"
    assert r["statistic"] == pytest.approx((20 - 1) ** 2 / 60)
    try:
        from scipy.stats import binomtest, chi2
    except ImportError:  # scipy ships with the bench extra; the hand values above still hold
        return
    assert r["p_value"] == pytest.approx(chi2.sf(r["statistic"], 1), rel=1e-10)
    assert mcnemar(2, 11)["p_value"] == pytest.approx(binomtest(2, 13, 0.5).pvalue, rel=1e-12)


def test_rankdata_and_spearman_with_ties():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    x = [1, 2, 2, 3, 5, 4]
    y = [2, 1, 3, 3, 6, 5]
    # reference: Pearson of average ranks, computed naively
    rx, ry = rankdata(x), rankdata(y)
    ref = np.corrcoef(rx, ry)[0, 1]
    assert spearman(x, y) == pytest.approx(ref)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 30)
    b = a + rng.integers(0, 3, 30)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, rel=1e-12)


def test_bootstrap_and_paired_comparison():
    base = [True] * 6 + [False] * 4
    var = [True, True, False, False, False, True, False, False, True, False]
    r = paired_comparison(list(range(10)), ["s1"] * 5 + ["s2"] * 5, base, var, seed=3)
    assert r["difference"] == pytest.approx(0.4 - 0.6)
    assert r["right_to_wrong"] == 3 and r["wrong_to_right"] == 1
    assert r["flips"]["s1"]["right_to_wrong"] == [2, 3, 4]
    assert r["flips"]["s2"] == {"right_to_wrong": [], "wrong_to_right": [8]}
    assert r["mcnemar"]["p_value"] == pytest.approx(2 * (1 + 4) / 16)
    lo, hi = r["difference_ci95"]
    assert lo <= -0.2 <= hi and lo >= -1 and hi <= 1
    assert bootstrap_diff(base, var, seed=3) == (lo, hi)  # seeded: reproducible
    assert bootstrap_diff(base, base, seed=1) == (0.0, 0.0)


def test_spearman_drops_nan_pairs_and_is_nan_without_two_pairs():
    nan = float("nan")
    assert math.isnan(spearman([nan] * 4, [nan] * 4))  # was 1.0
    assert math.isnan(spearman([1.0, nan, 3.0], [nan, 2.0, 3.0]))  # one complete pair
    assert math.isnan(spearman([1.0, 2.0, nan], [5.0, 5.0, 1.0]))  # constant after dropping
    # the NaN pair is left out, not ranked: (1,3) (2,2) (3,1) are perfectly anti-monotone
    assert spearman([1.0, 2.0, 3.0, nan], [3.0, 2.0, 1.0, 10.0]) == pytest.approx(-1.0)
    assert spearman([nan, 1.0, 2.0, 3.0], [0.0, 3.0, nan, 1.0]) == pytest.approx(-1.0)
    x = [0.3, nan, 1.2, 0.7, 2.0, nan, 0.1]
    y = [1.0, 4.0, 2.0, nan, 3.0, nan, 0.5]
    keep = [i for i in range(len(x)) if not (math.isnan(x[i]) or math.isnan(y[i]))]
    assert spearman(x, y) == pytest.approx(spearman([x[i] for i in keep], [y[i] for i in keep]))


def _index_bootstrap(a, b, n_boot, seed, level=0.95):
    """The textbook paired bootstrap: resample item indices (the old implementation)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for k in range(0, n_boot, 500):
        idx = rng.integers(0, len(x), size=(min(500, n_boot - k), len(x)))
        diffs[k:k + len(idx)] = (y[idx] - x[idx]).mean(axis=1)
    alpha = (1 - level) / 2
    return np.quantile(diffs, alpha), np.quantile(diffs, 1 - alpha)


def test_bootstrap_from_outcome_counts_matches_index_resampling():
    # 200 items: 100 both right, 30 base only, 20 variant only, 50 both wrong; diff = -0.05
    base = [True] * 100 + [True] * 30 + [False] * 20 + [False] * 50
    var = [True] * 100 + [False] * 30 + [True] * 20 + [False] * 50
    want = _index_bootstrap(base, var, n_boot=20000, seed=11)
    got = bootstrap_diff(base, var, n_boot=20000, seed=5)
    # Monte-Carlo error of a 2.5% quantile with 20k draws is ~0.001; the grid step is 1/200
    assert got == pytest.approx(want, abs=0.011)
    # and both agree with the normal approximation sd = sqrt((p10 + p01 - d^2) / n)
    sd = math.sqrt((0.15 + 0.10 - 0.05**2) / 200)
    assert got == pytest.approx((-0.05 - Z * sd, -0.05 + Z * sd), abs=0.011)
    # numbers instead of booleans: the same kinds, found by their difference
    ints = bootstrap_diff(np.array(base, int), np.array(var, int), n_boot=20000, seed=5)
    assert ints == pytest.approx(want, abs=0.011)
    # the order of the items does not matter (only the counts of the four outcome types do)
    perm = np.random.default_rng(0).permutation(200)
    assert bootstrap_diff([base[i] for i in perm], [var[i] for i in perm], n_boot=20000,
                          seed=5) == got


Z = 1.959963984540054


def test_bootstrap_memory_does_not_grow_with_n():
    import time
    import tracemalloc

    rng = np.random.default_rng(0)
    n = 20_000
    a, b = rng.random(n) < 0.6, rng.random(n) < 0.55
    tracemalloc.start()
    bootstrap_diff(a, b, n_boot=500)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000, peak  # index resampling held 3 x n_boot x n x 8 bytes (240 MB)
    big = 10**7  # full-MMLU-sized and beyond: seconds, not gigabytes
    a, b = np.zeros(big, bool), np.zeros(big, bool)
    a[: big // 2] = True
    b[big // 4: 3 * big // 4] = True
    t0 = time.perf_counter()
    tracemalloc.start()
    lo, hi = bootstrap_diff(a, b)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 10
    assert peak < big + 2_000_000, peak  # one boolean temporary; nothing of size n_boot x n
    assert lo < 0.0 < hi and hi - lo < 1e-3


def test_wilson_interval_contains_the_estimate_at_the_edges():
    """k = 0 and k = n: the bound is exactly 0 (1). It used to round to about 1e-17 above the
    estimate for 95 of the 398 edge cases n < 200, a negative error bar that matplotlib refuses."""
    for n in range(1, 200):
        for k in (0, 1, n - 1, n):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n)
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0


def test_t_quantiles_match_the_printed_table_and_the_normal_limit():
    from mechinterp.evals.stats import t_interval, t_quantile

    # two-sided 95% critical values from a standard t table
    for df, want in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=2e-4), df
    assert t_quantile(0.975, 100000) == pytest.approx(1.95996, abs=1e-3)
    m, lo, hi = t_interval([1.0, 2.0, 3.0, float("nan")])
    # hand: mean 2, sd 1, n 3: half-width 4.3027 / sqrt(3)
    assert m == 2.0 and hi - m == pytest.approx(4.3027 / math.sqrt(3), abs=1e-3)
    assert math.isnan(t_interval([1.0])[1])
