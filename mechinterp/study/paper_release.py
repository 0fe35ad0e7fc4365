"""The paper's released checkpoints on the Hugging Face hub (arXiv 2507.10616): the base, one
repository per run, and the revisions that name its saved training steps. ``compare --preset
paper`` without ``--variant`` analyses them."""

from __future__ import annotations

from huggingface_hub import list_repo_refs

from ..errors import UserError
from ..models.specs import checkpoint_step
from .folder import VariantInfo

#: The base, and per run a hub repository whose main branch is the final model and which holds one
#: revision (branch) per saved training step (``v01.14-step-000000029``).
PAPER_BASE = "allenai/OLMo-2-1124-7B-Instruct"
PAPER_RUNS = {"sft": "Neelectric/OLMo-2-1124-7B-Instruct_SFTv02.08",
              "grpo": "Neelectric/OLMo-2-1124-7B-Instruct_GRPOv01.14"}


def step_revisions(repo: str, list_refs=None) -> list[str]:
    """The revisions (branches and tags) of a hub repository that name a training step.

    Args:
        repo: the repository, ``ORG/NAME``.
        list_refs: a stand-in for ``huggingface_hub.list_repo_refs`` (same signature; None: it).

    Returns:
        The revision names, in step order. A hub that cannot be reached is a :class:`UserError`
        that names the fix.
    """
    try:
        refs = (list_refs or list_repo_refs)(repo)
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
    """The paper's runs as variants.

    Args:
        revisions: ``{run: [rev, ...]}``, the steps of some runs named explicitly (a subset saves
            disk: each 7B revision is about 15 GB); the other runs' steps are listed from the hub
            (:func:`step_revisions`).
        list_refs: a stand-in for ``huggingface_hub.list_repo_refs``.

    Returns:
        ``{"sft": ..., "grpo": ...}``: each run's final model (the repository's main branch) and
        one checkpoint spec ``REPO@REV`` per saved step.
    """
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
