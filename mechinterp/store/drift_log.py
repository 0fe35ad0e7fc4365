"""A training run's drift log as the result store holds it: ``RUN/training-drift/result.json``.

The trainer writes it (:mod:`mechinterp.training.driftlog`); the weight-change measures read the
per-step path from it (:func:`logged_path`), with no training code needed to read it.
"""

from __future__ import annotations

from pathlib import Path

from .results import RESULT_FILE, read_result

#: The drift log's folder inside a training output folder (and the name of its probe).
DRIFT_LOG = "training-drift"


def logged_path(run_folder: Path) -> tuple[list[int], dict[str, list[list[float]]]] | None:
    """The per-step path a training run logged.

    Args:
        run_folder: a training output folder (``mechinterp train --out``).

    Returns:
        ``(steps, update_norm)`` with ``update_norm[matrix][i][layer]`` the length of optimizer
        step ``steps[i]``; None when the run logged no per-step path (no drift log, an unreadable
        one, or one written before the path was logged).
    """
    folder = Path(run_folder) / DRIFT_LOG
    if not (folder / RESULT_FILE).exists():
        return None
    try:
        data = read_result(folder).data
    except Exception:  # noqa: BLE001 - an unreadable log: the caller falls back to checkpoints
        return None
    steps, norms = data.get("update_norm_steps"), data.get("update_norm")
    return (list(steps), norms) if steps and norms else None
