"""What ``compare`` measures at each preset: the probes of a plan (:class:`Step`), their options,
and which variants each runs on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError


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
          damage_first_seed: bool = False, n_text: int | None = None,
          kl_batch: int | None = None) -> list[Step]:
    """The steps of a preset; ``diffing``: the model-diffing probes' steps (:func:`_diffing`).
    The claims read weight-change, kl-drift, task-accuracy, mmlu and damage-attribution: those run
    on every seed (damage-attribution on the first SFT seed only when ``damage_first_seed``).
    ``single`` adds attention-shift, mlp-patching and causal-trace, on the first seed of each kind
    only (no claim reads them; they describe one model). ``n_reverted``: damaged MMLU items whose
    MLP weights damage-attribution reverts (C8's origin; None: ``max_failures``, the damaged items
    it patches). ``kl_batch``: kl-drift's items per forward pass (None: the probe's default)."""
    return [
        Step("weight-change", {"sparsity": sparsity}, checkpoints=True),
        geometry,
        Step("kl-drift", {"items": task, "limit": n_task,
                           **({"n_text": n_text} if n_text is not None else {}),
                           **({"batch_size": kl_batch} if kl_batch is not None else {})},
             checkpoints=True),
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
#: ``default`` is the CPU study: the probes the claims read, on every seed (MMLU cloze on a fixed
#: stratified sample of 64 items, the task on 24 held-out problems), damage attribution on the
#: first SFT seed, the update's geometry on the first seed's SFT and GRPO; ``full`` (the sizes
#: below, every seed's damage attribution) adds attention shift, MLP patching and causal tracing
#: on each kind's first seed and the model-diffing probes; ``paper`` is sized for a GPU.
#: damage-attribution scores the mmlu step's items (over half of them damaged at the demo's
#: settings) so that C8 reverts at least 32 damaged items; it patches the first 8 of them.
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
    # the claims' probes on every seed at sizes for a demo of about half an hour on 2 CPU cores (SFT
    # damages about 60% of MMLU items: 64 leave about 38, of which C8 reverts 32); the update's
    # geometry on the first seed's SFT and GRPO final models; attention, patching and tracing in
    # the full preset; kl-drift 16 items a pass (0.6x the time of 4 a pass on 2 CPU cores)
    "default": _plan(**(_DEFAULT_SIZES | dict(n_mmlu=64, n_damage=64, n_task=24, n_text=16,
                                              kl_batch=16)),
                     damage_first_seed=True, single=False,
                     geometry=Step("update-geometry", {"k_fraction": 0.05},
                                   kinds=("sft", "grpo"), first_seed=True)),
    "full": _plan(**_DEFAULT_SIZES,
                  diffing=_diffing(n_texts=32, n_heldout=8, max_length=32, stride=5, n_lens=24,
                                   n_kl=8, n_mmlu=16, n_task=8)),
    "paper": _plan(n_mmlu=2000, n_task=None, n_facts=100, samples=10, n_patch=64, n_damage=1000,
                   max_failures=64, n_attn=64,
                   diffing=_diffing(n_texts=1000, n_heldout=200, max_length=128, stride=1,
                                    n_lens=300, n_kl=64, n_mmlu=500, n_task=200)),
}


#: The plan for the paper's released checkpoints (:mod:`mechinterp.study.paper_release`): the
#: paper preset's sizes, with GSM8K (test questions and reference
#: solutions; the paper's MATH-500 is not in our data root) as the in-domain items of KL and
#: accuracy (500 KL items as the paper; answers of up to 512 greedy tokens).
PAPER_RELEASE_PLAN = _plan(n_mmlu=2000, n_task=500, n_facts=100, samples=10, n_patch=64,
                           n_damage=1000, max_failures=64, n_attn=64, task="gsm8k",
                           answer_tokens=512,
                           diffing=_diffing(n_texts=1000, n_heldout=200, max_length=128, stride=1,
                                            n_lens=300, n_kl=64, n_mmlu=500, n_task=200,
                                            task="gsm8k", answer_tokens=512,
                                            lens_sets=("knowns", "mmlu")))


def select_steps(steps: list[Step], probes: list[str] | None) -> list[Step]:
    """The steps of a plan that run.

    Args:
        steps: the plan.
        probes: the probes to run (None: all); one the plan lacks is a :class:`UserError`.

    Returns:
        The steps of ``probes``, in plan order.
    """
    if probes is not None and (unknown := set(probes) - {s.probe for s in steps}):
        raise UserError(f"compare has no step {', '.join(sorted(unknown))}",
                        f"choose from {', '.join(s.probe for s in steps)}")
    return [s for s in steps if probes is None or s.probe in probes]


def step_variants(study, step: Step) -> list[str]:
    """The variants a step runs on.

    Args:
        study: the :class:`~mechinterp.study.folder.Study` (its variants and their kinds).
        step: the step.

    Returns:
        The variants of ``step.kinds`` (all when None) and, for a ``first_seed`` step, only the
        first replicate of each kind (variants of unknown kind all).
    """
    names = [n for n, v in study.variants.items()
             if step.kinds is None or v.kind in step.kinds]
    if step.first_seed:
        firsts = {study.replicates(v.kind)[0] for v in study.variants.values() if v.kind}
        names = [n for n in names if study.variants[n].kind is None or n in firsts]
    return names
