"""The precision gate: pure bf16 training (bf16 weights, AdamW on them) rounds away every update
below half a bf16 step at its weight, so its stored update looks sparse; float32 master weights
keep it dense. Checked against an independent float64 prediction of which entries round away, and
end to end through the contrast (``run_contrast``), ``update-geometry`` and the report section."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mechinterp.errors import UserError
from mechinterp.training.precision import choose, from_options

pytestmark = pytest.mark.usefixtures("one_thread")
LR = 1e-4  # tiny-random-llama's weights are N(0, 0.2): half a bf16 step exceeds 1e-4 above 2**-5
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU = torch.device("cpu")


# ----- the scheme ----------------------------------------------------------------------------------

def test_schemes_name_where_the_update_accumulates(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    pure = choose("pure-bf16", CPU)
    assert (pure.param_dtype, pure.compute_dtype, pure.mixed) == (torch.bfloat16, torch.bfloat16,
                                                                  "no")
    rec = pure.record()
    assert rec["scheme"] == "pure-bf16" and rec["autocast"] is False
    assert rec["master_weights"].startswith("none")
    for name in ("mixed-bf16", "bfloat16"):
        p = choose(name, CPU)
        assert (p.param_dtype, p.compute_dtype, p.scheme) == (torch.float32, torch.bfloat16,
                                                              "mixed-bf16")
    assert choose("auto", CPU).scheme == choose("float32", CPU).scheme == "float32"
    with pytest.raises(UserError, match="DeepSpeed"):
        choose("pure-bf16", CPU, deepspeed=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(UserError, match="launcher"):
        choose("pure-bf16", CPU)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(UserError, match="unknown --dtype/--precision 'bf8'"):
        choose("bf8", CPU)


def test_precision_option_and_dtype_must_agree():
    assert from_options(None, "pure-bf16") == "pure-bf16"
    assert from_options("bfloat16", "mixed-bf16") == "mixed-bf16"
    assert from_options("float32", None) == "float32"
    with pytest.raises(UserError, match="different schemes"):
        from_options("float32", "pure-bf16")
    with pytest.raises(UserError, match="unknown --precision"):
        from_options(None, "bf16")


def test_train_cli_refuses_conflicting_precision(tmp_path, capsys):
    from mechinterp.cli import main

    code = main(["train", "sft", "--out", str(tmp_path / "run"), "--base", "tiny-random-llama",
                 "--dtype", "float32", "--precision", "pure-bf16"])
    assert code == 2 and "ask for different schemes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----- pure bf16 against an independent float64 prediction -----------------------------------------

class Grads(TrainerCallback):
    """The (clipped) gradients of every matrix that the first optimizer step applies."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                          if n.endswith(tuple(f"{m}.weight" for m in MATRICES))}


def _rounds_away(p: np.ndarray, u: np.ndarray, band: float = 0.02):
    """float64, from the bf16 format alone: whether ``p - u`` rounds back to the bf16 value ``p``
    (``|u|`` below half the gap to the neighbouring bf16 number on the side it moves to; the gap
    below a power of two is half the gap above), and which entries lie within ``band`` (relative)
    of that boundary, where AdamW's own rounding of its moments could tip them."""
    a = np.abs(p)
    e = np.floor(np.log2(a))
    gap = 2.0 ** (e - 7)  # 8 significant bits
    toward_zero = np.sign(u) == np.sign(p)  # p - u shrinks |p|
    gap = np.where(toward_zero & (a == 2.0 ** e), gap / 2, gap)
    half = gap / 2
    return np.abs(u) < half, np.abs(np.abs(u) - half) <= band * half


def _train(tmp_path, base, scheme: str, name: str, callbacks=()):
    from mechinterp.training.runner import train
    from mechinterp.training.settings import resolve_settings

    s = resolve_settings("sft", None, dict(
        base=str(base), data="arithmetic", dtype=scheme, max_steps=3, checkpoints=3,
        per_device_train_batch_size=2, max_length=400, n_heldout=1, heldout_max_length=400,
        learning_rate=LR, lr_scheduler_type="constant", warmup_ratio=0.0, weight_decay=0.0,
        gradient_checkpointing=False, seed=0))
    out = tmp_path / name
    train(s, out, echo=lambda *_: None, callbacks=callbacks)
    return out


def _matrices(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items()
            if k.endswith(tuple(f"{m}.weight" for m in MATRICES))}


def _zero_fraction(base: dict, other: dict) -> float:
    same = sum(int((base[k].double() == other[k].double()).sum()) for k in base)
    return same / sum(t.numel() for t in base.values())


