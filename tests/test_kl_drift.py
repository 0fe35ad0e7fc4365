"""Teacher-forced KL: float64 reference, KL(m || m) = 0, batched = one-by-one, NaN items counted."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from mechinterp.analysis.divergence import teacher_forced_kl
from mechinterp.errors import UserError
from mechinterp.evals.answers import answer_items

PAIRS = [
    ("What is 2 + 3?", "2 + 3 = 5. The answer is #### 5"),
    ("Natalia sold clips to 48 of her friends in April. How many?", "She sold 48 clips. #### 48"),
    ("The capital of France is", " Paris."),
    ("Tokyo is the capital of which country? Answer in one word.", "Japan"),
    ("Question: A B C D?", "Let me work this out step by step. <answer> 42 </answer>"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(hf: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    variant = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in variant.named_parameters():
            if p.ndim == 2 and "embed" not in name and "wte" not in name:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return variant


def _reference_kl(base, variant, ids: list[int], start: int) -> float:
    """One item alone, float64, an explicit loop over answer positions."""
    x = torch.tensor([ids])
    with torch.no_grad():
        lb = torch.log_softmax(base(input_ids=x).logits[0].double(), -1)
        lv = torch.log_softmax(variant(input_ids=x).logits[0].double(), -1)
    vals = []
    for t in range(start - 1, len(ids) - 1):  # logits at t predict token t + 1 (an answer token)
        vals.append(float((lb[t].exp() * (lb[t] - lv[t])).sum()))
    return sum(vals) / len(vals)


def test_answer_items_put_the_boundary_where_the_answer_starts(tiny_model):
    tok = tiny_model.tokenizer
    items = answer_items(tok, PAIRS[:2])
    for (prompt, answer), ids, start in zip(PAIRS, items.input_ids, items.answer_start):
        rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        assert tok.decode(ids[:start]) == rendered
        assert tok.decode(ids[start:]) == answer
    plain = answer_items(tok, PAIRS[2:3], chat_template=False)
    assert tok.decode(plain.input_ids[0][plain.answer_start[0]:]) == " Paris."
    cut = answer_items(tok, PAIRS[:1], max_length=items.answer_start[0] + 2)
    assert cut.n_truncated == 1 and cut.n_answer_tokens() == [2]



def test_answer_items_take_chat_messages_and_drop_prompts_that_fill_max_length(tiny_model):
    tok = tiny_model.tokenizer
    system, (prompt, answer) = "Be brief.", PAIRS[0]
    as_text = answer_items(tok, [(prompt, answer)], system=system)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    as_messages = answer_items(tok, [(messages, answer)])
    assert as_messages == as_text
    short = answer_items(tok, [("Hi", "x")])
    limit, long_prompt = short.answer_start[0] + 1, "Hi " * 60
    with pytest.raises(UserError, match="max_length"):
        answer_items(tok, [(long_prompt, "x")], max_length=limit)
    kept = answer_items(tok, [(long_prompt, "x"), ("Hi", "x")], max_length=limit,
                        drop_long_prompts=True)
    assert kept.input_ids == [short.input_ids[0][:limit]]
    with pytest.raises(UserError, match="chat template"):
        answer_items(tok, [(messages, answer)], chat_template=False)


def test_kl_matches_float64_reference_on_two_items(tiny_model):
    base = tiny_model.hf
    variant = _perturbed(base)
    items = answer_items(tiny_model.tokenizer, PAIRS[:2])
    got = teacher_forced_kl(base, variant, items, batch_size=2)
    want = [_reference_kl(base, variant, ids, s)
            for ids, s in zip(items.input_ids, items.answer_start)]
    assert want[0] > 1e-3 and want[1] > 1e-3  # a real difference, not a trivial zero
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5)


def test_kl_of_a_model_with_itself_is_zero(tiny_model):
    from mechinterp.models import load

    items = answer_items(tiny_model.tokenizer, PAIRS)
    assert teacher_forced_kl(tiny_model, tiny_model, items).tolist() == [0.0] * len(PAIRS)
    twin = load(tiny_model.resolved, device="cpu", dtype="float32")  # a second copy
    assert teacher_forced_kl(tiny_model, twin, PAIRS, batch_size=3).abs().max() == 0.0


def test_batched_equals_one_by_one(tiny_model):
    variant = _perturbed(tiny_model.hf, seed=1)
    items = answer_items(tiny_model.tokenizer, PAIRS)
    assert len({len(i) for i in items.input_ids}) == len(PAIRS)  # padding really happens
    one = teacher_forced_kl(tiny_model.hf, variant, items, batch_size=1)
    batched = teacher_forced_kl(tiny_model.hf, variant, items, batch_size=4)
    torch.testing.assert_close(batched, one, rtol=1e-5, atol=1e-8)
    # the pad id does not matter either
    other_pad = type(items)(items.input_ids, items.answer_start, pad_id=7)
    torch.testing.assert_close(teacher_forced_kl(tiny_model.hf, variant, other_pad, 5), one,
                               rtol=1e-5, atol=1e-8)


def test_probe_counts_nonfinite_items_and_reads_a_jsonl(tmp_path):
    """A token whose embedding is NaN in the variant poisons exactly the item that uses it."""
    from mechinterp.models import load
    from mechinterp.models.modelset import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe

    base = load("tiny-random-llama", device="cpu", dtype="float32")
    pairs = [("What is 2 + 3?", "5"), ("Say a tilde.", "~~")]
    items = answer_items(base.tokenizer, pairs)
    only_second = set(items.input_ids[1]) - set(items.input_ids[0])
    assert only_second
    variant = load("tiny-random-llama", device="cpu", dtype="float32")
    with torch.no_grad():
        variant.hf.get_input_embeddings().weight[sorted(only_second)] = float("nan")
    variant.hf.save_pretrained(tmp_path / "nan")
    variant.tokenizer.save_pretrained(tmp_path / "nan")
    rows = tmp_path / "items.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    ms = ModelSet("tiny-random-llama", {"nan": str(tmp_path / "nan"),
                                        "same": "tiny-random-llama"}, device="cpu")
    probe = get_probe("kl-drift")
    res = run_probe(probe, ms, None, make_config(probe, {"items": str(rows), "n_text": "0"}))
    assert res["n_nonfinite"] == {"nan": 1, "same": 0}
    assert res["kl_items"]["nan"][0] == 0.0 and not np.isfinite(res["kl_items"]["nan"][1])
    assert res["kl"]["nan"] == 0.0 and res["kl"]["same"] == 0.0
    assert res["n_items"] == 2


def _bf16_pair():
    from mechinterp.models import load

    m = load("tiny-random-llama", device="cpu", dtype="float32")
    base = m.hf
    with torch.no_grad():  # realistic logit sizes (tens of nats), so bf16 rounding of logits bites
        base.get_output_embeddings().weight.mul_(3.0)
    variant = _perturbed(base, scale=0.05, seed=3)
    return m.tokenizer, base.to(torch.bfloat16), variant.to(torch.bfloat16)


def _reference_from_hidden(model, ids, attn, pred) -> torch.Tensor:
    """float64 log-softmax of (final-norm output, as the bf16 model computes it) x unembedding."""
    with torch.no_grad():
        h = model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        w = model.get_output_embeddings().weight
        return torch.log_softmax(h[pred].double() @ w.double().T, -1)


def test_bf16_models_get_float32_output_layer_and_log_softmax():
    from mechinterp.evals.answers import answer_log_probs

    tok, base, variant = _bf16_pair()
    items = answer_items(tok, PAIRS[:3])
    (_, ids, attn, pred), = items.batches(8)
    with torch.no_grad():
        got = answer_log_probs(base, ids, attn, pred)
    want = _reference_from_hidden(base, ids, attn, pred)
    assert got.dtype == torch.float32
    with torch.no_grad():  # what reading the bf16 logits gives
        bf16 = torch.log_softmax(base(input_ids=ids, attention_mask=attn).logits[pred].float(), -1)
    assert (bf16.double() - want).abs().max() > 1e-2  # the old path: bf16-rounded logits
    assert (got.double() - want).abs().max() < 1e-4
    # and the KL of the two bf16 models against the float64 reference of the same hidden states
    kl = teacher_forced_kl(base, variant, items, batch_size=2)
    wv = _reference_from_hidden(variant, ids, attn, pred)
    per_pos = (want.exp() * (want - wv)).sum(-1)
    rows = pred.nonzero()[:, 0]
    ref = torch.zeros(3, dtype=torch.float64).index_add_(0, rows, per_pos) / torch.bincount(rows)
    assert ref.min() > 1e-2
    np.testing.assert_allclose(kl.numpy(), ref.numpy(), rtol=1e-4)


def test_minus_inf_logits_give_zero_terms_not_nan():
    from mechinterp.analysis.divergence import kl_rows
    from mechinterp.models import load

    lb = torch.log_softmax(torch.tensor([[0.0, 1.0, -float("inf")], [2.0, -float("inf"), 0.0]]), -1)
    lv = torch.log_softmax(torch.tensor([[1.0, 0.0, -float("inf")], [0.0, 0.5, 0.0]]), -1)
    want = [sum(math.exp(b) * (b - v) for b, v in zip(rb, rv) if b != -math.inf)
            for rb, rv in zip(lb.tolist(), lv.tolist())]
    np.testing.assert_allclose(kl_rows(lb, lv).numpy(), want, rtol=1e-6)
    # p_variant = 0 where p_base > 0: KL is +inf (not NaN); NaN inputs stay NaN
    assert kl_rows(lv[1:], lb[1:]).item() == math.inf
    assert math.isnan(kl_rows(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 2)).item())
    # end to end: both models give -inf logits to some tokens (a masked vocabulary)
    m = load("tiny-random-llama", device="cpu", dtype="float32")
    tok, hf = m.tokenizer, m.hf
    head = hf.get_output_embeddings()
    masked = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        masked.weight.copy_(head.weight)
        masked.bias.zero_()
        masked.bias[:7] = -float("inf")
    hf.set_output_embeddings(masked)
    variant = _perturbed(hf, seed=2)
    with torch.no_grad():
        variant.get_output_embeddings().bias.copy_(masked.bias)
    kl = teacher_forced_kl(hf, variant, answer_items(tok, PAIRS[:2]))
    assert torch.isfinite(kl).all() and (kl > 0).all(), kl


def test_cached_base_gives_each_variant_its_own_float64_reference(tiny_model):
    """One base, two variants, the base's answer log-probs cached after the first: each
    variant's KL still equals its float64 one-item reference (the cache holds the base only)."""
    items = answer_items(tiny_model.tokenizer, PAIRS)
    cache: dict = {}
    for seed in (1, 2):
        variant = _perturbed(tiny_model.hf, seed=seed)
        got = teacher_forced_kl(tiny_model.hf, variant, items, batch_size=2, base_cache=cache)
        ref = [_reference_kl(tiny_model.hf, variant, ids, start)
               for ids, start in zip(items.input_ids, items.answer_start)]
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-6)
    assert len(cache) == 3  # batches of 2 over 5 items, computed once


