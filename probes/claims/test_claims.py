"""One test per claim of the paper (C1-C8 of ``mechinterp.claims``)."""

from __future__ import annotations

import pytest

from mechinterp.claims import CLAIMS


@pytest.mark.parametrize("claim", CLAIMS, ids=[f.__name__ for f in CLAIMS])
def test_claim(study, claim):
    verdict = claim(study)
    if verdict["held"] is None:
        pytest.skip(f"{verdict['id']} {verdict['statement']}")
    assert verdict["held"], f"{verdict['id']} ({verdict['title']}) did not hold: {verdict['statement']}"
