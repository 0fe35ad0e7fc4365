"""Options shared by the `mechinterp` commands and their sub-apps (one definition each).

``Base``, ``Device`` and ``Dtype`` accept None: ``train`` leaves them unset so that its settings
(preset, then the paper's defaults) decide; the other commands give them a default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError

Base = Annotated[str | None, typer.Option("--base", "-b", help="Base model spec: zoo name, "
                                          "folder, .gguf file, or hub ORG/NAME[@REV].")]
Variant = Annotated[list[str] | None, typer.Option(
    "--variant", "-v", help="NAME=SPEC of a fine-tuned model; NAME=SPEC1,SPEC2,... for the "
    "checkpoints of one run (e.g. sft=out@step-40,out@step-80, or sft=out@all for every "
    "step-N/checkpoint-N folder of a training output). Repeatable.")]
DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="Data root with mmlu/, knowns/, gsm8k/ (default: $MECHINTERP_DATA, else "
    "the Hugging Face hub).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Results folder; each probe writes "
                                   "OUT/<probe>/result.json and its figures.")]
Device = Annotated[str | None, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")]
Dtype = Annotated[str | None, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, "
                                           "bfloat16, float16.")]
Limit = Annotated[int | None, typer.Option(help="Use at most N data items in all (a fixed, seeded "
                                           "selection; shared between a probe's prompt sets).")]
Seed = Annotated[int, typer.Option(help="Seed of the item selection (and of anything random).")]


DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", help="Spread each model over several devices with accelerate's big-model "
    "placement: auto (fill the GPUs, then CPU, then disk), balanced, sequential. For models "
    "larger than one GPU; the base and one variant are resident at a time.")]
MaxMemory = Annotated[str | None, typer.Option(
    "--max-memory", help="With --device-map: memory per device for the weights, e.g. "
    "0=70GiB,1=70GiB,cpu=200GiB (leave room for activations).")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace a stored result of other models (other names or specs) in OUT; "
    "without it such a result is never replaced. Results of the same models are recomputed "
    "whenever their inputs changed, with or without it.")]


def key_values(items: list[str] | None, option: str, example: str) -> dict[str, str]:
    """Repeatable ``KEY=VALUE`` options as a dict.

    Args:
        items: the values given (None: none).
        option: the option's flag, for the error line (``--set``).
        example: a ``KEY=VALUE`` that would do, for the error line.

    Returns:
        ``{KEY: VALUE}``, both stripped; an item without ``=`` is a :class:`UserError`.
    """
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{option} {item!r} is not KEY=VALUE", f"e.g. {option} {example}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
