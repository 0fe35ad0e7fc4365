"""``mechinterp compare``: every probe and evaluation on a base and its fine-tunes, one folder.

A variant is a model spec or a training output folder (``mechinterp train --out``). For a training
folder the trajectory probes (weight change, KL, MMLU, in-domain accuracy) run on every checkpoint
of the run, and the single-model probes (attention, tracing, patching, damage attribution) on its
final model (the last checkpoint). Results go to ``OUT/<probe>/`` through the one runner, so a
re-run into the same folder reuses every result whose configuration and weights are unchanged.
Then the claims are decided (``OUT/claims.json``) and the report written (``OUT/report.md``,
``OUT/report.html``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

STUDY_FILE = "study.json"


@dataclass(frozen=True)
class Step:
    """One probe of a compare plan: its options, and whether it runs on every checkpoint."""

    probe: str
    options: dict[str, Any]
    checkpoints: bool = False  # True: every checkpoint of every run; False: final models only
    kinds: tuple[str, ...] | None = None  # only variants of these kinds (None: all variants)
    first_seed: bool = False  # True: only the first seed of each kind (Study.replicates)


def _plan(n_mmlu: int, n_task: int | None, n_facts: int, samples: int, n_patch: int,
          n_damage: int, max_failures: int, n_attn: int, sparsity: bool = True,
          n_reverted: int | None = None,
          patch_sites: tuple[str, ...] = ("mlp", "attn", "resid"),
          damage_sites: tuple[str, ...] = ("mlp_out", "attn_out"), task: str = "arithmetic",
          answer_tokens: int | None = None, diffing: list[Step] = (), single: bool = True,
          geometry: Step = Step("update-geometry", {"k_fraction": 0.05}, checkpoints=True),
          damage_first_seed: bool = False) -> list[Step]:
    """The steps of a preset; ``diffing``: the model-diffing probes' steps (:func:`_diffing`).
    The claims read weight-change, kl-drift, task-accuracy, mmlu and damage-attribution: those run
    on every seed (damage-attribution on the first SFT seed only when ``damage_first_seed``).
    ``single`` adds attention-shift, mlp-patching and causal-trace, on the first seed of each kind
    only (no claim reads them; they describe one model). ``n_reverted``: damaged MMLU items whose
    MLP weights damage-attribution reverts (C8's origin; None: ``max_failures``, the damaged items
    it patches)."""
    return [
        Step("weight-change", {"sparsity": sparsity}, checkpoints=True),
        geometry,
        Step("kl-drift", {"items": task, "limit": n_task}, checkpoints=True),
        # before/after is what the claims and the training table read; greedy generation on
        # every checkpoint cost more than any other step of the default demo
        Step("task-accuracy", {"items": task, "limit": n_task, "max_new_tokens": answer_tokens}),
        Step("mmlu", {"formats": ["cloze"], "limit": n_mmlu}, checkpoints=True),
        *([Step("attention-shift", {"n_mmlu": n_attn, "n_knowns": n_attn, "max_tokens": 128},
                first_seed=True),
           Step("mlp-patching", {"prompt_sets": ["knowns"], "limit": n_patch,
                                 "sites": list(patch_sites)}, first_seed=True),
           Step("causal-trace", {"limit": n_facts, "samples": samples, "max_fact_figures": 2},
                first_seed=True)] if single else []),
        # the costliest probe, and C8 asks it of SFT only
        Step("damage-attribution", {"format": "cloze", "limit": n_damage,
                                    "max_failures": max_failures, "max_damaged": n_reverted,
                                    "n_control": 4, "sites": list(damage_sites)},
             kinds=("sft",), first_seed=damage_first_seed),
        *diffing,
    ]


def _diffing(n_texts: int, n_heldout: int, max_length: int, stride: int, n_lens: int, n_kl: int,
             n_mmlu: int, n_task: int, task: str = "arithmetic", answer_tokens: int = 48,
             lens_sets: tuple[str, ...] = ("knowns", "mmlu", "task"), n_boot: int = 1000,
             stitch_kinds: tuple[str, ...] = ("sft", "grpo")) -> list[Step]:
    """activation-diff and logit-lens on every final model of the first seed; stitch's grid (12
    recipes and the two parents per variant, about a CPU-minute each at the default preset's
    sizes) on the first seed's SFT and GRPO runs."""
    return [
        Step("activation-diff", {"n_texts": n_texts, "n_heldout": n_heldout,
                                 "max_length": max_length, "steer_stride": stride,
                                 "n_bootstrap": n_boot}, first_seed=True),
        Step("logit-lens", {"limit": n_lens, "prompt_sets": list(lens_sets),
                            "task": "arithmetic", "n_bootstrap": n_boot}, first_seed=True),
        Step("stitch", {"recipes": "grid", "n_kl": n_kl, "n_mmlu": n_mmlu, "n_task": n_task,
                        "kl_items": task, "task_items": task, "max_new_tokens": answer_tokens,
                        "n_bootstrap": n_boot}, kinds=stitch_kinds, first_seed=True),
    ]


