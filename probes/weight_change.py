"""``weight-change``: where fine-tuning moved the weights, per checkpoint, and how sparsely.

Streamed from the checkpoints' safetensors files in row chunks (no model is loaded; peak memory is a
few chunks). For each variant (every checkpoint of every run), layer and matrix
(q k v o gate up down):

* ``relative_change[<variant>][<matrix>]``: ``||W_v - W_base||_F / ||W_base||_F``, list over layers;
* ``trajectory[<run>][<checkpoint>][<matrix>]``: the same, arranged by run in training order;
* ``changed_fraction[<variant>][<matrix>]``: fraction of entries whose bits changed, over all layers
  (``changed_fraction_by_layer`` has it per layer);
* ``dtypes``: the stored dtype(s) of the base and of each variant, and ``compared_in`` per variant:
  the dtype the differences were taken in (the wider of the two, at least float32);
* ``sparsity``: histogram of ``|dW| / max(|W_base|, 1e-10)`` over 100 log-spaced bins 1e-8..1 per
  variant and matrix kind (counts summed over layers; ``below``/``above`` count ratios < 1e-8,
  unchanged entries included, and >= 1).

Measures that relative change confounds with the optimizer and the base's weight scale
(:mod:`mechinterp.analysis.update_measures`), per variant:

* ``coherence[<variant>][<matrix>]``: ``||W_v - W_base||_F / path length`` per layer (1 = straight
  path, about ``1/sqrt(T)`` = random walk); ``coherence_source[<variant>]``: ``per-step log`` (the
  run's drift log) or ``checkpoints (N)`` (the path through the run's first N saved checkpoints:
  a lower bound of the path, so coherence is an upper bound; None for the first);
* ``update_scale[<variant>][<matrix>]``: ``RMS(W_v - W_base) / (lr x steps)`` per layer (None
  when lr / steps are unknown), with ``update_scale_settings[<variant>]`` (lr, steps, source);
* ``noise_floor[<variant>]``: both measures for the run's optimizer settings on pure-noise
  gradients (seeded AdamW simulation: mean and 95% band), None for a model no run of ours made;
* ``scale_confound[<variant>]``: Spearman over (layer, matrix) of relative change against
  ``1 / RMS(W_base)`` (``base_rms[<matrix>]`` per layer); above 0.9 the relative-change map reads
  the base's weight scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib as mpl
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mechinterp.analysis.update_measures import measures
from mechinterp.analysis.weights import SPARSITY_EDGES, load_config, weight_diff
from mechinterp.store.frames import Table
from mechinterp.models.naming import family_for, n_layers
from mechinterp.models.safetensors_io import tensor_index
from mechinterp.plotting import heatmap_grid, new_axes
from mechinterp.plotting.panels import layer_matrix, none_nan, panel_grid
from mechinterp.plotting.trajectories import run_steps, run_styles, run_x
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.core.summary import floats, fmt, mean_change
from mechinterp.progress import task
from mechinterp.store.results import Result

REL_LABEL = r"$\|W_v - W_{base}\|_F / \|W_{base}\|_F$"


@dataclass
class Config(BaseConfig):
    sparsity: bool = True  # also compute the update-sparsity histograms (about 3x slower)


class WeightChange:
    name = "weight-change"
    version = "3"
    description = ("relative Frobenius change per layer and matrix, per checkpoint, update "
                   "sparsity (bitwise changed fraction, |dW|/|W| histogram), path coherence and "
                   "update scale against an optimizer noise floor, and the weight-scale confound")
    Config = Config
    frames = (Table("relative_change", ("model", "component", "layer")),
              Table("changed_fraction", ("model", "component")),
              Table("changed_fraction_by_layer", ("model", "component", "layer")),
              Table("coherence", ("model", "component", "layer")),
              Table("update_scale", ("model", "component", "layer")),
              *(Table(f"noise_floor_{k}", ("model",), ci=f"noise_floor_{k}_ci95",
                      metric=f"noise_floor.{k}") for k in ("update_scale", "coherence")),
              Table("scale_confound", ("model",)))

    @staticmethod
    def frame_data(data: dict) -> dict:
        """The result, with each noise floor's two measures and bands keyed by model."""
        floors = {v: f for v, f in (data.get("noise_floor") or {}).items() if f}
        out = dict(data)
        for k in ("update_scale", "coherence"):
            out[f"noise_floor_{k}"] = {v: f[k] for v, f in floors.items()}
            out[f"noise_floor_{k}_ci95"] = {v: f[f"{k}_ci95"] for v, f in floors.items()}
        return out

    def run(self, models, data, config: Config) -> Result:
        folders = {n: models.specs[n].path for n in models.variants}
        base = models.specs["base"].path
        cfg = load_config(base)
        total = n_layers(cfg) * len(family_for(cfg).matrices)
        with task("weight change", total) as advance:
            diff = weight_diff(base, folders, sparsity=config.sparsity, progress=advance)
        rel = diff.relative()
        by_kind = {v: {m: diff.by_matrix(v, m) for m in diff.matrices} for v in folders}
        data_out = {
            "matrices": diff.matrices,
            "n_layers": diff.n_layers,
            "variants": list(folders),
            "runs": models.runs,
            "steps": run_steps(models.runs),
            "relative_change": rel,
            "trajectory": {run: {ck: rel[ck] for ck in names} for run, names in models.runs.items()},
            "changed_fraction": {v: {m: s.changed_fraction for m, s in k.items()}
                                 for v, k in by_kind.items()},
            "changed_fraction_by_layer": {
                v: {m: [s.changed_fraction for s in per] for m, per in mats.items()}
                for v, mats in diff.stats.items()},
        }
        data_out.update(measures(models.runs or {v: [v] for v in folders}, folders, base, diff))
        stored = {n: _stored_dtypes(f) for n, f in {"base": base, **folders}.items()}
        data_out["dtypes"] = stored
        data_out["compared_in"] = {v: "float64" if "F64" in stored["base"] + stored[v] else "float32"
                                   for v in folders}
        if config.sparsity:
            data_out["sparsity"] = {
                "edges": SPARSITY_EDGES.tolist(),
                "hist": {v: {m: s.hist.tolist() for m, s in k.items()} for v, k in by_kind.items()},
                "below": {v: {m: s.n_below for m, s in k.items()} for v, k in by_kind.items()},
                "above": {v: {m: s.n_above for m, s in k.items()} for v, k in by_kind.items()},
                "total": {v: {m: s.n_total for m, s in k.items()} for v, k in by_kind.items()},
            }
        # computed on the CPU from the stored tensors, whatever --device says (runner's default)
        return Result(self.name, data_out, provenance={
            "device": "cpu", "dtype": "/".join(sorted(set(data_out["compared_in"].values())))})

    # ----- figures -----------------------------------------------------------------------------
    def plot(self, result: Result) -> dict:
        data = result.data
        matrices = data["matrices"]
        runs = data.get("runs") or {v: [v] for v in data["variants"]}
        kinds = result.provenance.get("run_kinds") or {}
        rel = data["relative_change"]
        figs = {}
        finals = [names[-1] for names in runs.values() if names]
        if finals:
            figs["weight_change_heatmap"] = heatmap_grid(
                [(v, layer_matrix(rel[v], matrices)) for v in finals], matrices, "layer",
                REL_LABEL, title="Relative weight change per layer and matrix (last checkpoints)",
                ncols=4)
        multi = {r: names for r, names in runs.items() if len(names) > 1}
        for run, names in multi.items():
            last = layer_matrix(rel[names[-1]], matrices)
            figs[f"weight_change_checkpoints_{run}"] = heatmap_grid(
                [(n, layer_matrix(rel[n], matrices)) for n in names], matrices, "layer",
                REL_LABEL, vmin=0.0, vmax=float(np.nanmax(last)), ncols=5,
                title=f"Relative weight change per checkpoint of {run} "
                      "(colour scale 0..max of the last checkpoint; brighter = clipped)")
            figs[f"weight_change_layers_{run}"] = _layer_trajectories(
                run, names, data, run_styles(runs, kinds)[run])
        if multi:
            figs["weight_change_trajectory"] = _mean_trajectory(multi, data, kinds)
        if data.get("sparsity"):
            figs["sparsity_histograms"] = _sparsity_figure(finals, data)
        for key, label in MEASURES.items():
            if finals and data.get(key):
                shown = [v for v in finals if _has_values(data[key].get(v))]
                if not shown:
                    continue
                figs[f"{key}_heatmap"] = heatmap_grid(
                    [(v, layer_matrix(data[key][v], matrices)) for v in shown], matrices,
                    "layer", label, ncols=4,
                    title=f"{label} per layer and matrix (last checkpoints)")
                figs[f"{key}_layers"] = _measure_lines(shown, data, key, label)
        return figs


