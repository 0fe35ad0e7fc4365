"""Training under a real 2-process launch on this CPU (``accelerate launch ... -m mechinterp train``,
gloo): it finishes; frozen parameters stay bit-identical; each item is trained on the expected
number of times over all ranks; only rank 0 writes; ``--resume`` after a kill finishes the run
with no item lost or repeated; a NaN on one rank ends every rank.

Launch command: ``accelerate launch --multi_gpu --num_processes 2`` with ``--device cpu``. In
accelerate 1.16 ``accelerate launch --cpu --num_processes 2`` starts ONE process unless MPI is set
up (``--mpirun_hostfile``); ``--multi_gpu`` goes through torchrun, which starts two, and on a CPU
they join a gloo process group. Each rank runs ``tests/train_hooks.py``, which records its items
and writes (``--debug-dir``) and can poison one rank's weights (``--poison``) before it runs the CLI.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training_runs import _weights, assert_frozen_exactly  # tests/ is on sys.path

from mechinterp.models.run_folder import COMPLETE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SFT_FREEZE = "mlp@1,attn.heads@0:1"
GRPO_FREEZE = "attn.heads@0:1,mlp@1,mlp.neurons@0:0-7"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(algorithm: str, out: Path, *args: str, debug: Path | None = None,
             poison: str | None = None) -> list[str]:
    """The 2-process launch of ``mechinterp train ALGORITHM`` through the test hooks."""
    hooks = ["--poison", poison] if poison else []
    if debug is not None:
        debug.mkdir(parents=True, exist_ok=True)
        hooks += ["--debug-dir", str(debug)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_port()), str(ROOT / "tests" / "train_hooks.py"), *hooks,
            "--", "train", algorithm, "--out", str(out), *args]


def _env() -> dict[str, str]:
    return os.environ | dict(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                             OMP_NUM_THREADS="1", MECHINTERP_PROGRESS="0")


def _launch(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and the ranks it started (torchrun puts the ranks in sessions of
    their own, so killing the launcher's process group would leave them running)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [*tree, psutil.Process(proc.pid)] if proc.poll() is None else tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=60)
    proc.wait(timeout=60)


def _items(debug: Path, rank: int, first_lines: int | None = None) -> list[int]:
    lines = (debug / f"items-rank{rank}.txt").read_text().splitlines()
    return [int(x) for line in lines[:first_lines] for x in line.split()]


def _writes(debug: Path) -> dict[int, list[str]]:
    return {int(p.stem.removeprefix("writes-rank")): p.read_text().splitlines()
            for p in debug.glob("writes-rank*.txt")}


SFT_ARGS = ("--base", "tiny-random-llama", "--data", "arithmetic", "--device", "cpu",
            "--max-steps", "6", "--checkpoints", "3", "--batch-size", "2", "--max-length", "400",
            "--heldout", "1", "--heldout-max-length", "400", "--lr", "1e-3",
            "--weight-decay", "0.1", "--lr-scheduler", "constant", "--warmup-ratio", "0",
            "--freeze", SFT_FREEZE)


def test_sft_two_processes_kill_and_resume(tmp_path):
    """Kill the launch after its first checkpoint, resume, finish: items 0..23 each trained on
    exactly once over both ranks and both launches, frozen parts bit-identical, rank 0 the only
    writer."""
    out, dbg1, dbg2 = tmp_path / "run", tmp_path / "dbg1", tmp_path / "dbg2"
    t0 = time.perf_counter()
    log = tmp_path / "first-launch.log"
    proc = subprocess.Popen(_command("sft", out, *SFT_ARGS, debug=dbg1), env=_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    marker = out / "trainer-state" / "checkpoint-2" / COMPLETE
    try:
        while not marker.exists():
            assert proc.poll() is None, f"launch ended before its first checkpoint:\n" \
                                        f"{log.read_text()[-3000:]}"
            assert time.perf_counter() - t0 < 300, "no checkpoint after 300 s"
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert not (out / "config.json").exists(), "the run finished before the kill; make it longer"
    done = sorted(int(p.name.split("-")[1]) for p in (out / "trainer-state").glob("checkpoint-*")
                  if (p / COMPLETE).exists())
    last = done[-1]
    assert last in (2, 4)
    res = _launch(_command("sft", out, "--resume", debug=dbg2), _env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming from {out}/trainer-state/checkpoint-{last}" in res.stderr
    assert res.stdout.count("sft: 6 steps") == 1  # one report, from rank 0
    # items: steps 1..last from the first launch (one batch of 2 per rank and step), the rest
    # from the resumed one; 2 ranks x 2 per step x 6 steps = items 0..23, each exactly once
    seen = collections.Counter()
    for rank in (0, 1):
        seen.update(_items(dbg1, rank, first_lines=last))
        resumed = _items(dbg2, rank)
        assert len(resumed) == 2 * (6 - last)
        seen.update(resumed)
    assert sorted(seen) == list(range(24)) and set(seen.values()) == {1}, seen
    # rank 0 alone wrote: settings, each snapshot once, then the final model after the resume
    w1, w2 = _writes(dbg1), _writes(dbg2)
    assert set(w1) == {0} and set(w2) == {0}
    assert w1[0][: 1 + last // 2] == ["config"] + [f"snapshot step-{s}" for s in range(2, last + 1, 2)]
    assert w2[0] == [f"snapshot step-{s}" for s in range(last + 2, 7, 2)] + ["final"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    cfg = json.loads((out / "train-config.json").read_text())
    assert cfg["processes"] == 2 and cfg["precision"]["param_dtype"] == "float32"
    for folder in (out, out / "checkpoints" / "step-2"):
        assert_frozen_exactly("tiny-random-llama", SFT_FREEZE, folder, weight_decay=True)
    drift = json.loads((out / "training-drift" / "result.json").read_text())["data"]
    assert drift["steps"] == [2, 4, 6] and drift["kl"][-1] > 0


def test_grpo_two_processes_one_group_across_ranks(tmp_path):
    """Per-device batch 2 with groups of 4: a group spans both ranks (TRL needs only the global
    batch to hold whole groups). Each prompt is sampled 4 times over the two ranks."""
    out, dbg = tmp_path / "run", tmp_path / "dbg"
    res = _launch(_command(
        "grpo", out, "--base", "tiny-random-qwen2", "--data", "arithmetic", "--device", "cpu",
        "--max-steps", "3", "--checkpoints", "1", "--batch-size", "2", "--num-generations", "4",
        "--max-completion-length", "8", "--temperature", "1.0", "--heldout", "1",
        "--heldout-max-length", "400", "--lr", "1e-3", "--weight-decay", "0.1",
        "--warmup-ratio", "0", "--freeze", GRPO_FREEZE, debug=dbg), _env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    per_rank = [_items(dbg, r) for r in (0, 1)]
    seen = collections.Counter(per_rank[0] + per_rank[1])
    # 3 steps x (global batch 4 / group 4) = 3 prompts, each 4 completions, 2 on each rank
    assert sorted(seen) == [0, 1, 2] and set(seen.values()) == {4}, seen
    assert all(collections.Counter(p) == {i: 2 for i in range(3)} for p in per_rank), per_rank
    assert _writes(dbg) == {0: ["config", "snapshot step-3", "final"]}
    # a random tiny model earns no reward, so every advantage is 0 and only weight decay moves
    # the weights: frozen parts bit-identical, every trainable nonzero entry of a decayed matrix
    # (the Trainer decays neither biases nor norms) shrunk
    from mechinterp.models import load
    from mechinterp.models.selectors import plan

    lm = load("tiny-random-qwen2", device="cpu", dtype="float32")
    fp = plan(lm.hf, GRPO_FREEZE)
    assert fp.whole and fp.partial
    tuned = _weights(out)
    for name, b in lm.hf.named_parameters():
        t = tuned.get(name, tuned.get("lm_head.weight"))
        frozen = torch.ones_like(b, dtype=torch.bool) if name in fp.whole else \
            fp.partial.get(name, torch.zeros_like(b, dtype=torch.bool))
        assert torch.equal(t[frozen], b[frozen]), f"frozen part of {name} moved"
        if name in fp.whole or "norm" in name or name.endswith("bias"):
            continue
        live = ~frozen & (b != 0)
        assert bool(live.any())
        assert bool((t[live].abs() < b[live].abs()).all()), f"{name} was not decayed"


def test_nan_on_one_rank_stops_every_rank(tmp_path):
    """A NaN written into rank 1's weights after step 2 (a snapshot step): both ranks stop at that
    snapshot with the same message, the launch exits non-zero, step-1 stays the last good one."""
    out = tmp_path / "run"
    args = ("--base", "tiny-random-llama", "--data", "arithmetic", "--device", "cpu",
            "--max-steps", "4", "--checkpoints", "4", "--batch-size", "1", "--max-length", "400",
            "--heldout", "0", "--lr", "1e-3")
    t0 = time.perf_counter()
    res = _launch(_command("sft", out, *args, poison="1:2"), _env(), timeout=240)
    wall = time.perf_counter() - t0
    assert res.returncode != 0
    msg = f"training stopped: non-finite weights at step 2; last good checkpoint: {out}@step-1"
    assert (res.stdout + res.stderr).count(msg) == 2, res.stderr[-3000:]  # each rank says it
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert not (out / "trainer-state" / "checkpoint-2").exists()
    assert wall < 240  # no rank waits for the gloo timeout (30 min)
