"""``mmlu``: MMLU accuracy of the base and every variant, lm-eval letter format and cloze.

Result keys: ``accuracy[<model>][<format>]`` (a float; format like ``letter-0shot``,
``letter-5shot``, ``cloze``, ``cloze-norm``), ``ci95[<model>][<format>]`` (Wilson),
``by_subject[<model>][<format>][<subject>]``, ``by_subject_detail`` (n, correct, interval),
``paired[<variant>][<format>]`` (difference to the base with a bootstrap interval, McNemar, flips per
subject) and the item rows in ``items_<model>_<format>.jsonl`` beside ``result.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mechinterp.data.mmlu import load_mmlu
from mechinterp.evals.mmlu import (
    MMLUFormat,
    rows_to_jsonl,
    score_mmlu,
    stratified_sample,
    summarise,
)
from mechinterp.evals.paired import paired_rows
from mechinterp.store.frames import Table
from mechinterp.plotting import new_axes
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import paired_line
from mechinterp.store.results import Result


@dataclass
class Config(BaseConfig):
    # letter-0shot, letter-5shot, cloze (+ -chat); several at once
    formats: list[str] = field(default_factory=lambda: ["letter-0shot"])
    subjects: list[str] | None = None  # MMLU subjects (default: all 57)
    token_budget: int = 512  # tokens per forward: smaller batches stay in cache (fastest measured on CPU)

    at_least = {"token_budget": 1}  # lower bounds; every other number: at least 0


def item_file(model: str, fmt: str) -> str:
    return f"items_{model}_{fmt}.jsonl"


class MMLUProbe:
    name = "mmlu"
    version = "1"
    description = "MMLU accuracy (lm-eval letter format, k-shot; cloze) with item-level rows"
    Config = Config
    frames = (Table("accuracy", ("model", "format"), ci="ci95"),
              Table("paired", ("model", "format", "metric")))

    def run(self, models, data, config: Config) -> Result:
        fmts = [MMLUFormat.parse(f) for f in config.formats]
        subjects = list(config.subjects) if config.subjects else None
        items = stratified_sample(load_mmlu(data, "test", subjects), config.limit, config.seed)
        dev = load_mmlu(data, "dev", subjects) if any(f.shots for f in fmts) else []
        acc, ci, by_subject, detail, rows_by = {}, {}, {}, {}, {}
        files = {}
        for name in models.names:
            model = models[name]
            for fmt in fmts:
                rows = score_mmlu(model, items, dev, fmt, token_budget=config.token_budget)
                files[item_file(name, fmt.label)] = rows_to_jsonl(rows)
                keys = [(fmt.label, "pred")] + ([("cloze-norm" if not fmt.shots and not fmt.chat
                                                  else f"{fmt.label}-norm", "pred_norm")]
                                                 if fmt.kind == "cloze" else [])
                for label, pred_key in keys:
                    overall, per = summarise(rows, pred_key)
                    acc.setdefault(name, {})[label] = overall["accuracy"]
                    ci.setdefault(name, {})[label] = overall["ci95"]
                    by_subject.setdefault(name, {})[label] = {s: v["accuracy"]
                                                              for s, v in per.items()}
                    detail.setdefault(name, {})[label] = per
                    rows_by[(name, label)] = (rows, pred_key)
            if name != "base":
                models.release(name)
        paired = {}
        for name in models.variants:
            for label in acc["base"]:
                base_rows, key = rows_by[("base", label)]
                paired.setdefault(name, {})[label] = paired_rows(
                    base_rows, rows_by[(name, label)][0], key, seed=config.seed)
        return Result(self.name, {
            "formats": list(acc["base"]),
            "models": models.names,
            "n_items": len(items),
            "subjects": sorted({it.subject for it in items}),
            "accuracy": acc,
            "ci95": ci,
            "by_subject": by_subject,
            "by_subject_detail": detail,
            "paired": paired,
            "item_files": sorted(files),
        }, files=files)

    def plot(self, result: Result) -> dict:
        d = result.data
        fmts, names = d["formats"], d["models"]
        fig, ax = new_axes(width=max(5.0, 1.2 * len(fmts) * len(names) + 2), height=4)
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            x = np.arange(len(fmts)) + k * width
            y = np.array([d["accuracy"][name][f] for f in fmts])
            lo = np.array([d["ci95"][name][f][0] for f in fmts])
            hi = np.array([d["ci95"][name][f][1] for f in fmts])
            ax.bar(x, y, width, yerr=[y - lo, hi - y], capsize=3, label=name)
        ax.axhline(0.25, color="grey", ls="--", lw=1, label="chance (0.25)")
        ax.set_xticks(np.arange(len(fmts)) + width * (len(names) - 1) / 2, fmts)
        ax.set_ylabel("accuracy (95% Wilson interval)")
        ax.set_title(f"MMLU accuracy ({d['n_items']} test items)")
        ax.legend()
        figs = {"mmlu_accuracy": fig}
        subjects = d["subjects"]
        fmt = fmts[0]
        fig2, ax2 = new_axes(width=7, height=max(3.0, 0.18 * len(subjects) + 1.5))
        for name in names:
            vals = [d["by_subject"][name][fmt].get(s, np.nan) for s in subjects]
            ax2.plot(vals, np.arange(len(subjects)), "o", ms=4, label=name)
        ax2.axvline(0.25, color="grey", ls="--", lw=1)
        ax2.set_yticks(np.arange(len(subjects)), [s.replace("_", " ") for s in subjects],
                       fontsize=7)
        ax2.set_xlabel(f"accuracy ({fmt})")
        ax2.set_title("MMLU accuracy per subject")
        ax2.legend()
        figs["mmlu_by_subject"] = fig2
        return figs


PLAIN = ("General knowledge: MMLU in cloze format (log-likelihood of each answer's text after the "
         "question, as lm-evaluation-harness scores it) on a fixed stratified sample, paired "
         "against the base item by item.")


def summary(result: Result, study) -> list[str]:
    """The item count and, per model, accuracy in the first format, paired against the base."""
    data = result.data
    first = data["formats"][0]
    return [f"({data['n_items']} items, {first})"] + [
        paired_line(n, data["accuracy"][n][first], data["ci95"][n][first],
                    data.get("paired", {}).get(n, {}).get(first)) for n in data["models"]]


PROBE = declare(MMLUProbe(), plain=PLAIN, summary=summary,
                model_names=listed_models("models", "accuracy"))
