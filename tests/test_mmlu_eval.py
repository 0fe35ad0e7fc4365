"""MMLU scoring: lm-eval's prompt text, the one-row letter path and full scoring against a naive
per-choice forward pass, stratified sampling, and the item rows in the result store."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mechinterp.data.mmlu import MMLUItem, load_mmlu
from mechinterp.errors import UserError
from mechinterp.evals.loglik import Request, encode_pair, score
from mechinterp.evals.mmlu import (
    MMLUFormat,
    build_request,
    score_mmlu,
    stratified_sample,
    summarise,
)

ITEM = MMLUItem("high_school_biology", "  Which organelle makes ATP? ", ("Nucleus", "Mitochondrion",
                "Ribosome", "Golgi"), 1, "test", 7)
SHOT = MMLUItem("high_school_biology", "DNA is made of?", ("Lipids", "Sugars", "Nucleotides",
                "Ions"), 2, "dev", 0)


def test_letter_prompt_is_lm_eval_text():
    req = build_request(MMLUFormat("letter", 1), ITEM, [SHOT])
    assert req.context == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "DNA is made of?\nA. Lipids\nB. Sugars\nC. Nucleotides\nD. Ions\nAnswer: C\n\n"
        "Which organelle makes ATP?\nA. Nucleus\nB. Mitochondrion\nC. Ribosome\nD. Golgi\nAnswer:")
    assert req.continuations == (" A", " B", " C", " D")


def test_cloze_prompt_and_formats():
    req = build_request(MMLUFormat("cloze"), ITEM, [])
    assert req.context == ("The following are questions (with answers) about high school "
                           "biology.\n\nQuestion: Which organelle makes ATP?\nAnswer:")
    assert req.continuations == (" Nucleus", " Mitochondrion", " Ribosome", " Golgi")
    assert MMLUFormat.parse("letter-5shot") == MMLUFormat("letter", 5)
    assert MMLUFormat.parse("cloze").label == "cloze"
    assert MMLUFormat.parse("letter-0shot-chat").label == "letter-0shot-chat"
    for bad in ("letters", "letter-9shot"):
        with pytest.raises(UserError):
            MMLUFormat.parse(bad)


def naive_loglik(model, context: str, continuation: str) -> float:
    """One unbatched forward over context + continuation, float64 log-softmax."""
    ctx, cont = encode_pair(model.tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model.hf(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


@pytest.mark.parametrize("workers", [1, 2])
def test_batched_scoring_matches_naive(tiny_model, workers):
    reqs = [Request("The capital of France is", (" Paris", " Rome", " a city far away")),
            Request("Answer:", (" A", " B", " C", " D")),
            Request("Q: 1+1 = ?\nA: ", ("2", "11", "two"))]
    got, _ = score(tiny_model, reqs, token_budget=40, max_rows=3, workers=workers)
    for req, row in zip(reqs, got):
        for cont, val in zip(req.continuations, row):
            assert val == pytest.approx(naive_loglik(tiny_model, req.context, cont), abs=1e-4)


def test_letter_fast_path_and_rows(data_source):
    from mechinterp.models import load

    model = load("tiny-random-llama", device="cpu", dtype="float32")
    items = load_mmlu(data_source, "test", ["world_religions"])[:3]
    dev = load_mmlu(data_source, "dev", ["world_religions"])
    for fmt in (MMLUFormat("letter", 0), MMLUFormat("letter", 1), MMLUFormat("cloze")):
        reqs = [build_request(fmt, it, dev[:fmt.shots]) for it in items]
        _, n_fast = score(model, reqs)
        assert n_fast == (len(items) if fmt.kind == "letter" else 0)
        rows = score_mmlu(model, items, dev, fmt)
        for it, req, row in zip(items, reqs, rows):
            ref = [naive_loglik(model, req.context, c) for c in req.continuations]
            assert row["loglik"] == pytest.approx(ref, abs=1e-4)
            assert row["pred"] == max(range(4), key=ref.__getitem__)
            assert (row["subject"], row["index"], row["gold"]) == (it.subject, it.index, it.answer)
            if fmt.kind == "cloze":
                norm = [v / len(c) for v, c in zip(ref, it.choices)]
                assert row["pred_norm"] == max(range(4), key=norm.__getitem__)


@pytest.mark.slow
def test_default_model_letter_is_one_token_and_matches_naive(default_model, data_source):
    tok = default_model.tokenizer
    for letter in "ABCD":
        assert len(tok.encode(" " + letter)) == 1
    items = stratified_sample(load_mmlu(data_source, "test", ["marketing", "astronomy"]), 3)
    reqs = [build_request(MMLUFormat("letter", 0), it, []) for it in items]
    got, n_fast = score(default_model, reqs)
    assert n_fast == len(items)
    for req, row in zip(reqs, got):
        ref = [naive_loglik(default_model, req.context, c) for c in req.continuations]
        assert row == pytest.approx(ref, abs=1e-4)


def test_stratified_sample(data_source):
    items = load_mmlu(data_source, "test", ["anatomy", "virology", "global_facts"])
    sizes = Counter(it.subject for it in items)  # 135, 166, 100
    s = stratified_sample(items, 40, seed=0)
    got = Counter(it.subject for it in s)
    assert sum(got.values()) == 40
    for subj, n in sizes.items():  # proportional within rounding
        assert abs(got[subj] - 40 * n / len(items)) < 1
    assert stratified_sample(items, 40, seed=0) == s  # fixed
    assert stratified_sample(items, 40, seed=1) != s
    assert [items.index(it) for it in s] == sorted(items.index(it) for it in s)
    assert stratified_sample(items, None) == items


def test_summarise_wilson():
    rows = [{"subject": "a", "gold": 0, "pred": p} for p in (0, 0, 1, 2)] + \
        [{"subject": "b", "gold": 1, "pred": 1}]
    overall, per = summarise(rows)
    assert overall["accuracy"] == pytest.approx(3 / 5) and overall["n"] == 5
    assert per["a"]["accuracy"] == 0.5 and per["b"]["correct"] == 1
    assert overall["ci95"][0] < 0.6 < overall["ci95"][1]


def test_cli_eval_mmlu_writes_rows_and_figures(tmp_path, monkeypatch):
    from mechinterp.cli import main
    from mechinterp.store.results import read_result

    monkeypatch.setenv("MECHINTERP_PROGRESS", "0")
    out = tmp_path / "res"
    rc = main(["eval", "mmlu", "--model", "tiny-random-llama", "--variant", "twin=tiny-random-llama",
               "--subjects", "world_religions", "--limit", "4", "--format", "letter-0shot,cloze",
               "--out", str(out), "--device", "cpu", "--dtype", "float32"])
    assert rc == 0
    res = read_result(out / "mmlu")
    d = res.data
    assert set(d["accuracy"]["base"]) == {"letter-0shot", "cloze", "cloze-norm"}
    rows = [json.loads(x) for x in res.files["items_base_letter-0shot.jsonl"].splitlines()]
    assert len(rows) == 4 and {"subject", "gold", "pred", "loglik"} <= set(rows[0])
    acc = sum(r["pred"] == r["gold"] for r in rows) / 4
    assert d["accuracy"]["base"]["letter-0shot"] == acc
    assert d["by_subject"]["base"]["letter-0shot"]["world_religions"] == acc
    # the same weights twice: no flips, zero difference, p = 1
    paired = d["paired"]["twin"]["letter-0shot"]
    assert paired["difference"] == 0 and paired["mcnemar"]["p_value"] == 1.0
    assert (out / "mmlu" / "mmlu_accuracy.png").is_file()
    assert main(["figures", str(out)]) == 0
    assert main(["eval", "mmlu", "--model", "tiny-random-llama", "--format", "letters",
                 "--out", str(out)]) == 2


def test_plan_groups_hand_worked():
    from mechinterp.evals.prefix import plan_groups
    from mechinterp.evals.rows import Row

    def row(ids, first_target):
        return Row(0, ids, [(0, first_target, 1)])

    rows = [row([1, 2, 3, 4, 5, 9], 5),     # shares 1,2,3,4 with the next two
            row([1, 2, 3, 4, 6, 9], 5),
            row([1, 2, 3, 4, 7, 7, 7], 2),  # scores from position 2: prefix capped at 2
            row([8, 8, 8, 8, 8], 4)]        # shares nothing
    groups = plan_groups(rows, min_shared=2)
    assert [(g.rows, g.prefix) for g in groups] == [([0, 1, 2], 2), ([3], 0)]
    groups = plan_groups(rows, min_shared=3)  # row 2's cap breaks it off
    assert [(g.rows, g.prefix) for g in groups] == [([0, 1], 4), ([2], 0), ([3], 0)]
    # a row that would shrink the shared tokens (prefix x (rows - 1)) starts a new group
    rows = [row([5] * 10 + [1], 10), row([5] * 10 + [2], 10), row([5] * 10 + [3], 10),
            row([5, 5, 6, 6, 6, 6], 5)]
    assert [(g.rows, g.prefix) for g in plan_groups(rows, 2)] == [([0, 1, 2], 10), ([3], 0)]


def test_best_plan_picks_the_threshold_that_runs_fewest_tokens():
    """A lone item first in token order drags a low threshold into one group over the short
    opening all rows share (3 tokens); a threshold of 4 keeps the three rows sharing 7 together."""
    from mechinterp.evals.prefix import best_plan, plan_groups, tokens_to_run
    from mechinterp.evals.rows import Row

    rows = [Row(0, [1, 1, 1, 0, 0, 0, 0, 5, 99], [(0, 8, 1)])]
    rows += [Row(i, [1, 1, 1, 2, 2, 2, 2, 10 + i, 99], [(0, 8, 1)]) for i in (1, 2, 3)]
    low, high = plan_groups(rows, 2), plan_groups(rows, 4)
    assert [(g.rows, g.prefix) for g in low] == [([0, 1, 2, 3], 3)]
    assert [(g.rows, g.prefix) for g in high] == [([0], 0), ([1, 2, 3], 7)]
    assert (tokens_to_run(rows, low), tokens_to_run(rows, high)) == (3 + 4 * 6, 9 + 7 + 3 * 2)
    assert [(g.rows, g.prefix) for g in best_plan(rows, (2, 4))] == [([0], 0), ([1, 2, 3], 7)]


def _check_shared_matches_full_and_naive(model, reqs):
    full, _ = score(model, reqs, share_prefix=0)
    shared, _ = score(model, reqs, share_prefix=16, token_budget=700, kv_budget=2000)
    auto, _ = score(model, reqs, token_budget=300, kv_budget=2000)  # best_plan's threshold
    # three worker threads: prefix jobs and the batches on their caches interleave
    threaded, _ = score(model, reqs, share_prefix=16, token_budget=300, kv_budget=2000, workers=3)
    for req, a, b, c, d in zip(reqs, full, shared, auto, threaded):
        assert b == pytest.approx(a, abs=1e-4)
        assert c == pytest.approx(a, abs=1e-4)
        assert d == pytest.approx(a, abs=1e-4)
        ref = [naive_loglik(model, req.context, c) for c in req.continuations]
        assert b == pytest.approx(ref, abs=1e-4)


def test_shared_prefix_scoring_matches_full_and_naive(data_source):
    """5-shot letter (one prefix per subject) and cloze (one per item), prefixes of different
    lengths padded inside one cache, small budgets so chunks and batches split."""
    from mechinterp.models import load

    model = load("tiny-random-llama", device="cpu", dtype="float32")
    subjects = ["world_religions", "virology"]
    items = [it for s in subjects for it in load_mmlu(data_source, "test", [s])[:3]]
    dev = load_mmlu(data_source, "dev", subjects)
    for fmt in (MMLUFormat("letter", 0), MMLUFormat("letter", 5), MMLUFormat("cloze")):
        _check_shared_matches_full_and_naive(model, [
            build_request(fmt, it, [d for d in dev if d.subject == it.subject][:fmt.shots])
            for it in items])


def test_shared_prefix_scoring_learned_positions():
    """GPT-2 reads absolute positions from ``position_ids``: rows must get their true ones."""
    from mechinterp.models import load

    model = load("tiny-random-gpt2", device="cpu", dtype="float32")
    shots = "Some worked examples come first. " * 3
    reqs = [Request(f"{shots}Q{i}: {i} + {i}?{' ' * (i % 3)}\nA:", (" A", " B", " C"))
            for i in range(6)]
    reqs += [Request(f"Question {i}: name a colour{'!' * i}\nAnswer:", (" red", " sea green"))
             for i in range(4)]
    _check_shared_matches_full_and_naive(model, reqs)


def test_scoring_runs_fused_attention_and_restores_eager(tiny_model):
    """Scoring switches to SDPA for its forwards only: attention patterns (eager) work afterwards,
    also when the block raises."""
    seen = []
    handle = tiny_model.hf.base_model.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.config._attn_implementation))
    try:
        score(tiny_model, [Request("The capital of France is", (" Paris", " Rome"))])
    finally:
        handle.remove()
    assert seen and set(seen) == {"sdpa"}
    assert tiny_model.hf.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_model.fused_attention():
            assert tiny_model.hf.config._attn_implementation == "sdpa"
            raise RuntimeError("boom")
    assert tiny_model.hf.config._attn_implementation == "eager"
