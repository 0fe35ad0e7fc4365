"""Hooks into a (TRL) Trainer: freeze guard, stop guard, checkpoint snapshots with drift, progress.

Checkpoint layout under OUT::

    OUT/trainer-state/checkpoint-N/   Trainer format (model, optimizer, scheduler, RNG): --resume
                                      reads it; only the newest complete one is kept
    OUT/checkpoints/step-N/           clean save_pretrained folder + tokenizer: the spec OUT@step-N
    OUT/training-drift/result.json    weight change and KL at every snapshot, and the length of
                                      every optimizer step (result store)

Once a run has finished, :func:`prune_finished` may drop what only resuming or a trajectory needs:
the optimizer state in ``trainer-state/`` and the snapshots before the last (the demo does so for
runs whose checkpoints no analysis loads; ``mechinterp demo --keep-checkpoints`` keeps them).

A snapshot is complete when the Trainer has written its checkpoint, the clean folder has been
renamed into place and the marker ``.mechinterp-complete`` sits in the Trainer checkpoint; a crash
or a full disk part-way leaves the previous complete pair untouched.

Under a multi-process launch every rank runs these callbacks at the same points; only rank 0
writes, and the stop flags are all-reduced so that every rank stops together
(:class:`~mechinterp.training.distributed.Procs`).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import TrainerCallback
from transformers.integrations import get_reporting_integration_callbacks

from ..models.run_folder import COMPLETE, SNAPSHOT_DIR, SUMMARY_FILE, TRAINER_DIR
from ..paths import checkpoint_step
from ..progress import enabled, new_bar
from .distributed import Procs
from .driftlog import drift_scalars
from .freeze import FrozenState

_MODEL_FILES = (".safetensors", ".json", ".jinja", ".txt", ".model")
_SKIP = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args", "scaler")


class FreezeGuard(TrainerCallback):
    """Writes frozen slices back after every optimizer step (weight decay cannot move them)."""

    def __init__(self, frozen: FrozenState):
        self.frozen = frozen

    def on_optimizer_step(self, args, state, control, **kw):
        self.frozen.restore()


class StopGuard(TrainerCallback):
    """Stops on a non-finite loss before anything is saved from the broken step; every rank stops
    when any rank sees one (the Trainer logs at the same steps on every rank)."""

    def __init__(self, procs: Procs | None = None):
        self.procs = procs or Procs()
        self.reason: str | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        bad = loss is not None and not math.isfinite(float(loss))
        if self.procs.any(bad):
            self.reason = f"non-finite loss ({loss if bad else 'on another rank'}) at step " \
                          f"{state.global_step}"
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


def prune_finished(out: Path, keep_checkpoints: bool = False,
                   keep_trainer_state: bool = False) -> int:
    """Free the disk of a finished run (``train-summary.json`` written); return the bytes freed.

    Always kept: the final model in ``OUT`` (its files are hard links to the last snapshot's, so
    ``OUT@step-FINAL`` stays loadable at no extra disk), ``train-config.json``,
    ``train-summary.json`` and ``training-drift/`` (weight change and KL at every checkpoint,
    computed in memory while training). Dropped unless kept: ``trainer-state/`` (model, optimizer
    moments and RNG state for ``--resume``: three times the model's size; a finished run has
    nothing to resume) and, unless ``keep_checkpoints``, every snapshot before the last. A run that
    has not finished is left as it is (its checkpoints are what ``--resume`` needs)."""
    out = Path(out)
    if not (out / SUMMARY_FILE).is_file():
        return 0
    doomed = [] if keep_trainer_state else [out / TRAINER_DIR]
    if not keep_checkpoints:
        snaps = [p for p in (out / SNAPSHOT_DIR).glob("step-*")
                 if p.is_dir() and checkpoint_step(p.name, folder=True) is not None]
        snaps.sort(key=lambda p: checkpoint_step(p.name, folder=True))
        doomed += snaps[:-1]
    freed = 0
    for folder in doomed:
        if folder.is_dir():
            freed += _unshared_bytes(folder)
            shutil.rmtree(folder)
    return freed


def _unshared_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` that have no other hard link (what deleting frees)."""
    total = 0
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            st = f.stat()
            total += st.st_size if st.st_nlink == 1 else 0
    return total


