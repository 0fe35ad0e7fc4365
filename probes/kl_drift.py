"""``kl-drift``: how far each variant's predictions moved from the base's, teacher-forced.

Three item sets, each scored per variant (every checkpoint of every run):

- ``kl_reference``: held-out problems with *neutral* reference solutions, the paper's protocol
  (MATH-500 reference solutions, not the traces SFT trained on). For an arithmetic task the
  solution is a plain-prose worked answer ("7 + 5 = 12. The answer is 12.", no system prompt, no
  think/answer tags); for GSM8K and ``.jsonl`` items the items' own reference answers (then
  ``kl_reference`` and ``kl`` are one measurement).
- ``kl``: the items as given: for a task its held-out items in SFT's training target (system
  prompt + think/answer tags), so a variant trained on exactly that format reads far; secondary.
- ``kl_text``: ``n_text`` neutral texts (a seeded mix of MMLU test questions and ROME known-fact
  prompts, as ``activation-diff`` reads them), plain text, every next-token position.

Items: by default GSM8K test questions with their reference solutions, rendered in the chat template
(``items=path.jsonl`` reads ``{"prompt", "answer"}`` rows instead; ``chat_template=false`` reads
them as plain text). Per item: the mean over positions of ``sum_v p_base (log p_base - log
p_variant)`` (``direction=forward``, KL(base || variant), the default; ``reverse``: KL(variant ||
base)); per variant: the mean over items (see :mod:`mechinterp.analysis.divergence`). Positions
(``positions``): ``answer`` (default) averages over the positions predicting the solution's own
tokens (the prompt is context; the template's end-of-turn tokens after the solution are not
counted); ``all`` over every position of prompt and solution, as the paper's ``kl_tests.py``.
Neutral text always counts every position.

Result keys: ``kl_reference[<variant>]``, ``kl_reference_items``, ``kl_reference_sem``,
``kl_text[<variant>]``, ``kl_text_items``, ``kl_text_sem``, ``kl[<variant>]`` (mean over finite
items, nats), ``kl_items[<variant>]`` (list, NaN/inf items as null), ``n_nonfinite[<variant>]``
(items of ``kl`` whose KL is NaN/inf: counted, reported, left out of the mean; also
``n_nonfinite_reference``, ``n_nonfinite_text``), ``kl_sem`` (standard error of the mean),
``kl_direction``, ``positions``, ``reference`` (how the reference solutions were rendered),
``n_items``, ``n_text``, ``steps``, ``runs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mechinterp.analysis.divergence import (
    base_cache_fits,
    check_direction,
    teacher_forced_kl,
    text_items,
)
from mechinterp.data import load_gsm8k
from mechinterp.data.arithmetic import is_task
from mechinterp.data.base import read_jsonl
from mechinterp.data.subset import seeded_subset
from mechinterp.errors import DataError, UserError
from mechinterp.evals.answers import answer_items
from mechinterp.store.frames import Table
from mechinterp.plotting import new_axes
from mechinterp.plotting.trajectories import plot_run_lines, run_steps
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import fmt
from mechinterp.progress import task
from mechinterp.store.results import Result
from mechinterp.data.items import load_items
from mechinterp.data.qa import SYSTEM_PROMPT, QAItem, render_target
from probes.activation_diff import Config as TextConfig
from probes.activation_diff import neutral_texts


@dataclass
class Config(BaseConfig):
    items: str = "gsm8k"  # "gsm8k" (test questions + reference solutions), an arithmetic task
    # spec (its held-out items in the training format: system prompt + think/answer target), or
    # a .jsonl file
    chat_template: bool = True  # render prompt as a user turn, answer as the assistant's reply
    system_prompt: str = ""  # optional system turn (chat template only; task items: the training one)
    direction: str = "forward"  # forward: KL(base || variant), the paper's; reverse: KL(variant || base)
    # answer: positions predicting the solution's tokens; all: every position of prompt and
    # solution (the paper's kl_tests.py)
    positions: str = "answer"
    n_text: int = 32  # neutral texts (MMLU questions, known-fact prompts) for kl_text; 0: none
    text_max_length: int = 64  # tokens per neutral text at most
    batch_size: int = 4  # items per forward pass
    max_length: int = 1024  # tokens per item; longer answers are cut (counted in n_truncated)

    at_least = {"batch_size": 1, "max_length": 2, "text_max_length": 2}  # lower bounds; every other number: at least 0


def reference_solution(item: QAItem) -> str:
    """A task item's solution in plain prose, not SFT's think/answer target:
    ``7 + 5 = 12. The answer is 12.``"""
    reasoning = item.reasoning.strip().rstrip(".")
    return (f"{reasoning}. " if reasoning else "") + f"The answer is {item.answer}."


def load_pairs(config: Config, data, reference: bool = False) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from GSM8K, an arithmetic task or a JSONL file of ``{"prompt",
    "answer"}`` rows; ``reference``: a task's items with :func:`reference_solution` instead of
    SFT's target (GSM8K and files give their own reference answers either way)."""
    if is_task(config.items):  # held-out task items
        render = reference_solution if reference else render_target
        return [(it.question, render(it)) for it in load_items(config.items, data, "test")]
    if config.items == "gsm8k":
        if data is None:
            raise UserError("kl-drift on GSM8K needs a data source", "pass --data-dir")
        return [(it.question, it.solution) for it in load_gsm8k(data, "test")]
    path = Path(config.items).expanduser()
    if not path.is_file():
        raise UserError(f"items={config.items!r} is neither 'gsm8k' nor a file",
                        'pass a .jsonl file with {"prompt": ..., "answer": ...} rows')
    pairs = [(row["prompt"], row["answer"])
             for _, row in read_jsonl(path, {"prompt": (str,), "answer": (str,)})]
    if data is not None:
        data.log.record_file(path)
    if not pairs:
        raise DataError(f"{path} has no items", "add rows")
    return pairs


