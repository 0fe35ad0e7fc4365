"""The layout of a training output folder ``OUT`` (``mechinterp train sft|grpo --out OUT``)::

    OUT/config.json, model.safetensors, tokenizer   final model: the spec OUT
    OUT/checkpoints/step-N/                          snapshots: the specs OUT@step-N
    OUT/training-drift/result.json (+ figures)       drift log (result store)
    OUT/trainer-state/checkpoint-N/                  newest complete Trainer checkpoint, for --resume
    OUT/train-config.json                            the resolved settings of the run
    OUT/train-summary.json                           written last: the run has finished

The drift log's folder is :data:`~mechinterp.store.drift_log.DRIFT_LOG`. A Trainer checkpoint is complete when it holds the marker :data:`COMPLETE`.
"""

from __future__ import annotations


CONFIG_FILE = "train-config.json"
SUMMARY_FILE = "train-summary.json"  # written last: wall time, steps, checkpoints of a finished run
TRAINER_DIR = "trainer-state"
SNAPSHOT_DIR = "checkpoints"
COMPLETE = ".mechinterp-complete"
