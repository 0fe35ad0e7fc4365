"""GSM8K: batched left-padded greedy generation equals one prompt at a time; prompts; CLI."""

from __future__ import annotations

import json

import torch

from mechinterp.data.gsm8k import GSM8KItem
from mechinterp.evals.gsm8k import build_prompt, cut_at_stop, generate


def test_batched_generation_matches_single(fresh_tiny_llama):
    model = fresh_tiny_llama
    prompts = ["Question: 1 + 1?\nAnswer:", "Q: a much longer prompt about numbers 12\nA:", "x"]
    batched = generate(model, prompts, max_new_tokens=6, batch_size=3)
    for p, got in zip(prompts, batched):
        ids = model.tokenizer(p, return_tensors="pt")
        with torch.no_grad():
            ref = model.hf.generate(**ids, max_new_tokens=6, do_sample=False,
                                    pad_token_id=model.tokenizer.pad_token_id)
        assert got == model.tokenizer.decode(ref[0, ids["input_ids"].shape[1]:],
                                             skip_special_tokens=True)


def test_prompt_and_stop():
    item = GSM8KItem("How many?", "2 + 2 = 4\n#### 4", "4")
    shot = GSM8KItem("One?", "It is 1.\n#### 1", "1")
    assert build_prompt(item, [shot], False, None) == \
        "Question: One?\nAnswer: It is 1.\n#### 1\n\nQuestion: How many?\nAnswer:"
    assert cut_at_stop(" 5 apples.\n#### 5\n\nQuestion: next") == " 5 apples.\n#### 5\n\n"


def test_cli_eval_gsm8k(tmp_path, monkeypatch):
    from mechinterp.cli import main
    from mechinterp.store.results import read_result

    monkeypatch.setenv("MECHINTERP_PROGRESS", "0")
    rc = main(["eval", "gsm8k", "--model", "tiny-random-llama", "--limit", "2",
               "--max-new-tokens", "4", "--out", str(tmp_path), "--device", "cpu",
               "--dtype", "float32", "--chat"])
    assert rc == 0
    res = read_result(tmp_path / "gsm8k")
    rows = [json.loads(x) for x in res.files["items_base.jsonl"].splitlines()]
    assert len(rows) == 2 and res.data["n"] == 2
    assert res.data["accuracy"]["base"] == sum(r["correct"] for r in rows) / 2


def test_stop_strings_end_generation_without_changing_the_answer(fresh_tiny_llama):
    """lm-eval's ``until``: generation stops at a stop string; the text before it is the same
    greedy text as a run without stops (a stopped row is only padded while the batch goes on)."""
    model = fresh_tiny_llama
    prompts = ["Question: 1 + 1?\nAnswer:", "Q: a much longer prompt about numbers 12\nA:"]
    free = generate(model, prompts, max_new_tokens=24, batch_size=2)
    stop = free[0][4:6]  # a string the model is known to produce in row 0
    assert stop and len(free[0]) > 8
    stopped = generate(model, prompts, max_new_tokens=24, batch_size=2, stop=[stop])

    def cut(t):
        k = t.find(stop)
        return t if k < 0 else t[:k]

    assert [cut(t) for t in stopped] == [cut(t) for t in free]
    assert len(stopped[0]) < len(free[0]) and stop in stopped[0]


def test_few_shot_sampling_as_lm_eval_draws():
    import random

    import pytest

    from mechinterp.errors import UserError
    from mechinterp.evals.gsm8k import sample_shots

    pool = [GSM8KItem(f"q{i}", f"s{i}\n#### {i}", str(i), i, "train") for i in range(50)]
    got = sample_shots(pool, 3, 5)
    rnd = random.Random(1234)  # lm-eval: one Random(fewshot_random_seed), k draws per question
    assert got == [rnd.sample(pool, 5) for _ in range(3)]
    assert got[0] != got[1]  # each question its own examples
    assert sample_shots(pool, 2, 3, "first") == [pool[:3], pool[:3]]
    assert sample_shots(pool, 2, 0) == [[], []]
    with pytest.raises(UserError, match="51 shots asked"):
        sample_shots(pool, 1, 51)
