"""The drift log of a training run: weight change and KL from the base at every checkpoint.

Written through the result store as ``OUT/training-drift/result.json`` after each checkpoint (so a
killed run keeps what it logged), with the keys of the ``training-drift`` probe; ``mechinterp
figures OUT`` re-draws its trajectories without a model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..analysis.weights import live_weight_change
from ..results import Result, read_result, write_result
from .drift import HeldOut, answer_logprobs, kl_from_base, kl_per_item, without_autocast

PROBE_NAME = "training-drift"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def drift_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """A drift record as flat scalars for TensorBoard / W&B / trackio: KL from the base, the mean
    and max relative change over all layers and matrices, and each matrix's mean over layers."""
    import math

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

    def __init__(self, out: Path, base_folder: Path, family, config, heldout: HeldOut | None,
                 base_lp: list[torch.Tensor] | None, meta: dict[str, Any],
                 provenance: dict[str, Any]):
        self.folder = Path(out) / PROBE_NAME
        self.base_folder = Path(base_folder)
        self.family, self.config = family, config
        self.heldout, self.base_lp = heldout, base_lp
        self.meta, self.provenance = meta, provenance
        from ..models.naming import n_layers

        self.n_layers = n_layers(config)
        self.records: list[dict[str, Any]] = []

    def resume_from(self, last_step: int) -> None:
        """Keep the records of an earlier, interrupted run up to ``last_step``."""
        if (self.folder / "result.json").exists():
            old = read_result(self.folder)
            self.records = [r for r in old.data.get("records", []) if r["step"] <= last_step]

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
        }
        prov = {**self.provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return write_result(Result(PROBE_NAME, data, provenance=prov), self.folder)
