"""logit-lens against a float64 computation by hand: each prompt alone, the model run with
``output_hidden_states`` in float64, the final norm and the unembedding applied by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechinterp as mi
from mechinterp.analysis.lens import gold_ranks, lens_log_probs, residual_streams
from mechinterp.data import DataSource
from mechinterp.errors import UserError
from mechinterp.models import load
from mechinterp.models.edit import plant_change


@pytest.fixture(scope="module")
def planted(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("lens") / "v"
    m = load("tiny-random-llama", device="cpu", dtype="float32")
    plant_change(m, folder, {(1, "down"): 0.3, (2, "up"): 0.3, (3, "o"): 0.3}, seed=2)
    return folder


@pytest.fixture(scope="module")
def lens_result(planted, tmp_path_factory):
    return mi.run("logit-lens", base="tiny-random-llama", variants={"v": str(planted)},
                  out=tmp_path_factory.mktemp("out"), device="cpu", dtype="float32",
                  prompt_sets=["knowns", "mmlu"], limit=5, n_bootstrap=100, draw=False)


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon) \
        * norm.weight.detach().double()


def naive_lens(spec: str, prompt: str) -> torch.Tensor:
    """[layer, vocab] float64 log-probs at the prompt's last token."""
    m = load(spec, device="cpu", dtype="float64")
    ids = m.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = m.hf(ids, output_hidden_states=True).hidden_states
        w = m.hf.lm_head.weight.detach().double()
        n = m.n_layers
        # hidden_states[l + 1] is block l's output; the last one is already through the final norm
        rows = [_rms(hs[layer + 1][0, -1], m.hf.model.norm) for layer in range(n - 1)]
        rows.append(hs[n][0, -1])
        return torch.log_softmax(torch.stack(rows) @ w.T, -1)


@pytest.mark.slow
def test_lens_kl_and_ranks_match_float64_by_hand(lens_result, planted):
    from probes.logit_lens import Config, lens_prompts

    tok = load("tiny-random-llama", device="cpu").tokenizer
    cfg = Config(prompt_sets=["knowns", "mmlu"], limit=5)
    sets = lens_prompts(cfg, DataSource.from_option(None), tok)
    d = lens_result.data
    assert d["n_too_long_by_set"]["knowns"] == 0
    n = d["n_layers"]
    kl_ref, rank_ref = [], {"base": [], "v": []}
    for s in d["prompt_sets"]:
        kept = [(p, g) for p, g in sets[s] if len(tok(p)["input_ids"]) <= 256]
        assert len(kept) == d["n_prompts_by_set"][s]
        ranks_set = {"base": [], "v": []}
        for prompt, gold in kept:
            lb, lv = naive_lens("tiny-random-llama", prompt), naive_lens(str(planted), prompt)
            kl_ref.append((lb.exp() * (lb - lv)).sum(-1))
            for m, lp in (("base", lb), ("v", lv)):
                r = (lp > lp[:, gold:gold + 1]).sum(-1) + 1
                ranks_set[m].append(r)
                rank_ref[m].append(r)
        for m in ranks_set:
            np.testing.assert_array_equal(lens_result.arrays[f"{m}__{s}__rank"],
                                          torch.stack(ranks_set[m], 1).numpy())
    kl_ref = torch.stack(kl_ref, 1)  # [layer, prompt]
    np.testing.assert_allclose(d["lens_kl"]["v"], kl_ref.mean(1).numpy(), rtol=1e-3, atol=1e-6)
    assert min(d["lens_kl"]["v"][1:]) > 1e-4  # the planted change shows from layer 1
    for m in ("base", "v"):
        pooled = torch.stack(rank_ref[m], 1).numpy()
        assert d["answer_rank"][m] == np.median(pooled, 1).tolist()
        assert len(d["answer_rank"][m]) == n
    frame = lens_result.to_frame()
    assert len(frame.query("metric == 'lens_kl'")) == n


def test_last_layer_lens_is_the_models_output(one_thread):
    m = load("tiny-random-qwen2", device="cpu", dtype="float32")
    enc = m.tokenizer(["The capital of France is", "One two"], return_tensors="pt",
                      padding=True, padding_side="right")
    logits, resid = residual_streams(m, enc["input_ids"], enc["attention_mask"], logits=True)
    with torch.no_grad():
        lens = lens_log_probs(m, resid[-1])
    np.testing.assert_allclose(lens.numpy(), logits.log_softmax(-1).numpy(), atol=1e-5)
    # rank: 1 + tokens strictly above the gold one
    lp = torch.tensor([[0.0, -1.0, 0.0, -3.0]])
    assert gold_ranks(lp, torch.tensor([1])).tolist() == [3]
    assert gold_ranks(lp, torch.tensor([0])).tolist() == [1]


def test_first_top1_layer_by_hand():
    from probes.logit_lens import first_top1

    ranks = np.array([[5, 1, 9], [1, 2, 9], [1, 1, 9]])  # [layer, prompt]
    first, share = first_top1(ranks)
    assert first == pytest.approx(np.median([1, 0]))  # prompt 3 never reaches top-1
    assert share == pytest.approx(2 / 3)
    assert first_top1(np.full((3, 2), 4)) == (None, 0.0)


def test_in_domain_prompts_end_before_the_answer_digits():
    from mechinterp.data.arithmetic import parse_task, solve
    from mechinterp.models.loaded import load_tokenizer
    from mechinterp.models.specs import resolve
    from mechinterp.models.zoo import DEFAULT_MODEL
    from probes.logit_lens import task_prompts

    tok = load_tokenizer(resolve(DEFAULT_MODEL).path)  # SmolLM2: digits are single tokens
    prompts = task_prompts(tok, "arithmetic", 4, 0)
    problems = parse_task("arithmetic").split("test")
    assert len(prompts) == 4
    for prompt, gold in prompts:
        a, op, b = next(p for p in problems if f"What is {p[0]} {p[1]} {p[2]}?" in prompt)
        assert prompt.endswith(f"<think>\n{a} {op} {b} = ")
        assert tok.decode([gold]) == str(solve(a, op, b))[0]
    with pytest.raises(UserError, match="not an arithmetic task"):
        task_prompts(tok, "gsm8k", 4, 0)


def test_a_model_against_itself_has_zero_lens_kl(one_thread):
    r = mi.run("logit-lens", base="tiny-random-gpt2", variants={"same": "tiny-random-gpt2"},
               device="cpu", dtype="float32", prompt_sets=["knowns"], limit=3, n_bootstrap=10,
               draw=False)
    assert r["lens_kl"]["same"] == [0.0] * 4
    assert r["answer_rank"]["same"] == r["answer_rank"]["base"]
    with pytest.raises(UserError, match="unknown prompt set"):
        mi.run("logit-lens", base="tiny-random-gpt2", device="cpu", prompt_sets=["nope"],
               draw=False)


def test_limit_counts_prompts_in_all():
    """``limit`` means prompts in all (shared equally between the sets), as in every probe;
    without it each set takes ``n_per_set``."""
    from probes.logit_lens import Config, lens_prompts

    tok = load("tiny-random-llama", device="cpu").tokenizer
    data = DataSource.from_option(None)
    sizes = {s: len(v) for s, v in
             lens_prompts(Config(prompt_sets=["knowns", "mmlu"], limit=5), data, tok).items()}
    assert sizes == {"knowns": 3, "mmlu": 2}
    sizes = {s: len(v) for s, v in
             lens_prompts(Config(prompt_sets=["knowns", "mmlu"], n_per_set=4), data, tok).items()}
    assert sizes == {"knowns": 4, "mmlu": 4}
