"""``--report-to``: a tiny run logs its loss and its drift log (KL, weight change) to TensorBoard, and
the event file read back holds the numbers the run wrote to its own records."""

from __future__ import annotations

import math

import pytest

from mechinterp.errors import UserError
from mechinterp.training.runner import train
from mechinterp.training.settings import resolve_settings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(base="tiny-random-llama", max_steps=2, per_device_train_batch_size=2, max_length=768,
            checkpoints=2, n_heldout=2, heldout_max_length=768, learning_rate=1e-3,
            warmup_ratio=0.0, seed=0)


def _scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((out / "trainer-state" / "runs").iterdir())
    assert len(runs) == 1
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_loss_and_drift(tmp_path):
    from mechinterp.store.results import read_result

    out = tmp_path / "run"
    train(resolve_settings("sft", None, {**TINY, "report_to": "tensorboard"}), out,
          echo=lambda *_: None)
    tb = _scalars(out)
    drift = read_result(out / "training-drift").data
    assert drift["steps"] == [1, 2]
    for i, step in enumerate(drift["steps"]):
        kl = drift["kl"][i]
        assert kl is not None and kl > 0
        assert tb["train/drift/kl"][step] == pytest.approx(kl, rel=1e-6)
        per_matrix = {m: [v for v in drift["relative_change"][m][i] if not math.isnan(v)]
                      for m in drift["matrices"]}
        flat = [v for vals in per_matrix.values() for v in vals]
        assert tb["train/drift/relative_change_mean"][step] == pytest.approx(
            sum(flat) / len(flat), rel=1e-6)
        assert tb["train/drift/relative_change_max"][step] == pytest.approx(max(flat), rel=1e-6)
        for m, vals in per_matrix.items():
            assert tb[f"train/drift/relative_change/{m}"][step] == pytest.approx(
                sum(vals) / len(vals), rel=1e-6)
    losses = {h["step"]: h["loss"] for h in drift["history"] if "loss" in h}
    assert sorted(losses) == [1, 2]
    for step, loss in losses.items():
        assert tb["train/loss"][step] == pytest.approx(loss, rel=1e-6)


def test_default_reports_nowhere_and_bad_values_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(resolve_settings("sft", None, {**TINY, "max_steps": 1, "checkpoints": 1}), out,
          echo=lambda *_: None)
    assert not (out / "trainer-state" / "runs").exists()
    with pytest.raises(UserError, match="--report-to"):
        resolve_settings("sft", None, {**TINY, "report_to": "mlflow2"})
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(UserError, match="pip install tensorboard"):
        train(resolve_settings("sft", None, {**TINY, "report_to": "tensorboard"}),
              tmp_path / "other", echo=lambda *_: None)
