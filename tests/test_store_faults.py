"""Issue 22, item 4 and the fault-injection test: outputs are checked before any work (an --out
that is a file, unwritable or on a full disk stops with one line, exit 2, before a model is
loaded), and a compare killed with SIGKILL at seeded points all over its run, then re-run, ends
with exactly the claims, result data and figures of an uninterrupted run and no temporary
folder."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from mechinterp.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, args):
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model is loaded."""
    from mechinterp.models import loaded

    def boom(*a, **k):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(loaded.LoadedModel, "__init__", boom)


@pytest.mark.parametrize("cmd", [
    ["run", "weight-change", "--base", "tiny-random-llama", "--variant", "v=tiny-random-llama"],
    ["eval", "mmlu", "--model", "tiny-random-llama", "--limit", "2"],
    ["compare", "--base", "tiny-random-llama", "--variant", "sft=tiny-random-llama", "--preset",
     "smoke", "--only", "weight-change"],
])
def test_out_that_is_a_file_stops_before_any_work(tmp_path, capsys, cmd, no_model_load):
    """Repro 4: --out that is a file lost the computed probe with a traceback."""
    out = tmp_path / "out"
    out.write_text("not a folder")
    code, err = _run(capsys, [*cmd, "--out", str(out), "--device", "cpu"])
    assert code == 2 and "is a file" in err and len(err.splitlines()) == 1, err
    inner = tmp_path / "f"
    inner.write_text("x")
    code, err = _run(capsys, [*cmd, "--out", str(inner / "sub"), "--device", "cpu"])
    assert code == 2 and "is a file" in err, err
    assert out.read_text() == "not a folder"


def test_full_disk_stops_before_any_work(tmp_path, capsys, monkeypatch, no_model_load):
    """Repro 4: an --out on a full disk lost the computed work."""
    real = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(real(p).total, real(p).total, 4096))
    code, err = _run(capsys, ["run", "weight-change", "--base", "tiny-random-llama", "--variant",
                              "v=tiny-random-llama", "--out", str(tmp_path / "o"),
                              "--device", "cpu"])
    assert code == 2 and "is full" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_stops_before_any_work(tmp_path, capsys, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    code, err = _run(capsys, ["run", "weight-change", "--base", "tiny-random-llama", "--variant",
                              "v=tiny-random-llama", "--out", str(ro / "o"), "--device", "cpu"])
    assert code == 2 and "not writable" in err, err


# ----- fault injection -----------------------------------------------------------------------

PROBES = "weight-change,kl-drift,mmlu"
CHILD = """
import sys, time
t0 = time.monotonic()
from mechinterp.compare import compare
compare("tiny-random-llama", {"sft": sys.argv[2]}, sys.argv[1], preset="smoke",
        probes=sys.argv[3].split(","), device="cpu",
        echo=lambda m: print(f"{time.monotonic() - t0:.3f} {m}", flush=True))
"""


def _start(out: Path, sft: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MECHINTERP_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(sft), PROBES], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temps(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.is_dir())


def _snapshot(out: Path) -> dict:
    """What must equal between runs: claims, every result's data, the figures (listed and on
    disk)."""
    snap = {"claims": json.loads((out / "claims.json").read_text())}
    for probe in PROBES.split(","):
        folder = out / probe
        payload = json.loads((folder / "result.json").read_text())
        snap[probe] = {"data": payload["data"], "figures": payload["figures"],
                       "on_disk": sorted(p.name for p in folder.iterdir()
                                         if p.suffix in (".png", ".pdf")),
                       "figure_errors": payload["provenance"].get("figure_errors")}
    return snap


@pytest.mark.slow
def test_compare_killed_at_seeded_points_recovers_exactly(tmp_path, data_source):
    from mechinterp.models import load
    from mechinterp.models.edit import plant_change

    model = load("tiny-random-llama", device="cpu", dtype="float32")
    sft = plant_change(model, tmp_path / "sft", {(l, m): 0.2 for l in range(model.n_layers)
                                                  for m in ("q", "gate")}, seed=1)
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    p = _start(ref, sft)
    stdout, stderr = p.communicate(timeout=600)
    total = time.monotonic() - t0
    assert p.returncode == 0, stderr[-3000:]
    expected = _snapshot(ref)
    assert all(expected[probe]["on_disk"] for probe in PROBES.split(","))
    # kill points: stratified over the whole run, plus one just before each probe's "done"
    # (its result and figures are being written then)
    rng = random.Random(22)
    done = [float(line.split()[0]) for line in stdout.splitlines() if line.endswith(")")
            and " done (" in line]
    n_uniform = 10
    points = [total * (i + rng.random()) / n_uniform for i in range(n_uniform)]
    points += [max(0.0, d - rng.uniform(0.0, 0.6)) for d in done]
    rng.shuffle(points)
    out = tmp_path / "out"
    kills = in_write = recoveries = completed = 0
    after_kill = False
    for when in points:
        before = set(_temps(out)) if out.exists() else set()
        p = _start(out, sft)
        try:
            p.wait(timeout=when)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=600)
        if p.returncode == -signal.SIGKILL:
            kills += 1
            in_write += bool(set(_temps(out)) - before) if out.exists() else 0
            after_kill = True
            continue
        assert p.returncode == 0, stderr[-3000:]
        completed += 1
        recoveries += after_kill
        assert _snapshot(out) == expected and _temps(out) == []
        after_kill = False
        shutil.rmtree(out)  # the next point starts a fresh run
    p = _start(out, sft)  # the last re-run, to the end
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    recoveries += after_kill
    assert _snapshot(out) == expected and _temps(out) == []
    print(f"\nfault injection: {len(points)} points over a {total:.1f} s run, {kills} kills "
          f"({in_write} left a result write half-done), {recoveries} recoveries, "
          f"{completed + 1} completed runs equal to the uninterrupted one")
    assert kills >= 10 and in_write >= 1