def test_bf16_patching_tracing_and_scoring_paths_unembed_in_float32():
    """The other readers of logits (patching and cross-model patching, the block stack behind
    tracing and the patched sweeps, the evals' row scorer) used the bf16 output layer: logits off
    by up to ~0.06 nats. All now match the float64 reference of the same hidden states."""
    from types import SimpleNamespace

    from mechinterp.analysis.blocks import BlockStack
    from mechinterp.analysis.patching import model_logits
    from mechinterp.evals.rows import hidden_logprobs
    from mechinterp.models import load

    tok, base, _ = _bf16_pair()
    m = load("tiny-random-llama", device="cpu", dtype="float32")
    m.hf, m.dtype = base, torch.bfloat16  # the bf16 model behind a LoadedModel
    items = answer_items(tok, PAIRS[:3])
    (_, ids, attn, pred), = items.batches(8)
    want = _reference_from_hidden(base, ids, attn, pred)
    with torch.no_grad():
        full = model_logits(m, ids, attn)
        assert full.dtype == torch.float32
        got = torch.log_softmax(full[pred], -1).double()
        assert (got - want).abs().max() < 1e-4
        h = base.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        sel = pred.nonzero()
        tgt = want.argmax(-1)
        lp = hidden_logprobs(SimpleNamespace(hf=base), h, torch.cat([sel, tgt[:, None]], 1))
        np.testing.assert_allclose(lp.double().numpy(),
                                   want.gather(1, tgt[:, None])[:, 0].numpy(), atol=1e-4)
        stack = BlockStack(m)  # its logits take the residual stream before the final norm
        x = torch.randn(5, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
        x = (x * 4).to(torch.bfloat16)
        ref = stack.norm(x).double() @ base.get_output_embeddings().weight.double().T
        got_stack = stack.logits(x)
        assert got_stack.dtype == torch.float32
        assert (got_stack.double() - ref).abs().max() < 1e-4
        old = base.get_output_embeddings()(stack.norm(x))  # the bf16 head it used before
        assert (old.double() - ref).abs().max() > 1e-2
