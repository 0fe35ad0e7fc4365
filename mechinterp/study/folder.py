"""A study folder: what each variant is (:class:`VariantInfo`), and the results of each probe
(:class:`Study`), as ``compare`` writes them (``OUT/study.json`` beside ``OUT/<probe>/``) and
:func:`load_study` reads them back without loading a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models.lineage import TRAIN_CONFIG, freeze_text, read_run_json, role_from_name, run_kind
from ..models.specs import expand_checkpoints
from ..store.results import Result, find_results, read_result

STUDY_FILE = "study.json"
CLAIMS_FILE = "claims.json"


@dataclass
class VariantInfo:
    """What a variant is: its final spec, its checkpoints, and how it was trained (when known)."""

    name: str
    final: str
    checkpoints: list[str]
    algorithm: str | None = None  # "sft" / "grpo" from the run's train-config.json
    freeze: str | None = None  # the freeze spec of the run, "" when nothing was frozen
    train: dict[str, Any] = field(default_factory=dict)  # training wall time, steps, preset
    seed: int | None = None  # the run's training seed (train-config.json), None when unknown

    @property
    def kind(self) -> str | None:
        """``sft``, ``sft-frozen``, ``grpo`` (``grpo-frozen``...) or None when unknown."""
        return run_kind(self.algorithm, bool(self.freeze))


def describe_variant(name: str, spec: str) -> VariantInfo:
    """What a variant spec is.

    Args:
        name: the variant's name (its role is read from it when the spec has no training metadata).
        spec: a model spec, or a training output folder (``mechinterp train --out``).

    Returns:
        For a training folder its checkpoints and training metadata; else one model.
    """
    folder = Path(spec).expanduser()
    if not (folder / TRAIN_CONFIG).is_file():
        return VariantInfo(name, spec, [spec], **role_from_name(name))
    cfg = read_run_json(folder / TRAIN_CONFIG)
    try:
        checkpoints = expand_checkpoints(f"{spec}@all")
    except UserError:
        checkpoints = []
    if not (folder / "config.json").exists():
        raise UserError(f"training run {folder} has no final model (did it finish?)",
                        f"finish it with mechinterp train ... --resume --out {folder}")
    summary = folder / "train-summary.json"
    train = read_run_json(summary) if summary.is_file() else {}
    return VariantInfo(name, spec, checkpoints or [spec], cfg.get("algorithm"), freeze_text(cfg),
                       train, cfg.get("seed"))


@dataclass
class Study:
    """A compare folder: its variants (with roles) and the results of each probe."""

    out: Path
    base: str
    variants: dict[str, VariantInfo]
    results: dict[str, Result]  # probe name -> its result
    preset: str = "default"
    runs: dict[str, list[str]] = field(default_factory=dict)  # variant -> checkpoint model names
    claims: list[dict] = field(default_factory=list)  # decided by compare (claims.decide_all)
    plan: list[str] | None = None  # the probes compare set out to run (None: not recorded)

    def role(self, kind: str) -> str | None:
        """The first variant of a kind (``sft``, ``grpo``, ``sft-frozen``), by training metadata."""
        return next((n for n, v in self.variants.items() if v.kind == kind), None)

    def replicates(self, kind: str) -> list[str]:
        """Every variant of a kind, one per training seed (seed order; the study's order when the
        seeds are unknown): the replicates a claim's interval over seeds is computed from."""
        names = [n for n, v in self.variants.items() if v.kind == kind]
        return sorted(names, key=lambda n: (self.variants[n].seed is None,
                                            self.variants[n].seed or 0, names.index(n)))

    def final_name(self, variant: str, probe: str) -> str:
        """The name a variant's final model has in ``probe``'s result: the run's last checkpoint
        where the probe ran on checkpoints, else the variant's own name."""
        res = self.results.get(probe)
        models = set(_model_names(res)) if res is not None else set()
        names = self.runs.get(variant) or []
        if names and names[-1] in models:
            return names[-1]
        return variant

    def missing(self) -> list[str]:
        """What a finished compare would hold and this folder lacks: the planned probes without
        a result (a compare killed part-way); for a folder without a recorded plan,
        ``claims.json`` (written last) stands for the whole run."""
        if self.plan is None:
            return [] if (Path(self.out) / CLAIMS_FILE).is_file() else [CLAIMS_FILE]
        return [p for p in self.plan if p not in self.results]

    def to_json(self) -> dict:
        """What ``study.json`` holds: base, preset, runs, variants and plan."""
        return {"base": self.base, "preset": self.preset, "runs": self.runs,
                "variants": {n: vars(v) for n, v in self.variants.items()},
                **({"plan": self.plan} if self.plan is not None else {})}


def _model_names(result) -> list[str]:
    """The models a stored result covers, as its probe declares them ([] when the probe is not
    installed or declares nothing)."""
    try:
        names = getattr(result.probe_object(), "model_names", None)
    except UserError:
        return []
    return names(result.data) if names is not None else []


def write_study(study: Study) -> Path:
    """Write ``OUT/study.json`` (what :func:`load_study` reads); returns its path."""
    path = Path(study.out) / STUDY_FILE
    path.write_text(json.dumps(study.to_json(), indent=1) + "\n")
    return path


def load_study(out: Path | str) -> Study:
    """A compare folder as written by :func:`mechinterp.study.compare.compare`.

    Args:
        out: the folder.

    Returns:
        The study, with every probe result stored directly under ``out`` (no model is loaded).
    """
    out = Path(out)
    path = out / STUDY_FILE
    if not path.is_file():
        raise UserError(f"{out} is not a compare folder ({STUDY_FILE} missing)",
                        "run mechinterp compare --out DIR first")
    meta = json.loads(path.read_text())
    variants = {n: VariantInfo(**v) for n, v in meta["variants"].items()}
    results = {}
    for folder in find_results(out):
        if folder.parent == out:
            res = read_result(folder)
            results[res.probe] = res
    return Study(out, meta["base"], variants, results, meta.get("preset", "default"),
                 meta.get("runs", {}), plan=meta.get("plan"))
