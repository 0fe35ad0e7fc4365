"""``mechinterp`` with test hooks, for tests that train under ``accelerate launch`` (each rank runs
this script, so the hooks are installed in every rank's process)::

    accelerate launch ... tests/train_hooks.py [--debug-dir DIR] [--poison RANK:STEP] -- train sft ...

``--debug-dir DIR``: each rank appends the ids (row numbers of the training set) of the items in
every batch it collates to ``DIR/items-rank{R}.txt``, and what it writes to ``DIR/writes-rank{R}.txt``
(``config``, ``snapshot step-N`` before the checkpoint is marked complete, ``final``).
``--poison RANK:STEP``: a NaN is written into the first trainable weight on that rank after that
optimizer step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from mechinterp.cli import main
from mechinterp.training import callbacks, runner


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))  # torchrun's global rank (0 for one process)


def _note(debug: Path, what: str) -> None:
    with open(debug / f"writes-rank{_rank()}.txt", "a") as f:
        f.write(what + "\n")


class ItemLog:
    """A data collator that first appends the ids of its batch's items to a file (one line per
    batch); ids come from ``keys`` (tokenised ids, or a prompt's question) and -1 if unknown."""

    def __init__(self, collator, keys: dict, path: Path):
        self.collator, self.keys, self.path = collator, keys, path

    def __call__(self, examples):
        ids = [self.keys.get(tuple(ex["input_ids"]) if "input_ids" in ex
                             else ex["prompt"][-1]["content"], -1) for ex in examples]
        with open(self.path, "a") as f:
            f.write(" ".join(map(str, ids)) + "\n")
        return self.collator(examples)


class Poison(TrainerCallback):
    """Writes a NaN into the first trainable weight after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            p = next(p for p in model.parameters() if p.requires_grad)
            with torch.no_grad():
                p.view(-1)[0] = float("nan")


def _log_items(trainer, debug: Path) -> None:
    ds = trainer.train_dataset
    if "input_ids" in ds.column_names:  # SFT: tokenised rows, in the order of ours
        keys = {tuple(ids): i for i, ids in enumerate(ds["input_ids"])}
    else:  # GRPO: the prompts' questions
        keys = {row[-1]["content"]: i for i, row in enumerate(ds["prompt"])}
    trainer.data_collator = ItemLog(trainer.data_collator, keys, debug / f"items-rank{_rank()}.txt")


def install(debug: Path | None, poison: str | None) -> None:
    """Wrap the runner's seams: the settings write, each snapshot, the final write and the
    Trainer's construction (item log, poison callback)."""
    make_trainer, save_settings = runner._trainer, runner.save_settings
    snapshot, write_final = callbacks.Snapshots.snapshot, runner._write_final
    poison_rank, _, poison_step = (poison or "").partition(":")

    def trainer_with_hooks(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        if debug is not None:
            _log_items(trainer, debug)
        if poison_step and int(poison_rank) == _rank():
            trainer.add_callback(Poison(int(poison_step)))
        return trainer

    def noted(fn, what):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            _note(debug, what(*args))
            return out
        return call

    runner._trainer = trainer_with_hooks
    if debug is not None:
        runner.save_settings = noted(save_settings, lambda *_: "config")
        callbacks.Snapshots.snapshot = noted(snapshot, lambda _self, _ckpt, step: f"snapshot step-{step}")
        runner._write_final = noted(write_final, lambda *_: "final")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--debug-dir", type=Path)
    parser.add_argument("--poison", help="RANK:STEP")
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    install(opts.debug_dir, opts.poison)
    sys.exit(main(opts.cli[1:] if opts.cli[:1] == ["--"] else opts.cli))
