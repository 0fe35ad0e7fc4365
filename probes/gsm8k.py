"""``gsm8k``: GSM8K accuracy by greedy generation, base and every variant.

Result keys: ``accuracy[<model>]`` (float), ``ci95[<model>]`` (Wilson), ``n``,
``paired[<variant>]`` (difference with bootstrap interval, McNemar, flips) and item rows in
``items_<model>.jsonl`` beside ``result.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mechinterp.data.gsm8k import load_gsm8k
from mechinterp.data.subset import seeded_subset
from mechinterp.evals.gsm8k import sample_shots, score_gsm8k
from mechinterp.evals.mmlu import rows_to_jsonl
from mechinterp.evals.paired import paired_rows
from mechinterp.evals.stats import accuracy_summary
from mechinterp.store.frames import Table
from mechinterp.plotting import new_axes
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import paired_line
from mechinterp.store.results import Result


@dataclass
class Config(BaseConfig):
    shots: int = 0  # examples from the train split before each question
    shot_sampler: str = "random"  # "random": lm-eval's (k per question, seeded); "first": first k
    fewshot_seed: int = 1234  # lm-eval's fewshot_random_seed
    chat: bool = False  # prompt through the chat template (examples as turns)
    max_new_tokens: int = 256  # greedy tokens per answer at most
    batch_size: int = 8  # prompts per generate call
    signed = ("fewshot_seed",)
    at_least = {"max_new_tokens": 1, "batch_size": 1}  # lower bounds; every other number: at least 0


class GSM8KProbe:
    name = "gsm8k"
    version = "3"
    description = "GSM8K accuracy by batched greedy generation (plain or chat prompt, k-shot)"
    Config = Config
    frames = (Table("accuracy", ("model",), ci="ci95"), Table("paired", ("model", "metric")))

    def run(self, models, data, config: Config) -> Result:
        items = seeded_subset(load_gsm8k(data, "test"), config.limit, config.seed)
        train = load_gsm8k(data, "train") if config.shots else []
        shots = sample_shots(train, len(items), config.shots, config.shot_sampler,
                             config.fewshot_seed)
        acc, ci, rows_by, files = {}, {}, {}, {}
        for name in models.names:
            rows = score_gsm8k(models[name], items, chat=config.chat,
                               max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                               per_item_shots=shots)
            s = accuracy_summary([r["correct"] for r in rows])
            acc[name], ci[name], rows_by[name] = s["accuracy"], s["ci95"], rows
            files[f"items_{name}.jsonl"] = rows_to_jsonl(rows)
            if name != "base":
                models.release(name)
        paired = {v: paired_rows(rows_by["base"], rows_by[v], seed=config.seed)
                  for v in models.variants}
        return Result(self.name, {"models": models.names, "n": len(items), "accuracy": acc,
                                  "ci95": ci, "paired": paired, "item_files": sorted(files)},
                      files=files)

    def plot(self, result: Result) -> dict:
        d = result.data
        names = d["models"]
        fig, ax = new_axes(width=max(4.0, 1.0 * len(names) + 2), height=3.5)
        y = np.array([d["accuracy"][n] for n in names])
        lo = np.array([d["ci95"][n][0] for n in names])
        hi = np.array([d["ci95"][n][1] for n in names])
        ax.bar(np.arange(len(names)), y, yerr=[y - lo, hi - y], capsize=3)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_ylabel("accuracy (95% Wilson interval)")
        ax.set_title(f"GSM8K accuracy ({d['n']} test items)")
        return {"gsm8k_accuracy": fig}


PLAIN = ("Grade-school maths: greedy answers to GSM8K test questions (plain or chat prompt, with "
         "k worked examples), scored on the final number; paired against the base item by item.")


def summary(result: Result, study) -> list[str]:
    """Per model: accuracy with its interval, paired against the base."""
    data = result.data
    return [paired_line(n, data["accuracy"][n], data["ci95"][n], data.get("paired", {}).get(n))
            for n in data["models"]]


PROBE = declare(GSM8KProbe(), plain=PLAIN, summary=summary,
                model_names=listed_models("models", "accuracy"))