# how a full disk reads in the errors of the writers a checkpoint goes through: safetensors'
# SafetensorError ("I/O error: No space left on device (os error 28)"), torch.save's RuntimeError
# ("unexpected pos N vs M", "PytorchStreamWriter failed writing file ...: file write failed")
_DISK_FULL_TEXT = ("no space left", "os error 28", "errno 28", "quota exceeded", "os error 122")
_WRITE_FAILED_TEXT = ("file write failed", "unexpected pos", "pytorchstreamwriter failed",
                      "iostream error")


def save_failure(exc: BaseException, out: Path) -> str | None:
    """What a failed checkpoint write means, for the one-line stop message, or None when ``exc``
    is no failed write (then it is a bug and keeps its traceback). Read before anything is
    cleaned up: the free space then is what the writer saw."""
    if isinstance(exc, OSError):
        return "out of disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
            else f"I/O error ({exc})"
    if not isinstance(exc, (RuntimeError, SafetensorError)):
        return None
    text = str(exc).lower()
    if any(k in text for k in _DISK_FULL_TEXT):
        return "out of disk space"
    if not any(k in text for k in _WRITE_FAILED_TEXT):
        return None
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return "a file write failed"
    return "out of disk space" if free < (64 << 20) else \
        f"a file write failed ({free / 1e9:.1f} GB free on the disk of {out})"


class Snapshots(TrainerCallback):
    """Saves checkpoints at ``steps`` and logs drift (weight change, KL) at each of them."""

    def __init__(self, out: Path, steps: list[int], drift=None, echo=None,
                 procs: Procs | None = None):
        self.procs = procs or Procs()
        self.out = Path(out)
        self.steps = set(steps)
        self.drift = drift
        self.echo = echo or (lambda s: None)
        self.saved: list[int] = []
        self.reason: str | None = None
        self.report = None  # a logs -> None callable (integration_logger) for the drift scalars

    def on_step_begin(self, args, state, control, model=None, **kw):
        if self.drift is not None and self.procs.main:
            self.drift.path.begin(model)  # the weights before the step (once; then kept current)

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.drift is not None and self.procs.main:
            self.drift.path.step(state.global_step, model)  # ||W_t - W_{t-1}||_F per matrix
        if state.global_step in self.steps:
            control.should_save = True

    def on_save(self, args, state, control, model=None, **kw):
        step = state.global_step
        ckpt = self.out / TRAINER_DIR / f"checkpoint-{step}"
        if step not in self.steps:
            return
        self.procs.barrier()  # every rank has written its part (RNG state) of the checkpoint
        # each rank checks its own copy; a stop anywhere stops all
        if self.procs.any(not all(bool(torch.isfinite(p).all()) for p in model.parameters())):
            if self.procs.main:
                shutil.rmtree(ckpt, ignore_errors=True)
            self.reason = f"non-finite weights at step {step}"
            control.should_training_stop = True
            return
        if not self.procs.main or not ckpt.is_dir():
            return
        snap = self.snapshot(ckpt, step)
        if self.drift is not None:
            rec = self.drift.record(step, model, state.log_history)
            if self.report is not None:
                self.report(drift_scalars(rec))
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


def integration_logger(trainer):
    """A ``logs -> None`` that hands ``logs`` (at the current step) to the reporting integrations
    of ``trainer`` (``report_to``: TensorBoard, W&B, trackio...) and to nothing else: not through
    ``trainer.log``, whose other callbacks (the stop guard's all-reduce) would wait for ranks that
    do not log. ``None`` when the trainer reports nowhere."""
    kinds = tuple(get_reporting_integration_callbacks(trainer.args.report_to))
    targets = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kinds)]
    if not targets:
        return None

    def log(logs: dict[str, float]) -> None:
        for cb in targets:
            cb.on_log(trainer.args, trainer.state, trainer.control, logs=dict(logs))

    return log


class TrainProgress(TrainerCallback):
    """A progress bar with loss / reward (rich, in a terminal) or one line per log (``echo``)."""

    def __init__(self, total: int, desc: str, echo=None):
        self.total, self.desc, self.echo = total, desc, echo
        self.bar = None
        self.enabled = enabled()
        self.t0 = time.perf_counter()
        self.first_step: int | None = None

    def on_train_begin(self, args, state, control, **kw):
        self.first_step = state.global_step
        self.t0 = time.perf_counter()
        if self.enabled and state.is_world_process_zero:
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
