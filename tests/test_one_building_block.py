"""One of each building block: ``limit`` is the total number of items in every
probe (shared between prompt sets), causal tracing's known-fact screen is the seeded-order
screen of ``data.subset``, the MMLU prompts of the activation probes are ``evals.mmlu``'s, and one
parser reads checkpoint steps."""

from __future__ import annotations

import random

import pytest

from mechinterp.data.mmlu import MMLUItem
from mechinterp.data.subset import screened_subset, seeded_subset, split_limit
from mechinterp.paths import checkpoint_step


@pytest.mark.parametrize(("limit", "sizes", "want"), [
    (10, [100, 100], [5, 5]),
    (7, [100, 100, 100], [3, 2, 2]),  # the first sets take the remainder
    (10, [2, 100], [2, 8]),  # a share the small set cannot fill goes to the other
    (9, [2, 3, 100], [2, 3, 4]),
    (50, [3, 4], [3, 4]),  # fewer items than the limit: all of them
    (None, [3, 4], [3, 4]),
    (4, [0, 9], [0, 4]),
])
def test_split_limit_shares_a_total(limit, sizes, want):
    assert split_limit(limit, sizes) == want


def test_screened_subset_is_the_old_known_fact_screen():
    """The screen causal-trace ran before it moved to data.subset (written out here as it was):
    the same items and the same count of screened items, so stored traces stay valid."""
    items = list(range(1000, 1300))

    def accept(x):
        return x % 3 == 0 or x % 7 == 0

    for seed, limit in ((0, 5), (3, 40), (7, 1), (1, 300)):
        order = random.Random(seed).sample(range(len(items)), len(items))
        keep, screened = [], 0
        for i in order:
            screened += 1
            if accept(items[i]):
                keep.append(i)
                if len(keep) == limit:
                    break
        want = [items[i] for i in sorted(keep)]
        calls: list[int] = []
        got, n = screened_subset(items, limit, seed, accept, progress=lambda c=calls: c.append(1))
        assert (got, n) == (want, screened)
        assert len(calls) == len(got) == min(limit, sum(map(accept, items)))
    # no limit: every accepted item, all screened
    got, n = screened_subset(items, None, 0, accept)
    assert got == [x for x in items if accept(x)] and n == len(items)


def test_mlp_patching_limit_is_the_total_over_prompt_sets(data_source):
    from mechinterp.data import load_knowns, load_mmlu
    from mechinterp.models.tiny_tokenizer import build_tiny_tokenizer
    from probes.mlp_patching import Config, mmlu_prompt, prompts_for

    tok = build_tiny_tokenizer()
    sets = prompts_for(data_source, Config(prompt_sets=["knowns", "mmlu"], limit=5, seed=2), tok)
    assert {k: len(v) for k, v in sets.items()} == {"knowns": 3, "mmlu": 2}
    want = [mmlu_prompt(it, "letter")[0]
            for it in seeded_subset(load_mmlu(data_source, "test"), 2, 2)]
    assert [p for p, _ in sets["mmlu"]] == want
    # a small MMLU subset takes what it has, the rest goes to the facts
    one = ["abstract_algebra"]
    n_alg = len(load_mmlu(data_source, "test", one))
    sets = prompts_for(data_source, Config(prompt_sets=["mmlu", "knowns"], limit=n_alg + 150,
                                           mmlu_subjects=one), tok)
    assert {k: len(v) for k, v in sets.items()} == {"mmlu": n_alg, "knowns": 150}
    # one prompt set: limit items of it, the selection mlp-patching made before (compare's plan)
    sets = prompts_for(data_source, Config(prompt_sets=["knowns"], limit=4), tok)
    assert [p for p, _ in sets["knowns"]] == [f.prompt for f in
                                              seeded_subset(load_knowns(data_source), 4, 0)]


def test_attention_shift_limit_caps_the_total(data_source):
    from probes.attention_shift import Config, load_prompts

    def counts(texts):
        mmlu = sum(t.startswith("The following are multiple choice questions") for t in texts)
        return mmlu, len(texts) - mmlu

    assert counts(load_prompts(data_source, Config(n_mmlu=6, n_knowns=4))) == (6, 4)
    assert counts(load_prompts(data_source, Config(n_mmlu=6, n_knowns=4, limit=5))) == (3, 2)
    assert counts(load_prompts(data_source, Config(n_mmlu=6, n_knowns=1, limit=5))) == (4, 1)


def test_mmlu_prompts_of_the_activation_probes_are_lm_evals():
    """Hand-written expected strings: lm-eval's 0-shot letter context (question stripped) and the
    bare cloze question for mlp-patching's text answers."""
    from mechinterp.evals.mmlu import MMLUFormat, build_request
    from probes.mlp_patching import mmlu_prompt

    item = MMLUItem("high_school_physics", "  What is 2 + 2? \n", ("3", "4", "5", "6"), 1)
    letter = ("The following are multiple choice questions (with answers) about high school "
              "physics.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert mmlu_prompt(item, "letter") == (letter, "B")
    assert mmlu_prompt(item, "text") == ("Question: What is 2 + 2?\nAnswer:", "4")
    assert build_request(MMLUFormat(), item, ()).context == letter  # what attention-shift reads


def test_one_checkpoint_step_parser(tmp_path):
    from mechinterp.models.specs import expand_checkpoints
    from mechinterp.plotting.trajectories import run_steps

    assert checkpoint_step("sft@step-40") == 40
    assert checkpoint_step("org/model@v01.14-step-000000029") == 29
    assert checkpoint_step("sft@main") is None
    # a folder name must be a checkpoint's as a whole
    for name, step in (("step-40", 40), ("checkpoint-500", 500), ("step_7", 7), ("step12", 12),
                       ("step-4-final", None), (".tmp-step-4", None), ("main", None)):
        assert checkpoint_step(name, folder=True) == step, name
    for name in ("step-10", "step-2", "checkpoint-5", "step-4-final", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert expand_checkpoints(f"{tmp_path}@all") == [f"{tmp_path}@{n}" for n in
                                                     ("step-2", "checkpoint-5", "step-10")]
    assert run_steps({"sft": ["sft@step-2", "sft"]}) == {"sft@step-2": 2, "sft": None}
