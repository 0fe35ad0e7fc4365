"""The one runner: reuse only on equal version/config/inputs, failed figures drawn again on reuse,
broken plugins skipped, mi.run checks options."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import mechinterp as mi
from mechinterp.core.probe import BaseConfig
from mechinterp.core.runner import run_probe
from mechinterp.errors import UserError
from mechinterp.store.results import Result


@dataclass
class Config(BaseConfig):
    scale: float = 1.0


class Counting:
    """A probe that counts its runs; its figure can be made to fail."""

    name = "counting"
    version = "1"
    description = "test probe"
    Config = Config

    def __init__(self, fail_plot: bool = False):
        self.calls = 0
        self.fail_plot = fail_plot

    def run(self, models, data, config):
        self.calls += 1
        return Result(self.name, {"value": config.scale * 2, "models": models.names})

    def plot(self, result):
        if self.fail_plot:
            raise RuntimeError("plot bug")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot([0, result.data["value"]])
        return {"counting": fig}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from mechinterp.models import ModelSet, load
    from mechinterp.models.edit import plant_change

    base = load("tiny-random-llama", device="cpu", dtype="float32")
    folder = plant_change(base, tmp_path_factory.mktemp("v") / "v", {(1, "q"): 0.1}, seed=0)
    return ModelSet("tiny-random-llama", {"v": str(folder)}, device="cpu")


def test_reuse_only_when_config_and_weights_are_equal(pair, tmp_path):
    probe = Counting()
    said: list[str] = []
    first = run_probe(probe, pair, None, Config(), out=tmp_path, reuse=True, echo=said.append)
    again = run_probe(probe, pair, None, Config(), out=tmp_path, reuse=True, echo=said.append)
    assert probe.calls == 1 and again.provenance["reused"] is True
    assert again.data == json.loads((tmp_path / "counting" / "result.json").read_text())["data"]
    assert first.provenance["config_hash"] == again.provenance["config_hash"]
    other = run_probe(probe, pair, None, Config(scale=3.0), out=tmp_path, reuse=True,
                      echo=said.append)
    assert probe.calls == 2 and other.data["value"] == 6.0
    assert any("configuration changed" in m for m in said)
    # another model under the same name is another study's result: refused, replaced only
    # with overwrite (same specs with other content are recomputed: test_store_identity)
    from mechinterp.models import ModelSet

    swapped = ModelSet("tiny-random-llama", {"v": "tiny-random-llama"}, device="cpu")
    with pytest.raises(UserError, match="other models.*--overwrite"):
        run_probe(probe, swapped, None, Config(scale=3.0), out=tmp_path, reuse=True)
    assert probe.calls == 2
    run_probe(probe, swapped, None, Config(scale=3.0), out=tmp_path, reuse=True, echo=said.append,
              overwrite=True)
    assert probe.calls == 3 and any("other models" in m for m in said)


def test_without_reuse_a_replaced_result_is_said(pair, tmp_path):
    probe = Counting()
    said: list[str] = []
    run_probe(probe, pair, None, Config(), out=tmp_path, echo=said.append)
    run_probe(probe, pair, None, Config(scale=2.0), out=tmp_path, echo=said.append)
    assert probe.calls == 2 and said == [f"counting: replacing the result in {tmp_path / 'counting'} "
                                         "(configuration changed)"]


def test_a_failing_figure_keeps_the_result(pair, tmp_path):
    said: list[str] = []
    res = run_probe(Counting(fail_plot=True), pair, None, Config(), out=tmp_path, echo=said.append)
    stored = json.loads((tmp_path / "counting" / "result.json").read_text())
    assert stored["data"]["value"] == 2.0
    assert stored["provenance"]["figure_errors"] == ["RuntimeError: plot bug"]
    assert res.provenance["figure_errors"] and "figures failed" in said[0]
    # reuse draws the failed figures again (the numbers are not recomputed)
    probe = Counting()
    run_probe(probe, pair, None, Config(), out=tmp_path, reuse=True, echo=said.append)
    assert probe.calls == 0 and (tmp_path / "counting" / "counting.png").exists()
    stored = json.loads((tmp_path / "counting" / "result.json").read_text())
    assert "figure_errors" not in stored["provenance"] and "counting.png" in stored["owned"]


def test_mi_run_checks_option_names(pair):
    with pytest.raises(UserError, match="no option 'n_sampels'"):
        mi.run("weight-change", pair, n_sampels=3)
    with pytest.raises(UserError, match="not both"):
        mi.run("weight-change", pair, variants={"x": "y"})


def test_mi_run_weight_change(pair, tmp_path):
    res = mi.run("weight-change", pair, out=tmp_path, sparsity=False)
    assert res["relative_change"]["v"]["q"][1] == pytest.approx(0.1, rel=1e-3)
    assert (tmp_path / "weight-change" / "result.json").exists()


def test_broken_plugin_is_skipped_and_listed(monkeypatch):
    from importlib import metadata

    from mechinterp.core import registry as probe_mod

    class EP:
        name, value, group = "broken-one", "nowhere.module:PROBE", probe_mod.ENTRY_POINT_GROUP

        def load(self):
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [EP()])
    monkeypatch.setattr(probe_mod, "BROKEN", {})
    with pytest.warns(UserWarning, match="broken-one"):
        found = probe_mod.registry()
    assert "weight-change" in found and "broken-one" in probe_mod.BROKEN
