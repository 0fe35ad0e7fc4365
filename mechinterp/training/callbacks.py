"""Hooks into a (TRL) Trainer: freeze guard, stop guard, checkpoint snapshots with drift, progress.

Checkpoint layout under OUT::

    OUT/trainer-state/checkpoint-N/   Trainer format (model, optimizer, scheduler, RNG): --resume
                                      reads it; only the newest complete one is kept
    OUT/checkpoints/step-N/           clean save_pretrained folder + tokenizer: the spec OUT@step-N
    OUT/training-drift/result.json    weight change and KL at every snapshot (result store)

A snapshot is complete when the Trainer has written its checkpoint, the clean folder has been
renamed into place and the marker ``.mechinterp-complete`` sits in the Trainer checkpoint; a crash
or a full disk part-way leaves the previous complete pair untouched.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..models.specs import checkpoint_step
from .freeze import FrozenState

COMPLETE = ".mechinterp-complete"
TRAINER_DIR = "trainer-state"
SNAPSHOT_DIR = "checkpoints"
_MODEL_FILES = (".safetensors", ".json", ".jinja", ".txt", ".model")
_SKIP = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args", "scaler")


class FreezeGuard(TrainerCallback):
    """Writes frozen slices back after every optimizer step (weight decay cannot move them)."""

    def __init__(self, frozen: FrozenState):
        self.frozen = frozen

    def on_optimizer_step(self, args, state, control, **kw):
        self.frozen.restore()


class StopGuard(TrainerCallback):
    """Stops on a non-finite loss before anything is saved from the broken step."""

    def __init__(self):
        self.reason: str | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.reason = f"non-finite loss ({loss}) at step {state.global_step}"
            control.should_training_stop = True
            control.should_save = False


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no extra disk while both exist), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete Trainer checkpoints under ``out``, oldest first."""
    root = Path(out) / TRAINER_DIR
    found = [p for p in root.glob("checkpoint-*") if (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: checkpoint_step(p.name, folder=True))


def clean_incomplete(out: Path) -> list[str]:
    """Remove half-written Trainer checkpoints and snapshot temp folders; name what went."""
    removed = []
    for p in (Path(out) / TRAINER_DIR).glob("checkpoint-*"):
        if not (p / COMPLETE).exists():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    for p in (Path(out) / SNAPSHOT_DIR).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(str(p))
    return removed


class Snapshots(TrainerCallback):
    """Saves checkpoints at ``steps`` and logs drift (weight change, KL) at each of them."""

    def __init__(self, out: Path, steps: list[int], drift=None, echo=None):
        self.out = Path(out)
        self.steps = set(steps)
        self.drift = drift
        self.echo = echo or (lambda s: None)
        self.saved: list[int] = []
        self.reason: str | None = None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step in self.steps:
            control.should_save = True

    def on_save(self, args, state, control, model=None, **kw):
        step = state.global_step
        ckpt = self.out / TRAINER_DIR / f"checkpoint-{step}"
        if step not in self.steps or not ckpt.is_dir():
            return
        if not state.is_world_process_zero:
            return
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            shutil.rmtree(ckpt, ignore_errors=True)
            self.reason = f"non-finite weights at step {step}"
            control.should_training_stop = True
            return
        snap = self.snapshot(ckpt, step)
        if self.drift is not None:
            self.drift.record(step, model, state.log_history)
        (ckpt / COMPLETE).write_text(f"{snap}\n")
        for old in complete_checkpoints(self.out)[:-1]:  # keep only the newest for --resume
            shutil.rmtree(old, ignore_errors=True)
        self.saved.append(step)
        self.echo(f"checkpoint step-{step}: {snap}")

    def snapshot(self, ckpt: Path, step: int) -> Path:
        """A clean save_pretrained folder from the Trainer checkpoint, renamed into place atomically."""
        root = self.out / SNAPSHOT_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step}"
        tmp = root / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for f in sorted(ckpt.iterdir()):
                if f.is_file() and f.name.endswith(_MODEL_FILES) and not f.name.startswith(_SKIP):
                    link_or_copy(f, tmp / f.name)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


class TrainProgress(TrainerCallback):
    """A progress bar with loss / reward (rich, in a terminal) or one line per log (``echo``)."""

    def __init__(self, total: int, desc: str, echo=None):
        from ..progress import enabled

        self.total, self.desc, self.echo = total, desc, echo
        self.bar = None
        self.enabled = enabled()
        self.t0 = time.perf_counter()
        self.first_step: int | None = None

    def on_train_begin(self, args, state, control, **kw):
        self.first_step = state.global_step
        self.t0 = time.perf_counter()
        if self.enabled and state.is_world_process_zero:
            from ..progress import new_bar

            self.bar = new_bar(transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self.desc, total=self.total, completed=state.global_step)

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        parts = [f"{k} {logs[k]:.4g}" for k in ("loss", "reward", "grad_norm") if k in logs]
        if not parts or not state.is_world_process_zero:
            return
        done = state.global_step - (self.first_step or 0)
        rate = (time.perf_counter() - self.t0) / done if done else float("nan")
        text = f"{self.desc} step {state.global_step}/{self.total}  " + "  ".join(parts)
        if self.bar is not None:
            self.bar.update(self.task, description=text)
        elif self.echo is not None:
            self.echo(f"{text}  ({rate:.2f} s/step)")

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def eprint(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
