"""The paper's claims as small functions of stored results: numbers in, a verdict out.

Each claim takes a :class:`~mechinterp.study.folder.Study` (the results of one ``compare`` folder,
the kinds and seeds of its variants) and returns a dict: ``id``, ``title``, ``verdict`` (``held``,
``not held``, ``inconclusive``, ``not measured``), ``held`` (True only when held, False when not
held, else None), ``test`` (its one primary test), ``primary`` (effect size, 95% interval, p-value,
Holm-adjusted p, minimum detectable effect at 80% power, the effect the claim needs, n and seeds),
``numbers``, ``statement``, ``caveats`` and ``why`` (the reason for the verdict). The decision rule
is :func:`mechinterp.study.claims.core.decide`. Intervals resample seeds, then items, so they reflect
seed-to-seed variation; with one seed a claim says so.

:func:`decide_all` decides every claim and applies Holm's correction across the claims' primary
tests. The report, ``claims.json`` and the pytest claims (``pytest --pyargs probes.claims``) all
call it, so they cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ...core.summary import floats
from ...store.results import jsonable
from ..folder import CLAIMS_FILE
from . import stats
from .behaviour import c2_kl, c5_mmlu, c6_freezing, c7_razor, gold_logprob, paired_delta
from .core import VERDICTS, missing, redecide
from .origin import c8_damage_mid_mlp
from .weights import c1_weight_change, c3_qk_most_changed, c4_sft_mid_mlp, mean_change

CLAIMS: list[Callable] = [c1_weight_change, c2_kl, c3_qk_most_changed, c4_sft_mid_mlp, c5_mmlu,
                          c6_freezing, c7_razor, c8_damage_mid_mlp]

HOLM = ("Holm's step-down correction across the primary tests of the claims that were measured "
        "(family of {m}); a claim is held only when its Holm-adjusted p is below 0.05")


def decide_all(study) -> list[dict]:
    """Every claim of :data:`CLAIMS`, Holm-corrected across their primary tests.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.

    Returns:
        One decided claim dict per claim; a claim whose computation fails is reported as not
        measured, with why.
    """
    out = []
    for fn in CLAIMS:
        cid = fn.__name__.split("_", 1)[0].upper()
        try:
            out.append(fn(study))
        except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError) as exc:
            out.append(missing(cid, cid, f"could not be computed ({type(exc).__name__}: {exc})"))
    tested = [c for c in out if c.get("primary") is not None]
    adjusted = stats.holm([c["primary"]["p_value"] for c in tested])
    for c, p in zip(tested, adjusted):
        c["primary"]["p_holm"] = p
        c["primary"]["holm_family"] = len(tested)
        redecide(c)
    return out


def verdict_word(claim: dict) -> str:
    """``held``, ``not held``, ``inconclusive`` or ``not measured``."""
    return claim.get("verdict") or {True: "held", False: "not held", None: "not measured"}[
        claim["held"]]


def verdict_line(claim: dict) -> str:
    """One line for a terminal: id, verdict in capitals, title and statement."""
    return f"{claim['id']} {verdict_word(claim).upper():12s} {claim['title']}: {claim['statement']}"


def write_claims(claims: list[dict], out: Path | str) -> Path:
    """Write ``OUT/claims.json``.

    Args:
        claims: decided claims (:func:`decide_all`).
        out: the study folder.

    Returns:
        The file's path; it holds ``{claim id: {verdict, held, primary, numbers, statement, ...}}``
        with NaN as null.
    """
    path = Path(out) / CLAIMS_FILE
    body = {c["id"]: {k: v for k, v in c.items() if k != "id"} for c in claims}
    path.write_text(json.dumps(jsonable(body), indent=1, allow_nan=False) + "\n")
    return path


__all__ = ["CLAIMS", "HOLM", "VERDICTS", "decide_all", "verdict_line", "verdict_word",
           "write_claims", "floats", "mean_change",
           "gold_logprob", "paired_delta", "c1_weight_change", "c2_kl", "c3_qk_most_changed",
           "c4_sft_mid_mlp", "c5_mmlu", "c6_freezing", "c7_razor", "c8_damage_mid_mlp"]
