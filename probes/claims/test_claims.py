"""One test per claim of the paper (C1-C8 of ``mechinterp.study.claims``), decided as the report does
(:func:`mechinterp.study.claims.decide_all`, Holm-corrected): ``held`` passes; ``not held`` fails;
``inconclusive`` is reported as an expected failure (XFAIL) with its numbers, never as a pass;
``not measured`` is skipped with what is missing."""

from __future__ import annotations

import pytest

from mechinterp.study.claims import CLAIMS


def _numbers(c: dict) -> str:
    p = c.get("primary") or {}
    if not p:
        return c["statement"]
    lo, hi = p["ci95"]
    holm = f" (Holm {p['p_holm']:.3g})" if p.get("p_holm") is not None else ""
    return (f"{p['measure']} = {p['effect']:.4g} [{lo:.4g}, {hi:.4g}], {p['test']}: p = "
            f"{p['p_value']:.3g}{holm}, MDE {p['mde']:.3g} (needed {p['needed']:.3g}), n = "
            f"{p['n']}, {p['n_seeds']} seed(s). {c['statement']}")


@pytest.mark.parametrize("claim", CLAIMS, ids=[f.__name__ for f in CLAIMS])
def test_claim(decided, claim):
    c = decided[claim.__name__.split("_", 1)[0].upper()]
    head = f"{c['id']} ({c['title']})"
    if c["verdict"] == "not measured":
        pytest.skip(f"{c['id']} {c['statement']}")
    if c["verdict"] == "inconclusive":
        pytest.xfail(f"{head} inconclusive: {c['why']}. {_numbers(c)}")
    assert c["verdict"] == "held", f"{head} {c['verdict']}: {c['why']}. {_numbers(c)}"
