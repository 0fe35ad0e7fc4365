"""Bad input gets one line on stderr, exit code 2, no traceback and no result.json."""

import shutil
import subprocess
import sys

import pytest

from mechinterp.cli import main
from mechinterp.models import fetch


def _run(capsys, args):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def corrupt_dir(tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(fetch("tiny-random-llama"), d)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-10])
    return d


def _bad_cases(tmp_path, corrupt_dir):
    out = str(tmp_path / "out")
    return [
        (["run", "weight-change", "--base", "no-such-model", "--out", out], "cannot resolve model spec"),
        (["run", "weight-change", "--base", "tiny-random-llama", "--variant", "g=tiny-random-gpt2",
          "--out", out], "variant 'g'"),
        (["run", "weight-change", "--base", "tiny-random-llama", "--variant", f"c={corrupt_dir}",
          "--out", out], "truncated"),
        (["run", "no-such-probe", "--base", "tiny-random-llama", "--out", out], "unknown probe"),
        (["run", "weight-change", "--base", "tiny-random-llama", "--data-dir", str(tmp_path / "x"),
          "--out", out], "is not a folder"),
        (["run", "weight-change", "--base", "tiny-random-llama", "--set", "bogus=1", "--out", out],
         "has no option 'bogus'"),
        (["models", "fetch", "nope"], "unknown zoo model"),
        (["figures", str(tmp_path)], "no result.json"),
    ]


def test_bad_input_one_line_exit_2(tmp_path, corrupt_dir, capsys):
    for args, needle in _bad_cases(tmp_path, corrupt_dir):
        code, err = _run(capsys, args)
        assert code == 2, (args, err)
        assert err.startswith("mechinterp: error:") and needle in err, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "out").exists()


class _FailsMidway:
    """A probe that does part of its work, then finds bad input (as real probes do mid-run)."""

    name = "fails-midway"
    version = "1"
    description = "raises a UserError after its first item"

    def __init__(self):
        from dataclasses import make_dataclass

        from mechinterp.core.probe import BaseConfig

        self.Config = make_dataclass("Config", [], bases=(BaseConfig,))
        self.reached: list[int] = []

    def run(self, models, data, config):
        from mechinterp.errors import UserError

        for i in range(3):
            self.reached.append(i)
            models.base.hf(**models.base.encode("The capital of France is"))
            if i == 1:
                raise UserError(f"item {i} is malformed", "fix the item")
        raise AssertionError("not reached")

    def plot(self, result):
        return {}


def test_a_probe_failing_inside_run_leaves_no_result(tmp_path, capsys, monkeypatch):
    from mechinterp.core import registry as registry_module

    probe = _FailsMidway()
    installed = registry_module.registry
    monkeypatch.setattr(registry_module, "registry", lambda: {**installed(), probe.name: probe})
    out = tmp_path / "out"
    cases = [(["run", probe.name, "--base", "tiny-random-llama", "--out", str(out)],
              "item 1 is malformed"),
             # a built-in probe's own check, inside its run (models loaded, data opened)
             (["run", "mlp-patching", "--base", "tiny-random-llama", "--out", str(out)],
              "mlp-patching compares models")]
    for args, needle in cases:
        code, err = _run(capsys, args)
        assert code == 2, (args, err)
        assert err.startswith("mechinterp: error:") and needle in err, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not list(tmp_path.rglob("result.json")), (args, list(tmp_path.rglob("*")))
    assert probe.reached == [0, 1]  # the run really started and stopped midway


def test_console_script_exit_code_and_stderr(tmp_path):
    """The installed entry point behaves the same from a shell."""
    proc = subprocess.run([sys.executable, "-m", "mechinterp.cli", "run", "weight-change",
                           "--base", "no-such-model", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "cannot resolve" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_listing_commands(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "tiny-random-gpt2" in out
    assert main(["probes", "list"]) == 0
    assert "weight-change" in capsys.readouterr().out
    assert main(["models", "fetch", "tiny-random-llama"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(fetch("tiny-random-llama"))


def test_unknown_command_line_option_is_a_usage_error(tmp_path, capsys):
    """typer >= 0.29 raises its vendored click's exceptions: still a usage message, exit 2."""
    code, err = _run(capsys, ["run", "damage-attribution", "--subjects", "x", "--out",
                              str(tmp_path / "o")])
    assert code == 2
    assert "No such option: --subjects" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_help_keeps_square_brackets():
    """Help text in square brackets ("[paper: 571]", "ORG/NAME[@REV]") is shown, not eaten as markup."""
    from typer.testing import CliRunner

    from mechinterp.cli import app

    runner = CliRunner()
    train = runner.invoke(app, ["train", "sft", "--help"], terminal_width=200)
    assert train.exit_code == 0 and "[paper: 571]" in train.output
    run = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert run.exit_code == 0 and "ORG/NAME[@REV]" in run.output
