"""The geometry and precision of a weight update ``dW = W_variant - W_base``: pure functions over
matrices (no files, no models).

Spectral measures (:func:`update_geometry`), with ``U_k, V_k`` the top-``k`` left / right singular
vectors of a matrix:

* **spectral drift**: mean over the top-``k`` singular values of ``|s_i(W_v) - s_i(W_b)| /
  s_i(W_b)``, and the signed relative change of the largest one;
* **principal-subspace rotation**: the principal angles (degrees) between ``span U_k(W_b)`` and
  ``span U_k(W_v)`` (left) and between the ``V_k`` (right); their mean and their largest;
* **on-principal share**: ``||U_k^T dW V_k||_F^2 / ||dW||_F^2``, the share of the update's energy
  in the base's top-``k`` singular subspace taken on *both* sides (two-sided projection
  ``P_U dW P_V``). A random update of the same shape (i.i.d. Gaussian entries, or any law invariant
  under rotations) puts an expected ``k_l k_r / (m n) = k^2 / (m n)`` there: ``random_share``. The
  one-sided shares ``||U_k^T dW||^2 / ||dW||^2`` (random: ``k / m``) and ``||dW V_k||^2 /
  ||dW||^2`` (random: ``k / n``) are given too;
* **effective rank** of ``dW``: ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` over all its singular
  values (Roy & Vetterli 2007); **stable rank**: ``||dW||_F^2 / ||dW||_2^2``.

Top-``k`` singular vectors come from an exact SVD (LAPACK, float64) up to :data:`EXACT_MAX_DIM`,
from ``torch.svd_lowrank`` (randomized, float64, ``q = 4k`` columns, :data:`LOWRANK_NITER` power
iterations, a fixed seed so base and variant see the same test matrix) above it; ``svd="exact"|"lowrank"`` forces one.
The full spectrum of ``dW`` (effective rank) is exact either way: ``torch.linalg.svdvals`` up to
:data:`EXACT_MAX_DIM`, else the eigenvalues of the float64 Gram matrix ``dW^T dW`` (or ``dW dW^T``,
the smaller), whose square roots are the singular values to about ``1e-8 s_max``.

Precision measures (:func:`sparsity_counts`), per entry, comparing in a dtype that holds both
stored values exactly:

* ``exact_zero``: ``W_v == W_b`` (the stored update is exactly zero);
* ``bf16_invisible``: ``bf16(W_v) == bf16(W_b)`` with round-to-nearest-even - the update vanishes
  when the weights are stored in bfloat16. For a base that is already a bfloat16 value ``b`` this
  is ``|dW| < ulp(b) / 2`` (a tie ``|dW| = ulp(b) / 2`` vanishes exactly when ``b``'s last mantissa
  bit is even; moving toward zero from a power of two the gap below is ``ulp / 2``, so the
  threshold there is ``ulp / 4``). Exact zeros count as invisible;
* ``tolerance[t]``: ``|dW| <= t`` (absolute), exact zeros included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EXACT_MAX_DIM = 2048  # exact SVD when min(m, n) is at most this, svd_lowrank above
LOWRANK_NITER = 8  # power iterations of svd_lowrank
#: columns of the randomized range finder: q = this x k. Weight spectra are flat (SmolLM2's
#: gate/down: the 29th singular value is 64% of the first), so q = k + 16 missed the top-29
#: subspace by 4-8 degrees on average; 4k with 8 iterations stays within 0.2 (tests state it)
LOWRANK_Q_FACTOR = 4
LOWRANK_SEED = 0


def k_for(shape: tuple[int, int], fraction: float) -> int:
    """``max(1, round(fraction * min(m, n)))``, at most ``min(m, n)``."""
    return int(min(min(shape), max(1, round(fraction * min(shape)))))


def svd_method(shape: tuple[int, int], svd: str = "auto") -> str:
    """``exact`` or ``lowrank`` for a matrix of ``shape`` (``svd``: auto, exact or lowrank)."""
    if svd not in ("auto", "exact", "lowrank"):
        raise ValueError(f"svd must be auto, exact or lowrank, not {svd!r}")
    if svd != "auto":
        return svd
    return "exact" if min(shape) <= EXACT_MAX_DIM else "lowrank"


@dataclass
class TopSVD:
    """Top-``k`` singular triplets: ``u`` (m, k), ``s`` (k,), ``v`` (n, k), float64."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    method: str


def top_svd(w: torch.Tensor, k: int, method: str = "exact") -> TopSVD:
    """Top-``k`` singular triplets of ``w`` in float64, exactly or by ``torch.svd_lowrank``."""
    w = w.to(torch.float64)
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return TopSVD(u[:, :k], s[:k], vh[:k].T, method)
    q = min(min(w.shape), LOWRANK_Q_FACTOR * k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LOWRANK_SEED)
        u, s, v = torch.svd_lowrank(w, q=q, niter=LOWRANK_NITER)
    return TopSVD(u[:, :k], s[:k], v[:, :k], method)


def singular_values(dw: torch.Tensor) -> tuple[torch.Tensor, str]:
    """All singular values of ``dw`` (float64, descending) and how they were computed."""
    dw = dw.to(torch.float64)
    if min(dw.shape) <= EXACT_MAX_DIM:
        return torch.linalg.svdvals(dw), "svdvals"
    g = dw.T @ dw if dw.shape[1] <= dw.shape[0] else dw @ dw.T
    ev = torch.linalg.eigvalsh(g).clamp_min(0).sqrt()
    return ev.flip(0), "gram-eigvalsh"


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of orthonormal ``a``, ``b``
    (same number of rows). Small angles come from the sines (accurate near 0), large ones from the
    cosines (accurate near pi/2), as Knyazev & Argentati (2002) recommend."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    cos = torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0)  # descending -> angles ascending
    sin = torch.linalg.svdvals(b - a @ (a.T @ b)).clamp(0.0, 1.0).flip(0)  # ascending
    n = min(cos.numel(), sin.numel())
    cos, sin = cos[:n], sin[:n]
    return torch.where(sin < np.sqrt(0.5), torch.arcsin(sin), torch.arccos(cos))


