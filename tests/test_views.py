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


def _storage(p: torch.Tensor) -> int:
    return p.untyped_storage().data_ptr()


def _check_shared_storage(model):
    """Each view's own parameters (as that view lists them) live in the HF module's storage."""
    hf = dict(model.hf.named_parameters())
    hf_storage = {_storage(p): n for n, p in hf.items()}
    # nnsight lists the parameters of the module it wraps: the same tensors, name by name
    lm = dict(model.lm.named_parameters())
    assert set(lm) == set(hf)
    for name, p in lm.items():
        assert p.data_ptr() == hf[name].data_ptr() and _storage(p) == _storage(hf[name]), name
    env = model.lm.get(model.param_slice(0, "q").name.rsplit(".", 1)[0]).weight  # the envoy path
    assert env.data_ptr() == hf[model.param_slice(0, "q").name].data_ptr()
    # the bridge: every parameter in HF storage, and every HF parameter used by the bridge
    bridge = dict(model.bridge.named_parameters())
    own = [n for n, p in bridge.items() if _storage(p) not in hf_storage]
    assert own == []  # GPT-2's split q/k/v included: views into the fused c_attn
    used = {hf_storage[_storage(p)] for p in bridge.values() if _storage(p) in hf_storage}
    assert used == set(hf)
    ref = model.param_slice(1, model.matrices[-1])  # an MLP output matrix, shared by all three
    want = hf[ref.name].data_ptr()
    assert any(p.data_ptr() == want for p in bridge.values())
    assert lm[ref.name].data_ptr() == want


def _three_outputs(model, ids):
    with torch.no_grad():
        hf = model.hf(ids).logits
        tl = model.bridge(ids, return_type="logits")
    with model.lm.trace(ids):
        out = model.lm.output.save()
    return hf, tl, out.logits.detach()


@pytest.mark.parametrize("spec", ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-gpt2"])
def test_an_edit_through_each_view_shows_in_the_others(spec):
    from mechinterp.models import load

    m = load(spec, device="cpu", dtype="float32")
    ids = m.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    hf = dict(m.hf.named_parameters())
    mlp_out = m.param_slice(1, m.matrices[-1]).name
    mlp_in = m.param_slice(0, m.matrices[-2]).name
    by_ptr = {p.data_ptr(): p for p in m.bridge.parameters()}
    edits = {  # view -> the parameter object that view hands out
        "bridge": by_ptr[hf[mlp_out].data_ptr()],
        "nnsight": dict(m.lm.named_parameters())[mlp_in],
        "hf": m.weight(2 % m.n_layers, m.matrices[-1]),
    }
    before = _three_outputs(m, ids)
    for view, param in edits.items():
        with torch.no_grad():
            param.mul_(-3.0)
        after = _three_outputs(m, ids)
        for name, b, a in zip(("hf", "bridge", "nnsight"), before, after):
            assert (a - b).abs().max() > 1e-3, (view, name)  # every view sees the edit
        torch.testing.assert_close(after[1], after[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(after[2], after[0], atol=1e-5, rtol=0)
        before = after


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


def test_gpt2_split_qkv_are_views_of_the_fused_weight():
    """The bridge splits GPT-2's fused ``c_attn`` into q/k/v: views of the same storage, so an
    edit of the HF weight reaches the bridge's split parameters and outputs without a refresh."""
    from mechinterp.models import load

    m = load("tiny-random-gpt2", device="cpu", dtype="float32")
    ids = m.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    bridge = dict(m.bridge.named_parameters())
    before = _three_outputs(m, ids)
    for matrix in ("q", "k", "v"):
        split = next(p for n, p in bridge.items()
                     if re.search(rf"h\.0\..*attn\.{matrix}\._original_component\.weight", n))
        w = m.weight(0, matrix)
        assert _storage(split) == _storage(w)
        with torch.no_grad():
            w.mul_(3.0)
        assert torch.equal(split, w) or torch.equal(split, w.T)  # (Conv1D stores W transposed)
    hf, tl, nn = _three_outputs(m, ids)
    assert (hf - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(tl, hf, atol=1e-4, rtol=0)
    torch.testing.assert_close(nn, hf, atol=1e-5, rtol=0)
