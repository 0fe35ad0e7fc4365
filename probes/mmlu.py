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
        """Accuracy per model and format with its Wilson interval (one row per model, so a study
        of many checkpoints stays readable), and a subject x model heatmap."""
        d = result.data
        return {"mmlu_accuracy": _accuracy_figure(d), "mmlu_by_subject": _subject_figure(d)}


def _accuracy_figure(d: dict):
    fmts, names = d["formats"], d["models"]
    fig, ax = new_axes(width=7, height=max(2.5, 0.28 * len(names) + 1.4))
    rows = np.arange(len(names))[::-1]
    step = 0.6 / max(1, len(fmts))
    for k, f in enumerate(fmts):
        y = np.array([d["accuracy"][n][f] for n in names])
        lo = np.array([d["ci95"][n][f][0] for n in names])
        hi = np.array([d["ci95"][n][f][1] for n in names])
        ax.errorbar(y, rows + (k - (len(fmts) - 1) / 2) * step, xerr=[y - lo, hi - y], fmt="o",
                    ms=4, capsize=2, label=f)
    ax.axvline(0.25, color="grey", ls="--", lw=1, label="chance (0.25)")
    ax.set_yticks(rows, names, fontsize=8)
    ax.set_xlabel("accuracy (95% Wilson interval)")
    ax.set_title(f"MMLU accuracy ({d['n_items']} test items)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _subject_figure(d: dict):
    names, subjects, fmt = d["models"], d["subjects"], d["formats"][0]
    acc = np.array([[d["by_subject"][n][fmt].get(s, np.nan) for n in names] for s in subjects],
                   dtype=float)
    fig, ax = new_axes(width=max(5.0, 0.3 * len(names) + 3.5),
                       height=max(3.0, 0.18 * len(subjects) + 2.0))
    im = ax.imshow(acc, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(np.arange(len(subjects)), [s.replace("_", " ") for s in subjects], fontsize=7)
    ax.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=7)
    ax.set_title(f"MMLU accuracy per subject ({fmt}; {d['n_items']} items in all)")
    fig.colorbar(im, ax=ax, label="accuracy", shrink=0.5)
    return fig


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
