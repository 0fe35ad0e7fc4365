"""Bad input and the result store: every probe option is checked when the config is
built (type and lower bound, one line, exit 2), variant names are checked in the Python API as on
the CLI, NaN and infinity survive a write and read of a result, and a result folder missing its
array file is a clear error. Each case failed (or raised a bare exception) before its fix."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import numpy as np
import pytest

from mechinterp.core.options import make_config
from mechinterp.core.registry import registry
from mechinterp.errors import SpecError, UserError
from mechinterp.store.results import Result, read_result, write_result

PROBES = sorted(registry())


def _numeric_fields(config_cls) -> list[str]:
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if f.name != "seed" and any(a in (int, float) for a in args):
            out.append(f.name)
    return out


@pytest.mark.parametrize("name", PROBES)
def test_every_numeric_option_rejects_negative_and_wrong_types(name):
    from mechinterp.core.options import bounds

    probe = registry()[name]
    fields = _numeric_fields(probe.Config)
    assert "limit" in fields  # every probe has the shared options
    signed = bounds(probe.Config)[1]  # declared free of sign (seeds)
    for field in (f for f in fields if f not in signed):
        with pytest.raises(UserError, match=rf"option {field}=\[?-1(\.0)?\]? of .* must be at least"):
            make_config(probe, {field: "-1"})
        listed = "list" in str({f.name: f.type for f in dataclasses.fields(probe.Config)}[field])
        with pytest.raises(UserError, match=field):  # from Python: a list where a number
            make_config(probe, {field: ["x"] if listed else [1, 2]})  # belongs, or a word in one
    make_config(probe)  # the defaults pass their own checks


@pytest.mark.parametrize("name,field", [("attention-shift", "batch_size"), ("mmlu", "token_budget"),
                                        ("damage-attribution", "window"),
                                        ("causal-trace", "samples"),
                                        ("task-accuracy", "max_new_tokens")])
def test_zero_where_zero_means_nothing(name, field):
    with pytest.raises(UserError, match=f"{field}=0 .* at least 1"):
        make_config(registry()[name], {field: "0"})


def test_types_from_python_are_checked_and_normalised():
    probe = registry()["causal-trace"]
    cfg = probe.Config(noise_scale=2)  # an int where a float belongs: accepted, as a float
    assert isinstance(cfg.noise_scale, float) and cfg.noise_scale == 2.0
    with pytest.raises(UserError, match="noise_mult=nan .* at least 0"):
        probe.Config(noise_mult=math.nan)
    with pytest.raises(UserError, match="samples=2.5 of causal-trace must be int"):
        probe.Config(samples=2.5)
    with pytest.raises(UserError, match="keep_wrong=1 .* must be bool"):
        probe.Config(keep_wrong=1)
    with pytest.raises(UserError, match="kinds='mlp' .* must be list"):
        probe.Config(kinds="mlp")  # a string is not a list of one string


def test_cli_bad_option_is_one_line_and_exit_2(capsys, tmp_path):
    from mechinterp.cli import main

    assert main(["run", "attention-shift", "--set", "batch_size=0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "batch_size=0" in err and "at least 1" in err
    assert not any(tmp_path.iterdir())


def test_variant_named_base_is_refused_in_python():
    from mechinterp.models import ModelSet

    with pytest.raises(SpecError, match="bad variant name 'base'"):
        ModelSet("tiny-random-llama", {"base": "tiny-random-llama"}, device="cpu")
    with pytest.raises(SpecError, match="bad variant name"):
        ModelSet("tiny-random-llama", {"a b": "tiny-random-llama"}, device="cpu")


def test_checkpoint_step_reads_suffixed_names():
    from mechinterp.paths import checkpoint_step

    assert checkpoint_step("sft@step-40-final") == 40
    assert checkpoint_step("sft@checkpoint-7") == 7
    assert checkpoint_step("sft@main") is None


def test_nan_and_inf_round_trip_exactly(tmp_path):
    data = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf, "d": [math.nan, 2.0]}],
            "e": np.array([0.5, np.nan]), "f": np.float64("nan"), "g": (math.nan, 3),
            "ok": 1.5, "none": None}
    prov = {"spearman": math.nan}
    res = Result("x", data, provenance=prov)
    write_result(res, tmp_path / "r")
    text = (tmp_path / "r" / "result.json").read_text()

    def refuse(tok):
        raise ValueError(tok)

    raw = json.loads(text, parse_constant=refuse)  # strict JSON: no NaN literal in the file
    assert raw["data"]["a"] is None and raw["data"]["b"][1] is None
    back = read_result(tmp_path / "r")
    d = back.data
    assert math.isnan(d["a"]) and d["b"][1] == math.inf and d["b"][2]["c"] == -math.inf
    assert math.isnan(d["b"][2]["d"][0]) and d["b"][2]["d"][1] == 2.0
    assert d["e"][0] == 0.5 and math.isnan(d["e"][1]) and math.isnan(d["f"])
    assert math.isnan(d["g"][0]) and d["g"][1] == 3
    assert d["ok"] == 1.5 and d["none"] is None  # a real None stays None
    assert math.isnan(back.provenance["spearman"])


def test_missing_array_file_is_a_user_error(tmp_path):
    write_result(Result("x", {"k": 1}, arrays={"grid": np.zeros((2, 2))}), tmp_path / "r")
    (tmp_path / "r" / "arrays.npz").unlink()
    with pytest.raises(UserError, match="arrays.npz is missing"):
        read_result(tmp_path / "r")


def test_run_probe_without_data_uses_the_data_root(monkeypatch, data_source, tmp_path):
    """``data=None`` from Python means what it means on the CLI: $MECHINTERP_DATA."""
    from mechinterp.core.runner import run_probe
    from mechinterp.models import ModelSet

    monkeypatch.setenv("MECHINTERP_DATA", str(data_source.root))
    probe = registry()["mmlu"]
    models = ModelSet("tiny-random-llama", {}, device="cpu")
    res = run_probe(probe, models, None, make_config(probe, {"formats": "cloze"}, limit=2))
    assert res.provenance["data"]["files"]  # the MMLU files it read are logged


def test_release_frees_the_weights_even_while_a_reference_lives(tmp_path):
    """Probes loop ``for v in variants: var = models[v]``: the previous variant stayed alive
    through ``var`` while the next one loaded (peak: base + two variants). ``release`` now frees
    the weights themselves; inside a probe run a model the caller loaded beforehand is kept."""
    import torch

    from mechinterp.models import ModelSet, load
    from mechinterp.models.edit import plant_change

    base = load("tiny-random-llama", device="cpu", dtype="float32")
    a = plant_change(base, tmp_path / "a", {(0, "q"): 0.1}, seed=0)
    b = plant_change(base, tmp_path / "b", {(1, "q"): 0.1}, seed=1)
    models = ModelSet("tiny-random-llama", {"a": str(a), "b": str(b)}, device="cpu")

    var = models["a"]
    models.release("a")
    assert all(p.device.type == "meta" for p in var.hf.parameters())  # no storage left
    fresh = models["a"]  # reloads on next access, intact
    assert fresh is not var and fresh.hf.model.embed_tokens.weight.device.type == "cpu"

    models.release("a")
    mine = models["b"]  # a notebook's own handle, loaded before the probe runs
    with models.run_scope():
        probes_own = models["a"]
        models.release("a")
        models.release("b")
    assert all(p.device.type == "meta" for p in probes_own.hf.parameters())  # the probe's: freed
    assert all(p.device.type == "cpu" for p in mine.hf.parameters())  # the caller's: kept
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(mine.hf(input_ids=ids).logits).all()


def test_quantisation_origin_is_inherited_and_a_mismatch_warns(tmp_path):
    """The default model is dequantised from a Q4_1 GGUF: a fine-tune of the *original* weights
    would pass every check and weight-change would report quantisation noise as fine-tuning."""
    import json
    import shutil

    from mechinterp.models import ModelSet
    from mechinterp.models.origin import write_gguf_origin
    from mechinterp.models.specs import quantisation_origin
    from mechinterp.models.zoo import fetch

    base = tmp_path / "dequantised"
    shutil.copytree(fetch("tiny-random-llama"), base)
    write_gguf_origin(base, "m.Q4_1.gguf", "MOSTLY_Q4_1", "ab" * 32)
    plain = tmp_path / "plain"
    shutil.copytree(fetch("tiny-random-llama"), plain)
    run = tmp_path / "run"  # a training output of the dequantised base: inherits its origin
    shutil.copytree(fetch("tiny-random-llama"), run / "checkpoints" / "step-2")
    (run / "train-config.json").write_text(json.dumps({"base": str(base)}))

    assert quantisation_origin(plain) is None
    got = quantisation_origin(run / "checkpoints" / "step-2")
    assert got["file_type"] == "MOSTLY_Q4_1" and got["inherited_from"] == str(base)
    with pytest.warns(UserWarning, match="variant 'orig' has plain weights, the base has "
                                         "dequantised from MOSTLY_Q4_1"):
        ModelSet(str(base), {"orig": str(plain)}, device="cpu")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms = ModelSet(str(base), {"sft": f"{run}@step-2"}, device="cpu")
    assert ms.provenance()["sft"]["quantisation_origin"]["file_type"] == "MOSTLY_Q4_1"


def test_weights_identity_follows_content_and_reads_each_content_once(tmp_path, monkeypatch):
    """Provenance hashed every byte of every checkpoint on every run (about 300 GB for a
    20-checkpoint 7B run); a stat-based id then let rewritten weights with an old mtime pass (issue
    22). Now: the SHA-256 of each file's content, computed once and cached by
    inode/size/mtime/ctime in our cache; hub blobs by their content address, read for free."""
    import os
    import shutil

    from mechinterp.models.safetensors_io import folder_hash, weights_identity
    from mechinterp.models.zoo import fetch
    from mechinterp.store import hashing

    src = fetch("tiny-random-llama")
    a = tmp_path / "a"
    shutil.copytree(src, a)
    ident = weights_identity(a)
    assert ident.startswith("sha256:") and weights_identity(a) == ident == weights_identity(src)
    # a re-save with other bytes changes it, even with the old mtime put back
    f = next(a.glob("*.safetensors"))
    mtime = f.stat().st_mtime_ns
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    os.utime(f, ns=(mtime, mtime))
    assert weights_identity(a) != ident

    # a hub-cache layout: snapshot files are symlinks to blobs named by their sha256
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    (hub / "snap").mkdir()
    blob = hub / "blobs" / ("c" * 64)
    shutil.copy(next(src.glob("*.safetensors")), blob)
    (hub / "snap" / "model.safetensors").symlink_to(blob)
    reads = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or "0" * 64)
    hub_id = weights_identity(hub / "snap")
    assert reads == [] and hub_id == "sha256:" + folder_hash(hub / "snap")
    blob.rename(hub / "blobs" / ("d" * 64))
    (hub / "snap" / "model.safetensors").unlink()
    (hub / "snap" / "model.safetensors").symlink_to(hub / "blobs" / ("d" * 64))
    assert weights_identity(hub / "snap") != hub_id  # another content address: other weights


def test_cli_strings_coerce_to_each_field_type():
    """``--set key=value`` strings: lists split on commas, Optional takes none, bools their words,
    numbers their type; a word that is none of these is an error naming the option."""
    ct = registry()["causal-trace"]
    cfg = make_config(ct, {"kinds": "hidden, mlp", "noise_scale": "none", "keep_wrong": "yes",
                           "samples": "4", "noise_mult": "2.5"})
    assert cfg.kinds == ["hidden", "mlp"] and cfg.noise_scale is None and cfg.keep_wrong is True
    assert cfg.samples == 4 and cfg.noise_mult == 2.5
    assert make_config(ct, {"noise_scale": "0.5"}).noise_scale == 0.5
    with pytest.raises(UserError, match="keep_wrong='maybe' of probe 'causal-trace' is not a valid bool"):
        make_config(ct, {"keep_wrong": "maybe"})
    with pytest.raises(UserError, match="has no option 'sample'"):
        make_config(ct, {"sample": "4"})


@pytest.mark.parametrize("name", PROBES)
def test_every_option_is_documented_with_type_default_and_meaning(name, capsys):
    """``mechinterp probes show`` and ``help(mi.probe(NAME))`` list each option with its type,
    default, lower bound and one line of meaning (taken from the Config's comments)."""
    import pydoc

    import mechinterp as mi
    from mechinterp.cli import main
    from mechinterp.core.options import options

    probe = mi.probe(name)
    opts = options(probe)
    assert {o["name"] for o in opts} == {f.name for f in dataclasses.fields(probe.Config)}
    assert all(o["meaning"] for o in opts), [o["name"] for o in opts if not o["meaning"]]
    text = pydoc.render_doc(probe, renderer=pydoc.plaintext)
    for o in opts:
        assert f"{o['name']} ({o['type']}, default {o['default']}" in " ".join(text.split())
    assert main(["probes", "show", name]) == 0
    shown = capsys.readouterr().out
    assert all(o["name"] in shown for o in opts)