#: What each preset measures. ``smoke`` proves the pipeline end to end in CI (every probe);
#: ``default`` is the CPU study: the probes the claims read on every seed (MMLU cloze on a fixed
#: stratified sample, the task on a fixed sample of held-out problems), attention shift, MLP
#: patching and causal tracing (what the study notebooks show) on each kind's first seed; ``full``
#: adds the model-diffing probes on the first seed; ``paper`` is sized for a GPU.
#: damage-attribution scores the mmlu step's 100 items (about half of them damaged) so that C8
#: reverts at least 32 damaged items; it patches the first 8 of them. In the default preset it runs
#: on the first SFT seed (each SFT seed costs about 7 CPU-minutes); the full preset runs every seed.
_DEFAULT_SIZES = dict(n_mmlu=100, n_task=32, n_facts=3, samples=2, n_patch=8, n_damage=100,
                      max_failures=8, n_reverted=32, n_attn=8, patch_sites=("mlp",),
                      damage_sites=("mlp_out",))
PLANS: dict[str, list[Step]] = {
    "smoke": _plan(n_mmlu=8, n_task=8, n_facts=1, samples=2, n_patch=2, n_damage=8,
                   max_failures=2, n_attn=2, sparsity=False, patch_sites=("mlp",),
                   damage_sites=("mlp_out",),
                   # the precision measures only (no SVD), final models only
                   geometry=Step("update-geometry", {"spectral": False}),
                   diffing=_diffing(n_texts=4, n_heldout=2, max_length=16, stride=15, n_lens=3,
                                    n_kl=2, n_mmlu=2, n_task=2, answer_tokens=16, n_boot=100,
                                    stitch_kinds=("sft",))),
    # the update's geometry on the SFT and GRPO final models of every seed (its trajectories over
    # checkpoints cost about a CPU-minute per checkpoint: the full preset has them)
    "default": _plan(**_DEFAULT_SIZES, damage_first_seed=True,
                     geometry=Step("update-geometry", {"k_fraction": 0.05},
                                   kinds=("sft", "grpo"))),
    "full": _plan(**_DEFAULT_SIZES,
                  diffing=_diffing(n_texts=32, n_heldout=8, max_length=32, stride=5, n_lens=24,
                                   n_kl=8, n_mmlu=16, n_task=8)),
    "paper": _plan(n_mmlu=2000, n_task=None, n_facts=100, samples=10, n_patch=64, n_damage=1000,
                   max_failures=64, n_attn=64,
                   diffing=_diffing(n_texts=1000, n_heldout=200, max_length=128, stride=1,
                                    n_lens=300, n_kl=64, n_mmlu=500, n_task=200)),
}


#: The paper's released checkpoints (arXiv 2507.10616), what ``compare --preset paper`` analyses
#: when no --variant is given: the base, and per run a hub repository whose main branch is the
#: final model and which holds one revision (branch) per saved training step
#: (``v01.14-step-000000029``).
PAPER_BASE = "allenai/OLMo-2-1124-7B-Instruct"
PAPER_RUNS = {"sft": "Neelectric/OLMo-2-1124-7B-Instruct_SFTv02.08",
              "grpo": "Neelectric/OLMo-2-1124-7B-Instruct_GRPOv01.14"}
