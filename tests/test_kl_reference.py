"""kl-drift as the paper measures C2: held-out problems with neutral reference solutions (not SFT's
think/answer target), neutral text, and the KL direction as an explicit, recorded option. Every
number is checked against a float64 loop over positions written here from the definition."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from mechinterp.analysis.divergence import teacher_forced_kl
from mechinterp.data.arithmetic import parse_task, task_items
from mechinterp.data.subset import seeded_subset
from mechinterp.errors import UserError
from mechinterp.evals.answers import answer_items
from mechinterp.models import load
from mechinterp.models.edit import plant_change
from mechinterp.models.modelset import ModelSet
from mechinterp.core.options import make_config
from mechinterp.core.registry import get_probe
from mechinterp.core.runner import run_probe

pytestmark = pytest.mark.usefixtures("one_thread")
N_ITEMS, N_TEXT = 3, 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base folder, a variant with every matrix moved 30%) of the tiny Llama."""
    root = tmp_path_factory.mktemp("klref")
    m = load("tiny-random-llama", device="cpu", dtype="float32")
    m.hf.save_pretrained(root / "base")
    m.tokenizer.save_pretrained(root / "base")
    plant_change(m, root / "moved", {(la, mat): 0.3 for la in range(m.n_layers)
                                     for mat in m.matrices}, seed=4)
    return root


def _f64(path):
    return load(str(path), device="cpu", dtype="float32").hf.double().eval()


def _kl64(base, variant, ids: list[int], first: int, reverse: bool = False) -> float:
    """Mean over positions t = first-1 .. len-2 (logits at t predict token t+1) of
    sum_v p(log p - log q), p the base's (forward) or the variant's (reverse), all float64."""
    x = torch.tensor([ids])
    with torch.no_grad():
        lb = torch.log_softmax(base(input_ids=x).logits[0], -1)
        lv = torch.log_softmax(variant(input_ids=x).logits[0], -1)
    if reverse:
        lb, lv = lv, lb
    vals = [float((lb[t].exp() * (lb[t] - lv[t])).sum()) for t in range(first - 1, len(ids) - 1)]
    return sum(vals) / len(vals)


