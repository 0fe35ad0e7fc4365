"""The precision gate (``mechinterp demo --precision-contrast``): is "RL updates are sparse" a
property of the algorithm or of where the update accumulates?

SFT and GRPO are trained twice each from the same base, seed, prompts and steps: once in pure bf16
(bf16 weights, AdamW updating them, as a naive GPU run does) and once with float32 master weights
under bf16 autocast (the matrix products run in bf16 both times, so what differs is only where the
update accumulates). The base is the demo's base rounded to bf16 once and saved
(``OUT/precision/base-bf16``): both schemes start from exactly the same values, so an exactly
unchanged entry means the same thing in both, the bf16 run's stored update is comparable entry by
entry, and the base is what a bf16 GPU run loads. ``update-geometry`` then measures the stored
updates against that base (``OUT/precision/update-geometry``): the fraction of entries exactly
unchanged in the stored dtype, unchanged once rounded to bf16, and within 1e-5, per layer and
matrix. The report's "precision gate" section (:mod:`mechinterp.study.precision_report`) states
them per run kind and scheme.

Layout of ``OUT/precision``::

    base-bf16/                 the base rounded to bf16 (config, safetensors, tokenizer)
    models/<kind>-<scheme>     the training runs (``sft-pure-bf16``, ``sft-fp32-master``, ...;
                               further seeds ``-s1``, ...)
    update-geometry/           the precision (and, at the default size, spectral) measures
    contrast.json              what was run: base, preset, runs with their kind, scheme and seed

Finished runs and a stored result with unchanged inputs are reused, as the demo does.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.options import make_config
from ..core.registry import get_probe
from ..core.runner import run_probe
from ..data import DataSource
from ..errors import UserError
from ..models import load
from ..models.modelset import ModelSet
from ..models.origin import ORIGIN_FILE
from ..models.zoo import DEFAULT_MODEL
from ..store.results import check_out
from .demo import DEMO_PRESETS, DemoPreset, DemoRun, train_one
from .precision_report import CONTRAST_DIR, CONTRAST_FILE, gate_lines

BASE_DIR = "base-bf16"
_BASE_MARK = "mechinterp-bf16-of.json"
#: the two schemes: training ``--precision`` -> the suffix of the run's name
SCHEMES = {"pure-bf16": "pure-bf16", "mixed-bf16": "fp32-master"}
#: what each scheme is, in words
SCHEME_WORDS = {"pure-bf16": "pure bf16 (bf16 weights, AdamW on them)",
                "mixed-bf16": "float32 master weights (bf16 autocast)"}
KINDS = ("sft", "grpo")


@dataclass(frozen=True)
class ContrastPreset:
    """A demo preset's training settings, with ``train`` on top, for both schemes."""

    demo_preset: str
    train: dict[str, Any] = field(default_factory=dict)
    spectral: bool = True  # update-geometry's SVD measures too (else the precision measures only)
    seeds: int = 1


#: ``smoke``: the smoke demo's 2 steps (CI); ``default``: the demo's settings (12 steps at lr 2e-5,
#: the arithmetic task), one checkpoint and fewer KL items; ``paper``: the paper's settings (GPU)
CONTRAST_PRESETS: dict[str, ContrastPreset] = {
    "smoke": ContrastPreset("smoke", spectral=False),
    "default": ContrastPreset("default", dict(checkpoints=1, n_heldout=8)),
    "full": ContrastPreset("full", dict(checkpoints=1, n_heldout=8)),
    "paper": ContrastPreset("paper", dict(checkpoints=1)),
}


@dataclass(frozen=True)
class ContrastRun:
    run: DemoRun
    scheme: str  # a key of SCHEMES


