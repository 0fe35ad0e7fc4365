"""Device and dtype choice: CUDA when present, else CPU; float32 on CPU, bfloat16 on GPU."""

from __future__ import annotations

import re

import torch

from ..errors import UserError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64}


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available", "use --device cpu")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"use auto or one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


#: ``device_map`` strings accelerate's big-model placement understands (``from_pretrained``).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map):
    """None (one device), one of :data:`DEVICE_MAPS`, or an explicit ``{module: device}`` dict
    (devices: GPU index, ``"cpu"``, ``"disk"``)."""
    if device_map in (None, "", "none"):
        return None
    if isinstance(device_map, dict) or device_map in DEVICE_MAPS:
        return device_map
    raise UserError(f"unknown device map {device_map!r}",
                    f"use one of {', '.join(DEVICE_MAPS)} (accelerate's placement), or leave it out")


_SIZE = re.compile(r"^\d+(\.\d+)?([KMGT]i?B)?$", re.IGNORECASE)


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (the
    ``max_memory`` of accelerate: per device, what its share of the weights may use)."""
    if text is None or isinstance(text, dict):
        return text
    out: dict = {}
    for item in (s.strip() for s in text.split(",")):
        key, sep, size = item.partition("=")
        key, size = key.strip(), size.strip()
        if (not item or not sep or not (key.isdigit() or key in ("cpu", "disk", "mps"))
                or not _SIZE.match(size)):
            raise UserError(f"--max-memory item {item!r} is not DEVICE=SIZE",
                            "write e.g. 0=70GiB,1=70GiB,cpu=200GiB (GPU index, cpu or disk; "
                            "a size in bytes or with a unit KB/MB/GB/KiB/MiB/GiB)")
        out[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else size
    return out


def input_device(module: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: the device its input embedding computes on. For a model placed
    by accelerate that is the execution device of the hook over the embedding (its weight may sit
    on the meta device, offloaded); otherwise the device of its weight."""
    emb = module.get_input_embeddings()
    for mod in (emb, module):
        dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        if mod is emb and emb.weight.device.type != "meta":
            return emb.weight.device
    return torch.device("cpu")
