"""The precision scheme of a training run: which dtype the weights are kept and updated in, and
which dtype the matrix products run in.

``--dtype bfloat16`` (the default on a GPU) means bf16 *mixed precision*: the model is loaded in
float32, AdamW updates those float32 weights (the master weights), and the forward and backward
passes run under accelerate's bf16 autocast (TrainingArguments ``bf16=True``). Updating bf16 weights
directly would be wrong at the paper's learning rate: an update smaller than half of bf16's
rounding step at that weight (about ``|w| * 2**-9``) rounds away, so sparsity measured afterwards
would be an artefact of precision. Under DeepSpeed the engine keeps its own float32 master weights
and casts the model to bf16. ``float32`` (the default on a CPU) and ``float64`` train without
autocast. The scheme is written to ``OUT/train-config.json`` under ``"precision"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models.device import pick_dtype

_MIXED = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_FROM_ENV = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    param_dtype: torch.dtype  # the model's parameters: what AdamW updates, what checkpoints hold
    compute_dtype: torch.dtype  # matrix products (autocast); == param_dtype without mixed precision
    deepspeed: bool = False

    @property
    def mixed(self) -> str:
        """accelerate's ``mixed_precision``: ``bf16``, ``fp16`` or ``no``."""
        return _MIXED.get(self.compute_dtype, "no") if self.compute_dtype != self.param_dtype else "no"

    def record(self) -> dict[str, str | bool]:
        """For the run's metadata (``train-config.json``)."""
        name = str(self.compute_dtype).removeprefix("torch.")
        if self.mixed == "no":
            master = f"the model's {_name(self.param_dtype)} parameters (no mixed precision)"
        elif self.deepspeed:
            master = "DeepSpeed's float32 master weights (the engine casts the model to " \
                     f"{name} for compute)"
        else:
            master = f"the model's float32 parameters (AdamW updates them; {name} autocast)"
        return {"param_dtype": _name(self.param_dtype), "compute_dtype": name,
                "mixed_precision": self.mixed, "autocast": self.mixed != "no",
                "master_weights": master}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose(dtype: str | None, device: torch.device, deepspeed: bool = False) -> Precision:
    """The scheme for ``--dtype`` on ``device``. ``auto`` follows the launcher's mixed precision
    (``accelerate launch --mixed_precision``) when it sets one, else bf16 on a GPU and float32 on a
    CPU; an explicit ``--dtype`` that contradicts the launcher is refused."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if dtype in (None, "", "auto") and launcher in _FROM_ENV:
        compute = _FROM_ENV[launcher]
    else:
        compute = pick_dtype(dtype, device)
    p = Precision(torch.float32 if compute in _MIXED else compute, compute, deepspeed)
    if launcher in _FROM_ENV and p.mixed != launcher:
        raise UserError(f"the launcher asks for {launcher} mixed precision but --dtype is {dtype}",
                        f"pass --dtype {_name(_FROM_ENV[launcher])} or launch without "
                        "--mixed_precision")
    if p.mixed == "fp16" and device.type != "cuda":
        raise UserError("float16 mixed precision needs a GPU", "use --dtype bfloat16 on a CPU")
    return p
