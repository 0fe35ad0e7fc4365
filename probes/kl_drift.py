"""``kl-drift``: how far each variant's predictions moved from the base's, teacher-forced.

Items are prompts with reference answers: by default GSM8K test questions with their reference
solutions, rendered in the chat template (``items=path.jsonl`` reads ``{"prompt", "answer"}`` rows
instead; ``chat_template=false`` reads them as plain text). Per item: the mean over answer positions
of ``sum_v p_base (log p_base - log p_variant)``; per variant (every checkpoint of every run): the mean
over items (see :mod:`mechinterp.analysis.divergence`).

Result keys: ``kl[<variant>]`` (mean over finite items, nats), ``kl_items[<variant>]`` (list, NaN/inf
items as null), ``n_nonfinite[<variant>]`` (items whose KL is NaN/inf: counted, reported, left out
of the mean), plus ``kl_sem`` (standard error of the mean), ``n_items``, ``steps``, ``runs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mechinterp.analysis.divergence import answer_items, base_cache_fits, teacher_forced_kl
from mechinterp.data import load_gsm8k
from mechinterp.data.arithmetic import is_task
from mechinterp.data.base import read_jsonl
from mechinterp.data.subset import seeded_subset
from mechinterp.errors import DataError, UserError
from mechinterp.frames import Table
from mechinterp.plotting import new_axes
from mechinterp.plotting.trajectories import plot_run_lines, run_steps
from mechinterp.probe import BaseConfig
from mechinterp.progress import task
from mechinterp.results import Result
from mechinterp.training.prompts import SYSTEM_PROMPT, load_items, render_target


@dataclass
class Config(BaseConfig):
    items: str = "gsm8k"  # "gsm8k" (test questions + reference solutions), an arithmetic task
    # spec (its held-out items in the training format: system prompt + think/answer target), or
    # a .jsonl file
    chat_template: bool = True  # render prompt as a user turn, answer as the assistant's reply
    system_prompt: str = ""  # optional system turn (chat template only; task items: the training one)
    batch_size: int = 4  # items per forward pass
    max_length: int = 1024  # tokens per item; longer answers are cut (counted in n_truncated)

    at_least = {"batch_size": 1, "max_length": 2}  # lower bounds; every other number: at least 0


def load_pairs(config: Config, data) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from GSM8K or a JSONL file of ``{"prompt", "answer"}`` rows."""
    if is_task(config.items):  # held-out task items with the reference solution SFT trains on
        return [(it.question, render_target(it)) for it in load_items(config.items, data, "test")]
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


class KLDrift:
    name = "kl-drift"
    version = "2"
    description = "teacher-forced KL(base || variant) on prompts with reference answers (GSM8K)"
    Config = Config
    frames = (Table("kl", ("model",)), Table("kl_sem", ("model",)))

    def run(self, models, data, config: Config) -> Result:
        pairs = seeded_subset(load_pairs(config, data), config.limit, config.seed)
        system = config.system_prompt or (SYSTEM_PROMPT if is_task(config.items) else None)
        items = answer_items(models.base.tokenizer, pairs, config.chat_template, system,
                             config.max_length)
        kl, kl_items, n_bad, sem = {}, {}, {}, {}
        vocab = models.base.hf.get_output_embeddings().weight.shape[0]
        # the base's answer distributions once for all variants, when they fit (2 GB)
        cache = {} if base_cache_fits(items, vocab) else None
        with task("kl drift", len(items) * len(models.variants)) as advance:
            for name in models.variants:
                per_item = teacher_forced_kl(models.base, models[name], items,
                                             config.batch_size, progress=advance,
                                             base_cache=cache).numpy()
                finite = per_item[np.isfinite(per_item)]
                kl[name] = float(finite.mean()) if finite.size else float("nan")
                sem[name] = float(finite.std(ddof=1) / math.sqrt(finite.size)) \
                    if finite.size > 1 else float("nan")
                kl_items[name] = per_item.tolist()
                n_bad[name] = int((~np.isfinite(per_item)).sum())
                models.release(name)
        return Result(self.name, {
            "variants": models.variants,
            "runs": models.runs,
            "steps": run_steps(models.runs),
            "kl": kl,
            "kl_sem": sem,
            "kl_items": kl_items,
            "n_nonfinite": n_bad,
            "n_items": len(items),
            "n_answer_tokens": int(sum(items.n_answer_tokens())),
            "n_truncated": items.n_truncated,
            "items": config.items,
        })

    def plot(self, result: Result) -> dict:
        data = result.data
        runs = data.get("runs") or {v: [v] for v in data["variants"]}
        if not runs:
            return {}
        kl = {k: (np.nan if v is None else v) for k, v in data["kl"].items()}
        sem = {k: (np.nan if v is None else v) for k, v in data["kl_sem"].items()}
        fig, ax = new_axes(6.5, 4.0)
        n_bad = sum(data["n_nonfinite"].values())
        note = f"; {n_bad} non-finite item values left out" if n_bad else ""
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
        ax.set_ylabel(r"KL(base $\|$ variant), nats per answer token")
        ax.set_title(f"Teacher-forced KL on {data['n_items']} {_items_label(data['items'])} items "
                     f"(mean $\\pm$ s.e.m.{note})", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        return {"kl_drift": fig}


def _items_label(items: str) -> str:
    return "GSM8K test" if items == "gsm8k" else Path(items).name


PROBE = KLDrift()
