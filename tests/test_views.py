"""Three views over one copy of the weights: shared storage and identical numbers."""

import re

import pytest
import torch

PROMPTS = ["The capital of France is", "The Eiffel Tower is located in the city of"]


def _last_logprobs_three_ways(model, prompt):
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        hf = model.hf(ids).logits[0, -1].double().log_softmax(-1)
        tl = model.bridge(ids, return_type="logits")[0, -1].double().log_softmax(-1)
    with model.lm.trace(ids):
        out = model.lm.output.save()
    nn = out.logits[0, -1].double().log_softmax(-1)
    return hf, tl, nn


def _check_parity(model):
    for prompt in PROMPTS:
        hf, tl, nn = _last_logprobs_three_ways(model, prompt)
        assert (hf - tl).abs().max().item() <= 1e-4
        assert (hf - nn).abs().max().item() <= 1e-4


def _check_shared_storage(model):
    hf_ptrs = {p.data_ptr() for p in model.hf.parameters()}
    own = [n for n, p in model.bridge.named_parameters() if p.data_ptr() not in hf_ptrs]
    if model.family.name == "gpt2":
        # TransformerLens splits GPT-2's fused c_attn into separate k/v Linear copies
        own = [n for n in own if not re.search(r"attn\.[qkv]\._original_component", n)]
    assert own == []
    assert model.lm._module is model.hf
    # and an in-place edit through one view is seen by the others
    w = model.weight(0, "q")
    assert w.data_ptr() in hf_ptrs or w.untyped_storage().data_ptr() in {
        p.untyped_storage().data_ptr() for p in model.hf.parameters()}


def test_parity_tiny(tiny_model):
    _check_parity(tiny_model)
    _check_shared_storage(tiny_model)


def test_edit_through_hf_is_seen_by_bridge(fresh_tiny_llama):
    m = fresh_tiny_llama
    ids = m.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    before = m.bridge(ids, return_type="logits")
    with torch.no_grad():
        m.weight(1, "down").mul_(0.0)
    after_tl = m.bridge(ids, return_type="logits")
    after_hf = m.hf(ids).logits
    assert not torch.allclose(before, after_tl)
    torch.testing.assert_close(after_tl, after_hf, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_parity_default_model(default_model):
    _check_parity(default_model)
    _check_shared_storage(default_model)


@pytest.mark.slow
def test_default_model_knows_paris(default_model):
    """Behaviour check of the dequantised default (stack notes: ' Paris' with p ~ 0.77)."""
    m = default_model
    ids = m.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        p = m.hf(ids).logits[0, -1].softmax(-1)
    top = int(p.argmax())
    assert m.tokenizer.decode(top) == " Paris"
    assert 0.6 < float(p[top]) < 0.9


def test_views_leave_the_hf_module_untouched(fresh_tiny_llama):
    """Building the bridge must not rename HF parameters (save_pretrained and hooks rely on them)."""
    m = fresh_tiny_llama
    before = [n for n, _ in m.hf.named_parameters()]
    _ = m.bridge, m.lm
    assert [n for n, _ in m.hf.named_parameters()] == before
    assert type(m.module(0, "mlp_out")).__module__.startswith("transformers.")


def test_nnsight_view_does_not_change_padding(fresh_tiny_llama):
    side = fresh_tiny_llama.tokenizer.padding_side
    _ = fresh_tiny_llama.lm
    assert fresh_tiny_llama.tokenizer.padding_side == side
