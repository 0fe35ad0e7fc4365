"""The arithmetic task: spec parsing, disjoint seeded splits, correct answers, the training format,
and the in-domain eval on a tiny model checked against an independent re-scoring."""

from __future__ import annotations

import json
import re

import pytest

from mechinterp.data import DataSource
from mechinterp.data.arithmetic import ArithmeticTask, parse_task, task_items
from mechinterp.data.items import load_items
from mechinterp.data.qa import render_target
from mechinterp.errors import DataError
from mechinterp.training.rewards import correctness, format_reward


def test_default_task_operand_ranges_and_disjoint_held_out_problems():
    """The demo's task (``arithmetic``, which the cpu-demo training preset spells out): operands
    0-19 (three problems in four have a two-digit operand, so SFT cannot fit a table of facts
    within the demo's steps), held-out problems disjoint from the training ones, and more
    training problems than the demo's SFT run sees (24 steps x 2)."""
    from mechinterp.training.settings import CPU_DEMO_TASK, PRESETS, resolve_settings

    t = parse_task("arithmetic")
    assert (t.ops, t.min, t.max) == ("+x", 0, 19)
    assert parse_task(CPU_DEMO_TASK) == t
    assert {PRESETS["cpu-demo"][a]["data"] for a in ("sft", "grpo")} == {CPU_DEMO_TASK}
    train, test = t.split("train"), t.split("test")
    every = {(a, op, b) for op in "+x" for a in range(20) for b in range(20)}
    assert set(train) | set(test) == every and not set(train) & set(test)
    assert len(train) == len(set(train)) == 600 and len(test) == 200
    assert sum(a >= 10 or b >= 10 for a, _, b in every) == 2 * (400 - 100)
    sft = resolve_settings("sft", "cpu-demo", {})
    assert len(train) > sft.max_steps * sft.per_device_train_batch_size
    held_q = {it.question for it in load_items("arithmetic", DataSource(None), "test")}
    train_q = {it.question for it in load_items(CPU_DEMO_TASK, DataSource(None), "train")}
    assert len(held_q) == 200 and held_q.isdisjoint(train_q)
    assert all(re.fullmatch(r"What is 1?\d [+x] 1?\d\?", q) for q in held_q | train_q)


def test_spec_parsing():
    assert parse_task("arithmetic") == ArithmeticTask()
    t = parse_task("arithmetic:ops=+-,min=2,max=5,heldout=0.5,seed=3")
    assert (t.ops, t.min, t.max, t.heldout, t.seed) == ("+-", 2, 5, 0.5, 3)
    assert parse_task(t.spec) == t


@pytest.mark.parametrize("bad, why", [
    ("arithmetic:ops=*", "ops"), ("arithmetic:max=x", "not a number"),
    ("arithmetic:size=3", "no option 'size'"), ("arithmetic:min=5,max=2", "empty"),
    ("arithmetic:heldout=1.5", "heldout"), ("arithmetic:ops", "KEY=VALUE"),
    ("arithmetic:min=0,max=0,ops=+", "fewer than 4"), ("algebra", "not an arithmetic"),
])
def test_bad_specs_say_what_is_wrong(bad, why):
    with pytest.raises(DataError, match=why):
        parse_task(bad)


def test_splits_are_disjoint_cover_the_universe_and_depend_on_the_seed():
    t = ArithmeticTask(ops="+x-", min=0, max=6, heldout=0.3, seed=1)
    train, test = set(t.split("train")), set(t.split("test"))
    assert not train & test
    assert train | test == {(a, op, b) for op in "+x-" for a in range(7) for b in range(7)}
    assert len(test) == round(0.3 * 3 * 49)
    assert t.split("test") == ArithmeticTask(ops="+x-", min=0, max=6, heldout=0.3, seed=1).split("test")
    assert set(ArithmeticTask(ops="+x-", min=0, max=6, heldout=0.3, seed=2).split("test")) != test


def test_answers_and_rendered_targets_are_right():
    items = task_items(ArithmeticTask(ops="+x-", min=0, max=9), "train")
    for it in items:
        a, op, b = re.fullmatch(r"What is (\d+) ([+x-]) (\d+)\?", it.question).groups()
        want = {"+": int(a) + int(b), "x": int(a) * int(b), "-": int(a) - int(b)}[op]
        assert it.answer == str(want) and it.reasoning.endswith(f"= {want}")
    targets = [render_target(it) for it in items]
    assert correctness(None, targets, [it.answer for it in items]) == [1.0] * len(items)
    assert format_reward(None, targets) == [1.0] * len(items)
    wrong = correctness(None, targets, [str(int(it.answer) + 1) for it in items])
    assert wrong == [0.0] * len(items)


def test_load_items_reads_the_held_out_split():
    held = load_items("arithmetic:min=0,max=5", DataSource(None), "test")
    train = load_items("arithmetic:min=0,max=5", DataSource(None), "train")
    assert {i.question for i in held}.isdisjoint({i.question for i in train})
    assert len(held) + len(train) == 2 * 36


def test_task_accuracy_probe_on_tiny_models(tmp_path, one_thread):
    from mechinterp.models import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe
    from mechinterp.data.qa import final_answer

    probe = get_probe("task-accuracy")
    ms = ModelSet("tiny-random-llama", {"same": "tiny-random-llama"}, device="cpu")
    res = run_probe(probe, ms, DataSource(None),
                    make_config(probe, {"items": "arithmetic:min=0,max=4", "max_new_tokens": "6"},
                                limit=5), out=tmp_path)
    d = res.data
    assert d["n_items"] == 5 and d["models"] == ["base", "same"]
    rows = [json.loads(x) for x in (tmp_path / "task-accuracy" / "items_base.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [final_answer(r["completion"]) == r["gold"] for r in rows]
    assert d["accuracy"]["base"] == sum(r["correct"] for r in rows) / 5
    # the same weights greedy-decode the same text: no flips, difference exactly 0
    assert d["paired"]["same"]["difference"] == 0.0 and d["paired"]["same"]["right_to_wrong"] == 0
    with pytest.raises(Exception, match="batch_size=0 of task-accuracy must be at least 1"):
        make_config(probe, {"batch_size": "0"})


def test_kl_drift_on_task_items_uses_the_training_format(one_thread):
    from mechinterp.models import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe

    probe = get_probe("kl-drift")
    ms = ModelSet("tiny-random-llama", {"same": "tiny-random-llama"}, device="cpu")
    res = run_probe(probe, ms, DataSource(None), make_config(probe, {"items": "arithmetic", "n_text": "0"},
                                                            limit=3))
    assert res.data["kl"]["same"] == pytest.approx(0.0, abs=1e-7)
    assert res.data["kl_reference"]["same"] == pytest.approx(0.0, abs=1e-7)
    assert res.data["n_items"] == 3
