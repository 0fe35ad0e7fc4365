"""Issue 22, items 1, 2 and 9: a result is reused only when every input it read has the same
content (weights, config.json, tokenizer files, data files), checked through a content-hash cache
in our own cache folder that no size/mtime coincidence can fool; a result of other models is never
replaced without --overwrite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import mechinterp as mi
from mechinterp.cli import main
from mechinterp.errors import UserError
from mechinterp.models import fetch

SUBJECT = "abstract_algebra"


@pytest.fixture
def variant(tmp_path):
    """A local copy of tiny-random-llama: the variant whose files the tests change."""
    v = tmp_path / "v"
    shutil.copytree(fetch("tiny-random-llama"), v)
    return v


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    (root / "mmlu" / "test").mkdir(parents=True)
    src = Path(os.environ["MECHINTERP_DATA"]) / "mmlu" / "test" / f"{SUBJECT}_test.csv"
    shutil.copy2(src, root / "mmlu" / "test" / src.name)
    return root


def _mmlu(variant, data, out, said=None):
    return mi.run("mmlu", "tiny-random-llama", {"v": str(variant)}, data=str(data), out=out,
                  device="cpu", dtype="float32", reuse=True, echo=None if said is None else said.append,
                  subjects=[SUBJECT], limit=16, draw=False)


def _rotate_answers(csv: Path) -> None:
    """Every gold letter one on (A->B, ..., D->A): same size, other truth."""
    import csv as csvmod
    import io

    rows = list(csvmod.reader(io.StringIO(csv.read_text())))
    for r in rows:
        r[5] = "BCDA"["ABCD".index(r[5])]
    buf = io.StringIO()
    csvmod.writer(buf, lineterminator="\n").writerows(rows)
    csv.write_text(buf.getvalue())


def _same_mtime(path: Path, ref_ns: int) -> None:
    os.utime(path, ns=(ref_ns, ref_ns))


def test_changed_data_file_is_recomputed_not_reused(variant, data_root, tmp_path):
    """Repro 1: an MMLU copy with rotated answers was reused (stale accuracy)."""
    out, said = tmp_path / "out", []
    first = _mmlu(variant, data_root, out, said)
    rotated = tmp_path / "rotated"
    shutil.copytree(data_root, rotated)
    _rotate_answers(rotated / "mmlu" / "test" / f"{SUBJECT}_test.csv")
    again = _mmlu(variant, rotated, out, said)
    assert not again.provenance.get("reused")
    assert any(f"data file mmlu/test/{SUBJECT}_test.csv changed" in m for m in said), said
    fresh = _mmlu(variant, rotated, tmp_path / "fresh")
    assert again.data["accuracy"] == fresh.data["accuracy"] != first.data["accuracy"]
    # the same file changed in place with its size and mtime restored (cp -p / touch -r)
    csv = data_root / "mmlu" / "test" / f"{SUBJECT}_test.csv"
    assert _mmlu(variant, data_root, tmp_path / "o3").data == first.data
    mtime = csv.stat().st_mtime_ns
    _rotate_answers(csv)
    _same_mtime(csv, mtime)
    said.clear()
    in_place = _mmlu(variant, data_root, tmp_path / "o3", said)
    assert not in_place.provenance.get("reused") and any("changed" in m for m in said), said
    # an identical copy elsewhere is the same input: reused
    assert _mmlu(variant, rotated, out).provenance.get("reused") is True


def test_changed_config_or_tokenizer_is_recomputed(variant, data_root, tmp_path):
    """Repro 1: the variant's config.json (rms_norm_eps) or tokenizer changed -> reused before."""
    out, said = tmp_path / "out", []
    _mmlu(variant, data_root, out, said)
    cfg = json.loads((variant / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (variant / "config.json").write_text(json.dumps(cfg))
    again = _mmlu(variant, data_root, out, said)
    assert not again.provenance.get("reused") and any("config.json of v changed" in m
                                                       for m in said), said
    fresh = _mmlu(variant, data_root, tmp_path / "fresh")
    assert again.data["accuracy"] == fresh.data["accuracy"]
    tok = json.loads((variant / "tokenizer_config.json").read_text())
    tok["model_max_length"] = 12345
    (variant / "tokenizer_config.json").write_text(json.dumps(tok))
    said.clear()
    third = _mmlu(variant, data_root, out, said)
    assert not third.provenance.get("reused")
    assert any("tokenizer file tokenizer_config.json of v changed" in m for m in said), said
    assert _mmlu(variant, data_root, out).provenance.get("reused") is True


def test_weights_overwritten_with_restored_mtime_are_recomputed(variant, tmp_path):
    """Repro 2: new weights with the old size and mtime (cp -p, rsync -a, tar) were reused."""
    from mechinterp.models import load
    from mechinterp.models.edit import plant_change

    other = plant_change(load("tiny-random-llama", device="cpu", dtype="float32"),
                         tmp_path / "other", {(0, "q"): 0.5}, seed=1)
    f = variant / "model.safetensors"
    assert f.stat().st_size == (other / "model.safetensors").stat().st_size
    out, said = tmp_path / "out", []
    kw = dict(out=out, reuse=True, echo=said.append, sparsity=False, device="cpu")
    first = mi.run("weight-change", "tiny-random-llama", {"v": str(variant)}, **kw)
    assert first["relative_change"]["v"]["q"][0] == pytest.approx(0.0, abs=1e-9)
    mtime = f.stat().st_mtime_ns
    _same_mtime(other / "model.safetensors", mtime)
    subprocess.run(["cp", "-p", str(other / "model.safetensors"), str(f)], check=True)
    assert f.stat().st_mtime_ns == mtime
    again = mi.run("weight-change", "tiny-random-llama", {"v": str(variant)}, **kw)
    assert not again.provenance.get("reused") and any("weights of v changed" in m for m in said)
    assert again["relative_change"]["v"]["q"][0] == pytest.approx(0.5, rel=1e-3)
    # and back with `touch -r`: the original bytes, the mtime of the moment before
    shutil.copyfile(fetch("tiny-random-llama") / "model.safetensors", f)
    ref = tmp_path / "ref"
    ref.touch()
    _same_mtime(ref, mtime)
    subprocess.run(["touch", "-r", str(ref), str(f)], check=True)
    said.clear()
    back = mi.run("weight-change", "tiny-random-llama", {"v": str(variant)}, **kw)
    assert not back.provenance.get("reused") and any("weights of v changed" in m for m in said)
    assert back["relative_change"]["v"]["q"][0] == pytest.approx(0.0, abs=1e-9)


def test_content_hash_cache_lives_in_our_cache_and_never_goes_stale(tmp_path, monkeypatch):
    """Hash once per content; a re-check is a stat; cp -p / touch -r / rewrite re-hash; nothing is
    written beside the user's files (MECHINTERP_FULL_HASH used to write into the model folder)."""
    from mechinterp.store import hashing

    cache = tmp_path / "cache"
    monkeypatch.setattr(hashing, "cache_dir", lambda: cache)
    monkeypatch.setattr(hashing, "RACY_S", 0.0)
    reads: list[Path] = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(Path(p)) or real(p))
    user = tmp_path / "user"
    user.mkdir()
    f = user / "w.bin"
    f.write_bytes(b"a" * 1000)
    import hashlib

    assert hashing.content_hash(f) == hashlib.sha256(b"a" * 1000).hexdigest() and len(reads) == 1
    assert hashing.content_hash(f) == hashlib.sha256(b"a" * 1000).hexdigest() and len(reads) == 1
    assert sorted(p.name for p in user.iterdir()) == ["w.bin"]
    assert len(list((cache / "content-hashes").iterdir())) == 1
    mtime = f.stat().st_mtime_ns
    # same size, other bytes, mtime restored
    src = tmp_path / "src.bin"
    src.write_bytes(b"b" * 1000)
    _same_mtime(src, mtime)
    subprocess.run(["cp", "-p", str(src), str(f)], check=True)
    assert f.stat().st_mtime_ns == mtime
    assert hashing.content_hash(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(reads) == 2
    # touch -r alone (content unchanged) re-reads too: the ctime moved
    ref = tmp_path / "ref"
    ref.touch()
    subprocess.run(["touch", "-r", str(ref), str(f)], check=True)
    assert hashing.content_hash(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(reads) == 3
    # a recent change is hashed but not cached (a change in the same clock tick would not show)
    monkeypatch.setattr(hashing, "RACY_S", 3600.0)
    f.write_bytes(b"c" * 1000)
    hashing.content_hash(f)
    hashing.content_hash(f)
    assert len(reads) == 5


def test_weights_identity_follows_content_not_stat(variant):
    from mechinterp.models.safetensors_io import model_files, weights_identity

    src = fetch("tiny-random-llama")
    before = set(variant.iterdir())  # (a zoo folder built by an older version may hold its cache)
    assert weights_identity(variant) == weights_identity(src)  # same bytes, other inode
    files = model_files(variant)
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja"} <= set(files)
    assert set(variant.iterdir()) == before  # nothing written into the model's folder


def _eval(capsys, model, out, data, *extra):
    code = main(["eval", "mmlu", "--model", model, "--subjects", SUBJECT, "--limit", "4",
                 "--data-dir", str(data), "--out", str(out), "--device", "cpu", *extra])
    return code, capsys.readouterr().err.strip()


def test_result_of_other_models_is_refused_without_overwrite(tmp_path, data_root, capsys):
    """Repro 9: `eval mmlu --model B --out O` destroyed model A's result with one line."""
    out = tmp_path / "out"
    code, err = _eval(capsys, "tiny-random-llama", out, data_root)
    assert code == 0, err
    stored = (out / "mmlu" / "result.json").read_bytes()
    code, err = _eval(capsys, "tiny-random-qwen2", out, data_root)
    assert code == 2 and "--overwrite" in err and "other models" in err, err
    assert len(err.splitlines()) == 1 and (out / "mmlu" / "result.json").read_bytes() == stored
    code, err = _eval(capsys, "tiny-random-qwen2", out, data_root, "--overwrite")
    assert code == 0, err
    prov = json.loads((out / "mmlu" / "result.json").read_text())["provenance"]
    assert prov["model_identity"]["base"]["spec"] == "tiny-random-qwen2"
    with pytest.raises(UserError, match="--overwrite"):  # the Python API the same
        mi.run("mmlu", "tiny-random-llama", data=str(data_root), out=out, device="cpu",
               subjects=[SUBJECT], limit=4)
