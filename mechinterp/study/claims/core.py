"""What a claim is (its dict), the one decision rule every claim uses, and the look-ups claims
share (roles, replicate pairs, stored arrays).

A claim has ONE primary test. Its verdict:

- ``held``: the 95% interval excludes 0 on the claimed side, the primary test's p-value (Holm-
  adjusted across the claims in :func:`~mechinterp.study.claims.decide_all`) is below 0.05, and every
  gate the claim sets (e.g. "SFT's update is above the optimizer's noise floor") passes;
- ``not held``: the interval excludes 0 on the other side with p below 0.05, or the test had at
  least 80% power for the effect the claim needs (minimum detectable effect <= needed) and the
  interval rules that effect out;
- ``inconclusive``: anything else (the interval spans 0 while the test lacks power for the needed
  effect or cannot rule it out; significant before Holm but not after; a gate failed);
- ``not measured``: the study lacks what the claim reads (a role, a probe, a result key); the
  statement says what and how to get it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import stats

ALPHA = 0.05
VERDICTS = ("held", "not held", "inconclusive", "not measured")


def claim(cid: str, title: str, statement: str, numbers: dict | None = None,
          primary: dict | None = None, gates: list[dict] | None = None,
          caveats: list[str] | None = None) -> dict:
    """A decided claim (see :func:`decide`); ``primary`` None: not measured."""
    c = {"id": cid, "title": title, "verdict": "not measured", "held": None,
         "test": (primary or {}).get("test"), "primary": primary, "numbers": numbers or {},
         "statement": statement, "caveats": list(caveats or []), "gates": list(gates or []),
         "why": ""}
    if primary is not None:
        redecide(c)
    return c


def missing(cid: str, title: str, what: str) -> dict:
    """A not-measured claim whose statement and ``why`` say what the study lacks."""
    c = claim(cid, title, f"not measured: {what}")
    c["why"] = what
    return c


def primary(test: str, measure: str, point: float, reps: np.ndarray, needed: float,
            n: int, n_seeds: int, p: float | None = None, direction: int = 1,
            units: str = "") -> dict:
    """The primary test's numbers from a point estimate and its bootstrap replicates: interval,
    p-value (the bootstrap's unless a test's ``p`` is given), standard error, minimum detectable
    effect and power at ``needed`` (the smallest effect in the claimed direction that would
    support the claim, pre-specified by each claim)."""
    reps = np.asarray(reps, float)
    se = float(np.nanstd(reps, ddof=1)) if np.isfinite(reps).sum() > 1 else math.nan
    return {"test": test, "measure": measure, "effect": float(point),
            "ci95": stats.interval(reps), "p_value": float(stats.boot_p(reps) if p is None else p),
            "p_holm": None, "se": se, "mde": stats.mde(se), "needed": float(needed),
            "power_at_needed": stats.power(needed, se), "direction": direction, "n": int(n),
            "n_seeds": int(n_seeds), "units": units}


def decide(p: dict, gates: list[dict], holm: bool = True) -> tuple[str, str]:
    """``(verdict, why)`` from a primary test (see the module docstring)."""
    pv = p["p_holm"] if holm and p.get("p_holm") is not None else p["p_value"]
    d = p["direction"]
    lo, hi = sorted(d * x for x in p["ci95"])
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(pv)):
        return "inconclusive", "no finite interval"
    sig = pv < ALPHA
    adj = "Holm-adjusted " if holm and p.get("p_holm") is not None else ""
    if lo > 0 and sig:
        verdict, why = "held", f"interval excludes 0 on the claimed side, {adj}p = {pv:.3g}"
    elif hi < 0 and sig:
        verdict, why = "not held", f"interval excludes 0 on the other side, {adj}p = {pv:.3g}"
    elif hi < p["needed"] and p["mde"] <= p["needed"]:
        verdict, why = "not held", (f"the test had >= 80% power for the needed effect "
                                    f"{p['needed']:.3g} (MDE {p['mde']:.3g}) and the interval "
                                    "rules it out")
    elif lo > 0:
        verdict, why = "inconclusive", f"interval excludes 0 but {adj}p = {pv:.3g} >= {ALPHA}"
    else:
        verdict, why = "inconclusive", (
            "interval spans 0" + (f"; power {p['power_at_needed']:.0%} < 80% for the needed "
                                  f"effect {p['needed']:.3g} (MDE {p['mde']:.3g})"
                                  if p["mde"] > p["needed"] else
                                  f"; does not rule out the needed effect {p['needed']:.3g}"))
    for g in gates:
        if not g["ok"] and (g.get("blocks") == "any" or verdict == "held"):
            verdict, why = "inconclusive", g["reason"]
    return verdict, why


def redecide(c: dict, holm: bool = True) -> dict:
    """Set ``verdict``, ``held`` and ``why`` of a claim from its primary test and gates."""
    if c.get("primary") is None:
        return c
    if c.get("parts"):  # intersection-union: every part must hold, at the claim's (largest) p
        for part in c["parts"]:
            part["primary"]["p_holm"] = c["primary"].get("p_holm")
            part["verdict"], part["why"] = decide(part["primary"], part["gates"], holm)
        vs = [part["verdict"] for part in c["parts"]]
        c["verdict"] = ("held" if all(v == "held" for v in vs) else
                        "not held" if "not held" in vs else "inconclusive")
        c["why"] = "; ".join(f"{part['kind']}: {part['verdict']} ({part['why']})"
                             for part in c["parts"])
    else:
        c["verdict"], c["why"] = decide(c["primary"], c["gates"], holm)
    c["held"] = {"held": True, "not held": False}.get(c["verdict"])
    return c


def gate(ok: bool, reason: str, blocks: str = "held") -> dict:
    """A condition of the claim: when ``ok`` is False the verdict cannot be ``held`` (``blocks=
    "held"``) or is ``inconclusive`` whatever the test says (``blocks="any"``)."""
    return {"ok": bool(ok), "reason": reason, "blocks": blocks}


def ci_text(p: dict, digits: int = 3) -> str:
    """A primary test's 95% interval as ``[lo, hi]`` to ``digits`` significant digits."""
    lo, hi = p["ci95"]
    return f"[{lo:.{digits}g}, {hi:.{digits}g}]"


