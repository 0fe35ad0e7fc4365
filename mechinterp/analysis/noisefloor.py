"""What an optimizer does on pure-noise gradients: the floor that weight-change measures sit on.

At a few dozen AdamW steps every entry moves by about ``lr x m_hat / sqrt(v_hat)`` whatever the
gradient means, so ``RMS(dW) / (lr x steps)`` and the path coherence
``||W_T - W_0||_F / sum_t ||W_t - W_{t-1}||_F`` are large even when the gradients carry no signal.
:func:`simulate` runs the real ``torch.optim.AdamW`` with the run's settings (lr, betas, eps,
weight decay, schedule and warm-up through ``transformers.get_scheduler``, steps) on a parameter
block fed i.i.d. Gaussian gradients, seeded, and reports both measures per step with their spread
over replicate blocks.

Clipping: pure-noise gradients have the same expected norm at every step, so global-norm clipping
multiplies every step's gradient by about the same factor, which Adam's ``m / sqrt(v)`` cancels
(up to ``eps``, negligible at unit gradients); the simulation draws unit-variance gradients and
does not clip. ``max_grad_norm`` is recorded in the settings, not simulated.

Weight decay pulls each entry toward zero in proportion to it, so the block starts at the base's
weight scale (``w_rms``, the RMS over the model's tracked matrices).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_scheduler

from ..models.lineage import find_train_config

BLOCK = 4096  # entries per replicate block
REPLICATES = 16  # replicate blocks, one seed each
SEED = 0


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer a run used, as far as the noise floor depends on it."""

    lr: float
    max_steps: int
    kind: str = "adamw_torch_fused"  # the Trainer's optim (its default); any AdamW simulates as one
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0

    @property
    def simulable(self) -> bool:
        return self.kind.lower().startswith("adamw")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_train_config(cls, cfg: dict[str, Any]) -> OptimizerSettings | None:
        """From a run's ``train-config.json`` (:class:`~mechinterp.training.settings.
        TrainSettings`, the Trainer's defaults where it names none); None without lr or steps."""
        extra = cfg.get("extra") or {}
        lr, steps = cfg.get("learning_rate"), cfg.get("max_steps")
        if not lr or not steps:
            return None
        # the runner passes warmup_ratio as the Trainer's warmup_steps: below 1 a ratio
        warm = extra.get("warmup_steps", extra.get("warmup_ratio", cfg.get("warmup_ratio", 0.0)))
        warm = float(warm or 0.0)
        warmup = math.ceil(warm * steps) if warm < 1 else int(warm)
        return cls(lr=float(lr), max_steps=int(steps),
                   kind=str(extra.get("optim", cls.kind)),
                   betas=(float(extra.get("adam_beta1", 0.9)), float(extra.get("adam_beta2", 0.999))),
                   eps=float(extra.get("adam_epsilon", 1e-8)),
                   weight_decay=float(extra.get("weight_decay", cfg.get("weight_decay", 0.0)) or 0.0),
                   max_grad_norm=cfg.get("max_grad_norm"),
                   lr_scheduler_type=str(extra.get("lr_scheduler_type",
                                                   cfg.get("lr_scheduler_type", "constant"))),
                   warmup_steps=warmup)


def run_metadata(folder: Path | str) -> dict[str, Any] | None:
    """``{"config": train-config.json, "summary": train-summary.json or {}, "run": folder}`` of
    the training run ``folder`` (a run's output or one of its checkpoints) belongs to, or None for
    a model no run of ours made."""
    path = find_train_config(folder)
    if path is None:
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    summary_path = path.parent / "train-summary.json"
    summary = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            summary = {}
    return {"config": cfg, "summary": summary, "run": path.parent}


@dataclass
class Floor:
    """Both measures at one step: mean over replicate blocks and the 2.5-97.5 percentiles."""

    step: int
    update_scale: float
    update_scale_ci95: list[float]
    coherence: float
    coherence_ci95: list[float]


def simulate(s: OptimizerSettings, at_steps: list[int] | None = None, block: int = BLOCK,
             replicates: int = REPLICATES, seed: int = SEED, w_rms: float = 0.1,
             constant_gradient: bool = False) -> dict[int, Floor]:
    """AdamW on pure-noise gradients with ``s``'s settings, for ``s.max_steps`` steps.

    ``replicates`` blocks of ``block`` entries (float64), block ``i`` fed from generator seed
    ``seed + i``; weights start as ``w_rms x N(0, 1)``. Per step in ``at_steps`` (default: the
    last): ``RMS(W_t - W_0) / (lr x t)`` (``lr`` = the configured peak) and
    ``||W_t - W_0|| / sum_{u<=t} ||W_u - W_{u-1}||``, each per block, then mean and percentile
    interval over blocks (a matrix larger than one block spreads less). ``constant_gradient``:
    one fixed gradient per block instead of noise (the sign-step ceiling: both measures reach 1).
    """
    steps = sorted(set(at_steps or [s.max_steps]))
    if steps[0] < 1 or steps[-1] > s.max_steps:
        raise ValueError(f"steps {steps} outside 1..{s.max_steps}")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(replicates)]
    w0 = torch.stack([torch.randn(block, generator=g, dtype=torch.float64) for g in gens]) * w_rms
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([w], lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
    sched = get_scheduler(s.lr_scheduler_type, opt, num_warmup_steps=s.warmup_steps,
                          num_training_steps=s.max_steps)
    fixed = torch.stack([torch.randn(block, generator=g, dtype=torch.float64) for g in gens])
    prev = w0.clone()
    path = torch.zeros(replicates, dtype=torch.float64)
    out: dict[int, Floor] = {}
    for t in range(1, s.max_steps + 1):
        w.grad = fixed.clone() if constant_gradient else torch.stack(
            [torch.randn(block, generator=g, dtype=torch.float64) for g in gens])
        opt.step()
        sched.step()
        cur = w.detach()
        path += torch.linalg.vector_norm(cur - prev, dim=1)
        prev = cur.clone()
        if t in steps:
            d = cur - w0
            scale = (d.square().mean(1).sqrt() / (s.lr * t)).numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                coh = (torch.linalg.vector_norm(d, dim=1) / path).numpy()
            out[t] = Floor(t, float(scale.mean()), _pct(scale), float(np.nanmean(coh)), _pct(coh))
    return out


def _pct(x: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]


def floor_record(s: OptimizerSettings, f: Floor, w_rms: float, block: int = BLOCK,
                 replicates: int = REPLICATES, seed: int = SEED) -> dict[str, Any]:
    """The ``noise_floor[model]`` entry of the weight-change result."""
    return {"update_scale": f.update_scale, "coherence": f.coherence,
            "update_scale_ci95": f.update_scale_ci95, "coherence_ci95": f.coherence_ci95,
            "settings": {**s.to_json(), "step": f.step, "simulated_as": "torch.optim.AdamW",
                         "clipping": "not simulated (a constant rescaling of pure-noise "
                                     "gradients leaves Adam's update unchanged up to eps)",
                         "w_rms": w_rms, "block": block, "replicates": replicates, "seed": seed,
                         "ci95": "2.5-97.5 percentiles over replicate blocks"}}
