"""Spec resolution, zoo, ModelSet comparability and corrupt checkpoints."""

import json
import shutil
from pathlib import Path

import pytest

from mechinterp.errors import CorruptCheckpoint, IncompatibleModels, SpecError
from mechinterp.models import ModelSet, fetch, load, parse_variant_args, resolve
from mechinterp.models.safetensors_io import read_header


@pytest.fixture
def llama_dir(tmp_path):
    src = fetch("tiny-random-llama")
    dst = tmp_path / "llama"
    shutil.copytree(src, dst)
    return dst


def test_zoo_and_folder_resolve_to_the_same_files(llama_dir):
    z = resolve("tiny-random-llama")
    f = resolve(str(llama_dir))
    assert z.source == "zoo" and f.source == "local"
    assert z.weight_hash() == f.weight_hash()


def test_training_checkpoint_spec(llama_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama_dir, run / "checkpoints" / "step-4")
    r = resolve(f"{run}@step-4")
    assert r.path == run / "checkpoints" / "step-4" and r.revision == "step-4"
    with pytest.raises(SpecError, match="no checkpoint 'step-9'.*available: step-4"):
        resolve(f"{run}@step-9")


@pytest.mark.parametrize("spec,match", [
    ("no-such-model", "cannot resolve model spec"),
    ("tiny-random-llama@v1", "has no revisions"),
    ("/nonexistent/model.gguf", "does not exist"),
    ("", "empty model spec"),
    ("a/b@", "malformed spec"),
])
def test_bad_specs(spec, match):
    with pytest.raises(SpecError, match=match):
        resolve(spec)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SpecError, match="no .safetensors"):
        resolve(str(tmp_path))


def test_truncated_safetensors_is_named(llama_dir):
    f = next(llama_dir.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        read_header(f)
    with pytest.raises(CorruptCheckpoint, match=f.name):
        load(str(llama_dir))


def test_garbage_safetensors_is_named(llama_dir):
    f = next(llama_dir.glob("*.safetensors"))
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptCheckpoint, match="broken safetensors header"):
        load(str(llama_dir))


def test_parse_variant_args():
    assert parse_variant_args(["sft=a", "grpo=b@step-1, b@step-2"]) == {
        "sft": ["a"], "grpo": ["b@step-1", "b@step-2"]}
    for bad, match in [("nospec", "has no name"), ("base=x", "bad variant name"),
                       ("x=", "empty spec")]:
        with pytest.raises(SpecError, match=match):
            parse_variant_args([bad])
    with pytest.raises(SpecError, match="given twice"):
        parse_variant_args(["a=x", "a=y"])


def test_modelset_runs_and_lazy_loading(llama_dir, tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(llama_dir, run / "checkpoints" / f"step-{step}")
    ms = ModelSet.from_args("tiny-random-llama", [f"sft={run}@step-1,{run}@step-2",
                                                  f"other={llama_dir}"], device="cpu")
    assert ms.names == ["base", "sft@step-1", "sft@step-2", "other"]
    assert ms.runs == {"sft": ["sft@step-1", "sft@step-2"], "other": ["other"]}
    assert ms._loaded == {}
    assert ms["other"].name == "other"
    ms.release("other")
    assert "other" not in ms._loaded


def test_modelset_rejects_other_architecture():
    with pytest.raises(IncompatibleModels, match="variant 'g'.*gpt2.*base is llama"):
        ModelSet("tiny-random-llama", {"g": "tiny-random-gpt2"})


def test_modelset_rejects_other_shapes(llama_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig.from_pretrained(llama_dir)
    cfg.intermediate_size = 96
    other = llama_dir.parent / "wider"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    for f in llama_dir.glob("tokenizer*"):
        shutil.copy(f, other)
    with pytest.raises(IncompatibleModels, match=r"down_proj.weight has shape \(64, 96\).*\(64, 128\) in the base"):
        ModelSet("tiny-random-llama", {"w": str(other)})


def test_modelset_rejects_other_vocabulary(llama_dir):
    tok = json.loads((llama_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    key = next(k for k in vocab if len(k) > 3)
    vocab[key + "X"] = vocab.pop(key)
    (llama_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(IncompatibleModels, match="vocabulary"):
        ModelSet("tiny-random-llama", {"v": str(llama_dir)})


@pytest.mark.slow
def test_gguf_spec_roundtrip(tmp_path):
    """A GGUF file is a spec: converted once into the cache (we write one with the gguf package)."""
    from mechinterp.models.zoo import SMOLLM2_GGUF

    cached = Path(fetch("smollm2-135m-instruct"))
    gguf_file = cached.parent.parent / "downloads" / Path(SMOLLM2_GGUF).name
    assert gguf_file.exists()
    r = resolve(str(gguf_file))
    assert r.source == "gguf"
    assert r.weight_hash() == resolve("smollm2-135m-instruct").weight_hash()
