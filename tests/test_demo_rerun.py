"""A second ``mechinterp demo`` into the same folder reuses its finished training runs:
``train-config.json`` holds run facts (precision, processes) beside the settings, and
only the settings decide whether a finished run is the one asked for. The end-to-end check, a
second demo in a new process on the smoke preset, is in ``test_demo_smoke.py``."""

from __future__ import annotations

import json

import pytest

from mechinterp.study.demo import DEMO_PRESETS, DemoRun, train_one
from mechinterp.errors import UserError
from mechinterp.models.run_folder import CONFIG_FILE, SUMMARY_FILE
from mechinterp.training.settings import (
    RUN_FACTS,
    resolve_settings,
    save_settings,
    settings_differ,
)


def _finished_run(out, name: str, algorithm: str, freeze, **change):
    """A run folder as train() leaves it, without training: the settings the demo would ask for
    (with ``change``), the run facts train() adds, and a summary."""
    p = DEMO_PRESETS["smoke"]
    overrides = dict(p.train) | (p.grpo if algorithm == "grpo" else {})
    overrides |= {"freeze_preset": freeze, "device": "auto", "dtype": "auto", "seed": 0} | change
    s = resolve_settings(algorithm, p.train_preset, overrides)
    folder = out / "models" / name
    folder.mkdir(parents=True)
    save_settings(s, folder / CONFIG_FILE, {"precision": {"master_weights": "float32"},
                                            "processes": 1})
    (folder / SUMMARY_FILE).write_text(json.dumps({"algorithm": algorithm, "steps": s.max_steps}))
    return folder


def _no_training(*_a, **_k):
    raise AssertionError("a finished run was trained again")


@pytest.mark.parametrize("name,algorithm,freeze", [("sft", "sft", None), ("grpo", "grpo", None),
                                                   ("sft-frozen", "sft", "paper-mid-mlp")])
def test_a_finished_run_with_the_same_settings_is_reused(tmp_path, monkeypatch, name, algorithm,
                                                         freeze):
    import mechinterp.training.runner as runner

    monkeypatch.setattr(runner, "train", _no_training)
    folder = _finished_run(tmp_path, name, algorithm, freeze)
    said = []
    got = train_one(DemoRun(name, algorithm, freeze, 0, True), DEMO_PRESETS["smoke"], tmp_path,
                     None, "auto", "auto", said.append)
    assert got == folder and said == [f"  {name}: finished run in {folder}, reused"]


def test_a_finished_run_with_other_settings_is_refused_naming_them(tmp_path, monkeypatch):
    import mechinterp.training.runner as runner

    monkeypatch.setattr(runner, "train", _no_training)
    _finished_run(tmp_path, "sft", "sft", None, learning_rate=3e-4)
    with pytest.raises(UserError, match=r"finished run with other settings: learning_rate "
                                        r"\(run: 0.0003, now: "):
        train_one(DemoRun("sft", "sft", None, 0, True), DEMO_PRESETS["smoke"], tmp_path, None,
                   "auto", "auto", lambda _: None)


def test_run_facts_are_no_settings():
    s = resolve_settings("sft", "cpu-demo", {})
    saved = json.loads(json.dumps(s.to_json())) | {"precision": {"x": 1}, "processes": 4}
    assert set(RUN_FACTS) == {"precision", "processes"}
    assert settings_differ(saved, s) == {}
    assert settings_differ(saved | {"seed": 1}, s) == {"seed": (1, 0)}
    assert settings_differ({k: v for k, v in saved.items() if k != "beta"}, s) == \
        {"beta": (None, s.beta)}  # a setting missing from the file is a difference
