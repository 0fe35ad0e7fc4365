"""The main job (``mechinterp demo``): the study end to end on the built-in default model.

1. train ``OUT/models/sft``, ``OUT/models/grpo`` and ``OUT/models/sft-frozen`` (SFT with the
   paper's mid-layer MLPs frozen) from the same base, on the same synthetic arithmetic prompts,
   with the same steps and learning rate;
2. ``compare`` them with the base: every probe, MMLU cloze, the in-domain task, paired statistics;
3. write ``OUT/report.md``, ``OUT/report.html``, ``OUT/claims.json`` and print the verdict.

Presets: ``smoke`` (minutes; CI runs it), ``default`` (the CPU study, about 20 minutes on two
cores), ``paper`` (the paper's training settings; for a GPU node). A run folder whose training
finished is reused; one that stopped part-way is resumed; ``compare`` reuses every result whose
configuration and weights are unchanged, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .models.zoo import DEFAULT_MODEL, fetch

RUNS = (("sft", "sft", None), ("grpo", "grpo", None), ("sft-frozen", "sft", "paper-mid-mlp"))


@dataclass(frozen=True)
class DemoPreset:
    train_preset: str | None  # a training preset (training/settings.py), None: the paper's values
    compare_preset: str
    train: dict[str, Any] = field(default_factory=dict)  # overrides for both algorithms
    grpo: dict[str, Any] = field(default_factory=dict)  # overrides for GRPO only


DEMO_PRESETS: dict[str, DemoPreset] = {
    "smoke": DemoPreset("cpu-demo", "smoke", dict(max_steps=2, checkpoints=1, n_heldout=4)),
    "default": DemoPreset("cpu-demo", "default"),
    "paper": DemoPreset(None, "paper", dict(data="arithmetic:max=99")),
}


def _train_one(name: str, algorithm: str, freeze: str | None, preset: DemoPreset, out: Path,
               data_dir, device: str, dtype: str, echo) -> Path:
    from .training.runner import CONFIG_FILE, SUMMARY_FILE, train
    from .training.settings import resolve_settings

    folder = out / "models" / name
    overrides = dict(preset.train) | (preset.grpo if algorithm == "grpo" else {})
    overrides |= {"freeze_preset": freeze, "device": device, "dtype": dtype}
    settings = resolve_settings(algorithm, preset.train_preset, overrides)
    if (folder / SUMMARY_FILE).is_file():
        saved = json.loads((folder / CONFIG_FILE).read_text())
        if saved == json.loads(json.dumps(settings.to_json())):
            echo(f"  {name}: finished run in {folder}, reused")
            return folder
        raise UserError(f"{folder} holds a finished run with other settings",
                        "use another --out, or delete that folder to retrain")
    resume = (folder / CONFIG_FILE).is_file()
    echo(f"  {name}: {algorithm}{' with ' + freeze + ' frozen' if freeze else ''}, "
         f"{settings.max_steps} steps, lr {settings.learning_rate:g}, "
         f"{settings.checkpoints} checkpoints{' (resuming)' if resume else ''}")
    outcome = train(settings, folder, resume=resume, data_dir=data_dir,
                    echo=lambda m: echo(f"    {m}"))
    echo(f"  {name}: {outcome.steps} steps in {outcome.wall_time_s:.0f} s")
    return folder


def run_demo(out: Path, preset: str = "default", data_dir=None, device: str = "auto",
             dtype: str = "auto", echo=print, overwrite: bool = False):
    from .claims import verdict_line
    from .compare import compare
    from .results import check_out

    if preset not in DEMO_PRESETS:
        raise UserError(f"unknown demo preset {preset!r}", f"use one of {', '.join(DEMO_PRESETS)}")
    check_out(out)
    p = DEMO_PRESETS[preset]
    out = Path(out)
    t0 = time.perf_counter()
    echo(f"[1/3] base model {DEFAULT_MODEL}: {fetch(DEFAULT_MODEL)}")
    echo(f"[2/3] training three fine-tunes into {out / 'models'} (preset {preset})")
    variants = {name: str(_train_one(name, algo, freeze, p, out, data_dir, device, dtype, echo))
                for name, algo, freeze in RUNS}
    t_train = time.perf_counter() - t0
    echo(f"[3/3] comparing them with the base (compare preset {p.compare_preset})")
    study = compare(DEFAULT_MODEL, variants, out, data_dir=data_dir, preset=p.compare_preset,
                    device=device, dtype=dtype, echo=echo, overwrite=overwrite)
    claims = study.claims
    wall = time.perf_counter() - t0
    echo("")
    echo(f"report: {out / 'report.html'} (also report.md, claims.json)")
    echo(f"verdict ({wall / 60:.1f} min in all, {t_train / 60:.1f} min training):")
    for c in claims:
        echo("  " + verdict_line(c))
    return study, claims


def ensure_demo(folder: Path | str = "results", preset: str = "smoke", echo=print) -> Path:
    """The demo's output folder, for notebooks: used as it is when it holds a finished study
    (``study.json``), else built there with ``preset`` (``smoke``: a few minutes on a CPU; run
    ``mechinterp demo --out DIR`` for the default study)."""
    from .compare import STUDY_FILE

    folder = Path(folder)
    if not (folder / STUDY_FILE).is_file():
        echo(f"no finished demo in {folder}: building it with the {preset} preset")
        run_demo(folder, preset=preset, echo=echo)
    return folder
