"""End-to-end training on tiny models: freezing is bit-exact, snapshots load as specs, drift numbers
match an independent computation, --resume after an interruption reproduces the uninterrupted run,
and a NaN loss or a full disk stops with the last good checkpoint intact."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mechinterp.errors import UserError
from mechinterp.training import callbacks as cb_mod
from mechinterp.training.runner import train
from mechinterp.training.settings import resolve_settings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SFT = dict(base="tiny-random-llama", max_steps=4, per_device_train_batch_size=2,
                max_length=768, checkpoints=2, n_heldout=2, heldout_max_length=768,
                learning_rate=1e-3, weight_decay=0.1, warmup_ratio=0.0, seed=0)
SLICED = "attn.heads@1:0,mlp.neurons@2:{file},embed"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def assert_frozen_exactly(base_spec: str, spec: str, tuned_folder: Path, weight_decay: bool) -> int:
    """Every frozen tensor and slice bit-identical to the base; every trainable tensor moved."""
    from mechinterp.models import load
    from mechinterp.models.selectors import plan

    lm = load(base_spec, device="cpu", dtype="float32")
    p = plan(lm.hf, spec)
    base = {n: t.detach() for n, t in lm.hf.named_parameters()}
    tuned = _weights(tuned_folder)
    checked = 0
    for name, b in base.items():
        t = tuned[name] if name in tuned else tuned["lm_head.weight" if "embed" in name else name]
        if name in p.whole:
            assert torch.equal(t, b), f"{name} moved although frozen"
        elif name in p.partial:
            m = p.partial[name]
            assert torch.equal(t[m], b[m]), f"frozen slice of {name} moved"
            assert not torch.equal(t[~m], b[~m]), f"trainable part of {name} did not move"
        elif weight_decay or "norm" not in name:
            assert not torch.equal(t, b), f"{name} did not move"
        checked += 1
    assert p.partial, "the spec should exercise sliced freezing"
    return checked


@pytest.fixture(scope="module")
def neuron_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("idx") / "neurons.txt"
    f.write_text("0 5 17\n64\n")
    return f


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, neuron_file):
    out = tmp_path_factory.mktemp("sft") / "run"
    spec = SLICED.format(file=neuron_file)
    s = resolve_settings("sft", None, {**TINY_SFT, "freeze": spec})
    res = train(s, out, echo=lambda *_: None)
    return out, spec, res


def test_sft_freezes_exactly_and_snapshots_load(sft_run):
    from mechinterp.models import resolve
    from mechinterp.models.modelset import ModelSet

    out, spec, res = sft_run
    assert res.steps == 4 and res.checkpoints == ["step-2", "step-4"]
    for folder in (out, out / "checkpoints" / "step-2"):
        assert_frozen_exactly("tiny-random-llama", spec, folder, weight_decay=True)
    final, last = _weights(out), _weights(out / "checkpoints" / "step-4")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert resolve(f"{out}@step-2").path == out / "checkpoints" / "step-2"
    ms = ModelSet.from_args("tiny-random-llama", [f"sft={out}@step-2,{out}@step-4", f"final={out}"],
                            device="cpu", dtype="float32")
    assert ms.runs["sft"] == ["sft@step-2", "sft@step-4"]
    assert ms["sft@step-4"].tokenizer.chat_template


def test_drift_log_matches_independent_computation(sft_run):
    from mechinterp.analysis.weights import weight_change
    from mechinterp.core.runner import redraw
    from mechinterp.data.items import load_items, pick
    from mechinterp.data.qa import prompt_messages, render_target
    from mechinterp.models import load, resolve
    from mechinterp.store.results import read_result
    from mechinterp.training.drift import answer_logprobs, build_heldout, kl_per_item

    out, _, _ = sft_run
    r = read_result(out / "training-drift")
    d = r.data
    assert r.probe == "training-drift" and d["steps"] == [2, 4] and d["n_heldout"] == 2
    base = resolve("tiny-random-llama").path
    _, _, ref = weight_change(base, {c: out / "checkpoints" / c for c in d["checkpoints"]})
    for i, c in enumerate(d["checkpoints"]):
        for m in d["matrices"]:
            assert d["relative_change"][m][i] == pytest.approx(ref[c][m], rel=1e-9)
    assert all(v > 0 for v in ref["step-4"]["up"])
    # the log as one long table: each checkpoint a model, with its run and step
    df = r.to_frame()
    assert df.run.nunique() == 1 and sorted(df.step.unique()) == [2, 4]
    for i, step in enumerate(d["steps"]):
        got = df.query(f"metric == 'relative_change' and step == {step} and component == 'up'")
        assert got.sort_values("layer").value.tolist() == d["relative_change"]["up"][i]
        assert df.query(f"metric == 'kl' and step == {step}").value.item() == d["kl"][i]
    # KL recomputed from the saved checkpoint, on the held-out items rebuilt from scratch
    from mechinterp.data import DataSource

    items = pick(load_items("gsm8k", DataSource.from_option(None), "test"), 2, 0)
    b, t = load("tiny-random-llama", device="cpu"), load(f"{out}@step-4", device="cpu")
    held = build_heldout(b.tokenizer, [prompt_messages(i.question) for i in items],
                         [render_target(i) for i in items], 768)
    per = kl_per_item(answer_logprobs(b.hf, held), answer_logprobs(t.hf, held))
    assert d["kl_per_item"][-1] == pytest.approx(per, rel=1e-4)
    assert d["kl"][-1] > d["kl"][0] > 0
    assert [h["step"] for h in d["history"]] == [1, 2, 3, 4]
    names = {p.name for p in redraw(out)}
    assert {"drift_weight_change.png", "drift_kl.png", "drift_final_heatmap.png",
            "drift_history.png"} <= names


class Killed(Exception):
    pass


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def test_resume_after_interruption_reproduces_the_run(sft_run, tmp_path, neuron_file):
    from mechinterp.store.results import read_result
    from mechinterp.training.runner import resume_settings

    ref_out, spec, _ = sft_run
    out = tmp_path / "run"
    s = resolve_settings("sft", None, {**TINY_SFT, "freeze": spec})
    with pytest.raises(Killed):
        train(s, out, echo=lambda *_: None, callbacks=(KillAt(3),))
    assert (out / "checkpoints" / "step-2").is_dir() and not (out / "config.json").exists()
    # what a kill during the next save would leave behind
    (out / "trainer-state" / "checkpoint-4").mkdir()
    (out / "trainer-state" / "checkpoint-4" / "model.safetensors").write_bytes(b"partial")
    (out / "checkpoints" / ".tmp-step-4").mkdir()
    with pytest.raises(UserError, match="differ from the run"):
        resume_settings(out, {"learning_rate": 5.0})
    msgs = []
    res = train(resume_settings(out, {}), out, resume=True, echo=msgs.append)
    assert any("resuming from" in m and "checkpoint-2" in m for m in msgs)
    assert res.steps == 4
    ref, got = _weights(ref_out), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed run differs from uninterrupted"
    assert not (out / "checkpoints" / ".tmp-step-4").exists()
    assert [p.name for p in (out / "trainer-state").glob("checkpoint-*")] == ["checkpoint-4"]
    a, b = read_result(ref_out / "training-drift").data, read_result(out / "training-drift").data
    assert a["steps"] == b["steps"] == [2, 4]
    assert a["relative_change"] == b["relative_change"] and a["kl"] == pytest.approx(b["kl"])
    # the per-step path: steps 1-2 kept from the interrupted log, 3-4 measured after resuming
    assert a["update_norm_steps"] == b["update_norm_steps"] == [1, 2, 3, 4]
    assert a["update_norm"] == b["update_norm"]
    with pytest.raises(UserError, match="already holds a training run"):
        train(s, out)


class PoisonAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    s = resolve_settings("sft", None, {**TINY_SFT, "n_heldout": 0})
    with pytest.raises(UserError, match=r"non-finite loss.*step 4.*last good checkpoint: .*@step-2"):
        train(s, out, echo=lambda *_: None, callbacks=(PoisonAt(3),))
    assert not (out / "checkpoints" / "step-4").exists() and not (out / "config.json").exists()
    w = _weights(out / "checkpoints" / "step-2")
    assert all(torch.isfinite(t).all() for t in w.values())
    assert [p.name for p in (out / "trainer-state").glob("checkpoint-*")] == ["checkpoint-2"]


def _fail_at_step_4(monkeypatch, where: str) -> None:
    """Make the step-4 checkpoint write fail as a full disk does in each writer it goes through,
    with the exception type and text each raises on a full disk (measured on small tmpfs mounts:
    safetensors' text, and torch.save's 'unexpected pos' and 'iostream error' while training)."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def at_step_4(path) -> bool:
        return "checkpoint-4" in str(path) or ".tmp-step-4" in str(path)

    if where == "snapshot copy (OSError)":
        real = cb_mod.link_or_copy

        def full_disk(src, dst):
            if at_step_4(dst):
                raise OSError(errno.ENOSPC, "No space left on device")
            real(src, dst)

        monkeypatch.setattr(cb_mod, "link_or_copy", full_disk)
    elif where == "save_pretrained (SafetensorError)":
        real_st = mu.safe_save_file

        def st_full(tensors, filename, *a, **kw):
            if at_step_4(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on "
                                      "device (os error 28)")
            return real_st(tensors, filename, *a, **kw)

        monkeypatch.setattr(mu, "safe_save_file", st_full)
    else:
        real_save = torch.save
        text = {"unexpected pos": "[enforce fail at inline_container.cc:672] . unexpected pos "
                                  "9408 vs 9300",
                "iostream": "basic_ios::clear: iostream error",
                "file write failed": "[enforce fail at inline_container.cc:858] . "
                "PytorchStreamWriter failed writing file data/0: file write failed"}[
            where.split(", ")[1].rstrip(")")]

        def torch_full(obj, f, *a, **kw):
            if at_step_4(f):
                raise RuntimeError(text)
            return real_save(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", torch_full)


@pytest.mark.parametrize("where", ["snapshot copy (OSError)", "save_pretrained (SafetensorError)",
                                   "torch.save (RuntimeError, unexpected pos)",
                                   "torch.save (RuntimeError, iostream)",
                                   "torch.save (RuntimeError, file write failed)"])
def test_out_of_disk_stops_cleanly(tmp_path, monkeypatch, where):
    """A full disk while saving step 4 stops with one line and the step-2 checkpoint intact,
    whichever writer hit it (an OSError, a SafetensorError or one of torch.save's RuntimeErrors)."""
    out = tmp_path / "run"
    _fail_at_step_4(monkeypatch, where)
    s = resolve_settings("sft", None, {**TINY_SFT, "n_heldout": 0})
    with pytest.raises(UserError, match=r"training stopped: (out of disk space|a file write "
                                        r"failed \(.* GB free .*\)) while saving; last good "
                                        r"checkpoint: .*@step-2 .*free space, then rerun with "
                                        r"--resume"):
        train(s, out, echo=lambda *_: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert [p.name for p in (out / "trainer-state").glob("checkpoint-*")] == ["checkpoint-2"]
    assert _weights(out / "checkpoints" / "step-2")


def test_a_runtime_error_that_is_no_failed_write_keeps_its_traceback(tmp_path):
    from mechinterp.training.callbacks import save_failure

    assert save_failure(RuntimeError("CUDA out of memory"), tmp_path) is None
    assert save_failure(ValueError("No space left on device"), tmp_path) is None
    assert save_failure(RuntimeError("... file write failed"), tmp_path).startswith(
        "a file write failed (")


def test_grpo_freezes_exactly(tmp_path):
    from mechinterp.training.rewards import completion_text

    def length_reward(prompts, completions, **_):  # random tiny models never earn the maths rewards
        return [len(completion_text(c)) / 10.0 for c in completions]

    spec = "attn.heads@0:1,mlp@1,norm"
    s = resolve_settings("grpo", "cpu-smoke", dict(
        base="tiny-random-qwen2", max_steps=2, checkpoints=1, max_completion_length=12,
        n_heldout=1, heldout_max_length=768, learning_rate=1e-3, weight_decay=0.1,
        warmup_ratio=0.0, temperature=1.0, freeze=spec, extra={"reward_weights": [1.0]}))
    res = train(s, tmp_path / "run", echo=lambda *_: None, reward_funcs=[length_reward])
    assert res.steps == 2
    assert_frozen_exactly("tiny-random-qwen2", spec, tmp_path / "run", weight_decay=True)
    assert res.final["kl"] > 0
