"""Weight-change measures that separate a directed update from optimizer noise and weight scale.

Relative change ``||dW|| / ||W_base||`` ranks matrices by ``1 / RMS(W_base)`` when every entry
moves by about ``lr`` per AdamW step (a short run: ``m_hat / sqrt(v_hat)`` is about 1 whatever the
gradient). Beside it, per model, matrix and layer:

* **coherence** ``||W_T - W_0||_F / sum_t ||W_t - W_{t-1}||_F``: 1 for a straight path, about
  ``1 / sqrt(T)`` for a random walk. The path comes from the run's per-step log (the drift log's
  ``update_norm``, :class:`~mechinterp.training.driftlog.PathLog`) when a run of ours made the
  model; otherwise from consecutive saved checkpoints (base -> first -> ... -> this one), a lower
  bound of the true path, so an upper bound of the coherence;
* **update scale** ``RMS(W_T - W_0) / (lr x steps)`` (the configured peak lr; None when the run's
  lr or steps are unknown): about 1 when every step moves every entry by lr in one direction;
* **noise floor**: both measures for the same optimizer settings on pure-noise gradients
  (:mod:`.noisefloor`);
* **scale confound**: Spearman, over the (layer, matrix) pairs that moved, of relative change
  against ``1 / RMS(W_base)``: near 1 means the relative-change map reads the base's weight scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..evals.stats import spearman
from ..models.specs import checkpoint_step
from .noisefloor import OptimizerSettings, floor_record, run_metadata, simulate
from .weights import DiffStats, WeightDiff, weight_diff

SOURCE_LOG = "per-step log"


def coherence(displacement: float, path: float) -> float | None:
    """``displacement / path``; None when nothing moved (path 0) or either is not finite."""
    if not (math.isfinite(displacement) and math.isfinite(path)) or path <= 0:
        return None
    return displacement / path


def update_scale(stats: DiffStats, lr: float | None, steps: int | None) -> float | None:
    """``RMS(W_T - W_0) / (lr x steps)``; None when lr or steps is unknown."""
    if not lr or not steps or not stats.n_total:
        return None
    return math.sqrt(stats.sq_diff / stats.n_total) / (lr * steps)


def base_rms(diff: WeightDiff) -> dict[str, list[float]]:
    """``RMS(W_base)`` per matrix and layer (the same base under every variant)."""
    any_variant = next(iter(diff.stats.values()))
    return {m: [math.sqrt(s.sq_base / s.n_total) if s.n_total else float("nan") for s in per]
            for m, per in any_variant.items()}


def scale_confound(rel: dict[str, list[float]], rms: dict[str, list[float]],
                   moved: dict[str, list[bool]] | None = None) -> float:
    """Spearman over (layer, matrix) of relative change against ``1 / RMS(W_base)``; ``moved``
    keeps only the pairs that changed at all (a frozen matrix's 0 says nothing of scale)."""
    xs, ys = [], []
    for m, per in rel.items():
        for layer, r in enumerate(per):
            if moved is not None and not moved[m][layer]:
                continue
            w = rms[m][layer]
            xs.append(float("nan") if r is None else r)
            ys.append(1.0 / w if w and math.isfinite(w) else float("nan"))
    return spearman(xs, ys) if len(xs) >= 2 else float("nan")


def path_from_log(steps: list[int], norms: dict[str, list[list[float]]],
                  upto: int) -> dict[str, list[float]] | None:
    """Per matrix and layer, the sum of the logged step lengths over steps 1..``upto``; None
    unless every one of those steps was logged."""
    idx = [i for i, s in enumerate(steps) if s <= upto]
    if upto < 1 or sorted(steps[i] for i in idx) != list(range(1, upto + 1)):
        return None
    return {m: [math.fsum(per[i][layer] for i in idx) for layer in range(len(per[idx[0]]))]
            for m, per in norms.items()}


def path_from_checkpoints(base_folder: Path, ordered: list[tuple[str, Path]], diff: WeightDiff,
                          progress: Callable[[], None] | None = None
                          ) -> dict[str, dict[str, list[float]]]:
    """Per model of ``ordered`` (one run's checkpoints in training order), the path base ->
    first -> ... -> that model summed over the legs between consecutive checkpoints."""
    out: dict[str, dict[str, list[float]]] = {}
    total: dict[str, list[float]] | None = None
    prev = None
    for name, folder in ordered:
        if prev is None:
            leg = diff.stats[name]
        else:
            leg = weight_diff(prev, {name: folder}, sparsity=False, progress=progress).stats[name]
        lengths = {m: [math.sqrt(s.sq_diff) for s in per] for m, per in leg.items()}
        total = lengths if total is None else {
            m: [a + b for a, b in zip(total[m], lengths[m])] for m in total}
        out[name] = total
        prev = folder
    return out


def model_step(name: str, folder: Path, meta: dict | None) -> int | None:
    """The optimizer step a model was saved at: its checkpoint folder's (``step-N``), a run's
    final model's from ``train-summary.json`` (else its ``max_steps``), else the name's."""
    step = checkpoint_step(Path(folder).name, folder=True)
    if step is None and meta is not None and Path(folder).resolve() == meta["run"].resolve():
        step = meta["summary"].get("steps") or meta["config"].get("max_steps")
    if step is None:
        step = checkpoint_step(name)
    return step


def measures(runs: dict[str, list[str]], folders: dict[str, Path], base_folder: Path,
             diff: WeightDiff, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """The new weight-change keys for every model of ``runs`` (see the module docstring)."""
    from ..models.run_folder import logged_path

    rms = base_rms(diff)
    sq = sum(s.sq_base for per in next(iter(diff.stats.values())).values() for s in per)
    n = sum(s.n_total for per in next(iter(diff.stats.values())).values() for s in per)
    w_rms = math.sqrt(sq / n) if n else 0.1
    out: dict[str, Any] = {"coherence": {}, "coherence_source": {}, "update_scale": {},
                           "update_scale_settings": {}, "noise_floor": {}, "scale_confound": {},
                           "base_rms": rms}
    for names in runs.values():
        metas = {v: run_metadata(folders[v]) for v in names}
        steps = {v: model_step(v, folders[v], metas[v]) for v in names}
        logs = {}
        for v in names:
            if metas[v] is not None:
                key = str(metas[v]["run"])
                if key not in logs:
                    logs[key] = logged_path(metas[v]["run"])
        paths: dict[str, dict[str, list[float]]] = {}
        for v in names:
            log = logs.get(str(metas[v]["run"])) if metas[v] is not None else None
            got = path_from_log(*log, steps[v]) if log and steps[v] else None
            if got is not None:
                paths[v] = got
                out["coherence_source"][v] = SOURCE_LOG
        rest = [v for v in names if v not in paths]
        if rest:
            order = sorted(rest, key=lambda v: (steps[v] is None, steps[v] or 0, names.index(v)))
            est = path_from_checkpoints(base_folder, [(v, folders[v]) for v in order], diff,
                                        progress)
            for k, v in enumerate(order):
                paths[v] = est[v] if k > 0 else None
                out["coherence_source"][v] = f"checkpoints ({k + 1})"
        floors = _floors(names, metas, steps, w_rms)
        for v in names:
            st = diff.stats[v]
            out["coherence"][v] = {
                m: [coherence(math.sqrt(s.sq_diff), paths[v][m][layer]) if paths[v] else None
                    for layer, s in enumerate(per)] for m, per in st.items()}
            cfg = (metas[v] or {}).get("config") or {}
            lr = cfg.get("learning_rate")
            out["update_scale"][v] = {m: [update_scale(s, lr, steps[v]) for s in per]
                                      for m, per in st.items()}
            out["update_scale_settings"][v] = {
                "lr": lr, "steps": steps[v],
                "source": str(metas[v]["run"] / "train-config.json") if metas[v] else
                "unknown: no train-config.json (a model no run of ours made)"}
            out["noise_floor"][v] = floors.get(v)
            moved = {m: [s.n_changed > 0 for s in per] for m, per in st.items()}
            out["scale_confound"][v] = scale_confound(
                {m: [s.relative for s in per] for m, per in st.items()}, rms, moved)
    return out


def _floors(names: list[str], metas: dict, steps: dict, w_rms: float) -> dict[str, dict]:
    """``noise_floor`` per model: one simulation per run's settings, read at each model's step."""
    by_run: dict[str, tuple[OptimizerSettings, list[str]]] = {}
    for v in names:
        if metas[v] is None or not steps[v]:
            continue
        s = OptimizerSettings.from_train_config(metas[v]["config"])
        if s is None or not s.simulable or steps[v] > s.max_steps:
            continue
        by_run.setdefault(str(metas[v]["run"]), (s, []))[1].append(v)
    out = {}
    for s, models in by_run.values():
        sim = simulate(s, [steps[v] for v in models], w_rms=w_rms)
        for v in models:
            out[v] = floor_record(s, sim[steps[v]], w_rms)
    return out
