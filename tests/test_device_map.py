"""Models placed by accelerate's big-model inference (``device_map``): on this CPU the layers go
to "cpu" and "disk" (offloaded, brought in per forward pass) through ``max_memory``; logits,
captured and patched activations and probes' numbers must equal the single-device run, and a
probe must hold the base and one variant at a time."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mechinterp.analysis.patching import Patch, capture, model_logits, run_patched
from mechinterp.errors import UserError
from mechinterp.models import load
from mechinterp.models.device import input_device, parse_max_memory
from mechinterp.models.edit import plant_change
from mechinterp.models.modelset import ModelSet
from mechinterp.core.options import make_config
from mechinterp.core.registry import get_probe
from mechinterp.core.runner import run_probe

SPECS = ("tiny-random-llama", "tiny-random-gpt2")  # untied head / tied embeddings


def _weight_bytes(spec: str) -> int:
    m = load(spec, device="cpu", dtype="float32")
    return sum(p.numel() * p.element_size() for p in m.hf.parameters())


def _placed(spec: str, fraction: float, name: str = "model"):
    """``spec`` with ``max_memory`` allowing ``fraction`` of its weights on the CPU; the rest goes
    to disk (fraction 0.3: accelerate puts the whole model on disk, embeddings included)."""
    cap = int(_weight_bytes(spec) * fraction)
    return load(spec, device="cpu", dtype="float32", device_map="auto",
                max_memory={"cpu": cap}, name=name)


@pytest.fixture(scope="module", params=[(s, f) for s in SPECS for f in (0.3, 0.7)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request):
    spec, fraction = request.param
    return load(spec, device="cpu", dtype="float32"), _placed(spec, fraction)


def test_placement_really_offloads(pair):
    ref, m = pair
    assert "disk" in m.placement.values()  # not a one-device model in disguise
    metas = [n for n, p in m.hf.named_parameters() if p.device.type == "meta"]
    assert metas and len(metas) < len(list(ref.hf.parameters())) + 1
    assert m.device == torch.device("cpu") == input_device(m.hf)


def test_logits_activations_and_patches_equal_the_one_device_run(pair):
    ref, m = pair
    ids = ref.tokenizer(["The capital of France is", "Tokyo is the capital of"],
                        return_tensors="pt", padding=True)
    x, mask = ids.input_ids, ids.attention_mask
    torch.testing.assert_close(model_logits(m, x, mask), model_logits(ref, x, mask),
                               atol=0, rtol=0)
    sites = [("resid_pre", 1), ("attn_out", 2), ("mlp_out", 1), ("resid_post", 3)]
    _, want = capture(ref, x, mask, sites)
    _, got = capture(m, x, mask, sites)
    for key in sites:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    patches = [Patch("mlp_out", 1, torch.zeros(1, x.shape[1], ref.config.hidden_size),
                     rows=torch.tensor([1])),
               Patch("resid_pre", 3, want[("resid_pre", 1)][:, 1:3] * 2,
                     positions=torch.tensor([1, 2]))]
    clean = model_logits(ref, x, mask)
    patched = run_patched(ref, x, mask, patches)
    assert (patched - clean).abs().max() > 1e-2  # the patches do something
    torch.testing.assert_close(run_patched(m, x, mask, patches), patched, atol=0, rtol=0)


def test_views_work_over_an_offloaded_model(pair):
    ref, m = pair
    ids = ref.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref.hf(ids).logits
        tl = m.bridge(ids, return_type="logits")
    torch.testing.assert_close(tl, want, atol=1e-5, rtol=0)
    if m.placement.get("") == "disk":  # wholly offloaded: nnsight cannot wrap it, and says so
        with pytest.raises(UserError, match="nnsight view"):
            _ = m.lm
        return
    with m.lm.trace(ids):
        out = m.lm.output.save()
    torch.testing.assert_close(out.logits.detach(), want, atol=0, rtol=0)


def test_offloaded_weight_cannot_be_edited_in_place(pair):
    _, m = pair
    layer = m.n_layers - 1  # the last block is on disk in both placements
    with pytest.raises(UserError, match="offloaded"):
        m.weight(layer, m.matrices[-1])


def test_free_releases_hooks_and_our_offload_folder():
    m = _placed("tiny-random-llama", 0.5)
    from pathlib import Path

    folder = Path(m._offload_dir)
    assert folder.is_dir()
    m.free()
    assert not folder.exists()
    assert all(p.device.type == "meta" for p in m.hf.parameters())
    assert not any(hasattr(mod, "_hf_hook") for mod in m.hf.modules())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model = load("tiny-random-llama", device="cpu", dtype="float32")
    root = tmp_path_factory.mktemp("v")
    return {name: str(plant_change(model, root / name, {(1, "down"): scale, (2, "up"): scale},
                                   seed=seed))
            for name, scale, seed in (("a", 0.5, 1), ("b", 0.3, 2))}


def _both(planted, probe_name, options, limit, data_source, only="a"):
    probe = get_probe(probe_name)
    cfg = make_config(probe, options, seed=0, limit=limit)
    cap = int(_weight_bytes("tiny-random-llama") * 0.5)
    out = {}
    for placed in (False, True):
        kw = dict(device_map="auto", max_memory=f"cpu={cap}") if placed else {}
        ms = ModelSet("tiny-random-llama", {only: planted[only]}, device="cpu", dtype="float32",
                      **kw)
        out[placed] = run_probe(probe, ms, data_source, cfg)
        if placed:
            assert "disk" in ms.base.placement.values()
            assert out[placed].provenance["placement"]["device_map"] == "auto"
    return out[False].data, out[True].data


@pytest.mark.slow  # CPU/disk-offloaded forwards: tens of seconds on 2 shared cores
def test_mlp_patching_numbers_equal_the_one_device_run(planted, data_source):
    one, placed = _both(planted, "mlp-patching", {"prompt_sets": "knowns", "sites": "mlp,resid"},
                        3, data_source)
    rec = one["recovery"]["a"]
    assert np.nanmax(np.abs(rec["resid"]["denoise"])) > 0.5  # a real signal, not all zeros
    assert placed["recovery"] == one["recovery"]


@pytest.mark.slow  # CPU/disk-offloaded forwards: tens of seconds on 2 shared cores
def test_causal_trace_numbers_equal_the_one_device_run(planted, data_source):
    one, placed = _both(planted, "causal-trace", {"samples": "2", "window": "2",
                                                  "keep_wrong": "true", "max_fact_figures": "1"},
                        1, data_source)
    assert one["n_facts"] == {"base": 1, "a": 1}
    np.testing.assert_allclose(np.array(placed["aie"]["a"]["hidden"]["last"]),
                               np.array(one["aie"]["a"]["hidden"]["last"]), atol=1e-6, rtol=0)
    assert placed["noise_scale"] == pytest.approx(one["noise_scale"], abs=1e-9)
    for kind in ("hidden", "mlp", "attn"):
        for name in ("base", "a"):
            for group, vals in one["aie"][name][kind].items():
                np.testing.assert_allclose(placed["aie"][name][kind][group], vals, atol=1e-6)


@pytest.mark.slow  # CPU/disk-offloaded forwards: tens of seconds on 2 shared cores
def test_kl_drift_one_variant_resident_at_a_time(planted, data_source, monkeypatch):
    """Two variants on a placed base: equal KL, and at no time more than base + one variant
    loaded and not yet freed."""
    import mechinterp.models.modelset as modelset

    live: list = []
    peak = [0]
    real_load = modelset.load

    def counting_load(*a, **kw):
        m = real_load(*a, **kw)
        free = m.free

        def freeing():
            live.remove(m)
            free()
        m.free = freeing
        live.append(m)
        peak[0] = max(peak[0], len(live))
        return m

    probe = get_probe("kl-drift")
    cfg = make_config(probe, {"items": "arithmetic"}, seed=0, limit=4)
    cap = int(_weight_bytes("tiny-random-llama") * 0.5)
    ref = run_probe(probe, ModelSet("tiny-random-llama", planted, device="cpu",
                                    dtype="float32"), data_source, cfg).data
    monkeypatch.setattr(modelset, "load", counting_load)
    ms = ModelSet("tiny-random-llama", planted, device="cpu", dtype="float32",
                  device_map="auto", max_memory={"cpu": cap})
    got = run_probe(probe, ms, data_source, cfg).data
    assert peak[0] == 2 and [m.name for m in live] == ["base"]
    assert ref["kl"]["a"] > 0 and ref["kl"]["b"] > 0
    for v in ("a", "b"):
        assert got["kl"][v] == pytest.approx(ref["kl"][v], rel=1e-6, abs=1e-9)


def test_weight_change_streams_and_loads_no_model(planted, monkeypatch):
    import mechinterp.models.modelset as modelset

    def no_load(*a, **kw):
        raise AssertionError("weight-change loaded a whole model")

    monkeypatch.setattr(modelset, "load", no_load)
    ms = ModelSet("tiny-random-llama", {"a": planted["a"]}, device="cpu", device_map="auto",
                  max_memory="cpu=1000")
    res = run_probe(get_probe("weight-change"), ms, None,
                    make_config(get_probe("weight-change"), {}))
    rel = res.data["relative_change"]["a"]
    assert rel["down"][1] > 0 and rel["down"][0] == 0


def test_max_memory_parsing_and_bad_options():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB",
                                                               "cpu": "200GiB"}
    for bad in ("0:70GiB", "gpu=1GB", "0=", ""):
        with pytest.raises(UserError, match="DEVICE=SIZE"):
            parse_max_memory(bad)
    with pytest.raises(UserError, match="device map"):
        ModelSet("tiny-random-llama", device_map="everywhere")


def test_cli_device_map_options(planted, tmp_path):
    from mechinterp.cli import app, main

    res = CliRunner().invoke(app, ["run", "weight-change", "--base", "tiny-random-llama",
                                   "--variant", f"a={planted['a']}", "--device-map", "auto",
                                   "--max-memory", "cpu=1GiB", "--out", str(tmp_path),
                                   "--no-figures"])
    assert res.exit_code == 0, res.output
    assert main(["run", "weight-change", "--base", "tiny-random-llama", "--device-map", "auto",
                 "--max-memory", "cpu:1GiB", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # ~20 s of CPU (a minute on the shared machine)
def test_gpu_check_script_runs_on_cpu_and_prints_its_table():
    """benchmarks/gpu_check.py, as a GPU user runs it, on a tiny model in float32 on the CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--model",
                           "tiny-random-llama", "--device", "cpu", "--dtype", "float32",
                           "--cells", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(("ok", "FAIL"))
            or "  ok  " in line or "  FAIL  " in line]
    assert len(rows) >= 8 and not any("FAIL" in r for r in rows)
    assert "0 failed" in proc.stdout
