"""pytest plugin: run probe checks on your own checkpoints.

    pytest my_checks.py --mi-base allenai/OLMo-2-1124-7B-Instruct \\
        --mi-variant sft=Neelectric/OLMo-2-1124-7B-Instruct_SFTv02.08 --mi-device cuda

gives tests a session-scoped ``modelset`` fixture (a :class:`~mechinterp.models.ModelSet`) and a
``mi_data`` fixture (a :class:`~mechinterp.data.DataSource` from ``--mi-data-dir`` or
``MECHINTERP_DATA``). Imports are deferred so that the plugin costs nothing in other test runs.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("mechinterp", "mechinterp: probe checks on your checkpoints")
    group.addoption("--mi-base", default=None,
                    help="base model spec for the modelset fixture (default: the built-in default)")
    group.addoption("--mi-variant", action="append", default=[], metavar="NAME=SPEC",
                    help="variant NAME=SPEC (repeatable; NAME=A,B,... for a run's checkpoints)")
    group.addoption("--mi-device", default="auto", help="auto, cpu, cuda, cuda:N")
    group.addoption("--mi-dtype", default="auto", help="auto, float32, bfloat16, float16")
    group.addoption("--mi-data-dir", default=None, help="data root (default: $MECHINTERP_DATA)")
    group.addoption("--mi-results", default=None, metavar="DIR",
                    help="probes.claims: a compare folder to read (or to compute into)")
    group.addoption("--mi-preset", default="default",
                    help="probes.claims: compare preset when computing (smoke, default, paper)")


@pytest.fixture(scope="session")
def modelset(request):
    """The ModelSet named by --mi-base / --mi-variant (default base: smollm2-135m-instruct)."""
    # torch: importing mechinterp loads it, which other test runs should not pay for
    from mechinterp.errors import UserError
    from mechinterp.models.modelset import ModelSet
    from mechinterp.models.zoo import DEFAULT_MODEL

    opt = request.config.getoption
    try:
        return ModelSet.from_args(opt("--mi-base") or DEFAULT_MODEL, opt("--mi-variant"),
                                  device=opt("--mi-device"), dtype=opt("--mi-dtype"))
    except UserError as exc:
        pytest.fail(f"mechinterp: {exc.one_line()}", pytrace=False)


@pytest.fixture(scope="session")
def mi_data(request):
    """DataSource from --mi-data-dir, else MECHINTERP_DATA, else the hub."""
    # torch: importing mechinterp loads it, which other test runs should not pay for
    from mechinterp.data import DataSource
    from mechinterp.errors import UserError

    try:
        return DataSource.from_option(request.config.getoption("--mi-data-dir"))
    except UserError as exc:
        pytest.fail(f"mechinterp: {exc.one_line()}", pytrace=False)
