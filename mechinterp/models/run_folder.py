"""The layout of a training output folder ``OUT`` (``mechinterp train sft|grpo --out OUT``)::

    OUT/config.json, model.safetensors, tokenizer   final model: the spec OUT
    OUT/checkpoints/step-N/                          snapshots: the specs OUT@step-N
    OUT/training-drift/result.json (+ figures)       drift log (result store)
    OUT/trainer-state/checkpoint-N/                  newest complete Trainer checkpoint, for --resume
    OUT/train-config.json                            the resolved settings of the run
    OUT/train-summary.json                           written last: the run has finished

A Trainer checkpoint is complete when it holds the marker :data:`COMPLETE`.
"""

from __future__ import annotations

from pathlib import Path

from ..store.results import read_result

CONFIG_FILE = "train-config.json"
SUMMARY_FILE = "train-summary.json"  # written last: wall time, steps, checkpoints of a finished run
TRAINER_DIR = "trainer-state"
SNAPSHOT_DIR = "checkpoints"
DRIFT_DIR = "training-drift"
COMPLETE = ".mechinterp-complete"


def logged_path(run_folder: Path) -> tuple[list[int], dict[str, list[list[float]]]] | None:
    """``(steps, update_norm[matrix][i][layer])`` of a run's drift log, or None when the run
    logged no per-step path (no drift log, or one without ``update_norm``)."""
    folder = Path(run_folder) / DRIFT_DIR
    if not (folder / "result.json").exists():
        return None
    try:
        data = read_result(folder).data
    except Exception:  # noqa: BLE001 - an unreadable log: the caller falls back to checkpoints
        return None
    steps, norms = data.get("update_norm_steps"), data.get("update_norm")
    return (list(steps), norms) if steps and norms else None
