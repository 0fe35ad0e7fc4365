"""The ``study`` fixture: a compare folder, read or computed (see ``probes.claims``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mechinterp.errors import UserError
from mechinterp.models.modelset import parse_variant_args
from mechinterp.models.zoo import DEFAULT_MODEL
from mechinterp.study.claims import decide_all
from mechinterp.study.compare import compare
from mechinterp.study.folder import STUDY_FILE, load_study


@pytest.fixture(scope="session")
def study(request, tmp_path_factory):
    opt = request.config.getoption
    results = opt("--mi-results")
    try:
        if results and (Path(results) / STUDY_FILE).is_file() \
                and not opt("--mi-variant"):
            study = load_study(results)
            if study.missing():  # a compare killed part-way: its claims would read as skipped
                pytest.fail(f"mechinterp: {results} is an unfinished compare folder (missing: "
                            f"{', '.join(study.missing())}); re-run the compare into it "
                            "(finished results are reused)", pytrace=False)
            return study
        runs = parse_variant_args(opt("--mi-variant"))
        if not runs:
            pytest.fail("mechinterp claims need --mi-results DIR (a compare folder) or "
                        "--mi-variant NAME=SPEC for at least an sft and a grpo model", pytrace=False)
        out = results or tmp_path_factory.mktemp("claims")
        return compare(opt("--mi-base") or DEFAULT_MODEL, {n: v[0] for n, v in runs.items()}, out,
                       data_dir=opt("--mi-data-dir"), preset=opt("--mi-preset"),
                       device=opt("--mi-device"), dtype=opt("--mi-dtype"))
    except UserError as exc:
        pytest.fail(f"mechinterp: {exc.one_line()}", pytrace=False)


@pytest.fixture(scope="session")
def decided(study):
    """``{claim id: claim}``: every claim decided once, Holm-corrected, as the report has them."""
    return {c["id"]: c for c in decide_all(study)}
