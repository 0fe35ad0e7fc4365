"""Mixed precision: ``--dtype bfloat16`` trains float32 master weights under bf16 autocast (this
CPU stands in for a GPU), so an update smaller than bf16's rounding step survives; weight change
against a base stored in another dtype works and says which dtypes it compared."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mechinterp.training.runner import train
from mechinterp.training.settings import resolve_settings

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 1e-3  # Adam's first step moves every entry by ~LR; bf16's half-step at 1.0 is 2**-9..2**-8


class Watch(TrainerCallback):
    """Records the dtype of one Linear layer's output in step 1's training forward passes, and the
    (clipped) gradients of the norm weights that the first optimizer step applies."""

    def __init__(self):
        self.seen: set[torch.dtype] = set()
        self.handle = None
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        layer = model.model.layers[0].mlp.up_proj
        self.handle = layer.register_forward_hook(lambda m, i, o: self.seen.add(o.dtype))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                          if "norm" in n}

    def on_step_end(self, args, state, control, **kw):
        self.handle.remove()  # the training forward passes of step 1 only (not drift's)


@pytest.mark.slow
def test_bf16_mixed_precision_keeps_updates_that_bf16_adamw_rounds_away(tmp_path):
    """The issue's failing command (``--dtype bfloat16`` from the float32 base) finishes with
    checkpoints and a final model; its norm weights (exactly 1.0 in the base) move by LR at step 1
    in float32, where AdamW on bf16 weights (computed here independently) leaves them at 1.0."""
    out = tmp_path / "run"
    s = resolve_settings("sft", None, dict(
        base="tiny-random-llama", data="arithmetic", dtype="bfloat16", max_steps=2, checkpoints=2,
        per_device_train_batch_size=2, max_length=400, n_heldout=1, heldout_max_length=400,
        learning_rate=LR, lr_scheduler_type="constant", warmup_ratio=0.0, weight_decay=0.0,
        gradient_checkpointing=False, seed=0))
    probe = Watch()
    res = train(s, out, echo=lambda *_: None, callbacks=(probe,))
    assert res.steps == 2 and res.checkpoints == ["step-1", "step-2"]
    assert probe.seen == {torch.bfloat16}  # matmuls ran under bf16 autocast
    prec = json.loads((out / "train-config.json").read_text())["precision"]
    assert (prec["param_dtype"], prec["compute_dtype"], prec["autocast"]) == \
        ("float32", "bfloat16", True)
    assert "AdamW updates them" in prec["master_weights"]
    step1, final = load_file(str(out / "checkpoints/step-1/model.safetensors")), \
        load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in final.values())  # the master weights are saved
    norms = [n for n in step1 if "norm" in n]
    assert len(norms) == 9
    assert sorted(probe.grads) == sorted(norms)
    for name in norms:
        g = probe.grads[name]
        delta = step1[name].double() - 1.0
        # ours, against Adam's first step in float64: m_hat = g, v_hat = g^2, so the float32
        # master weight moves by -LR * g / (|g| + eps) (|delta| = LR for |g| >> eps = 1e-8)
        assert torch.all(delta != 0), name
        np.testing.assert_allclose(delta.numpy(), (-LR * g / (g.abs() + 1e-8)).numpy(),
                                   rtol=0, atol=2e-7, err_msg=name)  # float32 steps near 1
        # bf16-only AdamW from the same start with the same gradient: 1 - LR*sign(g) is within
        # half a bf16 step of 1.0 (2**-9 below, 2**-8 above), so the update rounds away
        p = torch.nn.Parameter(torch.ones_like(g, dtype=torch.bfloat16))
        p.grad = g.to(torch.bfloat16)
        torch.optim.AdamW([p], lr=LR, weight_decay=0.0).step()
        assert torch.equal(p.detach(), torch.ones_like(p)), f"bf16 AdamW moved {name}"
        assert torch.all(final[name] != 1.0)  # still moved at the end
    drift = json.loads((out / "training-drift" / "result.json").read_text())["data"]
    assert drift["steps"] == [1, 2] and drift["precision"] == prec
    assert drift["compared"] == [{"base_dtype": "float32", "live_dtype": "float32",
                                  "compared_in": "float32"}]
    assert drift["kl"][-1] > 0


def _bf16_base(tmp_path):
    """tiny-random-llama saved in bf16 (a base stored in another dtype than our checkpoints)."""
    from mechinterp.models import load

    lm = load("tiny-random-llama", device="cpu", dtype="float32")
    folder = tmp_path / "base-bf16"
    lm.hf.to(torch.bfloat16).save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_weight_change_across_dtypes_matches_float64(tmp_path):
    """A bf16 base against float32 weights: the chunked statistics, the training drift log and the
    weight-change probe agree with float64 and record the dtypes they compared."""
    from mechinterp.analysis import weights as W
    from mechinterp.models import load
    from mechinterp.models.modelset import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe
    from mechinterp.training.driftlog import DriftLogger

    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, 33, generator=g).to(torch.bfloat16)
    v = b.float() + 1e-4 * torch.randn(64, 33, generator=g)  # moves below bf16's resolution
    v[:3] = b[:3].float()  # untouched rows
    got = W.tensor_stats(b, v)
    b64, v64 = b.double(), v.double()
    # sums of squares are float32 over blocks of 1024 (weights.py): relative error ~1e-6
    assert got.relative == pytest.approx(float((v64 - b64).norm() / b64.norm()), rel=1e-5)
    assert got.n_changed == int((v64 != b64).sum()) == 61 * 33
    assert W.tensor_stats(v, b).relative == pytest.approx(
        float((v64 - b64).norm() / v64.norm()), rel=1e-5)

    base = _bf16_base(tmp_path)
    live = load(str(base), device="cpu", dtype="float32")  # float32 "master weights" of a bf16 base
    w = live.weight(1, "up")
    with torch.no_grad():
        w += 1e-4 * torch.randn(w.shape, generator=g)
    log = DriftLogger(tmp_path / "run", base, live.family, live.config, None, None, {}, {})
    rc = log.weight_change(live.hf)
    assert rc["up"][1] > 0 and rc["up"][0] == 0.0 and rc["q"][1] == 0.0
    base_up = load_file(str(base / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    assert rc["up"][1] == pytest.approx(float((w.detach().double() - base_up.double()).norm()
                                              / base_up.double().norm()), rel=1e-5)
    assert log.meta["compared"] == [{"base_dtype": "bfloat16", "live_dtype": "float32",
                                     "compared_in": "float32"}]
    live.hf.save_pretrained(tmp_path / "tuned")  # float32 files
    live.tokenizer.save_pretrained(tmp_path / "tuned")
    ms = ModelSet(str(base), {"tuned": str(tmp_path / "tuned")}, device="cpu")
    probe = get_probe("weight-change")
    res = run_probe(probe, ms, None, make_config(probe, {"sparsity": False}))
    assert res["dtypes"] == {"base": "BF16", "tuned": "F32"}
    assert res["compared_in"] == {"tuned": "float32"}
    assert res["relative_change"]["tuned"]["up"][1] == pytest.approx(rc["up"][1], rel=1e-6)