def contrast_runs(seeds: int = 1) -> list[ContrastRun]:
    """SFT and GRPO in each scheme, seed by seed: ``sft-pure-bf16``, ``sft-fp32-master``,
    ``grpo-pure-bf16``, ``grpo-fp32-master``, then ``...-s1`` for seed 1, ..."""
    if seeds < 1:
        raise UserError(f"a precision contrast needs at least one seed (got {seeds})",
                        "use seeds >= 1")
    return [ContrastRun(DemoRun(f"{kind}-{suffix}" + (f"-s{i}" if i else ""), kind, None, i,
                                False), scheme)
            for i in range(seeds) for kind in KINDS for scheme, suffix in SCHEMES.items()]


def bf16_base(spec: str, folder: Path, echo=print) -> Path:
    """``spec``'s weights rounded to bf16 (nearest even) and saved as a model folder, with its
    tokenizer and origin record; reused when ``folder`` already holds it for the same spec."""

    folder = Path(folder)
    mark = folder / _BASE_MARK
    if mark.is_file() and json.loads(mark.read_text()).get("source") == spec:
        return folder
    lm = load(spec, device="cpu", dtype="bfloat16")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.hf.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    origin = Path(lm.resolved.path) / ORIGIN_FILE
    if origin.is_file():  # still the same quantised source, as far as weight-change asks
        shutil.copy2(origin, tmp / ORIGIN_FILE)
    (tmp / _BASE_MARK).write_text(json.dumps({"source": spec, "source_path": str(
        lm.resolved.path), "dtype": "bfloat16", "rounding": "nearest even"}, indent=1) + "\n")
    lm.free()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    echo(f"  base rounded to bf16: {folder}")
    return folder


def run_contrast(out: Path | str, preset: str = "default", base: str | None = None,
                 data_dir=None, device: str = "auto", echo=print, seeds: int | None = None,
                 train: dict[str, Any] | None = None) -> dict:
    """Train the contrast into ``out/precision`` and measure it (see the module docstring).
    ``base``: the model to start from (default: the built-in model); ``train``: more training
    settings for every run (e.g. ``{"learning_rate": 1e-4}``). Returns ``contrast.json``'s
    content."""

    if preset not in CONTRAST_PRESETS:
        raise UserError(f"unknown precision-contrast preset {preset!r}",
                        f"use one of {', '.join(CONTRAST_PRESETS)}")
    check_out(out)
    cp = CONTRAST_PRESETS[preset]
    folder = Path(out) / CONTRAST_DIR
    spec = base or DEFAULT_MODEL
    t0 = time.perf_counter()
    echo(f"precision contrast (preset {preset}): SFT and GRPO in pure bf16 and with float32 "
         f"master weights, from {spec} rounded to bf16, into {folder}")
    start = bf16_base(spec, folder / BASE_DIR, echo)
    dp = DEMO_PRESETS[cp.demo_preset]
    train_preset = DemoPreset(dp.train_preset, dp.compare_preset,
                              dict(dp.train) | cp.train | (train or {}) | {"base": str(start)},
                              dict(dp.grpo))
    runs = contrast_runs(seeds or cp.seeds)
    folders = {}
    for r in runs:
        folders[r.run.name] = str(train_one(r.run, train_preset, folder, data_dir, device,
                                             r.scheme, echo))
    t_train = time.perf_counter() - t0
    probe = get_probe("update-geometry")
    config = make_config(probe, {"spectral": cp.spectral})
    models = ModelSet(str(start), folders, device="cpu")
    res = run_probe(probe, models, DataSource.from_option(data_dir), config, out=folder,
                    reuse=True, echo=lambda m: echo(f"  {m}"))
    meta = {"preset": preset, "base": spec, "bf16_base": str(start),
            "runs": {r.run.name: {"kind": r.run.algorithm, "scheme": r.scheme,
                                  "seed": r.run.seed, "folder": folders[r.run.name]}
                     for r in runs},
            "schemes": SCHEME_WORDS, "spectral": cp.spectral,
            "training": {k: v for k, v in vars(train_preset).items() if k != "compare_preset"},
            "wall_time_s": {"training": round(t_train, 1),
                            "update_geometry": res.provenance.get("wall_time_s")}}
    (folder / CONTRAST_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    for line in gate_lines(Path(out)):
        echo(f"  {line}")
    return meta