#: The plan for them: the paper preset's sizes, with GSM8K (test questions and reference
#: solutions; the paper's MATH-500 is not in our data root) as the in-domain items of KL and
#: accuracy (500 KL items as the paper; answers of up to 512 greedy tokens).
PAPER_RELEASE_PLAN = _plan(n_mmlu=2000, n_task=500, n_facts=100, samples=10, n_patch=64,
                           n_damage=1000, max_failures=64, n_attn=64, task="gsm8k",
                           answer_tokens=512,
                           diffing=_diffing(n_texts=1000, n_heldout=200, max_length=128, stride=1,
                                            n_lens=300, n_kl=64, n_mmlu=500, n_task=200,
                                            task="gsm8k", answer_tokens=512,
                                            lens_sets=("knowns", "mmlu")))


def step_revisions(repo: str, list_refs=None) -> list[str]:
    """The revisions (branches and tags) of hub repository ``repo`` that name a training step,
    in step order, read with ``huggingface_hub.list_repo_refs`` (or ``list_refs``, same
    signature). A hub that cannot be reached is a :class:`UserError` that names the fix."""
    from ..plotting.trajectories import checkpoint_step

    if list_refs is None:
        from huggingface_hub import list_repo_refs as list_refs
    try:
        refs = list_refs(repo)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository, gated...
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(f"cannot list the revisions of {repo} on the Hugging Face hub "
                        f"({type(exc).__name__}{': ' + reason if reason else ''})",
                        "run where the hub is reachable, or name the steps yourself: "
                        "--revisions RUN=REV1,REV2 (e.g. grpo=v01.14-step-000000029)") from None
    steps = {ref.name: checkpoint_step(ref.name) for ref in [*refs.branches, *refs.tags]}
    found = sorted((step, name) for name, step in steps.items() if step is not None)
    if not found:
        raise UserError(f"{repo} has no revision named for a training step",
                        "name the revisions yourself with --revisions RUN=REV1,REV2")
    return [name for _, name in found]


def paper_variants(revisions: dict[str, list[str]] | None = None,
                   list_refs=None) -> dict[str, VariantInfo]:
    """``{"sft": ..., "grpo": ...}`` for the paper's runs: the final model (the repository's main
    branch) and one checkpoint spec ``REPO@REV`` per saved step. ``revisions`` (``{run: [rev,
    ...]}``) names the steps of some runs explicitly (a subset saves disk: each 7B revision is
    about 15 GB); the other runs' steps are listed from the hub (:func:`step_revisions`)."""
    from ..plotting.trajectories import checkpoint_step

    revisions = dict(revisions or {})
    if unknown := set(revisions) - set(PAPER_RUNS):
        raise UserError(f"the paper has no run {', '.join(sorted(unknown))}",
                        f"use {', '.join(PAPER_RUNS)}")
    out = {}
    for run, repo in PAPER_RUNS.items():
        revs = revisions.get(run) or step_revisions(repo, list_refs)
        if len(set(revs)) != len(revs):
            raise UserError(f"--revisions names a revision of {run} twice", "list each once")
        revs = sorted(revs, key=lambda r: (checkpoint_step(r) is None, checkpoint_step(r) or 0))
        out[run] = VariantInfo(run, repo, [f"{repo}@{r}" for r in revs], algorithm=run,
                               freeze="", train={"source": "hub", "repository": repo})
    return out


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
        if self.algorithm is None:
            return None
        return self.algorithm + ("-frozen" if self.freeze else "")


def describe_variant(name: str, spec: str) -> VariantInfo:
    """A training output folder gives checkpoints and training metadata; anything else is one model."""
    from ..models.lineage import read_run_json
    from ..models.specs import expand_checkpoints
    from ..models.run_folder import CONFIG_FILE

    folder = Path(spec).expanduser()
    if not (folder / CONFIG_FILE).is_file():
        return VariantInfo(name, spec, [spec], **_kind_from_name(name))
    cfg = read_run_json(folder / CONFIG_FILE)
    try:
        ckpts = expand_checkpoints(f"{spec}@all")
    except UserError:
        ckpts = []
    if not (folder / "config.json").exists():
        raise UserError(f"training run {folder} has no final model (did it finish?)",
                        f"finish it with mechinterp train ... --resume --out {folder}")
    freeze = ",".join(p for p in (cfg.get("freeze"), cfg.get("freeze_preset")) if p) or ""
    train = {}
    summary = folder / "train-summary.json"
    if summary.is_file():
        train = read_run_json(summary)
    return VariantInfo(name, spec, ckpts or [spec], cfg.get("algorithm"), freeze, train,
                       cfg.get("seed"))