def test_text(p: dict) -> str:
    """``p = 0.012 (Holm 0.05), MDE 0.1, n 100 over 3 seeds``."""
    holm = f" (Holm {p['p_holm']:.3g})" if p.get("p_holm") is not None else ""
    return (f"{p['test']}: p = {p['p_value']:.3g}{holm}; MDE at 80% power {p['mde']:.3g} "
            f"(needed {p['needed']:.3g}); n = {p['n']} over {p['n_seeds']} seed(s)")


# ----- look-ups ------------------------------------------------------------------------------

def result(study, probe: str):
    """The study's result of ``probe``, or None."""
    return study.results.get(probe)


def replicates(study, kind: str) -> list[str]:
    """The variants of ``kind``, one per seed (:meth:`~mechinterp.study.folder.Study.replicates`;
    study order for a study-like object without it)."""
    return list(study.replicates(kind)) if hasattr(study, "replicates") else [
        n for n, v in study.variants.items() if v.kind == kind]


def pairs(study, a: str, b: str) -> list[tuple[str, str]] | str:
    """Replicate i of kind ``a`` with replicate i of kind ``b`` (as many pairs as both have), or
    a message naming the kind that is missing."""
    first, second = replicates(study, a), replicates(study, b)
    for kind, names in ((a, first), (b, second)):
        if not names:
            return f"no {kind} variant (kinds come from train-config.json or the variant's name)"
    return list(zip(first, second))


def single_seed(n_seeds: int) -> list[str]:
    """The single-seed caveat when ``n_seeds`` is below 2, else none."""
    return (["single seed: the interval reflects item-to-item variation only, not seed-to-seed"]
            if n_seeds < 2 else [])


def get(d: dict | None, *keys, default: Any = None) -> Any:
    """``d[k1][k2]...``, or ``default`` where a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d
