"""Small statistics for evaluations (numpy only): Wilson intervals, exact McNemar, bootstrap
intervals for paired accuracy differences, ratios of means and means with bootstrap intervals,
and Spearman's rank correlation with ties."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (95% by default); (nan, nan) when n == 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 (k = n) the bound is exactly 0 (1); centre - half rounds to about +1e-17 there,
    # which put the interval above the estimate (a negative error bar)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def accuracy_summary(correct: Sequence[bool]) -> dict:
    """``{"accuracy", "n", "correct", "ci95": [lo, hi]}`` with a Wilson interval."""
    n = len(correct)
    k = int(sum(bool(c) for c in correct))
    return {"accuracy": k / n if n else float("nan"), "n": n, "correct": k, "ci95": list(wilson(k, n))}


def mcnemar(b: int, c: int, exact_below: int = 25) -> dict:
    """McNemar's test from the discordant counts ``b`` (right->wrong) and ``c`` (wrong->right).

    Exact two-sided binomial test (p = 0.5) when ``b + c < exact_below``; otherwise the chi-square
    statistic with continuity correction, ``(|b - c| - 1)^2 / (b + c)``, on one degree of freedom.
    """
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "method": "exact", "statistic": 0.0, "p_value": 1.0}
    if n < exact_below:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
        return {"b": b, "c": c, "method": "exact", "statistic": float(k),
                "p_value": min(1.0, 2.0 * tail)}
    stat = (abs(b - c) - 1) ** 2 / n
    p = math.erfc(math.sqrt(stat / 2.0))  # survival function of chi2 with 1 dof
    return {"b": b, "c": c, "method": "chi2-cc", "statistic": stat, "p_value": p}


def bootstrap_diff(a: Sequence[bool], b: Sequence[bool], n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(b) - mean(a)`` resampling paired items.

    Resampling ``n`` items with replacement only matters through how many of each *kind* of pair
    it draws: for paired correctness the kinds are both right, base only, variant only, both wrong
    (by their difference ``b - a``: 0, -1, +1, 0). So each replicate draws the counts of the kinds
    from a multinomial with the observed proportions, which has exactly the distribution of the
    textbook index resampling, in memory ``n_boot x kinds`` instead of ``n_boot x n``. Any numeric
    pairs work; replicates are drawn in blocks so memory stays bounded when there are many kinds.
    """
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("paired samples must have the same length")
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    if x.dtype == bool and y.dtype == bool:  # counts of the four kinds, without float copies
        both = int(np.count_nonzero(x & y))
        base_only, var_only = int(np.count_nonzero(x)) - both, int(np.count_nonzero(y)) - both
        counts = np.array([both, base_only, var_only, n - both - base_only - var_only])
        values = np.array([0.0, -1.0, 1.0, 0.0])
    else:  # the kinds of pair, by their difference
        values, counts = np.unique(y.astype(float) - x.astype(float), return_counts=True)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    block = max(1, (1 << 20) // len(values))
    for lo in range(0, n_boot, block):
        hi = min(n_boot, lo + block)
        draws = rng.multinomial(n, counts / n, size=hi - lo)  # (replicates, kinds)
        diffs[lo:hi] = draws @ values / n
    alpha = (1 - level) / 2
    return float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (NaN has no rank: drop it first, as
    :func:`spearman` does)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties handled).

    Pairs where either value is NaN are dropped (pairwise deletion) before ranking; ``+-inf`` are
    ordinary values (ranked last/first). NaN when fewer than 2 pairs remain or when either side is
    constant on the remaining pairs.
    """
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of equal length")
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(xa) | np.isnan(ya))
    if int(keep.sum()) < 2:
        return float("nan")
    rx, ry = rankdata(xa[keep]), rankdata(ya[keep])
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def ratio_of_means(num: np.ndarray, den: np.ndarray, rng: np.random.Generator | None = None,
                   n_boot: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``mean(num, -1) / mean(den)`` per row of ``num`` [conds, items] and, with ``rng``, a
    percentile bootstrap 95% interval over items ([conds, 2]); NaN when the mean of ``den``
    is not positive or there are no items."""
    num = np.asarray(num, float)
    den = np.asarray(den, float)
    nan = np.full(num.shape[:-1], np.nan)
    if den.size == 0:
        return nan, np.stack([nan, nan], -1)
    d = den.mean()
    est = num.mean(-1) / d if d > 0 else nan
    if rng is None or n_boot <= 0 or not d > 0:
        return est, np.stack([nan, nan], -1)
    idx = rng.integers(0, den.size, (n_boot, den.size))
    db = den[idx].mean(-1)
    nb = num[..., idx].mean(-1)  # [conds, boot]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(db > 0, nb / db, np.nan)
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5], axis=-1) if np.isfinite(ratios).any() else (
        nan, nan)
    return est, np.stack([lo, hi], -1)


