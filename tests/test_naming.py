"""The component map: every (layer, matrix) and hook site resolves, with the right shapes."""

import pytest
import torch

from mechinterp.errors import SpecError
from mechinterp.models.naming import BRIDGE_HOOKS, check_family


def test_every_matrix_has_the_config_shape(tiny_model):
    cfg = tiny_model.config
    for layer in range(tiny_model.n_layers):
        for m in tiny_model.matrices:
            assert tuple(tiny_model.weight(layer, m).shape) == tiny_model.family.expected_shape(m, cfg)


def test_gpt2_q_k_v_are_the_thirds_of_c_attn():
    from mechinterp.models import load

    m = load("tiny-random-gpt2", device="cpu")
    full = m.hf.get_parameter("transformer.h.1.attn.c_attn.weight")
    d = m.config.n_embd
    assert torch.equal(m.weight(1, "q"), full[:, :d])
    assert torch.equal(m.weight(1, "k"), full[:, d:2 * d])
    assert torch.equal(m.weight(1, "v"), full[:, 2 * d:])


def test_bridge_hook_sites_exist_and_fire(tiny_model):
    names = set(tiny_model.bridge.hook_dict)
    for layer in range(tiny_model.n_layers):
        for site in BRIDGE_HOOKS:
            assert tiny_model.hook_name(site, layer) in names
    ids = tiny_model.tokenizer("hello world", return_tensors="pt").input_ids
    _, cache = tiny_model.bridge.run_with_cache(
        ids, names_filter=lambda n: n.endswith(("hook_mlp_out", "hook_pattern")))
    assert cache[tiny_model.hook_name("mlp_out", 0)].shape[-1] == tiny_model.config.hidden_size \
        if hasattr(tiny_model.config, "hidden_size") else True
    pat = cache[tiny_model.hook_name("attn_pattern", 0)]
    torch.testing.assert_close(pat.sum(-1), torch.ones_like(pat.sum(-1)))  # rows are distributions


def test_hf_mlp_module_output_is_bridge_mlp_out(tiny_model):
    """The HF module our map names for mlp_out emits exactly the bridge's hook_mlp_out."""
    from mechinterp.analysis.patching import capture

    ids = tiny_model.tokenizer("hello world again", return_tensors="pt").input_ids
    _, ours = capture(tiny_model, ids, None, [("mlp_out", 1), ("attn_out", 1)])
    _, cache = tiny_model.bridge.run_with_cache(ids)
    torch.testing.assert_close(ours[("mlp_out", 1)], cache[tiny_model.hook_name("mlp_out", 1)],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[("attn_out", 1)], cache[tiny_model.hook_name("attn_out", 1)],
                               atol=1e-5, rtol=0)


def test_wrong_shapes_fail_on_load(tiny_model):
    shapes = {n: tuple(p.shape) for n, p in tiny_model.hf.named_parameters()}
    ref = tiny_model.param_slice(0, "o")
    shapes[ref.name] = (3, 3)
    with pytest.raises(SpecError, match="shape"):
        check_family(tiny_model.family, tiny_model.config, shapes)
    del shapes[ref.name]
    with pytest.raises(SpecError, match="no such parameter"):
        check_family(tiny_model.family, tiny_model.config, shapes)


@pytest.mark.slow
def test_default_model_map(default_model):
    assert default_model.n_layers == 30
    assert tuple(default_model.weight(0, "k").shape) == (192, 576)  # 3 KV heads x 64
    assert tuple(default_model.weight(29, "down").shape) == (576, 1536)
