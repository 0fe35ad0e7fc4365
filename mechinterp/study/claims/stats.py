"""The statistics the claims share: a hierarchical bootstrap (seeds, then items), an exact
sign-flip permutation test for paired differences, bootstrap p-values, power and the minimum
detectable effect, Holm's correction. numpy only; every function is seeded."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from ...evals.stats import Z95, bootstrap_means

Z80 = 0.8416212335729143  # one-sided normal quantile of 80% power
N_BOOT = 2000
N_PERM = 20000
EXACT_FLIPS = 16  # up to this many non-zero differences the sign-flip test enumerates every sign


def hier_bootstrap(groups: Sequence[np.ndarray], n_boot: int = N_BOOT,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Column means averaged over seeds, and their hierarchical bootstrap replicates.

    A replicate draws as many seeds as there are, with replacement, and within every drawn seed
    its items with replacement (a fresh draw each time a seed is drawn:
    :func:`mechinterp.evals.stats.bootstrap_means`), then averages the drawn seeds' column means.
    With one seed this is the ordinary bootstrap over items.

    Args:
        groups: one array ``[items, k]`` per seed (rows: the seed's items, e.g. MMLU items or
            (layer, matrix) entries; columns: the quantities a statistic combines).
        n_boot: replicates.
        seed: the generator's seed.

    Returns:
        ``(point [k], replicates [n_boot, k])``.
    """
    groups = [np.asarray(g, float).reshape(len(g), -1) for g in groups]
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("every seed needs at least one item")
    k = groups[0].shape[1]
    rng = np.random.default_rng(seed)
    n_seeds = len(groups)
    point = np.mean([g.mean(0) for g in groups], axis=0)
    draws = rng.integers(0, n_seeds, (n_boot, n_seeds))
    out = np.zeros((n_boot, k))
    for j, g in enumerate(groups):
        count = (draws == j).sum(1)
        owner = np.repeat(np.arange(n_boot), count)  # which replicate each draw of seed j feeds
        n = len(g)
        chunk = max(1, 2_000_000 // max(1, n * k))
        means = np.empty((owner.size, k))
        for lo in range(0, owner.size, chunk):
            hi = min(owner.size, lo + chunk)
            means[lo:hi] = bootstrap_means(g, rng, hi - lo)
        np.add.at(out, owner, means)
    return point, out / n_seeds


def boot_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the statistic is 0": twice the smaller tail of the
    replicates at 0, with the +1 correction (never 0)."""
    b = np.asarray(replicates, float)
    b = b[np.isfinite(b)]
    if b.size == 0:
        return math.nan
    tail = min(int((b <= 0).sum()), int((b >= 0).sum()))
    return min(1.0, 2.0 * (tail + 1) / (b.size + 1))


def sign_flip_p(diffs: Sequence[float], n_perm: int = N_PERM, seed: int = 0) -> float:
    """Two-sided sign-flip permutation test of "the paired differences are symmetric about 0",
    on their sum. Exact (all 2^m signs) up to :data:`EXACT_FLIPS` non-zero differences, else
    ``n_perm`` seeded random signs with the +1 correction. Four differences of one sign give
    2/16 = 0.125, as the exact McNemar test on four discordant pairs does."""
    d = np.asarray([x for x in diffs if x is not None and math.isfinite(x)], float)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    obs = abs(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if d.size <= EXACT_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float((np.abs(signs @ d) >= obs - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for lo in range(0, n_perm, 2000):
        signs = rng.choice((-1.0, 1.0), size=(min(2000, n_perm - lo), d.size))
        hits += int((np.abs(signs @ d) >= obs - tol).sum())
    return (hits + 1) / (n_perm + 1)


def interval(replicates: np.ndarray) -> list[float]:
    """Percentile 95% interval of bootstrap replicates."""
    b = np.asarray(replicates, float)
    b = b[np.isfinite(b)]
    if b.size == 0:
        return [math.nan, math.nan]
    return [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))]


def normal_cdf(x: float) -> float:
    """The standard normal distribution function at ``x``."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def mde(se: float) -> float:
    """Smallest true effect a two-sided 5% test detects with 80% power at standard error ``se``."""
    return (Z95 + Z80) * se


def power(effect: float, se: float) -> float:
    """Power of the two-sided 5% test against a true ``effect`` (normal approximation)."""
    if not se > 0:
        return 1.0 if effect != 0 else 0.0
    return normal_cdf(abs(effect) / se - Z95)


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count in the family)."""
    idx = [i for i, x in enumerate(p) if x is not None and math.isfinite(x)]
    out = [math.nan] * len(p)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
