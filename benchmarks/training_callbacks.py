"""Step time with and without the training callbacks (snapshots + drift logging), one process.

Runs the same seeded training twice - once with checkpoints every ``--interval`` steps (Trainer
checkpoint, clean snapshot, weight change per layer/matrix, held-out KL) and once without - and
prints a table with the ratio. The fixed cost per checkpoint is also projected onto the paper's
interval (20 checkpoints over 571 steps, every ~29 steps), marked as a projection.

    python benchmarks/training_callbacks.py                     # default model, SFT, small batch
    python benchmarks/training_callbacks.py --base tiny-random-llama --steps 20 --interval 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from mechinterp.training.runner import train
from mechinterp.training.settings import resolve_settings


class WallPerStep(TrainerCallback):
    """Wall time from one step's start to the next step's start (includes any checkpoint work)."""

    def __init__(self):
        self.starts: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self.starts.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kw):
        self.starts.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def run(base: str, steps: int, interval: int, record: bool, heldout: int, seed: int) -> list[float]:
    clock = WallPerStep()
    s = resolve_settings("sft", "cpu-smoke", dict(
        base=base, max_steps=steps, checkpoints=max(1, steps // interval), n_heldout=heldout,
        per_device_train_batch_size=1, max_length=256, heldout_max_length=320, seed=seed,
        warmup_ratio=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        train(s, Path(tmp) / "run", echo=lambda *_: None, callbacks=(clock,), record=record,
              skip_disk_check=True)
    return clock.steps()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--interval", type=int, default=4, help="steps between checkpoints")
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    plain = run(a.base, a.steps, a.interval, False, a.heldout, a.seed)
    withcb = run(a.base, a.steps, a.interval, True, a.heldout, a.seed)
    ckpt_steps = {i * a.interval - 1 for i in range(1, a.steps // a.interval + 1)}  # 0-based
    step_time = statistics.median(plain)
    cost = statistics.mean(withcb[i] - plain[i] for i in ckpt_steps if i < len(withcb))
    tot_p, tot_c = sum(plain), sum(withcb)
    paper_interval = 571 / 20
    rows = [
        ("median step, no callbacks (s)", f"{step_time:.2f}"),
        ("median step, callbacks, non-checkpoint steps (s)",
         f"{statistics.median([t for i, t in enumerate(withcb) if i not in ckpt_steps]):.2f}"),
        ("checkpoint cost (s, mean over checkpoints)", f"{cost:.2f}"),
        (f"total {a.steps} steps: no callbacks / callbacks (s)", f"{tot_p:.1f} / {tot_c:.1f}"),
        (f"overhead at interval {a.interval} (measured)", f"{100 * (tot_c / tot_p - 1):.1f}%"),
        (f"overhead at interval {paper_interval:.1f} (projected: cost / (interval x step))",
         f"{100 * cost / (paper_interval * step_time):.1f}%"),
        ("interval for < 5% overhead (projected)", f"{cost / (0.05 * step_time):.0f} steps"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"training callbacks benchmark: {a.base}, SFT batch 1, {a.steps} steps, "
          f"checkpoint every {a.interval}, {a.heldout} held-out items")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
