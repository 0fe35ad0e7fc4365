"""The pytest plugin gives users a `modelset` fixture built from --mi-base / --mi-variant."""

import shutil

from mechinterp.models import fetch

pytest_plugins = ["pytester"]


def test_modelset_fixture_from_options(pytester, tmp_path):
    var = tmp_path / "v"
    shutil.copytree(fetch("tiny-random-llama"), var)
    pytester.makepyfile("""
        def test_user_check(modelset):
            assert modelset.variants == ["sft"]
            assert modelset["sft"].n_layers == modelset.base.n_layers == 4
    """)
    result = pytester.runpytest_subprocess("--mi-base", "tiny-random-llama",
                                           "--mi-variant", f"sft={var}", "--mi-device", "cpu")
    result.assert_outcomes(passed=1)


def test_bad_spec_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x(modelset):\n    pass\n")
    result = pytester.runpytest_subprocess("--mi-base", "no-such-model")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*mechinterp: cannot resolve model spec 'no-such-model'*"])
    assert "Traceback" not in result.stdout.str()
