"""The drift log of a training run: weight change and KL from the base at every checkpoint, and the
length of every optimizer step.

``update_norm[matrix][i][layer]`` is ``||W_t - W_{t-1}||_F`` of that matrix over optimizer step
``t = update_norm_steps[i]`` (:class:`PathLog`: the live weights against a copy kept from the step
before), so the path a matrix travelled up to a checkpoint is the sum over its steps; the
``weight-change`` probe's coherence divides the displacement by it.

Written through the result store as ``OUT/training-drift/result.json`` after each checkpoint (so a
killed run keeps what it logged), with the keys of the ``training-drift`` probe; ``mechinterp
figures OUT`` re-draws its trajectories without a model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.weights import live_weight_change, matrix_refs, tensor_stats
from ..evals.answers import TokenisedItems
from ..models.naming import n_layers
from ..store.drift_log import DRIFT_LOG
from ..store.results import Result, read_result, write_result
from .drift import answer_logprobs, kl_from_base, kl_per_item, without_autocast

PROBE_NAME = DRIFT_LOG  # the drift log is the training-drift probe's result


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class PathLog:
    """``||W_t - W_{t-1}||_F`` per optimizer step, matrix and layer of the live weights.

    :meth:`begin` (before a step) keeps a copy of the tracked matrices once, on their device (the
    memory of one copy of them); :meth:`step` (after it) measures each against its copy (float64
    sums; the fused kernel on CPU) and overwrites the copy. Frozen entries add nothing: they are
    written back before the step ends. Parameters sharded over processes (ZeRO-3, FSDP) are not
    logged (the weight-change probe then estimates the path from the checkpoints).
    """

    def __init__(self, family, config):
        self.matrices = list(family.matrices)
        self.n_layers = n_layers(config)
        self.refs = matrix_refs(family, config)
        self.prev: list[torch.Tensor] | None = None
        self.off = False  # parameters sharded over processes: this rank cannot see them whole
        self.steps: list[int] = []
        self.norms: list[dict[str, list[float]]] = []  # per step: [matrix][layer]

    def _live(self, model: torch.nn.Module, ref) -> torch.Tensor:
        return ref.take(model.get_parameter(ref.name).detach())

    @torch.no_grad()
    def begin(self, model: torch.nn.Module) -> None:
        if self.prev is None and not self.off:
            lives = [self._live(model, ref) for _, _, ref in self.refs]
            if any(t.numel() == 0 for t in lives):  # sharded parameters (ZeRO-3, FSDP): no log
                self.off = True
                return
            self.prev = []
            for live in lives:
                self.prev.append(torch.empty_like(live, memory_format=torch.contiguous_format))
                _copy_into(self.prev[-1], live)

    @torch.no_grad()
    def step(self, step: int, model: torch.nn.Module) -> None:
        if self.prev is None:
            return
        out = {m: [float("nan")] * self.n_layers for m in self.matrices}
        for k, (layer, m, ref) in enumerate(self.refs):
            live = self._live(model, ref)
            out[m][layer] = _diff_norm(self.prev[k], live)
            _copy_into(self.prev[k], live)
        keep = [i for i, s in enumerate(self.steps) if s < step]
        self.steps = [self.steps[i] for i in keep] + [step]
        self.norms = [self.norms[i] for i in keep] + [out]

    def keep_until(self, last_step: int, data: dict) -> None:
        """Take over the steps up to ``last_step`` of an earlier log (``--resume``)."""
        steps = data.get("update_norm_steps") or []
        norms = data.get("update_norm") or {}
        if not steps or set(norms) != set(self.matrices):
            return
        idx = [i for i, s in enumerate(steps) if s <= last_step]
        self.steps = [steps[i] for i in idx]
        self.norms = [{m: norms[m][i] for m in self.matrices} for i in idx]

    def to_json(self) -> dict[str, Any]:
        return {"update_norm_steps": list(self.steps),
                "update_norm": {m: [n[m] for n in self.norms] for m in self.matrices}}


def _diff_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||b - a||_F`` with float64 sums."""
    if a.device.type == "cpu":
        return float(tensor_stats(a, b, sparsity=False).sq_diff) ** 0.5
    return float(torch.linalg.vector_norm((b - a).reshape(-1), dtype=torch.float64))


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; on CPU through numpy's single-threaded copy, several times faster
    than torch's on a busy machine (its threads wait for each other)."""
    if dst.device.type == "cpu" and dst.dtype in (torch.float32, torch.float64):
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def drift_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """A drift record as flat scalars for TensorBoard / W&B / trackio: KL from the base, the mean
    and max relative change over all layers and matrices, and each matrix's mean over layers."""
    rc = rec.get("relative_change") or {}
    per = {m: [v for v in vals if not math.isnan(v)] for m, vals in rc.items()}
    flat = [v for vals in per.values() for v in vals]
    out: dict[str, float] = {}
    if rec.get("kl") is not None:
        out["drift/kl"] = float(rec["kl"])
    if flat:
        out["drift/relative_change_mean"] = sum(flat) / len(flat)
        out["drift/relative_change_max"] = max(flat)
    out |= {f"drift/relative_change/{m}": sum(v) / len(v) for m, v in per.items() if v}
    return out