MEASURES = {"coherence": "coherence (displacement / path length)",
            "update_scale": "update scale RMS(dW) / (lr x steps)"}


def _has_values(per_matrix) -> bool:
    return bool(per_matrix) and any(x is not None for xs in per_matrix.values() for x in xs)


def _measure_lines(variants: list[str], data: dict, key: str, label: str):
    """Per variant: the measure over layers, one line per matrix kind, over the band pure-noise
    AdamW gradients with the run's settings reach (mean and 2.5-97.5 percentiles)."""
    matrices = data["matrices"]
    fig, axes = panel_grid(len(variants), 3, (5.0, 3.6), ylabel=label, sharey=True)
    for ax, v in zip(axes.ravel(), variants):
        floor = (data.get("noise_floor") or {}).get(v)
        if floor:
            lo, hi = floor[f"{key}_ci95"]
            ax.axhspan(lo, hi, color="0.85", zorder=0)
            ax.axhline(floor[key], color="0.4", linestyle="--", linewidth=1,
                       label=f"noise floor {floor[key]:.3g} [{lo:.3g}, {hi:.3g}]")
        for m in matrices:
            ax.plot(none_nan(data[key][v][m]), marker="o", markersize=2.5, linewidth=1, label=m)
        src = (data.get("coherence_source") or {}).get(v) if key == "coherence" else None
        ax.set_title(f"{v}" + (f" (path: {src})" if src else ""), fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{label}; grey band: AdamW with the run's settings on pure-noise gradients")
    return fig


def _stored_dtypes(folder) -> str:
    """The safetensors dtype(s) of a checkpoint's tensors, e.g. ``F32`` or ``BF16,F32``."""
    return ",".join(sorted({dtype for _, _, dtype in tensor_index(folder).values()}))


def _mean_trajectory(runs: dict, data: dict, kinds: dict):
    """Mean over layers per matrix kind against step: colour = matrix, line style = run kind."""
    matrices, steps, rel = data["matrices"], data["steps"], data["relative_change"]
    style = run_styles(runs, kinds)
    fig, ax = new_axes(7.5, 4.5)
    colors = {}
    all_steps = True
    for run, names in runs.items():
        xs, is_step = run_x(names, steps)
        all_steps &= is_step
        for m in matrices:
            ys = [np.nanmean(none_nan(rel[n][m])) for n in names]
            (line,) = ax.plot(xs, ys, linestyle=style[run], marker="o", markersize=3,
                              color=colors.get(m))
            colors[m] = line.get_color()
    ax.set_yscale("log")
    ax.set_xlabel("training step" if all_steps else "checkpoint")
    ax.set_ylabel("mean over layers of " + REL_LABEL)
    ax.set_title("Weight change over training, per matrix kind")
    handles = [Line2D([], [], color=colors[m], label=m) for m in matrices]
    handles += [Line2D([], [], color="0.3", linestyle=style[r],
                       label=f"{r} ({kinds.get(r) or 'kind unknown'})") for r in runs]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def _layer_trajectories(run: str, names: list[str], data: dict, linestyle):
    """One panel per matrix kind: each layer's change against step, coloured by layer."""
    matrices, rel = data["matrices"], data["relative_change"]
    xs, is_step = run_x(names, data["steps"])
    L = data["n_layers"]
    fig, axes = panel_grid(len(matrices), 4, (3.2, 2.7), margin=1.0, ylabel="relative change",
                           sharey=True)
    cmap = mpl.colormaps["viridis"]
    for ax, m in zip(axes.ravel(), matrices):
        arr = np.array([none_nan(rel[n][m]) for n in names], float)  # (checkpoint, layer)
        for layer in range(L):
            ax.plot(xs, arr[:, layer], color=cmap(layer / max(1, L - 1)), linewidth=1,
                    linestyle=linestyle)
        ax.set_yscale("log")
        ax.set_title(m)
        if not np.any(np.nan_to_num(arr) > 0):
            ax.text(0.5, 0.5, "unchanged at every checkpoint", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
        ax.set_xlabel("training step" if is_step else "checkpoint")
        ax.grid(True, alpha=0.3)
    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, L - 1), cmap=cmap)
    fig.colorbar(sm, ax=axes.ravel().tolist(), label="layer", shrink=0.9)
    fig.suptitle(f"Per-layer weight change over training: {run}")
    return fig


