"""Issue 22, items 3 and 4 (names) and the 0700 folders of item 8: a result folder is committed
whole (result.json, arrays, tables and figures) or not at all; reuse checks every file it owns;
a malformed result.json is recomputed; model names that are not file names are mapped."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mechinterp as mi
from mechinterp.models import fetch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def variant(tmp_path):
    from mechinterp.models import load
    from mechinterp.models.edit import plant_change

    return plant_change(load("tiny-random-llama", device="cpu", dtype="float32"),
                        tmp_path / "v", {(0, "q"): 0.1}, seed=0)


def _wc(variant, out, said=None, **kw):
    return mi.run("weight-change", "tiny-random-llama", {"v": str(variant)}, out=out, reuse=True,
                  device="cpu", sparsity=False, echo=None if said is None else said.append, **kw)


def _figures(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".pdf"))


def _temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.is_dir())


def _killed_run(variant, out, where: str) -> int:
    """Run weight-change in a child that kill -9s itself when it starts drawing (``plot``) or on
    its second figure file (``savefig``, inside the result write)."""
    code = f"""
import os, signal
import mechinterp as mi
from mechinterp.core.registry import get_probe
import matplotlib.figure
p = get_probe("weight-change")
calls = []
def die(*a, **k):
    calls.append(1)
    if {where!r} == "plot" or len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
if {where!r} == "plot":
    real = type(p).plot
    type(p).plot = die
else:
    real = matplotlib.figure.Figure.savefig
    matplotlib.figure.Figure.savefig = die
mi.run(p, "tiny-random-llama", {{"v": {str(variant)!r}}}, out={str(out)!r}, reuse=True,
       device="cpu", sparsity=False)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT).returncode


@pytest.mark.parametrize("where", ["plot", "savefig"])
def test_kill_before_figures_are_written_is_not_reused(variant, tmp_path, where):
    """Repro 3: kill -9 once result.json exists but before the figures -> re-run reused it,
    figureless."""
    out = tmp_path / "out"
    assert _killed_run(variant, out, where) == -9
    said: list[str] = []
    res = _wc(variant, out, said)
    assert not res.provenance.get("reused"), said
    folder = out / "weight-change"
    stored = json.loads((folder / "result.json").read_text())
    drawn = sorted(f for files in stored["figures"].values() for f in files)
    assert drawn and _figures(folder) == drawn
    assert _temps(out) == []
    clean = _wc(variant, tmp_path / "clean")
    assert _figures(tmp_path / "clean" / "weight-change") == drawn
    assert json.dumps(clean.data, sort_keys=True) == json.dumps(res.data, sort_keys=True)  # NaN too


def test_truncated_or_missing_figure_is_drawn_again_on_reuse(variant, tmp_path):
    """Repro 3: a truncated PDF (a full disk mid-figure) was accepted by reuse."""
    out = tmp_path / "out"
    _wc(variant, out)
    folder = out / "weight-change"
    owned = json.loads((folder / "result.json").read_text())["owned"]
    pdf = sorted(folder.glob("*.pdf"))[0]
    whole = pdf.read_bytes()
    pdf.write_bytes(whole[: len(whole) // 2])
    said: list[str] = []
    res = _wc(variant, out, said)
    assert res.provenance.get("reused") and any("drawing the figures" in m for m in said), said
    assert pdf.stat().st_size == owned[pdf.name]["size"] and pdf.read_bytes().rstrip().endswith(
        b"%%EOF")
    png = sorted(folder.glob("*.png"))[0]
    png.unlink()
    _wc(variant, out)
    assert png.is_file()
    # a damaged data file (arrays, tables, item rows) means a recompute
    table = next(p for p in folder.iterdir() if p.suffix in (".parquet", ".npz", ".jsonl"))
    table.write_bytes(b"broken")
    said.clear()
    again = _wc(variant, out, said)
    assert not again.provenance.get("reused") and any("incomplete" in m for m in said), said


def test_full_disk_while_writing_figures_keeps_the_previous_result(variant, tmp_path,
                                                                   monkeypatch):
    """A full disk mid-figure: one-line error, the previous result untouched, no temp folder."""
    from matplotlib.figure import Figure

    from mechinterp.errors import UserError

    out = tmp_path / "out"
    _wc(variant, out)
    before = {p.name: p.read_bytes() for p in (out / "weight-change").iterdir()}

    def full(self, fname, *a, **k):
        Path(fname).write_bytes(b"%PDF-1.4 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(UserError, match="no space left"):
        _wc(variant, out, seed=7)
    assert {p.name: p.read_bytes() for p in (out / "weight-change").iterdir()} == before
    assert _temps(out) == []


@pytest.mark.parametrize("payload", [
    {"probe": "weight-change"},
    {"data": {"x": 1}},
    [1, 2],
    {"probe": "weight-change", "data": {}, "provenance": {"probe_version": "1"}},
    {"probe": "weight-change", "data": {}, "provenance": {"probe_version": "1",
                                                          "model_identity": {"base": {}}}},
    {"probe": "weight-change", "data": {}, "provenance": [], "nonfinite": {"data": [[["a"],
                                                                                     "nan"]]}},
])
def test_malformed_result_json_is_recomputed_not_a_keyerror(variant, tmp_path, payload):
    """Item 7: a result.json missing keys gave KeyError in reuse instead of recomputing."""
    out = tmp_path / "out"
    (out / "weight-change").mkdir(parents=True)
    (out / "weight-change" / "result.json").write_text(json.dumps(payload))
    said: list[str] = []
    res = _wc(variant, out, said)
    assert not res.provenance.get("reused") and res["relative_change"]["v"]["q"][0] > 0
    assert any("replacing" in m for m in said), said


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_result_folders_follow_the_umask(tmp_path, umask):
    """Item 8: result folders were created 0700 whatever the umask (tempfile.mkdtemp)."""
    from mechinterp.store.results import Result, write_result

    old = os.umask(umask)
    try:
        write_result(Result("x", {"a": 1}), tmp_path / "out" / "x")
        write_result(Result("x", {"a": 2}), tmp_path / "out" / "x")  # the replacing path too
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "x").stat().st_mode & 0o777 == 0o777 & ~umask


def test_checkpoint_labels_with_slashes_are_safe_file_names(tmp_path, monkeypatch):
    """Repro 4: a checkpoint label with '/' (run@sub/step-2, a hub revision refs/pr/1) became a
    path in the item file name and lost the computed run with a traceback."""
    run = tmp_path / "run"
    for rev in ("sub/step-2", "step-4"):
        shutil.copytree(fetch("tiny-random-llama"), run / "checkpoints" / rev)
    data = Path(os.environ["MECHINTERP_DATA"])
    out = tmp_path / "out"
    res = mi.run("mmlu", "tiny-random-llama", {"sft": [f"{run}@sub/step-2", f"{run}@step-4"]},
                 data=str(data), out=out, device="cpu", subjects=["abstract_algebra"], limit=4)
    key = "items_sft@sub/step-2_letter-0shot.jsonl"
    assert key in res.files
    folder = out / "mmlu"
    assert all(p.parent == folder for p in folder.rglob("*"))  # no sub-folder made of a label
    back = mi.read_result(folder)
    assert back.files == res.files and back.data == json.loads(json.dumps(res.data))
