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


def _cli(capsys, args):
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
    code, err = _cli(capsys, [*cmd, "--out", str(out), "--device", "cpu"])
    assert code == 2 and "is a file" in err and len(err.splitlines()) == 1, err
    inner = tmp_path / "f"
    inner.write_text("x")
    code, err = _cli(capsys, [*cmd, "--out", str(inner / "sub"), "--device", "cpu"])
    assert code == 2 and "is a file" in err, err
    assert out.read_text() == "not a folder"


def test_full_disk_stops_before_any_work(tmp_path, capsys, monkeypatch, no_model_load):
    """Repro 4: an --out on a full disk lost the computed work."""
    real = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(real(p).total, real(p).total, 4096))
    code, err = _cli(capsys, ["run", "weight-change", "--base", "tiny-random-llama", "--variant",
                              "v=tiny-random-llama", "--out", str(tmp_path / "o"),
                              "--device", "cpu"])
    assert code == 2 and "is full" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_stops_before_any_work(tmp_path, capsys, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    code, err = _cli(capsys, ["run", "weight-change", "--base", "tiny-random-llama", "--variant",
                              "v=tiny-random-llama", "--out", str(ro / "o"), "--device", "cpu"])
    assert code == 2 and "not writable" in err, err


# ----- fault injection -----------------------------------------------------------------------

PROBES = "weight-change,kl-drift,mmlu"
CHILD = """
import sys, time
t0 = time.monotonic()
from mechinterp.study.compare import compare
compare("tiny-random-llama", {"sft": sys.argv[2]}, sys.argv[1], preset="smoke",
        probes=sys.argv[3].split(","), device="cpu",
        echo=lambda m: print(f"{time.monotonic() - t0:.3f} {m}", flush=True))
"""


def _start(out: Path, sft: Path, log: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MECHINTERP_PROGRESS="0")
    with log.open("w") as fh:  # a file, not a pipe: a child never blocks on a full pipe
        return subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(sft), PROBES],
                                env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)


def _run(out: Path, sft: Path, log: Path, at: float | None = None, write_of: str | None = None,
         delay: float = 0.0) -> int:
    """Run the compare; kill -9 it ``at`` seconds after its start, or ``delay`` seconds after the
    temporary folder of ``write_of``'s result appears (inside that result's write)."""
    p = _start(out, sft, log)
    t0 = time.monotonic()
    while p.poll() is None:
        if at is not None and time.monotonic() - t0 >= at:
            p.send_signal(signal.SIGKILL)
            break
        if write_of is not None and out.is_dir() and any(
                n.startswith(f".{write_of}.tmp-") for n in os.listdir(out)):
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    return p.wait(timeout=600)


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
    """kill -9 at 10 seeded times spread over the run (each next run is the re-run of the killed
    one) and inside the result write of 3 seeded probes (kill when its temporary folder appears,
    after a seeded delay); every completed run must equal the uninterrupted one."""
    from mechinterp.models import load
    from mechinterp.models.edit import plant_change

    model = load("tiny-random-llama", device="cpu", dtype="float32")
    sft = plant_change(model, tmp_path / "sft", {(i, m): 0.2 for i in range(model.n_layers)
                                                  for m in ("q", "gate")}, seed=1)
    log = tmp_path / "child.log"
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert _run(ref, sft, log) == 0, log.read_text()[-3000:]
    total = time.monotonic() - t0
    expected = _snapshot(ref)
    assert all(expected[probe]["on_disk"] for probe in PROBES.split(","))
    rng = random.Random(22)
    n_times = 10
    events = [("time", total * (i + rng.random()) / n_times) for i in range(n_times)]
    events += [("write", probe, rng.uniform(0.0, 0.05)) for probe in PROBES.split(",")]
    rng.shuffle(events)
    out = tmp_path / "out"
    kills = in_write = left_temp = recoveries = completed = 0
    dirty = False  # the folder holds what a killed run left

    def finish():  # run to the end and compare with the uninterrupted run
        nonlocal completed, recoveries, dirty
        assert _run(out, sft, log) == 0, log.read_text()[-3000:]
        assert _snapshot(out) == expected and _temps(out) == []
        completed += 1
        recoveries += dirty
        dirty = False

    for event in events:
        if event[0] == "write":  # a fresh run, so that this probe's result is written
            if dirty:
                finish()
            shutil.rmtree(out, ignore_errors=True)
        before = set(_temps(out)) if out.exists() else set()
        code = (_run(out, sft, log, at=event[1]) if event[0] == "time"
                else _run(out, sft, log, write_of=event[1], delay=event[2]))
        if code == -signal.SIGKILL:
            kills += 1
            in_write += event[0] == "write"  # killed after its temporary folder appeared
            left_temp += bool(out.exists() and set(_temps(out)) - before)
            dirty = True
            continue
        assert code == 0, log.read_text()[-3000:]
        assert _snapshot(out) == expected and _temps(out) == []
        completed += 1
        recoveries += dirty
        dirty = False
        shutil.rmtree(out)  # the next point starts a fresh run
    if dirty or not out.exists():
        finish()
    print(f"\nfault injection: {len(events)} kill points over a {total:.1f} s run: {kills} kills "
          f"({in_write} inside a result write; {left_temp} left a temporary folder), {recoveries} recoveries, {completed} completed "
          f"runs, all equal to the uninterrupted one")
    assert kills >= 10 and in_write >= 3