def _kind_from_name(name: str) -> dict[str, Any]:
    """Plain model specs carry no training metadata: read the role from the name (sft, grpo,
    sft-frozen...), or leave it unknown."""
    low = name.lower()
    for algo in ("grpo", "sft"):
        if low.startswith(algo):
            return {"algorithm": algo, "freeze": "frozen" if "frozen" in low else ""}
    return {}


@dataclass
class Study:
    """A compare folder: its variants (with roles) and the results of each probe."""

    out: Path
    base: str
    variants: dict[str, VariantInfo]
    results: dict[str, Any]  # probe name -> Result
    preset: str = "default"
    runs: dict[str, list[str]] = field(default_factory=dict)  # variant -> checkpoint model names
    claims: list[dict] = field(default_factory=list)  # decided by compare (claims.decide_all)
    plan: list[str] | None = None  # the probes compare set out to run (None: an older folder)

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
        models = set(_model_names(res.data)) if res is not None else set()
        names = self.runs.get(variant) or []
        if names and names[-1] in models:
            return names[-1]
        return variant

    def missing(self) -> list[str]:
        """What a finished compare would hold and this folder lacks: the planned probes without
        a result (a compare killed part-way); for a folder from before plans were recorded,
        ``claims.json`` (written last) stands for the whole run."""
        if self.plan is None:
            return [] if (Path(self.out) / "claims.json").is_file() else ["claims.json"]
        return [p for p in self.plan if p not in self.results]

    def to_json(self) -> dict:
        return {"base": self.base, "preset": self.preset, "runs": self.runs,
                "variants": {n: vars(v) for n, v in self.variants.items()},
                **({"plan": self.plan} if self.plan is not None else {})}


def _model_names(data: dict) -> list[str]:
    """Model names a result covers, whichever key the probe uses for them."""
    for key in ("models", "variants"):
        if isinstance(data.get(key), list):
            return list(data[key])
    for key in ("accuracy", "relative_change", "kl", "recovery", "js"):
        if isinstance(data.get(key), dict):
            return list(data[key])
    return []


def load_study(out: Path) -> Study:
    """A compare folder as written by :func:`compare` (no model is loaded)."""
    from ..store.results import find_results, read_result

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


def compare(base: str | None, variants: dict[str, str], out: Path, data_dir=None,
            preset: str = "default", device: str = "auto", dtype: str = "auto",
            probes: list[str] | None = None, echo=print, device_map=None,
            max_memory: dict | str | None = None,
            revisions: dict[str, list[str]] | None = None, overwrite: bool = False,
            executor: str = "serial", workers: int = 1,
            executor_options: dict[str, Any] | None = None) -> Study:
    """:func:`_compare` with ``out`` checked before any work and held with its writer lock for the
    whole run (a second writer waits, then stops with a line naming this one; worker processes of
    this run write under it); ``overwrite`` replaces stored results of other models (see
    :func:`mechinterp.core.runner.run_probe`)."""
    from ..store.locking import LOCK_FILE, writer_lock
    from ..store.results import check_out

    check_out(out)
    for name, spec in variants.items():  # a damaged run folder stops before OUT is made
        describe_variant(name, spec)
    made = not Path(out).exists()
    try:
        with writer_lock(out):
            return _compare(base, variants, out, data_dir, preset, device, dtype, probes, echo,
                            device_map, max_memory, revisions, overwrite, executor, workers,
                            executor_options)
    except BaseException:
        if made and {p.name for p in Path(out).iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)  # a run that failed before any work leaves no OUT
        raise


