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
    from mechinterp.results import read_result

    monkeypatch.setenv("MECHINTERP_PROGRESS", "0")
    rc = main(["eval", "gsm8k", "--model", "tiny-random-llama", "--limit", "2",
               "--max-new-tokens", "4", "--out", str(tmp_path), "--device", "cpu",
               "--dtype", "float32", "--chat"])
    assert rc == 0
    res = read_result(tmp_path / "gsm8k")
    rows = [json.loads(x) for x in res.files["items_base.jsonl"].splitlines()]
    assert len(rows) == 2 and res.data["n"] == 2
    assert res.data["accuracy"]["base"] == sum(r["correct"] for r in rows) / 2