class DriftLogger:
    """Relative change per layer and matrix (live weights vs the base folder) and held-out KL."""

    def __init__(self, out: Path, base_folder: Path, family, config, heldout: TokenisedItems | None,
                 base_lp: list[torch.Tensor] | None, meta: dict[str, Any],
                 provenance: dict[str, Any]):
        self.folder = Path(out) / PROBE_NAME
        self.base_folder = Path(base_folder)
        self.family, self.config = family, config
        self.heldout, self.base_lp = heldout, base_lp
        self.meta, self.provenance = meta, provenance
        self.n_layers = n_layers(config)
        self.records: list[dict[str, Any]] = []
        self.path = PathLog(family, config)

    def resume_from(self, last_step: int) -> None:
        """Keep the records of an earlier, interrupted run up to ``last_step``."""
        if (self.folder / "result.json").exists():
            old = read_result(self.folder)
            self.records = [r for r in old.data.get("records", []) if r["step"] <= last_step]
            self.path.keep_until(last_step, old.data)

    def weight_change(self, model: torch.nn.Module) -> dict[str, list[float]]:
        """Relative change of the live weights from the base file; a base stored in another dtype
        (bf16 on disk, float32 master weights live) is compared in the wider of the two, and
        ``meta["compared"]`` says which dtypes met."""
        seen: set[tuple[torch.dtype, torch.dtype]] = set()
        out = live_weight_change(self.base_folder, model, self.family, self.config, seen)
        self.meta["compared"] = [
            {"base_dtype": _name(b), "live_dtype": _name(v),
             "compared_in": _name(torch.promote_types(torch.promote_types(b, v), torch.float32))}
            for b, v in sorted(seen, key=str)]
        return out

    def record(self, step: int, model: torch.nn.Module, log_history: list[dict]) -> dict:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"step": step, "checkpoint": f"step-{step}",
                               "relative_change": self.weight_change(model)}
        if self.heldout is not None and self.base_lp is not None and self.heldout.input_ids:
            with without_autocast(model):
                tuned = answer_logprobs(model, self.heldout)
            rec["kl_per_item"] = kl_per_item(self.base_lp, tuned)
            rec["kl"] = kl_from_base(self.base_lp, tuned)
        rec["drift_time_s"] = round(time.perf_counter() - t0, 3)
        self.records = [r for r in self.records if r["step"] != step] + [rec]
        self.records.sort(key=lambda r: r["step"])
        self.write(log_history)
        return rec

    def write(self, log_history: list[dict]) -> Path:
        keys = ("loss", "reward", "reward_std", "grad_norm", "learning_rate")
        history = [{"step": h["step"], **{k: h[k] for k in keys if k in h}}
                   for h in log_history if "step" in h and any(k in h for k in keys[:2])]
        steps = [r["step"] for r in self.records]
        data = {
            **self.meta,
            "matrices": list(self.family.matrices),
            "n_layers": self.n_layers,
            "steps": steps,
            "checkpoints": [r["checkpoint"] for r in self.records],
            # relative_change[matrix][i][layer]: checkpoint i = steps[i]
            "relative_change": {m: [r["relative_change"][m] for r in self.records]
                                for m in self.family.matrices},
            "kl": [r.get("kl") for r in self.records],
            "kl_per_item": [r.get("kl_per_item") for r in self.records],
            "history": history,
            "records": self.records,
            **self.path.to_json(),
        }
        prov = {**self.provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return write_result(Result(PROBE_NAME, data, provenance=prov), self.folder)