def effective_rank(s: torch.Tensor) -> float:
    """``exp`` of the entropy of ``s / sum(s)`` (NaN for a zero matrix)."""
    s = s.to(torch.float64)
    total = float(s.sum())
    if not total > 0:
        return float("nan")
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """``sum s_i^2 / s_max^2`` = ``||dW||_F^2 / ||dW||_2^2`` (NaN for a zero matrix)."""
    s = s.to(torch.float64)
    top = float(s.max()) if s.numel() else 0.0
    return float((s * s).sum() / top**2) if top > 0 else float("nan")


def update_geometry(base_svd: TopSVD, w_variant: torch.Tensor, dw: torch.Tensor,
                    method: str | None = None) -> dict[str, float]:
    """Every spectral measure of one matrix's update (see the module doc).

    ``base_svd``: :func:`top_svd` of the base (computed once for all variants); ``dw``:
    ``W_variant - W_base`` computed exactly; ``method``: how to take the variant's top-``k``
    (default: as the base's).
    """
    k = base_svd.s.numel()
    m, n = dw.shape
    var = top_svd(w_variant, k, method or base_svd.method)
    sb, sv = base_svd.s, var.s
    rel = (sv - sb).abs() / sb.clamp_min(torch.finfo(torch.float64).tiny)
    left = principal_angles(base_svd.u, var.u)
    right = principal_angles(base_svd.v, var.v)
    dw = dw.to(torch.float64)
    total = float((dw * dw).sum())
    ut_dw = base_svd.u.T @ dw  # (k, n)
    two_sided = ut_dw @ base_svd.v  # (k, k)
    dw_v = dw @ base_svd.v  # (m, k)
    spectrum, spectrum_method = singular_values(dw)

    def share(x: torch.Tensor) -> float:
        return float((x * x).sum()) / total if total > 0 else float("nan")

    deg = 180.0 / np.pi
    return {
        "spectral_drift": float(rel.mean()),
        "top_singular_change": float((sv[0] - sb[0]) / sb[0]),
        "rotation_left": float(left.mean()) * deg,
        "rotation_left_max": float(left.max()) * deg,
        "rotation_right": float(right.mean()) * deg,
        "rotation_right_max": float(right.max()) * deg,
        "on_principal_share": share(two_sided),
        "left_share": share(ut_dw),
        "right_share": share(dw_v),
        "effective_rank": effective_rank(spectrum),
        "stable_rank": stable_rank(spectrum),
        "k": k,
        "random_share": k * k / (m * n),
        "random_left_share": k / m,
        "random_right_share": k / n,
        "svd": base_svd.method,
        "dw_spectrum": spectrum_method,
    }


# ----- precision ---------------------------------------------------------------------------------

def compare_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype two stored tensors are compared in: float64 if either is, else float32 (every
    float32 / bfloat16 / float16 value is exact in it, and so is the difference of two float32
    values within a factor of two of each other)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """The bfloat16 bit pattern (int32) of each value of ``x`` rounded to nearest, ties to even.

    float64 input is rounded in one step (no double rounding through float32): the float32 value
    nearest below or above is chosen so that its bf16 rounding equals the float64 one.
    """
    if x.dtype == torch.float64:
        # a float32 that rounds to the same bf16: keep the float32 rounding unless it landed
        # exactly on a bf16 tie (lower 16 bits 0x8000), then nudge it back toward x
        f = x.to(torch.float32)
        bits = f.view(torch.int32)
        tie = (bits & 0xFFFF) == 0x8000
        off = tie & (f.double() != x)
        if bool(off.any()):
            toward = torch.where(x > f.double(), torch.full_like(f, float("inf")),
                                 torch.full_like(f, -float("inf")))
            f = torch.where(off, torch.nextafter(f, toward), f)
        x = f
    x = x.to(torch.float32)
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = torch.isnan(x)
    return torch.where(nan, torch.full_like(rounded, 0x7FC0), rounded & 0xFFFF)


def _equal_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether ``a`` and ``b`` round to the same bfloat16 number (+0 and -0 are one number)."""
    ba, bb = to_bf16_bits(a), to_bf16_bits(b)
    ba = torch.where((ba & 0x7FFF) == 0, 0, ba)
    bb = torch.where((bb & 0x7FFF) == 0, 0, bb)
    return ba == bb


def sparsity_counts(b: torch.Tensor, v: torch.Tensor, tolerances: list[float]) -> dict:
    """Counts of one matrix's entries by how the update looks at each precision.

    Returns ``{"n", "exact_zero", "bf16_invisible", "tolerance": {t: count}, "compared_in",
    "ratio": float tensor |dW| / max(|W_b|, 1e-10) of the nonzero updates}``.
    """
    wide = compare_dtype(b.dtype, v.dtype)
    bw, vw = b.reshape(-1).to(wide), v.reshape(-1).to(wide)
    d = vw - bw
    zero = vw == bw
    same16 = _equal_bf16(vw, bw)
    absd = d.abs()
    tol = {t: int((absd <= t).sum()) for t in tolerances}
    nz = ~zero
    return {"n": bw.numel(), "exact_zero": int(zero.sum()), "bf16_invisible": int(same16.sum()),
            "tolerance": tol, "compared_in": str(wide).removeprefix("torch."),
            "d_nonzero": d[nz], "b_nonzero": bw[nz]}
