"""A variant of the default model with a *planted* change of known size: the known answer that
tests and the tour notebook check the probes against (mid-layer MLPs moved 5%, attention q/k
0.1%, everything else untouched)."""

from __future__ import annotations

from pathlib import Path

from .models.edit import plant_change
from .models.loaded import load
from .models.zoo import DEFAULT_MODEL
from .paths import cache_dir

PLANTED_MLP_LAYERS = range(12, 18)
PLANTED_MLP_REL = 5e-2  # about SFT's MLP change at lr 5e-5 in the paper
PLANTED_QK_REL = 1e-3


def planted_variant(device: str | None = None) -> Path:
    """The default model with a known change, cached (built once, ~5 s)."""
    folder = cache_dir() / "demo" / f"smollm2-planted-mlp{PLANTED_MLP_REL:g}-qk{PLANTED_QK_REL:g}"
    if (folder / "config.json").exists():
        return folder
    model = load(DEFAULT_MODEL, device="cpu", dtype="float32")
    edits = {(layer, m): PLANTED_MLP_REL for layer in PLANTED_MLP_LAYERS
             for m in ("gate", "up", "down")}
    edits |= {(layer, m): PLANTED_QK_REL for layer in range(model.n_layers) for m in ("q", "k")}
    tmp = folder.with_name(folder.name + ".tmp")
    plant_change(model, tmp, edits, seed=0)
    tmp.rename(folder)
    return folder