def bootstrap_means(x: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """Bootstrap replicates of the mean over the first axis of ``x``.

    Args:
        x: ``[items]`` or ``[items, k]``.
        rng: the generator the resamples are drawn from.
        n_boot: replicates.

    Returns:
        ``[n_boot]`` or ``[n_boot, k]``: the mean of each resample of the items (with replacement).
    """
    return x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)


def mean_ci(x: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, list[float]]:
    """Mean and percentile bootstrap 95% interval."""
    x = np.asarray(x, float)
    if x.size == 0:
        return math.nan, [math.nan, math.nan]
    boot = bootstrap_means(x, rng, max(1, n_boot))
    return float(x.mean()), [float(v) for v in np.percentile(boot, [2.5, 97.5])]


def sign_flip_p(x: np.ndarray, rng: np.random.Generator, n_perm: int = 10000) -> float:
    """Two-sided p-value of mean(x) = 0 for paired differences ``x``: the sign-flip randomisation
    test (each difference's sign flipped at random under the null of symmetry about 0),
    ``(1 + #{|mean*| >= |mean|}) / (1 + n_perm)``; exact enumeration when ``2^n <= n_perm``.
    NaN when ``x`` is empty; 1 when every difference is 0."""
    x = np.asarray(x, float)
    if x.size == 0:
        return math.nan
    obs = abs(x.mean()) * (1 - 1e-12)  # ties with the observed mean count as at least as large
    if 2 ** x.size <= n_perm:
        signs = 1 - 2 * ((np.arange(2 ** x.size)[:, None] >> np.arange(x.size)) & 1)
        return float((np.abs(signs @ x / x.size) >= obs).mean())
    hits = 0
    for lo in range(0, n_perm, 1000):
        signs = rng.choice([-1.0, 1.0], size=(min(1000, n_perm - lo), x.size))
        hits += int((np.abs(signs @ x / x.size) >= obs).sum())
    return (1 + hits) / (1 + n_perm)


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (``0.5 < p < 1``), by bisection on
    the CDF, itself a Simpson integral of the density (no SciPy here). Accurate to about 1e-6."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1 (got {p}, {df})")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t: float) -> float:  # P(T <= t) for t >= 0; substitute u = atan(t): smooth, bounded
        n = 2000
        b = math.atan(t)
        h = b / n

        def f(u: float) -> float:
            x = math.tan(u)
            return c * (1 + x * x / df) ** (-(df + 1) / 2) * (1 + x * x)

        s = f(0.0) + f(b) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(x: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean over the finite values of ``x`` (for small n,
    where the normal interval is too narrow); NaNs where fewer than 2 values."""
    v = np.asarray([a for a in x if a is not None and math.isfinite(a)], float)
    if v.size < 2:
        m = float(v.mean()) if v.size else math.nan
        return m, math.nan, math.nan
    m = float(v.mean())
    half = t_quantile(0.5 + level / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half
