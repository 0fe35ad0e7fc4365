"""``training-drift``: weight change and KL(base || checkpoint) along a training run.

``mechinterp train`` writes this result into its ``--out`` folder after every checkpoint; the probe
can also be run on existing checkpoints (``--variant sft=OUT@step-4,OUT@step-8``): weight change is
streamed from the safetensors, KL is teacher-forced on ``limit`` GSM8K test items rendered in the
training format (default 16). Result keys: ``steps``, ``checkpoints``, ``matrices``, ``n_layers``,
``relative_change[matrix][checkpoint][layer]``, ``kl[checkpoint]``, ``kl_per_item``, ``history``
(loss / reward per logged step, empty when run as a probe); a probe run stores one such block per
run in ``runs_drift[run]``. ``to_frame()`` gives ``relative_change`` (model, component, layer) and
``kl`` per checkpoint, the model of a training log's checkpoint named ``<run>@step-N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mechinterp.analysis.weights import weight_change
from mechinterp.data.base import DataSource
from mechinterp.errors import UserError
from mechinterp.store.frames import Table
from mechinterp.paths import checkpoint_step
from mechinterp.plotting import heatmap_grid, new_axes
from mechinterp.core.probe import BaseConfig, declare
from mechinterp.core.summary import fmt
from mechinterp.progress import track
from mechinterp.store.results import Result
from mechinterp.training.drift import answer_logprobs, build_heldout, kl_per_item
from mechinterp.data.items import load_items, pick
from mechinterp.data.qa import prompt_messages, render_target


@dataclass
class Config(BaseConfig):
    heldout_max_length: int = 512  # tokens per held-out item at most
    at_least = {"heldout_max_length": 2}  # lower bounds; every other number: at least 0


def _blocks(data: dict) -> dict[str, dict]:
    if "runs_drift" in data:
        return data["runs_drift"]
    # a training run's own log: named by what was trained (``sft``, ``sft frozen mlp@10-19``)
    name = data.get("algorithm", "run") + (f" frozen {data['freeze']}" if data.get("freeze") else "")
    return {name: data}


class TrainingDrift:
    name = "training-drift"
    version = "1"
    description = "weight change per layer/matrix and held-out KL from the base, per checkpoint"
    Config = Config
    frames = (Table("relative_change", ("model", "component", "layer")), Table("kl", ("model",)))

    @staticmethod
    def frame_data(data: dict) -> dict:
        """The tables keyed by model, for :func:`~mechinterp.store.frames.to_frame`: a checkpoint of a
        training run's own log is the model ``<run>@step-N``; a probe run's checkpoints keep
        their variant names (``sft@step-4``)."""
        rel, kl, runs = {}, {}, {}
        own_log = "runs_drift" not in data
        for run, b in _blocks(data).items():
            names = [f"{run}@{c}" if own_log else c for c in b.get("checkpoints", [])]
            runs[run] = names
            for i, name in enumerate(names):
                rel[name] = {m: b["relative_change"][m][i] for m in b["matrices"]}
                kl[name] = b["kl"][i]
        return {"relative_change": rel, "kl": kl, "runs": runs}

    def run(self, models, data, config: Config) -> Result:
        if not models.runs:
            raise UserError("training-drift needs at least one variant",
                            "e.g. --variant sft=OUT@step-4,OUT@step-8")
        items = pick(load_items("gsm8k", data or DataSource.from_option(None), "test"),
                     config.limit or 16, config.seed)
        base = models["base"]
        heldout = build_heldout(base.tokenizer, [prompt_messages(i.question) for i in items],
                                [render_target(i) for i in items], config.heldout_max_length)
        base_lp = answer_logprobs(base.hf, heldout)
        folders = {n: models.specs[n].path for n in models.variants}
        matrices, n_layer, rel = weight_change(models.specs["base"].path, folders)
        out = {}
        for run, names in models.runs.items():
            kls = []
            for n in track(names, f"KL {run}"):
                per = kl_per_item(base_lp, answer_logprobs(models[n].hf, heldout))
                kls.append(per)
                models.release(n)
            steps = [i + 1 if checkpoint_step(n) is None else checkpoint_step(n)
                     for i, n in enumerate(names)]
            out[run] = {"algorithm": run, "steps": steps, "checkpoints": names,
                        "matrices": matrices, "n_layers": n_layer,
                        "relative_change": {m: [rel[n][m] for n in names] for m in matrices},
                        "kl": [float(np.mean(p)) for p in kls], "kl_per_item": kls, "history": []}
        return Result(self.name, {"runs_drift": out})

    def plot(self, result: Result) -> dict:
        blocks = {k: b for k, b in _blocks(result.data).items() if b.get("steps")}
        if not blocks:
            return {}
        figs = {}
        # mean-over-layers relative change per matrix, log y
        fig, axes = new_axes(width=5.0 * len(blocks) + 1, height=3.8, ncols=len(blocks),
                             squeeze=False, sharey=True)
        for ax, (run, b) in zip(axes[0], blocks.items()):
            for m in b["matrices"]:
                arr = np.array(b["relative_change"][m], float)  # checkpoint x layer
                ax.plot(b["steps"], np.nanmean(arr, axis=1), marker="o", label=m)
            if any(np.nanmax(np.array(b["relative_change"][m], float)) > 0 for m in b["matrices"]):
                ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_title(run + (f" (frozen: {b['freeze']})" if b.get("freeze") else ""))
        axes[0][0].set_ylabel(r"mean over layers of $\|W_t - W_0\|_F / \|W_0\|_F$")
        axes[0][-1].legend(title="matrix", fontsize=8)
        fig.suptitle("Relative weight change along training")
        figs["drift_weight_change"] = fig
        # KL trajectory
        if any(any(k is not None for k in b["kl"]) for b in blocks.values()):
            fig, ax = new_axes(width=5.5, height=3.6)
            for run, b in blocks.items():
                pts = [(s, k) for s, k in zip(b["steps"], b["kl"]) if k is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=run)
            ax.set_xlabel("training step")
            ax.set_ylabel("KL(base || checkpoint), nats / answer token")
            ax.set_title("Held-out KL from the base (teacher-forced)")
            ax.legend()
            figs["drift_kl"] = fig
        # layer x matrix heatmap at the last checkpoint of each run
        panels = [(f"{run} {b['checkpoints'][-1]}",
                   np.array([b["relative_change"][m][-1] for m in b["matrices"]], float).T)
                  for run, b in blocks.items()]
        first = next(iter(blocks.values()))
        figs["drift_final_heatmap"] = heatmap_grid(
            panels, first["matrices"], "layer", r"$\|W - W_0\|_F / \|W_0\|_F$",
            title="Relative weight change at the last checkpoint")
        # loss / reward history (training runs only)
        hist = {run: b["history"] for run, b in blocks.items() if b.get("history")}
        if hist:
            keys = [k for k in ("loss", "reward") if any(k in h for hs in hist.values() for h in hs)]
            fig, axes = new_axes(width=4.5 * len(keys) + 1, height=3.4, ncols=len(keys), squeeze=False)
            for ax, key in zip(axes[0], keys):
                for run, hs in hist.items():
                    pts = [(h["step"], h[key]) for h in hs if h.get(key) is not None]
                    if pts:
                        ax.plot(*zip(*pts), label=run)
                ax.set_xlabel("training step")
                ax.set_ylabel(key)
                ax.set_title(f"training {key}")
            axes[0][-1].legend()
            figs["drift_history"] = fig
        return figs


PLAIN = ("How a training run drifted from its base, checkpoint by checkpoint: the relative change "
         "of each matrix per layer and the KL from the base on held-out items, as logged while "
         "training or measured afterwards.")


def summary(result: Result, study) -> list[str]:
    """Per checkpoint model: its held-out KL from the base."""
    kl = TrainingDrift.frame_data(result.data)["kl"]
    return [f"{name}: KL {fmt(value)} nats/token" for name, value in kl.items()]


def model_names(data: dict) -> list[str]:
    """The checkpoint models a drift result covers (``sft@step-4``, ...)."""
    return list(TrainingDrift.frame_data(data)["kl"])


PROBE = declare(TrainingDrift(), plain=PLAIN, summary=summary, model_names=model_names)
