"""``task-accuracy``: in-domain accuracy on the held-out items of the training task.

Greedy generation in the training prompt format, answers read as the GRPO reward reads them (see
:mod:`mechinterp.evals.task`). Items: the held-out split of the arithmetic task (``items`` takes any
``arithmetic:...`` spec, or ``gsm8k`` for GSM8K test questions); ``limit`` keeps a seeded subset.

Result keys: ``accuracy[<model>]``, ``ci95[<model>]`` (Wilson), ``format_rate[<model>]`` (share of
completions in the exact think/answer format), ``paired[<variant>]`` (difference to the base on the
same items with a bootstrap interval, McNemar, flips per operation), ``n_items``, ``models``,
``runs``; item rows in ``items_<model>.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from mechinterp.data.subset import seeded_subset
from mechinterp.errors import UserError
from mechinterp.evals.paired import paired_comparison
from mechinterp.evals.stats import accuracy_summary
from mechinterp.evals.task import score_task
from mechinterp.store.frames import Table
from mechinterp.plotting import new_axes
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import fmt, paired_line
from mechinterp.store.results import Result
from mechinterp.data.items import load_items


@dataclass
class Config(BaseConfig):
    items: str = "arithmetic"  # an arithmetic task spec (its held-out split) or "gsm8k" (test)
    max_new_tokens: int = 48  # greedy tokens per answer at most
    batch_size: int = 32  # prompts per generate call (one call for the default study's 24)
    at_least = {"max_new_tokens": 1, "batch_size": 1}  # lower bounds; every other number: at least 0


def _group(question: str) -> str:
    for op in ("+", "-", "x"):
        if f" {op} " in question:
            return op
    return "all"


class TaskAccuracy:
    name = "task-accuracy"
    version = "1"
    description = "in-domain accuracy on held-out task items, training prompt format, paired"
    Config = Config
    frames = (Table("accuracy", ("model",), ci="ci95"), Table("format_rate", ("model",)),
              Table("paired", ("model", "metric")))

    def run(self, models, data, config: Config) -> Result:
        items = seeded_subset(load_items(config.items, data, "test"), config.limit, config.seed)
        if not items:
            raise UserError(f"no held-out items in {config.items!r}", "check the items option")
        acc, ci, fmt, rows_by, files = {}, {}, {}, {}, {}
        for name in models.names:
            rows = score_task(models[name], items, config.max_new_tokens, config.batch_size)
            s = accuracy_summary([r["correct"] for r in rows])
            acc[name], ci[name] = s["accuracy"], s["ci95"]
            fmt[name] = float(np.mean([r["format_ok"] for r in rows]))
            rows_by[name] = rows
            files[f"items_{name}.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows)
            if name != "base":
                models.release(name)
        groups = [_group(it.question) for it in items]
        base_ok = [r["correct"] for r in rows_by["base"]]
        paired = {v: paired_comparison(list(range(len(items))), groups, base_ok,
                                       [r["correct"] for r in rows_by[v]], seed=config.seed)
                  for v in models.variants}
        return Result(self.name, {"items": config.items, "n_items": len(items),
                                  "models": models.names, "runs": models.runs, "accuracy": acc,
                                  "ci95": ci, "format_rate": fmt, "paired": paired}, files=files)

    def plot(self, result: Result) -> dict:
        d = result.data
        names = d["models"]
        fig, ax = new_axes(width=max(5.0, 0.55 * len(names) + 2), height=4)
        y = np.array([d["accuracy"][n] for n in names], float)
        lo = np.array([d["ci95"][n][0] for n in names], float)
        hi = np.array([d["ci95"][n][1] for n in names], float)
        ax.bar(np.arange(len(names)), y, yerr=[y - lo, hi - y], capsize=3, color="#4c72b0")
        ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% Wilson interval)")
        ax.set_title(f"In-domain accuracy, {d['n_items']} held-out items")
        return {"task_accuracy": fig}


PLAIN = ("In-domain accuracy: greedy answers to held-out arithmetic questions in the training "
         "prompt format, scored by the same answer extraction as the GRPO reward; paired against "
         "the base on the same items.")


def summary(result: Result, study) -> list[str]:
    """Per model: accuracy with its interval, the paired difference from the base, and the share
    of answers in the expected format."""
    data = result.data
    return [paired_line(n, data["accuracy"][n], data["ci95"][n], data.get("paired", {}).get(n))
            + (f"; format ok {fmt(data['format_rate'][n])}" if "format_rate" in data else "")
            for n in data["models"]]


PROBE = declare(TaskAccuracy(), plain=PLAIN, summary=summary,
                model_names=listed_models("models", "accuracy"))