def _compare(base: str | None, variants: dict[str, str], out: Path, data_dir=None,
             preset: str = "default", device: str = "auto", dtype: str = "auto",
             probes: list[str] | None = None, echo=print, device_map=None,
             max_memory: dict | str | None = None,
             revisions: dict[str, list[str]] | None = None, overwrite: bool = False,
             executor: str = "serial", workers: int = 1,
             executor_options: dict[str, Any] | None = None) -> Study:
    """Run the plan of ``preset`` on ``base`` (default: the built-in model) and ``variants``;
    decide claims; write the report. ``preset="paper"`` without variants analyses the paper's
    released checkpoints (:data:`PAPER_RUNS`, every saved step, or the ``revisions`` named).
    ``executor`` (``serial``, ``local``, ``slurm``) and ``workers`` say where and how many of the
    probe jobs run at once (:mod:`mechinterp.study.executor`); claims and report come after all of
    them."""
    from .claims import decide_all
    from ..data import DataSource
    from .executor import Job, check_executor, execute
    from ..models.modelset import ModelSet
    from ..models.zoo import DEFAULT_MODEL
    from ..core.probe import get_probe, make_config
    from .report import write_report
    from ..store.results import read_result

    check_executor(executor, workers)
    if preset not in PLANS:
        raise UserError(f"unknown compare preset {preset!r}", f"use one of {', '.join(PLANS)}")
    release = preset == "paper" and not variants
    if revisions and not release:
        raise UserError("--revisions names steps of the paper's checkpoints",
                        "use it with --preset paper and no --variant")
    if not variants and not release:
        raise UserError("compare needs at least one --variant NAME=SPEC",
                        "e.g. --variant sft=runs/sft --variant grpo=runs/grpo (or --preset "
                        "paper alone: the paper's released checkpoints)")
    steps = PAPER_RELEASE_PLAN if release else PLANS[preset]
    plan = [s for s in steps if probes is None or s.probe in probes]
    if probes is not None and (unknown := set(probes) - {s.probe for s in steps}):
        raise UserError(f"compare has no step {', '.join(sorted(unknown))}",
                        f"choose from {', '.join(s.probe for s in steps)}")
    base = base or (PAPER_BASE if release else DEFAULT_MODEL)
    info = (paper_variants(revisions) if release
            else {n: describe_variant(n, s) for n, s in variants.items()})
    data = DataSource.from_option(data_dir)
    if data.root is None:
        raise UserError("compare needs a data root (MMLU, known facts)",
                        "pass --data-dir or set MECHINTERP_DATA (e.g. ../shared/data)")
    kw = dict(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    ModelSet(base, {n: v.final for n, v in info.items()}, **kw)  # comparable: checked before work
    runs = ModelSet(base, {n: v.checkpoints for n, v in info.items()}, **kw)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    planned = [s.probe for s in plan
               if s.kinds is None or any(v.kind in s.kinds for v in info.values())]
    study = Study(out, base, info, {}, preset, dict(runs.runs), plan=planned)
    (out / STUDY_FILE).write_text(json.dumps(study.to_json(), indent=1) + "\n")
    jobs = []
    for i, step in enumerate(plan, 1):
        label = f"[compare {i}/{len(plan)}] {step.probe}"
        names = step_variants(study, step)
        variants = {n: (v.checkpoints if step.checkpoints else v.final) for n, v in info.items()
                    if n in names}
        if not variants:
            echo(f"{label}: skipped (no {'/'.join(step.kinds or ())} variant)")
            continue
        options = {k: v for k, v in step.options.items() if v is not None}
        make_config(get_probe(step.probe), options)  # a bad option stops before any job runs
        jobs.append(Job(label, step.probe, options, base, variants,
                        check=step.kinds is None and not step.first_seed, out=str(out),
                        data_dir=str(data.root), model_kw=kw,
                        overwrite=overwrite))
    execute(jobs, executor, workers, out / ".jobs", executor_options, echo)
    for job in jobs:
        study.results[job.probe] = read_result(out / job.probe)
    study.claims = decide_all(study)
    write_claims(study.claims, out)
    write_report(study, study.claims)
    return study


def step_variants(study: Study, step: Step) -> list[str]:
    """The variants a step runs on: those of ``step.kinds`` (all when None) and, for a
    ``first_seed`` step, only the first replicate of each kind (variants of unknown kind all)."""
    names = [n for n, v in study.variants.items()
             if step.kinds is None or v.kind in step.kinds]
    if step.first_seed:
        firsts = {study.replicates(v.kind)[0] for v in study.variants.values() if v.kind}
        names = [n for n in names if study.variants[n].kind is None or n in firsts]
    return names


def write_claims(claims: list[dict], out: Path) -> Path:
    """``OUT/claims.json``: ``{claim id: {held, numbers, statement, title}}`` (NaN as null)."""
    from ..store.results import _jsonable

    path = Path(out) / "claims.json"
    body = {c["id"]: {k: v for k, v in c.items() if k != "id"} for c in claims}
    path.write_text(json.dumps(_jsonable(body), indent=1, allow_nan=False) + "\n")
    return path
