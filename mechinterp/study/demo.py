"""The main job (``mechinterp demo``): the study end to end on the built-in default model.

1. train ``OUT/models/sft``, ``OUT/models/grpo`` and ``OUT/models/sft-frozen`` (SFT with the
   paper's mid-layer MLPs frozen) from the same base, on the same synthetic arithmetic prompts,
   with the same steps and learning rate; with several seeds, again as ``sft-s1``, ``grpo-s1``,
   ``sft-frozen-s1``, ``sft-s2``, ... (training seed 1, 2, ...: :func:`demo_runs`);
2. ``compare`` them with the base: the claims' probes on every seed, paired statistics (with
   ``full`` also the single-model probes, attention shift, MLP patching and causal tracing, and the
   model-diffing probes on each kind's first seed);
3. write ``OUT/report.md``, ``OUT/report.html``, ``OUT/claims.json`` and print the verdict.

Presets: ``smoke`` (minutes, one seed, every probe; CI runs it), ``default`` (the CPU study: three
seeds), ``full`` (``default`` plus the single-model and model-diffing probes: attention shift, patching,
tracing, activation-difference lens, logit lens, stitching), ``paper`` (the paper's training settings; for a GPU
node). A run folder whose training finished is reused; one that stopped part-way is resumed;
``compare`` reuses every result whose configuration and weights are unchanged, so an interrupted
demo continues where it stopped.

What a finished run keeps (:func:`mechinterp.training.callbacks.prune_finished`): the final model
(exact float32, also ``checkpoints/step-FINAL``) and the drift log of every checkpoint
(``training-drift/``: weight change and KL at each, computed in memory while training) always;
every checkpoint's weights only for the first seed's SFT and GRPO runs (the trajectory that the
checkpoint probes and C7 read); the optimizer state (``trainer-state/``, only needed to resume)
never. ``--keep-checkpoints`` keeps every checkpoint of every run and the optimizer state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models.lineage import read_run_json
from ..models.run_folder import CONFIG_FILE, SUMMARY_FILE
from ..models.zoo import DEFAULT_MODEL, fetch
from ..store.results import check_out
from .claims import verdict_line
from .compare import compare
from .folder import STUDY_FILE

#: The run kinds of the study: (name of the first seed's run, algorithm, freeze preset)
RUNS = (("sft", "sft", None), ("grpo", "grpo", None), ("sft-frozen", "sft", "paper-mid-mlp"))
#: Kinds whose first seed keeps every checkpoint (the trajectory: checkpoint probes, C7)
TRAJECTORY_KINDS = ("sft", "grpo")


@dataclass(frozen=True)
class DemoRun:
    name: str  # "sft", "grpo", "sft-frozen" for seed 0; "sft-s1", ... for further seeds
    algorithm: str
    freeze: str | None
    seed: int
    trajectory: bool  # keeps every checkpoint's weights (else the final one only)


def demo_runs(seeds: int) -> list[DemoRun]:
    """The runs of a demo, seed by seed (an interrupted demo has whole seeds).

    Args:
        seeds: training seeds per run kind (at least 1).

    Returns:
        One run per kind and seed: seed 0 named by its kind, seed i > 0 ``KIND-si``.
    """
    if seeds < 1:
        raise UserError(f"a demo needs at least one seed (got {seeds})", "use seeds >= 1")
    return [DemoRun(name + (f"-s{i}" if i else ""), algo, freeze, i,
                    i == 0 and name in TRAJECTORY_KINDS)
            for i in range(seeds) for name, algo, freeze in RUNS]


@dataclass(frozen=True)
class DemoPreset:
    train_preset: str | None  # a training preset (training/settings.py), None: the paper's values
    compare_preset: str
    train: dict[str, Any] = field(default_factory=dict)  # overrides for both algorithms
    grpo: dict[str, Any] = field(default_factory=dict)  # overrides for GRPO only
    seeds: int = 1  # training seeds per run kind (0, 1, ...)


DEMO_PRESETS: dict[str, DemoPreset] = {
    "smoke": DemoPreset("cpu-demo", "smoke", dict(max_steps=2, checkpoints=1, n_heldout=4)),
    "default": DemoPreset("cpu-demo", "default", seeds=3),
    "full": DemoPreset("cpu-demo", "full", seeds=3),
    "paper": DemoPreset(None, "paper", dict(data="arithmetic:max=99")),
}


def train_one(run: DemoRun, preset: DemoPreset, out: Path, data_dir, device: str, dtype: str,
               echo, keep_checkpoints: bool = False) -> Path:
    # deferred: the training modules import transformers' Trainer (only a demo that trains needs it)
    from ..training.callbacks import prune_finished
    from ..training.runner import train
    from ..training.settings import resolve_settings, settings_differ

    name, algorithm, freeze = run.name, run.algorithm, run.freeze
    folder = out / "models" / name
    overrides = dict(preset.train) | (preset.grpo if algorithm == "grpo" else {})
    overrides |= {"freeze_preset": freeze, "device": device, "dtype": dtype, "seed": run.seed}
    settings = resolve_settings(algorithm, preset.train_preset, overrides)
    keep = keep_checkpoints or run.trajectory
    if (folder / SUMMARY_FILE).is_file():
        differ = settings_differ(read_run_json(folder / CONFIG_FILE), settings)
        if not differ:
            echo(f"  {name}: finished run in {folder}, reused")
            return folder
        what = ", ".join(f"{k} (run: {a!r}, now: {b!r})" for k, (a, b) in list(differ.items())[:3])
        raise UserError(f"{folder} holds a finished run with other settings: {what}",
                        "use another --out, or delete that folder to retrain")
    resume = (folder / CONFIG_FILE).is_file()
    echo(f"  {name}: {algorithm}{' with ' + freeze + ' frozen' if freeze else ''}, seed "
         f"{run.seed}, {settings.max_steps} steps, lr {settings.learning_rate:g}, "
         f"{settings.checkpoints} checkpoints{' (resuming)' if resume else ''}")
    outcome = train(settings, folder, resume=resume, data_dir=data_dir,
                    echo=lambda m: echo(f"    {m}"))
    gone = prune_finished(folder, keep_checkpoints=keep, keep_trainer_state=keep_checkpoints)
    what = "optimizer state" + ("" if keep else " and earlier checkpoints")
    echo(f"  {name}: {outcome.steps} steps in {outcome.wall_time_s:.0f} s"
         + (f"; freed {gone / 1e9:.2f} GB ({what})" if gone else ""))
    return folder


def run_demo(out: Path, preset: str = "default", data_dir=None, device: str = "auto",
             dtype: str = "auto", echo=print, keep_checkpoints: bool = False,
             overwrite: bool = False):
    """Train the study's fine-tunes, compare them with the base, print the verdict.

    Args:
        out: the demo folder (runs in ``out/models/``, the study's results beside them).
        preset: a preset of :data:`DEMO_PRESETS`.
        data_dir: the data root (None: ``$MECHINTERP_DATA``).
        device, dtype: where and in what precision the models train and run.
        echo: print-like function for progress.
        keep_checkpoints: keep every checkpoint of every run and the optimizer state.
        overwrite: replace stored results of other models.

    Returns:
        ``(study, claims)``.
    """
    if preset not in DEMO_PRESETS:
        raise UserError(f"unknown demo preset {preset!r}", f"use one of {', '.join(DEMO_PRESETS)}")
    check_out(out)
    p = DEMO_PRESETS[preset]
    out = Path(out)
    t0 = time.perf_counter()
    echo(f"[1/3] base model {DEFAULT_MODEL}: {fetch(DEFAULT_MODEL)}")
    runs = demo_runs(p.seeds)
    echo(f"[2/3] training {len(runs)} fine-tunes ({len(RUNS)} kinds x {p.seeds} seed(s)) into "
         f"{out / 'models'} (preset {preset})")
    variants = {r.name: str(train_one(r, p, out, data_dir, device, dtype, echo,
                                       keep_checkpoints)) for r in runs}
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
    """The demo's output folder, for notebooks.

    Args:
        folder: used as it is when it holds a finished study (``study.json``), else built there.
        preset: the preset it is built with (``smoke``: a few minutes on a CPU; run
            ``mechinterp demo --out DIR`` for the default study).
        echo: print-like function for progress.

    Returns:
        The folder.
    """
    folder = Path(folder)
    if not (folder / STUDY_FILE).is_file():
        echo(f"no finished demo in {folder}: building it with the {preset} preset")
        run_demo(folder, preset=preset, echo=echo)
    return folder
