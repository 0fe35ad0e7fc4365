"""weight-change's coherence, update scale, noise floor and scale confound against independent
computations: float64 numpy on the stored weights, hand-worked cases, and weights snapshotted at
every step of a tiny training run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mechinterp.analysis import update_measures as U
from mechinterp.analysis.noisefloor import OptimizerSettings, simulate

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "tiny-random-llama"


def _stored(folder) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for f in sorted(folder.glob("*.safetensors"))
            for k, v in load_file(f).items()}


@torch.no_grad()
def _save_walk(tmp_path, deltas, name="run"):
    """Checkpoints ``step-1..step-T`` of a tiny Llama whose tracked matrices move by ``deltas[t]``
    (a function of (t, layer, matrix, weight) -> float64 step) at step t; returns the run folder
    and the model (for its matrix names and slices)."""
    from mechinterp.models import load

    lm = load(TINY, device="cpu", dtype="float32")
    run = tmp_path / name
    w0 = {(layer, m): lm.weight(layer, m).double().clone()
          for layer in range(lm.n_layers) for m in lm.matrices}
    cur = dict(w0)
    for t in range(1, len(deltas) + 1):
        for key in cur:
            cur[key] = cur[key] + deltas[t - 1](t, *key, w0[key])
            lm.weight(*key).copy_(cur[key].float())
        lm.hf.save_pretrained(run / "checkpoints" / f"step-{t}")
        lm.tokenizer.save_pretrained(run / "checkpoints" / f"step-{t}")
    return run, lm


def _run_probe(base, variants):
    from mechinterp.models.modelset import ModelSet
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe

    probe = get_probe("weight-change")
    ms = ModelSet(base, variants, device="cpu")
    return run_probe(probe, ms, None, make_config(probe, sparsity=False)).data


def _reference_coherence(base_folder, run, T, lm):
    """float64 numpy: ||W_T - W_0|| / sum_t ||W_t - W_{t-1}|| per matrix and layer."""
    ws = [_stored(base_folder)] + [_stored(run / "checkpoints" / f"step-{t}")
                                   for t in range(1, T + 1)]
    out = {}
    for m in lm.matrices:
        vals = []
        for layer in range(lm.n_layers):
            ref = lm.param_slice(layer, m)
            seq = [ref.take(torch.from_numpy(w[ref.name])).numpy() for w in ws]
            path = sum(np.linalg.norm(b - a) for a, b in zip(seq, seq[1:]))
            vals.append(np.linalg.norm(seq[-1] - seq[0]) / path)
        out[m] = vals
    return out


def test_straight_path_has_coherence_one(tmp_path):
    from mechinterp.models import resolve

    g = torch.Generator().manual_seed(0)
    T = 4
    dirs = {}

    def step(t, layer, m, w0):  # the same direction every step: a straight line
        if (layer, m) not in dirs:
            dirs[layer, m] = 0.01 * w0.norm() * torch.randn(w0.shape, generator=g,
                                                           dtype=torch.float64) / math.sqrt(w0.numel())
        return dirs[layer, m]

    run, lm = _save_walk(tmp_path, [step] * T)
    d = _run_probe(TINY, {"sft": f"{run}@all"})
    ref = _reference_coherence(resolve(TINY).path, run, T, lm)
    last = f"sft@step-{T}"
    assert d["coherence_source"][last] == f"checkpoints ({T})"
    assert d["coherence_source"]["sft@step-1"] == "checkpoints (1)"
    for m in lm.matrices:
        np.testing.assert_allclose(d["coherence"][last][m], ref[m], rtol=1e-6)
        np.testing.assert_allclose(d["coherence"][last][m], 1.0, atol=1e-4)
        assert d["coherence"]["sft@step-1"][m] == [None] * lm.n_layers  # one leg: no estimate


def test_random_walk_has_coherence_one_over_sqrt_t(tmp_path):
    from mechinterp.models import resolve

    g = torch.Generator().manual_seed(1)
    T = 9

    def step(t, layer, m, w0):  # independent Gaussian steps: a random walk
        return 0.01 * w0.std() * torch.randn(w0.shape, generator=g, dtype=torch.float64)

    run, lm = _save_walk(tmp_path, [step] * T)
    d = _run_probe(TINY, {"sft": f"{run}@all"})
    ref = _reference_coherence(resolve(TINY).path, run, T, lm)
    got = d["coherence"][f"sft@step-{T}"]
    for m in lm.matrices:
        np.testing.assert_allclose(got[m], ref[m], rtol=1e-6)
        # 4096+ entries per matrix: ||sum of T steps|| / (T ||step||) is 1/sqrt(T) to a few %
        np.testing.assert_allclose(got[m], 1 / math.sqrt(T), rtol=0.05)


def test_path_from_log_sums_logged_steps_and_needs_all_of_them():
    norms = {"q": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]}
    assert U.path_from_log([1, 2, 3], norms, 2) == {"q": [4.0, 6.0]}
    assert U.path_from_log([1, 2, 3], norms, 3) == {"q": [9.0, 12.0]}
    assert U.path_from_log([2, 3], {"q": norms["q"][1:]}, 3) is None  # step 1 missing
    assert U.path_from_log([1, 2, 3], norms, 4) is None  # beyond the log


def _write_config(run, **over):
    cfg = {"algorithm": "sft", "base": TINY, "learning_rate": 1e-3, "max_steps": 4,
           "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
           "max_grad_norm": 1.0, "seed": 0, "extra": {}} | over
    (run / "train-config.json").write_text(json.dumps(cfg))


def test_update_scale_hand_worked(tmp_path):
    """Every entry of layer 1's up moved by +-2e-3 over 4 steps at lr 1e-3: RMS(dW) = 2e-3, so
    RMS / (lr x steps) = 2e-3 / 4e-3 = 0.5; layer 0's up by +-1e-3 at step 2: 1e-3 / 2e-3 = 0.5
    at step 2 and 0.25 at step 4."""
    g = torch.Generator().manual_seed(2)
    signs = {}

    def sign(layer, m, w0):
        if (layer, m) not in signs:
            signs[layer, m] = torch.sign(torch.randn(w0.shape, generator=g, dtype=torch.float64))
        return signs[layer, m]

    def step(t, layer, m, w0):
        if m != "up" or layer > 1:
            return torch.zeros_like(w0)
        if layer == 1:
            return 0.5e-3 * sign(layer, m, w0)
        return 0.5e-3 * sign(layer, m, w0) * (t <= 2)

    run, lm = _save_walk(tmp_path, [step] * 4)
    _write_config(run)
    d = _run_probe(TINY, {"sft": f"{run}@all"})
    s2, s4 = d["update_scale"]["sft@step-2"]["up"], d["update_scale"]["sft@step-4"]["up"]
    assert s4[1] == pytest.approx(0.5, rel=1e-4) and s2[1] == pytest.approx(0.5, rel=1e-4)
    assert s2[0] == pytest.approx(0.5, rel=1e-4) and s4[0] == pytest.approx(0.25, rel=1e-4)
    assert s4[2] == 0.0
    assert d["update_scale_settings"]["sft@step-4"]["lr"] == 1e-3
    assert d["update_scale_settings"]["sft@step-4"]["steps"] == 4
    # the run's settings give its noise floor, the same as simulating them directly
    floor = d["noise_floor"]["sft@step-4"]
    sim = simulate(OptimizerSettings(lr=1e-3, max_steps=4, max_grad_norm=1.0), [2, 4],
                   w_rms=floor["settings"]["w_rms"])
    assert floor["update_scale"] == sim[4].update_scale
    assert floor["coherence_ci95"] == sim[4].coherence_ci95
    assert d["noise_floor"]["sft@step-2"]["coherence"] == sim[2].coherence
    # layer 0's up took two equal steps, then stood still: a straight path, coherence 1
    assert d["coherence"]["sft@step-2"]["up"][0] == pytest.approx(1.0, abs=1e-4)


DEMO = OptimizerSettings(lr=2e-5, max_steps=24, max_grad_norm=1.0)  # the cpu-demo preset's AdamW


def test_noise_floor_is_seeded_and_below_the_sign_step_ceiling():
    a, b = simulate(DEMO, [8, 24]), simulate(DEMO, [8, 24])
    assert a == b
    assert simulate(DEMO, seed=5)[24] != a[24]
    # the measurement: pure-noise AdamW at the demo's settings, c = 0.237
    assert 0.22 < a[24].update_scale < 0.25
    for f in a.values():
        lo, hi = f.update_scale_ci95
        assert lo <= f.update_scale <= hi <= 1.0
        assert 1 / math.sqrt(f.step) < f.coherence < 1.0
    # a constant gradient is the ceiling: every step moves every entry by lr x sign(g)
    top = simulate(DEMO, [8, 24], constant_gradient=True)
    for f in top.values():
        assert f.update_scale == pytest.approx(1.0, rel=1e-6)
        assert f.coherence == pytest.approx(1.0, rel=1e-9)


def test_noise_floor_follows_warmup_and_settings_from_train_config():
    cfg = {"learning_rate": 1e-4, "max_steps": 10, "warmup_ratio": 0.25,
           "lr_scheduler_type": "constant_with_warmup", "weight_decay": 0.1, "max_grad_norm": 0.2,
           "extra": {"adam_beta2": 0.99}}
    s = OptimizerSettings.from_train_config(cfg)
    assert (s.warmup_steps, s.betas, s.weight_decay, s.max_grad_norm) == (3, (0.9, 0.99), 0.1, 0.2)
    assert OptimizerSettings.from_train_config({"max_steps": 3}) is None
    # warm-up lowers the first steps' lr: less movement per lr x steps than without it
    no_warm = OptimizerSettings(lr=1e-4, max_steps=10, lr_scheduler_type="constant",
                                weight_decay=0.1, betas=(0.9, 0.99))
    assert simulate(s)[10].update_scale < simulate(no_warm)[10].update_scale


def _spearman_numpy(x, y):
    """Pearson of argsort ranks (no ties in these planted values)."""
    rx = np.empty(len(x))
    rx[np.argsort(x)] = np.arange(len(x))
    ry = np.empty(len(y))
    ry[np.argsort(y)] = np.arange(len(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@pytest.mark.parametrize("noise", [0.0, 0.5])
@torch.no_grad()
def test_scale_confound_matches_numpy_spearman(tmp_path, noise):
    """A base whose matrices have distinct scales, a variant whose relative change is k / RMS
    (times planted noise): the probe's Spearman equals numpy's, and is 1 without noise."""
    from mechinterp.models import load

    g = torch.Generator().manual_seed(3)
    lm = load(TINY, device="cpu", dtype="float32")
    keys = [(layer, m) for layer in range(lm.n_layers) for m in lm.matrices]
    scales = torch.linspace(0.3, 3.0, len(keys))[torch.randperm(len(keys), generator=g)]
    for (layer, m), s in zip(keys, scales):
        lm.weight(layer, m).mul_(s)
    lm.hf.save_pretrained(tmp_path / "base")
    lm.tokenizer.save_pretrained(tmp_path / "base")
    for layer, m in keys:
        w = lm.weight(layer, m)
        rms = float(w.double().square().mean().sqrt())
        want = 1e-3 / rms * float(1 + noise * torch.rand((), generator=g))
        d = torch.randn(w.shape, generator=g, dtype=torch.float64)
        w.add_((d * want * w.double().norm() / d.norm()).float())
    lm.hf.save_pretrained(tmp_path / "var")
    lm.tokenizer.save_pretrained(tmp_path / "var")
    d = _run_probe(str(tmp_path / "base"), {"v": str(tmp_path / "var")})
    b, v = _stored(tmp_path / "base"), _stored(tmp_path / "var")
    rel, inv = [], []
    for layer, m in keys:
        ref = lm.param_slice(layer, m)
        wb = ref.take(torch.from_numpy(b[ref.name])).numpy()
        wv = ref.take(torch.from_numpy(v[ref.name])).numpy()
        rel.append(np.linalg.norm(wv - wb) / np.linalg.norm(wb))
        inv.append(1 / np.sqrt(np.mean(wb ** 2)))
    assert d["scale_confound"]["v"] == pytest.approx(_spearman_numpy(rel, inv), abs=1e-12)
    if noise == 0.0:
        assert d["scale_confound"]["v"] == pytest.approx(1.0, abs=1e-12)
    else:
        assert d["scale_confound"]["v"] < 0.99


class Snapshot(TrainerCallback):
    """The tracked matrices before the first step and after every step, float64 on the side."""

    def __init__(self, refs):
        self.refs, self.seen = refs, []

    def _take(self, model):
        return [ref.take(model.get_parameter(ref.name).detach()).double().clone()
                for _, _, ref in self.refs]

    def on_step_begin(self, args, state, control, model=None, **kw):
        if not self.seen:
            self.seen.append(self._take(model))

    def on_step_end(self, args, state, control, model=None, **kw):
        self.seen.append(self._take(model))


def test_logged_path_lengths_equal_norms_of_step_differences(tmp_path):
    from mechinterp.analysis.weights import matrix_refs
    from mechinterp.models import load
    from mechinterp.store.results import read_result
    from mechinterp.training.runner import train
    from mechinterp.training.settings import resolve_settings

    lm = load(TINY, device="cpu", dtype="float32")
    refs = matrix_refs(lm.family, lm.config)
    snap = Snapshot(refs)
    s = resolve_settings("sft", None, dict(
        base=TINY, max_steps=3, per_device_train_batch_size=2, max_length=768, checkpoints=1,
        n_heldout=0, learning_rate=1e-3, weight_decay=0.1, warmup_ratio=0.0, seed=0))
    out = tmp_path / "run"
    train(s, out, echo=lambda *_: None, callbacks=(snap,))
    d = read_result(out / "training-drift").data
    assert d["update_norm_steps"] == [1, 2, 3] and len(snap.seen) == 4
    for i in range(3):
        for k, (layer, m, _) in enumerate(refs):
            want = float(np.linalg.norm((snap.seen[i + 1][k] - snap.seen[i][k]).numpy()))
            assert d["update_norm"][m][i][layer] == pytest.approx(want, rel=1e-9)
            assert want > 0
    # the probe reads the log: coherence = displacement / the logged path
    got = _run_probe(TINY, {"sft": str(out)})
    assert got["coherence_source"]["sft"] == U.SOURCE_LOG
    assert got["update_scale_settings"]["sft"] == {
        "lr": 1e-3, "steps": 3, "source": str(out / "train-config.json")}
    for k, (layer, m, _) in enumerate(refs):
        seq = [w[k].numpy() for w in snap.seen]
        path = sum(np.linalg.norm(b - a) for a, b in zip(seq, seq[1:]))
        assert got["coherence"]["sft"][m][layer] == pytest.approx(
            np.linalg.norm(seq[-1] - seq[0]) / path, rel=1e-6)
    assert got["noise_floor"]["sft"]["settings"]["weight_decay"] == 0.1


@torch.no_grad()
def test_path_log_measures_gpt2_fused_slices_apart():
    """GPT-2's q/k/v are column slices of one c_attn: moving only v's third logs only v."""
    from mechinterp.models import load
    from mechinterp.training.driftlog import PathLog

    lm = load("tiny-random-gpt2", device="cpu", dtype="float32")
    log = PathLog(lm.family, lm.config)
    log.begin(lm.hf)
    before = lm.weight(0, "v").double().clone()
    lm.weight(0, "v").add_(1e-3)
    log.step(1, lm.hf)
    want = float(np.linalg.norm((lm.weight(0, "v").double() - before).numpy()))
    assert log.norms[0]["v"][0] == pytest.approx(want, rel=1e-9) and want > 0
    assert log.norms[0]["q"][0] == 0.0 and log.norms[0]["k"][0] == 0.0
    log.step(2, lm.hf)  # nothing moved since: the kept copy is current
    assert all(x == 0.0 for m in lm.matrices for x in log.norms[1][m])
    assert log.to_json()["update_norm_steps"] == [1, 2]