def item_sets(models, data, config: Config) -> dict:
    """The tokenised item sets by result key: ``kl`` (items as given), ``kl_reference`` (None
    where it is the same rendering as ``kl``) and ``kl_text`` (None when ``n_text`` is 0)."""
    if config.positions not in ("answer", "all"):
        raise UserError(f"positions={config.positions!r}", "use positions=answer or positions=all")
    if config.n_text and data is None:
        raise UserError("kl-drift's neutral text (MMLU questions, known facts) needs a data source",
                        "pass --data-dir, or set n_text=0")
    tok = models.base.tokenizer
    task = is_task(config.items)

    def render(reference: bool, system: str | None):
        pairs = seeded_subset(load_pairs(config, data, reference), config.limit, config.seed)
        items = answer_items(tok, pairs, config.chat_template, system, config.max_length)
        return items.all_positions() if config.positions == "all" else items

    sets = {"kl": render(False, config.system_prompt or (SYSTEM_PROMPT if task else None)),
            "kl_reference": render(True, config.system_prompt or None) if task else None,
            "kl_text": None}
    if config.n_text:
        pool = neutral_texts(TextConfig(n_texts=config.n_text, n_heldout=1, seed=config.seed), data)
        sets["kl_text"] = text_items(tok, pool[:config.n_text], config.text_max_length)
    return sets


def summarise(per_item: np.ndarray) -> dict:
    """Mean and s.e.m. over the finite items, the list, and how many were not finite."""
    finite = per_item[np.isfinite(per_item)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "sem": float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1
            else float("nan"),
            "items": per_item.tolist(), "n_nonfinite": int((~np.isfinite(per_item)).sum())}