def test_pure_bf16_rounds_away_exactly_the_updates_below_half_a_bf16_step(tmp_path):
    """Step 1 of pure-bf16 SFT on tiny-random-llama: an entry is stored unchanged exactly where
    Adam's first step ``lr * g / (|g| + eps)`` (float64, from the captured gradients) is below half
    a bf16 step at the weight. After 3 steps the stored update is mostly exact zeros; the same run
    with float32 master weights changes nearly every entry."""
    from mechinterp.study.precision import bf16_base

    base = bf16_base("tiny-random-llama", tmp_path / "base-bf16", echo=lambda *_: None)
    start = _matrices(base / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in start.values())
    grads = Grads()
    pure = _train(tmp_path, base, "pure-bf16", "pure", (grads,))
    prec = json.loads((pure / "train-config.json").read_text())["precision"]
    assert (prec["scheme"], prec["param_dtype"], prec["compute_dtype"], prec["autocast"]) == \
        ("pure-bf16", "bfloat16", "bfloat16", False)
    step1 = _matrices(pure / "checkpoints/step-1/model.safetensors")
    assert sorted(grads.grads) == sorted(start) and len(start) == 4 * len(MATRICES)
    n = agree = ambiguous = predicted_zero = 0
    for k, p16 in start.items():
        assert step1[k].dtype == torch.bfloat16  # stored as trained: bf16
        p = p16.double().numpy().ravel()
        g = grads.grads[k].numpy().ravel()
        u = LR * g / (np.abs(g) + 1e-8)  # AdamW's first step (m_hat = g, v_hat = g^2), wd 0
        vanish, near = _rounds_away(p, u)
        stored_zero = step1[k].double().numpy().ravel() == p
        ok = ~near & (p != 0)
        n += p.size
        agree += int((vanish[ok] == stored_zero[ok]).sum())
        ambiguous += int((~ok).sum())
        predicted_zero += int(vanish[ok].sum())
        assert np.array_equal(vanish[ok], stored_zero[ok]), k
    assert ambiguous < 0.02 * n
    assert 0.5 < predicted_zero / n < 0.99  # the case is not trivial either way
    final = _matrices(pure / "model.safetensors")
    assert _zero_fraction(start, final) > 0.5
    master = _train(tmp_path, base, "mixed-bf16", "master")
    final_master = _matrices(master / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in final_master.values())
    assert _zero_fraction(start, final_master) < 0.01


# ----- the contrast, end to end --------------------------------------------------------------------

def test_precision_contrast_end_to_end_on_a_tiny_model(tmp_path, data_source):
    """``run_contrast`` at the smoke size on tiny-random-llama: SFT's stored update is mostly exact
    zeros in pure bf16 and dense with float32 master weights, as update-geometry's
    ``exact_zero_fraction`` and a direct count over the safetensors files agree; the report section
    states both. (GRPO rarely earns a reward from a random model: where every reward of a group is
    equal its update is zero in both schemes, so only the order of the two is asserted.)"""
    from mechinterp.store.results import read_result
    from mechinterp.study.precision import run_contrast
    from mechinterp.study.precision_report import gate_lines, gate_rows

    out = tmp_path / "results"
    meta = run_contrast(out, "smoke", base="tiny-random-llama", data_dir=data_source.root,
                        device="cpu", echo=lambda *_: None,
                        train={"learning_rate": LR, "max_length": 400, "heldout_max_length": 400})
    assert sorted(meta["runs"]) == ["grpo-fp32-master", "grpo-pure-bf16", "sft-fp32-master",
                                    "sft-pure-bf16"]
    data = read_result(out / "precision" / "update-geometry").data
    zero = {v: data["overall"][v]["exact_zero_fraction"] for v in meta["runs"]}
    base = _matrices(out / "precision" / "base-bf16" / "model.safetensors")
    for v, r in meta["runs"].items():
        direct = _zero_fraction(base, _matrices(Path(r["folder"]) / "model.safetensors"))
        assert zero[v] == pytest.approx(direct, abs=1e-12), v
        per_cell = [x for m in data["matrices"] for x in data["exact_zero_fraction"][v][m]]
        assert len(per_cell) == 28 and all(0 <= x <= 1 for x in per_cell)
        assert data["dtypes"][v] == ("BF16" if r["scheme"] == "pure-bf16" else "F32")
    assert zero["sft-pure-bf16"] > 0.5 and zero["sft-fp32-master"] < 0.01
    assert zero["grpo-pure-bf16"] >= zero["grpo-fp32-master"]
    rows = {(r["kind"], r["scheme"]): r for r in gate_rows(*_contrast(out))}
    cell = rows[("sft", "pure-bf16")]["measures"]["exactly unchanged (stored dtype)"]
    assert cell["overall"] == pytest.approx(zero["sft-pure-bf16"])
    assert cell["n_cells"] == 28 and cell["p5"] <= cell["median"] <= cell["p95"]
    assert math.isnan(cell["lo"])  # one seed: no interval over seeds
    lines = gate_lines(out)
    assert any(x.startswith("sft: exactly unchanged entries") and
               f"{100 * zero['sft-pure-bf16']:.2f}% in pure bf16" in x for x in lines)
    # the report of any compare into this folder carries the section, figures embedded
    from mechinterp.study.folder import Study
    from mechinterp.study.report import build_html, build_markdown

    study = Study(out, "tiny-random-llama", {}, {})
    md = build_markdown(study, [])
    assert "## Precision gate" in md and "precision/update-geometry/precision_histograms.png" in md
    assert all(line in md for line in lines)
    page = build_html(study, [])
    assert "<h2 id='precision-gate'>" in page and page.count("data:image/png;base64,") == 2


def _contrast(out):
    from mechinterp.study.precision_report import load_contrast

    return load_contrast(out)
