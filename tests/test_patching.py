"""The patching mechanism: identities that must hold exactly, and agreement with TransformerLens."""

import pytest
import torch

from mechinterp.analysis.patching import Patch, capture, run_patched
from mechinterp.errors import UserError

PROMPTS = ["The capital of France is", "Answer: the answer is 42"]


def _batch(model):
    enc = model.encode(PROMPTS)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "resid_post"])
def test_self_patch_changes_nothing(tiny_model, site):
    ids, mask = _batch(tiny_model)
    clean, acts = capture(tiny_model, ids, mask, [(site, 1)])
    patched = run_patched(tiny_model, ids, mask, [Patch(site, 1, acts[(site, 1)])])
    assert torch.equal(clean, patched)


def test_patch_matches_bridge_hooks(tiny_model):
    """Zeroing layer-2 MLP output through our HF hooks == the same edit through the bridge."""
    ids, mask = _batch(tiny_model)
    ours = run_patched(tiny_model, ids, mask, [Patch("mlp_out", 2, torch.zeros(()))])
    name = tiny_model.hook_name("mlp_out", 2)
    theirs = tiny_model.bridge.run_with_hooks(
        ids, attention_mask=mask, fwd_hooks=[(name, lambda act, hook: torch.zeros_like(act))])
    plain = tiny_model.hf(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ours, plain)  # the edit does something
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_rows_and_positions_are_respected(tiny_model):
    ids, mask = _batch(tiny_model)
    clean = tiny_model.hf(input_ids=ids, attention_mask=mask).logits
    # patch only row 1, position 0: row 0 must be untouched, row 1 changes
    out = run_patched(tiny_model, ids, mask, [Patch("resid_pre", 0, torch.zeros(()),
                                                    rows=torch.tensor([1]),
                                                    positions=torch.tensor([0]))])
    assert torch.equal(out[0], clean[0])
    assert not torch.allclose(out[1], clean[1])


def test_bad_layer_is_a_user_error(tiny_model):
    ids, mask = _batch(tiny_model)
    with pytest.raises(UserError, match="out of range"):
        run_patched(tiny_model, ids, mask, [Patch("mlp_out", 99, torch.zeros(()))])