def _sparsity_figure(variants: list[str], data: dict):
    """Per variant: fraction of entries per |dW|/|W| bin, one line per matrix kind."""
    sp, matrices = data["sparsity"], data["matrices"]
    edges = np.asarray(sp["edges"], float)
    centres = np.sqrt(edges[:-1] * edges[1:])
    fig, axes = panel_grid(len(variants), 3, (5.0, 3.6), ylabel="fraction of entries per bin",
                           sharey=True)
    for ax, v in zip(axes.ravel(), variants):
        for m in matrices:
            total = sp["total"][v][m]
            frac = np.asarray(sp["hist"][v][m], float) / max(1, total)
            changed = data["changed_fraction"][v][m]
            below = sp["below"][v][m] / max(1, total)
            ax.step(centres, frac, where="mid", linewidth=1.2,
                    label=f"{m}: {100 * (changed or 0):.1f}% changed, {100 * below:.0f}% <1e-8")
        ax.set_xscale("log")
        ax.set_xlim(edges[0], edges[-1])
        ax.set_title(v)
        ax.set_xlabel(r"$|\Delta W| / \max(|W_{base}|, 10^{-10})$")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Update sparsity (100 log bins 1e-8..1; % changed = bits differ)")
    return fig


PLAIN = ("How far each matrix moved: ||W_variant - W_base||_F / ||W_base||_F per layer and "
         "matrix kind, at every checkpoint, and how sparse the update is.")


def summary(result: Result, study) -> list[str]:
    """Per variant's final model: the mean relative change and the three matrix kinds that
    changed most."""
    lines = []
    for variant in study.variants:
        name = study.final_name(variant, "weight-change")
        rel = result.data["relative_change"].get(name)
        if rel:
            kind_means = {m: float(np.nanmean(floats(rel[m]))) for m in rel}
            kinds = sorted(rel, key=lambda m: -kind_means[m])
            lines.append(f"{name}: mean relative change {fmt(mean_change(rel))}; most changed "
                         + ", ".join(f"{m} {fmt(kind_means[m])}" for m in kinds[:3]))
    return lines


PROBE = declare(WeightChange(), plain=PLAIN, summary=summary,
                model_names=listed_models("variants", "relative_change"))
