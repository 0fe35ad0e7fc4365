"""The precision scheme of a training run: which dtype the weights are kept and updated in, and
which dtype the matrix products run in.

``--precision`` (or ``--dtype``) names it:

* ``mixed-bf16`` (``--dtype bfloat16``, the default on a GPU): bf16 *mixed precision*. The model
  is loaded in float32, AdamW updates those float32 weights (the master weights), and the forward
  and backward passes run under accelerate's bf16 autocast (TrainingArguments ``bf16=True``; on a
  CPU this is ``torch.autocast("cpu", torch.bfloat16)``). Under DeepSpeed the engine keeps its own
  float32 master weights and casts the model to bf16.
* ``pure-bf16``: the model is loaded in bf16 and AdamW updates the bf16 parameters directly (its
  moments are bf16 too), with no autocast: what a naive GPU run does when it loads a bf16 hub
  checkpoint and trains it as it is. An update smaller than half of bf16's rounding step at a
  weight (about ``|w| * 2**-9``) rounds away, step after step, so the stored update looks sparse;
  this scheme exists to show that artefact (``mechinterp demo --precision-contrast``).
* ``float32`` (the default on a CPU), ``float64``: that dtype throughout, no autocast.

The scheme is written to ``OUT/train-config.json`` under ``"precision"`` (``"scheme"`` names it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models.device import pick_dtype

_MIXED = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_FROM_ENV = {"bf16": torch.bfloat16, "fp16": torch.float16}
PURE_BF16 = "pure-bf16"
#: ``--precision`` values (``--dtype`` also takes them, and dtype names)
SCHEMES = (PURE_BF16, "mixed-bf16", "float32", "float64")
#: the scheme each ``--dtype`` name means
_DTYPE_SCHEME = {"bfloat16": "mixed-bf16", "bf16": "mixed-bf16", "float16": "mixed-fp16",
                 "fp16": "mixed-fp16", "float32": "float32", "fp32": "float32",
                 "float64": "float64"}
_SCHEME_DTYPE = {"mixed-bf16": "bfloat16", "mixed-fp16": "float16"}


@dataclass(frozen=True)
class Precision:
    param_dtype: torch.dtype  # the model's parameters: what AdamW updates, what checkpoints hold
    compute_dtype: torch.dtype  # matrix products (autocast); == param_dtype without mixed precision
    deepspeed: bool = False

    @property
    def mixed(self) -> str:
        """accelerate's ``mixed_precision``: ``bf16``, ``fp16`` or ``no``."""
        return _MIXED.get(self.compute_dtype, "no") if self.compute_dtype != self.param_dtype else "no"

    @property
    def scheme(self) -> str:
        """``mixed-bf16``, ``mixed-fp16``, ``pure-bf16``, ``float32`` or ``float64``."""
        if self.mixed != "no":
            return f"mixed-{self.mixed}"
        return PURE_BF16 if self.param_dtype == torch.bfloat16 else _name(self.param_dtype)

    def record(self) -> dict[str, str | bool]:
        """For the run's metadata (``train-config.json``)."""
        name = str(self.compute_dtype).removeprefix("torch.")
        if self.scheme == PURE_BF16:
            master = ("none: AdamW updates the model's bfloat16 parameters (pure bf16; an update "
                      "below half a bf16 step at a weight rounds away)")
        elif self.mixed == "no":
            master = f"the model's {_name(self.param_dtype)} parameters (no mixed precision)"
        elif self.deepspeed:
            master = "DeepSpeed's float32 master weights (the engine casts the model to " \
                     f"{name} for compute)"
        else:
            master = f"the model's float32 parameters (AdamW updates them; {name} autocast)"
        return {"scheme": self.scheme, "param_dtype": _name(self.param_dtype),
                "compute_dtype": name, "mixed_precision": self.mixed,
                "autocast": self.mixed != "no", "master_weights": master}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def from_options(dtype: str | None, precision: str | None) -> str | None:
    """The run's ``dtype`` setting from ``--dtype`` and ``--precision`` (the scheme's name, or
    the dtype when no ``--precision`` is given); both given and meaning different schemes is
    refused."""
    if precision is None:
        return dtype
    if precision not in SCHEMES:
        raise UserError(f"unknown --precision {precision!r}", f"use one of {', '.join(SCHEMES)}")
    if dtype not in (None, "", "auto") and _DTYPE_SCHEME.get(dtype, dtype) != precision:
        raise UserError(f"--dtype {dtype} and --precision {precision} ask for different schemes",
                        "pass only --precision")
    return precision


def choose(dtype: str | None, device: torch.device, deepspeed: bool = False) -> Precision:
    """The scheme for ``--dtype``/``--precision`` on ``device``. ``auto`` follows the launcher's
    mixed precision (``accelerate launch --mixed_precision``) when it sets one, else bf16 mixed
    precision on a GPU and float32 on a CPU; an explicit value that contradicts the launcher is
    refused, and so is ``pure-bf16`` under DeepSpeed (its engine keeps float32 master weights)."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if dtype == PURE_BF16:
        p = Precision(torch.bfloat16, torch.bfloat16, deepspeed)
    else:
        if dtype in (None, "", "auto") and launcher in _FROM_ENV:
            compute = _FROM_ENV[launcher]
        else:
            try:
                compute = pick_dtype(_SCHEME_DTYPE.get(dtype, dtype), device)
            except UserError:
                raise UserError(f"unknown --dtype/--precision {dtype!r}",
                                f"use auto, one of {', '.join(SCHEMES)}, or a dtype: "
                                f"{', '.join(_DTYPE_SCHEME)}") from None
        p = Precision(torch.float32 if compute in _MIXED else compute, compute, deepspeed)
    if launcher in _FROM_ENV and p.mixed != launcher:
        raise UserError(f"the launcher asks for {launcher} mixed precision but --dtype is {dtype}",
                        f"pass --dtype {_name(_FROM_ENV[launcher])} or launch without "
                        "--mixed_precision")
    if p.scheme == PURE_BF16 and deepspeed:
        raise UserError("pure bf16 under DeepSpeed: the engine keeps float32 master weights "
                        "whatever the model's dtype", "use --precision mixed-bf16 under DeepSpeed")
    if p.mixed == "fp16" and device.type != "cuda":
        raise UserError("float16 mixed precision needs a GPU", "use --dtype bfloat16 on a CPU")
    return p