def _chat_ids(tok, question: str, answer: str, system: str | None = None) -> tuple[list, int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": question}]
    prompt = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    return prompt + tok(answer, add_special_tokens=False)["input_ids"], len(prompt)


def _run(pair, data_source, tmp_path, **options):
    probe = get_probe("kl-drift")
    ms = ModelSet(str(pair / "base"), {"moved": str(pair / "moved")}, device="cpu")
    opts = {"items": "arithmetic", "n_text": str(N_TEXT), **options}
    return run_probe(probe, ms, data_source, make_config(probe, opts, limit=N_ITEMS),
                     out=tmp_path).data


def test_reference_template_and_text_kl_match_float64(pair, data_source, tmp_path):
    from mechinterp.data.qa import SYSTEM_PROMPT, render_target
    from probes.activation_diff import Config as TextConfig
    from probes.activation_diff import neutral_texts

    d = _run(pair, data_source, tmp_path)
    tok = load(str(pair / "base"), device="cpu", dtype="float32").tokenizer
    base, moved = _f64(pair / "base"), _f64(pair / "moved")
    items = seeded_subset(task_items(parse_task("arithmetic"), "test"), N_ITEMS, 0)
    # neutral: plain prose, no system prompt, no think/answer tags
    ref, tmpl = [], []
    for it in items:
        neutral = f"{it.reasoning}. The answer is {it.answer}."
        assert re.fullmatch(r"\d+ [+x] \d+ = \d+\. The answer is \d+\.", neutral)
        ref.append(_kl64(base, moved, *_chat_ids(tok, it.question, neutral)))
        tmpl.append(_kl64(base, moved, *_chat_ids(tok, it.question, render_target(it),
                                                  SYSTEM_PROMPT)))
    np.testing.assert_allclose(d["kl_reference_items"]["moved"], ref, rtol=2e-4)
    np.testing.assert_allclose(d["kl_items"]["moved"], tmpl, rtol=2e-4)
    assert d["kl_reference"]["moved"] == pytest.approx(np.mean(ref), rel=2e-4)
    assert min(ref) > 1e-3 and not np.allclose(ref, tmpl, rtol=1e-2)  # two renderings, two KLs
    # neutral text: every next-token position of the plain text (BOS as the tokenizer adds it)
    texts = neutral_texts(TextConfig(n_texts=N_TEXT, n_heldout=1), data_source)[:N_TEXT]
    text = [_kl64(base, moved, tok(t)["input_ids"][:64], 1) for t in texts]
    np.testing.assert_allclose(d["kl_text_items"]["moved"], text, rtol=2e-4)
    assert d["kl_text"]["moved"] == pytest.approx(np.mean(text), rel=2e-4)
    assert d["kl_direction"] == "forward" and d["positions"] == "answer"
    assert d["n_text"] == N_TEXT and d["n_items"] == N_ITEMS


def test_kl_drift_and_training_drift_read_the_same_answer_span(pair, data_source, tmp_path):
    """The held-out KL of a training run (and of the ``training-drift`` probe) and ``kl-drift``'s
    ``kl`` on the same model and items (a task's held-out items in SFT's target format) are one
    number per item: both average over the positions predicting the answer's own tokens, not
    the end-of-turn tokens the chat template appends after it."""
    from mechinterp.training.drift import answer_logprobs, build_heldout, kl_per_item
    from mechinterp.data.qa import SYSTEM_PROMPT, prompt_messages, render_target

    d = _run(pair, data_source, tmp_path, n_text="0")
    base = load(str(pair / "base"), device="cpu", dtype="float32")
    moved = load(str(pair / "moved"), device="cpu", dtype="float32")
    items = seeded_subset(task_items(parse_task("arithmetic"), "test"), N_ITEMS, 0)
    held = build_heldout(base.tokenizer, [prompt_messages(it.question) for it in items],
                         [render_target(it) for it in items])
    drift = kl_per_item(answer_logprobs(base.hf, held), answer_logprobs(moved.hf, held))
    np.testing.assert_allclose(drift, d["kl_items"]["moved"], rtol=1e-5)
    # the span is the answer's tokens: the float64 definition on prompt + answer alone
    b64, v64 = _f64(pair / "base"), _f64(pair / "moved")
    want = [_kl64(b64, v64, *_chat_ids(base.tokenizer, it.question, render_target(it),
                                       SYSTEM_PROMPT)) for it in items]
    np.testing.assert_allclose(drift, want, rtol=2e-4)


def test_reverse_direction_and_all_positions_are_their_definitions(pair, data_source, tmp_path):
    d = _run(pair, data_source, tmp_path, direction="reverse", positions="all", n_text="0")
    tok = load(str(pair / "base"), device="cpu", dtype="float32").tokenizer
    base, moved = _f64(pair / "base"), _f64(pair / "moved")
    items = seeded_subset(task_items(parse_task("arithmetic"), "test"), N_ITEMS, 0)
    want = [_kl64(base, moved, _chat_ids(tok, it.question,
                                         f"{it.reasoning}. The answer is {it.answer}.")[0], 1,
                  reverse=True) for it in items]
    np.testing.assert_allclose(d["kl_reference_items"]["moved"], want, rtol=2e-4)
    assert d["kl_direction"] == "reverse" and d["positions"] == "all"
    assert "kl_text" not in d and d["n_text"] == 0


def test_forward_and_reverse_differ_and_each_is_its_float64_definition(pair):
    m = load(str(pair / "base"), device="cpu", dtype="float32")
    moved = load(str(pair / "moved"), device="cpu", dtype="float32")
    pairs = [("What is 3 + 4?", "3 + 4 = 7. The answer is 7."),
             ("What is 6 x 2?", "6 x 2 = 12. The answer is 12.")]
    items = answer_items(m.tokenizer, pairs)
    fwd = teacher_forced_kl(m, moved, items).numpy()
    rev = teacher_forced_kl(m, moved, items, direction="reverse").numpy()
    b64, v64 = copy.deepcopy(m.hf).double(), copy.deepcopy(moved.hf).double()
    for k, (ids, start) in enumerate(zip(items.input_ids, items.answer_start)):
        assert fwd[k] == pytest.approx(_kl64(b64, v64, ids, start), rel=2e-4)
        assert rev[k] == pytest.approx(_kl64(b64, v64, ids, start, reverse=True), rel=2e-4)
    assert np.all(np.abs(fwd - rev) > 1e-3 * np.abs(fwd))  # KL is not symmetric
    # reverse with the roles swapped is forward
    np.testing.assert_allclose(teacher_forced_kl(moved, m, items, direction="reverse").numpy(),
                               fwd, rtol=1e-6)
    with pytest.raises(UserError, match="KL direction 'backward'"):
        teacher_forced_kl(m, moved, items, direction="backward")


def test_shared_prefix_counts_the_common_unmasked_columns_by_hand():
    from mechinterp.evals.answers import shared_prefix

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 0], [5, 6, 7, 8, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert shared_prefix(ids, mask) == 3  # columns 0-2 agree; column 3 differs in row 1
    # every row keeps a token of its own: two identical rows share all but their last column
    same = torch.tensor([[3, 4, 5], [3, 4, 5]])
    assert shared_prefix(same, torch.ones_like(same)) == 2
    # a masked column ends the prefix even where the ids agree
    assert shared_prefix(ids, torch.tensor([[1, 0, 1, 1, 1]] * 3)) == 1


def test_shared_prefix_pass_equals_the_full_pass(pair):
    """Right-padded rows of different lengths behind a 20-token common prefix: the prefix run
    once on its cache gives the full pass's log-probs at every answer position."""
    from mechinterp.evals.answers import (answer_log_probs, shared_prefix_hidden)

    m = load(str(pair / "moved"), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 200, (20,), generator=g).tolist()
    rows = [prefix + torch.randint(3, 200, (n,), generator=g).tolist() for n in (7, 3, 11)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    predict = mask.bool().clone()
    predict[:, :15] = False  # answer positions on both sides of the prefix's end
    for i, r in enumerate(rows):
        predict[i, len(r) - 1] = False
    with torch.no_grad():
        assert shared_prefix_hidden(m.hf, ids, mask) is not None  # the shared path runs
        full = answer_log_probs(m, ids, mask, predict)
        shared = answer_log_probs(m, ids, mask, predict, share_prefix=True)
    assert full.shape == shared.shape == (int(predict.sum()), full.shape[1])
    torch.testing.assert_close(shared, full, atol=2e-5, rtol=0)
