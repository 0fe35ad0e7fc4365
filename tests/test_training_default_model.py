"""Exact freezing on the real default model (SmolLM2-135M), SFT and GRPO, a couple of steps each."""

from __future__ import annotations

import pytest
from test_training_runs import assert_frozen_exactly  # tests/ is on sys.path (rootdir mode)

from mechinterp.models import DEFAULT_MODEL
from mechinterp.training.runner import train
from mechinterp.training.settings import resolve_settings

# MLPs of layers 18-23, plus slices: a query head (GQA: 9 heads / 3 KV heads)
# and 100 MLP neurons
SPEC = "mlp@18-23,attn.heads@5:4,mlp.neurons@10:0-99"


@pytest.mark.slow
def test_sft_freezes_exactly_on_default_model(tmp_path):
    s = resolve_settings("sft", "cpu-smoke", dict(
        base=DEFAULT_MODEL, max_steps=2, checkpoints=1, per_device_train_batch_size=1,
        max_length=256, n_heldout=0, learning_rate=1e-4, weight_decay=0.1, warmup_ratio=0.0,
        freeze=SPEC))
    res = train(s, tmp_path / "run", echo=lambda *_: None, skip_disk_check=True)
    assert res.steps == 2
    assert assert_frozen_exactly(DEFAULT_MODEL, SPEC, tmp_path / "run", weight_decay=True) > 200


@pytest.mark.slow
def test_grpo_freezes_exactly_on_default_model(tmp_path):
    from mechinterp.training.rewards import completion_text

    def length_reward(prompts, completions, **_):  # guarantees reward variance in one step
        return [len(completion_text(c)) / 10.0 for c in completions]

    s = resolve_settings("grpo", "cpu-smoke", dict(
        base=DEFAULT_MODEL, max_steps=1, checkpoints=1, max_completion_length=8, n_heldout=0,
        learning_rate=1e-4, weight_decay=0.1, warmup_ratio=0.0, temperature=1.0, freeze=SPEC,
        extra={"reward_weights": [1.0]}))
    res = train(s, tmp_path / "run", echo=lambda *_: None, reward_funcs=[length_reward],
                skip_disk_check=True)
    assert res.steps == 1
    assert_frozen_exactly(DEFAULT_MODEL, SPEC, tmp_path / "run", weight_decay=True)