class KLDrift:
    name = "kl-drift"
    version = "3"
    description = ("teacher-forced KL(base || variant) on held-out problems with neutral reference "
                   "solutions, on the items as given (a task: SFT's target) and on neutral text")
    Config = Config
    frames = (Table("kl", ("model",)), Table("kl_sem", ("model",)),
              Table("kl_reference", ("model",)), Table("kl_reference_sem", ("model",)),
              Table("kl_text", ("model",)), Table("kl_text_sem", ("model",)))

    def run(self, models, data, config: Config) -> Result:
        check_direction(config.direction)
        sets = item_sets(models, data, config)
        live = {k: v for k, v in sets.items() if v is not None}
        vocab = models.base.hf.get_output_embeddings().weight.shape[0]
        # the base's distributions once for all variants, per set, when they fit (2 GB)
        caches = {k: {} if base_cache_fits(v, vocab) else None for k, v in live.items()}
        got: dict[str, dict] = {k: {} for k in live}
        total = sum(len(v) for v in live.values()) * len(models.variants)
        with task("kl drift", total) as advance:
            for name in models.variants:
                for key, items in live.items():
                    got[key][name] = summarise(teacher_forced_kl(
                        models.base, models[name], items, config.batch_size, progress=advance,
                        base_cache=caches[key], direction=config.direction).numpy())
                models.release(name)
        got.setdefault("kl_reference", got["kl"])  # the items are their own reference
        items = sets["kl"]
        out = {"variants": models.variants, "runs": models.runs, "steps": run_steps(models.runs),
               "kl_direction": config.direction, "positions": config.positions,
               "reference": ("plain-prose worked answer (no system prompt)" if sets["kl_reference"]
                             else "the items' own answers"),
               "n_items": len(items), "n_answer_tokens": int(sum(items.n_answer_tokens())),
               "n_truncated": items.n_truncated, "items": config.items,
               "n_text": len(sets["kl_text"]) if sets["kl_text"] is not None else 0}
        suffix = {"kl": "", "kl_reference": "_reference", "kl_text": "_text"}
        for key, per in got.items():
            out[key] = {n: v["mean"] for n, v in per.items()}
            out[f"{key}_sem"] = {n: v["sem"] for n, v in per.items()}
            out[f"{key}_items"] = {n: v["items"] for n, v in per.items()}
            out[f"n_nonfinite{suffix[key]}"] = {n: v["n_nonfinite"] for n, v in per.items()}
        return Result(self.name, out)

    def plot(self, result: Result) -> dict:
        data = result.data
        runs = data.get("runs") or {v: [v] for v in data["variants"]}
        if not runs:
            return {}
        panels = [(k, t) for k, t in (("kl_reference", "neutral reference solutions"),
                                      ("kl", "items as given"), ("kl_text", "neutral text"))
                  if data.get(k)]
        if data.get("kl_reference") is not None and data.get("reference") == \
                "the items' own answers":  # one measurement: draw it once
            panels = [p for p in panels if p[0] != "kl_reference"]
        fig, axes = new_axes(5.0 * len(panels), 4.0, ncols=len(panels), squeeze=False)
        arrow = (r"KL(variant $\|$ base)" if data.get("kl_direction") == "reverse"
                 else r"KL(base $\|$ variant)")
        for ax, (key, title) in zip(axes[0], panels):
            self._panel(ax, result, runs, key)
            n = data["n_text"] if key == "kl_text" else data["n_items"]
            label = "texts" if key == "kl_text" else f"{_items_label(data['items'])} items"
            ax.set_title(f"{title}: {n} {label}", fontsize=10)
            ax.set_ylabel(f"{arrow}, nats per token")
        fig.suptitle("Teacher-forced KL (mean $\\pm$ s.e.m. over items; positions: "
                     f"{data.get('positions', 'answer')})", fontsize=10)
        return {"kl_drift": fig}

    @staticmethod
    def _panel(ax, result: Result, runs, key: str) -> None:
        data = result.data
        kl = {k: (np.nan if v is None else v) for k, v in data[key].items()}
        sem = {k: (np.nan if v is None else v) for k, v in data[f"{key}_sem"].items()}
        suffix = {"kl": "", "kl_reference": "_reference", "kl_text": "_text"}[key]
        n_bad = sum((data.get(f"n_nonfinite{suffix}") or {}).values())
        if any(len(n) > 1 for n in runs.values()):
            by_step = plot_run_lines(ax, runs, data["steps"], kl, err=sem,
                                     kinds=result.provenance.get("run_kinds"))
            ax.set_xlabel("training step" if by_step else "checkpoint")
            ax.legend(title="run (SFT dashed, GRPO solid)", fontsize=8)
        else:
            names = [n[-1] for n in runs.values()]
            ax.bar(range(len(names)), [kl[n] for n in names], yerr=[sem[n] for n in names],
                   color="#0072B2", capsize=3, width=0.5)
            ax.set_xlim(-0.75, len(names) - 0.25)
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        if n_bad:
            ax.text(0.02, 0.98, f"{n_bad} non-finite item values left out",
                    transform=ax.transAxes, va="top", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)


def _items_label(items: str) -> str:
    return "GSM8K test" if items == "gsm8k" else Path(items).name


PLAIN = ("How far each model's next-token distribution moved from the base's, teacher-forced on "
         "held-out in-domain items (the arithmetic task in the training prompt format): mean over "
         "answer tokens of KL(base || model), in nats.")


def summary(result: Result, study) -> list[str]:
    """Per model: the mean KL with a normal 95% interval from its standard error."""
    data = result.data
    lines = []
    for name, kl in data["kl"].items():
        sem = data.get("kl_sem", {}).get(name)
        half = 1.96 * sem if sem is not None else None
        band = f" [{fmt(kl - half)}, {fmt(kl + half)}]" if half is not None and kl is not None else ""
        lines.append(f"{name}: KL {fmt(kl)}{band} nats/token over {data.get('n_items')} items")
    return lines


PROBE = declare(KLDrift(), plain=PLAIN, summary=summary,
                model_names=listed_models("variants", "kl"))
