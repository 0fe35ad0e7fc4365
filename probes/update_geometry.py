"""``update-geometry``: the precision and the spectral geometry of each weight update
``dW = W_variant - W_base``, per layer, matrix (q k v o gate up down) and checkpoint.

Streamed one (layer, matrix) at a time from the checkpoints' safetensors files (memory-mapped; the
base matrix and its top-``k`` SVD are computed once for all variants), so the peak memory is a few
matrices whatever the model size. Measures (definitions in :mod:`mechinterp.analysis.geometry`):

Precision - what the papers disagree about (RL "updates a small subnetwork", arXiv 2505.11711, vs
"that sparsity is a bf16 artefact", arXiv 2511.08567):

* ``exact_zero_fraction[<variant>][<matrix>][<layer>]``: entries exactly unchanged as stored;
* ``bf16_invisible_fraction``: entries whose update vanishes in bfloat16 (``bf16(W_v) ==
  bf16(W_b)``, round to nearest even: below half a bf16 ulp of a bf16 base value), zeros included;
* ``tolerance_fraction[<tol>][<variant>][<matrix>][<layer>]``: ``|dW| <= tol`` (absolute; 1e-5 as
  in 2505.11711 by default), zeros included;
* ``histograms``: ``|dW| / max(|W_base|, 1e-10)`` over the 100 log bins 1e-8..1 of weight-change,
  per variant and matrix kind (summed over layers), with exact zeros in a bin of their own
  (``zero``) and nonzero ratios below 1e-8 apart (``below``);
* ``dtypes`` (stored, per model) and ``compared_in`` (per variant): the dtype compared, always.

Spectral geometry - does the update rotate the principal subspace or avoid it ("The Path Not
Taken": RLVR off-principal with little spectral drift, SFT rotating it):

* ``spectral_drift`` (mean relative change of the top-``k`` singular values),
  ``top_singular_change`` (signed, the largest);
* ``rotation_left`` / ``rotation_right``: mean principal angle (degrees) between the top-``k``
  left / right singular subspaces of base and variant; ``*_max``: the largest angle (left:
  vectors of length m, the number of rows as stored - a Linear's output side, GPT-2's Conv1D's
  input side);
* ``on_principal_share``: ``||U_k^T dW V_k||^2 / ||dW||^2`` (two-sided), against
  ``random_share[<matrix>] = k^2 / (m n)``, what a random update of the same shape puts there in
  expectation; ``left_share`` / ``right_share`` one-sided (random: ``k/m``, ``k/n``);
* ``effective_rank`` (exp of the entropy of dW's normalised singular values), ``stable_rank``
  (``||dW||_F^2 / ||dW||_2^2``).

``k[<matrix>]`` = ``max(1, round(k_fraction * min(m, n)))`` (or the ``k`` option); ``svd[<matrix>]``
records whether an exact SVD or ``torch.svd_lowrank`` gave the top-``k`` (``svd=auto``: exact up to
min(m, n) = 2048), and ``dw_spectrum[<matrix>]`` how dW's full spectrum was taken. With ``spec@all``
variants every checkpoint is measured (``trajectory`` keys as weight-change: ``runs``, ``steps``).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mechinterp.analysis import geometry as G
from mechinterp.analysis.weights import (
    CHUNK_ELEMENTS,
    SPARSITY_BINS,
    SPARSITY_EDGES,
    CheckpointReader,
    _bin_ratios,
    load_config,
    matrix_refs,
)
from mechinterp.errors import CorruptCheckpoint, UserError
from mechinterp.evals.stats import t_interval
from mechinterp.store.frames import Table
from mechinterp.models.naming import family_for, n_layers
from mechinterp.plotting import heatmap_grid
from mechinterp.plotting.panels import layer_matrix, none_nan, panel_grid
from mechinterp.plotting.trajectories import X_AXES, checkpoint_x, run_steps, run_styles, x_label
from mechinterp.core.probe import BaseConfig, declare, listed_models
from mechinterp.progress import task
from mechinterp.store.results import Result

from .weight_change import _stored_dtypes

#: spectral measures, per variant, matrix and layer
SPECTRAL = ("spectral_drift", "top_singular_change", "rotation_left", "rotation_left_max",
            "rotation_right", "rotation_right_max", "on_principal_share", "left_share",
            "right_share", "effective_rank", "stable_rank")
PRECISION = ("exact_zero_fraction", "bf16_invisible_fraction")
LABELS = {
    "on_principal_share": r"share of $\|dW\|^2$ in $W_{base}$'s top-$k$ subspace (two-sided)",
    "rotation_left": "mean principal angle, top-k left subspace (deg)",
    "rotation_right": "mean principal angle, top-k right subspace (deg)",
    "spectral_drift": "mean relative change of the top-k singular values",
    "effective_rank": "effective rank of dW",
    "stable_rank": "stable rank of dW",
    "exact_zero_fraction": "fraction of entries exactly unchanged",
    "bf16_invisible_fraction": "fraction of entries unchanged in bf16",
}
#: drawn as layer x matrix heatmaps and as trajectories
FIGURE_MEASURES = ("on_principal_share", "rotation_left", "rotation_right", "spectral_drift",
                   "effective_rank", "stable_rank", "exact_zero_fraction",
                   "bf16_invisible_fraction")


@dataclass
class Config(BaseConfig):
    k_fraction: float = 0.05  # k = max(1, round(k_fraction * min(m, n))) per matrix
    k: int | None = None  # the same k for every matrix instead (capped at min(m, n))
    svd: str = "auto"  # auto (exact up to min(m, n) = 2048, torch.svd_lowrank above), exact, lowrank
    tolerances: list[float] = field(default_factory=lambda: [1e-5])  # |dW| <= t counts as unchanged
    spectral: bool = True  # the SVD measures; false: the precision measures only (fast)
    x_axis: str = "step"  # trajectories against: step, fraction (of each run's training)

    at_least = {"k": 1}


class UpdateGeometry:
    name = "update-geometry"
    version = "1"
    description = ("precision (exact zeros, bf16-invisible, below tolerance) and spectral geometry "
                   "(spectral drift, principal rotation, on-principal share, effective/stable "
                   "rank) of each weight update, per layer, matrix and checkpoint")
    Config = Config
    frames = (*(Table(m, ("model", "component", "layer")) for m in SPECTRAL + PRECISION),
              Table("tolerance_fraction", ("metric", "model", "component", "layer")))

    def run(self, models, data, config: Config) -> Result:
        if config.svd not in ("auto", "exact", "lowrank"):
            raise UserError(f"option svd={config.svd!r} of update-geometry is not a method",
                            "use svd=auto, exact or lowrank")
        if config.x_axis not in ("step", "fraction"):
            raise UserError(f"option x_axis={config.x_axis!r} of update-geometry is not an axis",
                            "use x_axis=step or fraction (KL: the paper figure set, "
                            "mechinterp figures DIR --paper)")
        folders = {n: Path(models.specs[n].path) for n in models.variants}
        base = Path(models.specs["base"].path)
        out = measure(base, folders, config)
        out |= {"variants": list(folders), "runs": models.runs, "steps": run_steps(models.runs)}
        stored = {n: _stored_dtypes(f) for n, f in {"base": base, **folders}.items()}
        out["dtypes"] = stored
        return Result(self.name, out)

    # ----- figures -----------------------------------------------------------------------------
    def plot(self, result: Result) -> dict:
        data = result.data
        matrices = data["matrices"]
        runs = data.get("runs") or {v: [v] for v in data["variants"]}
        kinds = result.provenance.get("run_kinds") or {}
        x_axis = (result.provenance.get("config") or {}).get("x_axis", "step")
        finals = [names[-1] for names in runs.values() if names]
        figs = {}
        for m in FIGURE_MEASURES:
            if m not in data or not finals:
                continue
            panels = [(v, layer_matrix(data[m][v], matrices)) for v in finals]
            if m == "on_principal_share":  # as a ratio, so matrices of different shapes compare
                rand = np.array([data["random_share"][mm] for mm in matrices])[None, :]
                panels = [(v, a / rand) for v, a in panels]
            figs[f"geometry_{m}_heatmap"] = heatmap_grid(
                panels, matrices, "layer", _ylabel(m), ncols=4,
                title=f"{_ylabel(m)} (last checkpoints"
                      + (r"; random update: 1, i.e. $k^2/mn$)" if m == "on_principal_share"
                         else ")"))
        if finals and any(m in data for m in FIGURE_MEASURES):
            figs["geometry_by_matrix"] = by_matrix_figure(data, finals, kinds)
        if any(len(n) > 1 for n in runs.values()):
            figs["geometry_trajectory"] = trajectory_figure(data, runs, kinds, x_axis)
        if data.get("histograms") and finals:
            figs["precision_histograms"] = precision_figure(data, finals)
        return figs


# ----- measuring -----------------------------------------------------------------------------------

class Tally:
    """The measures of every (variant, matrix, layer) as they are computed, and their totals."""

    def __init__(self, variants: list[str], matrices: list[str], n_layer: int, config: Config):
        def grid(fill=None):
            return {v: {m: [fill] * n_layer for m in matrices} for v in variants}

        self.config, self.matrices, self.n_layers = config, matrices, n_layer
        self.tol_keys = [f"{t:g}" for t in config.tolerances]
        self.per = {key: grid() for key in (*(SPECTRAL if config.spectral else ()), *PRECISION)}
        self.tolerance = {t: grid() for t in self.tol_keys}
        self.hist = {key: {v: dict.fromkeys(matrices, 0) for v in variants}
                     for key in ("zero", "below", "above", "total")}
        self.hist["counts"] = {v: {m: np.zeros(SPARSITY_BINS, np.int64) for m in matrices}
                               for v in variants}
        self.totals = {v: {"n": 0, "exact_zero": 0, "bf16_invisible": 0,
                           "tolerance": dict.fromkeys(self.tol_keys, 0)} for v in variants}
        self.meta = {key: {} for key in ("k", "shape", "svd", "dw_spectrum", "random_share",
                                         "random_left_share", "random_right_share")}
        self.compared_in: dict[str, set] = {v: set() for v in variants}
        self.seconds = {"read": 0.0, "precision": 0.0, "base_svd": 0.0, "variant_geometry": 0.0}

    def matrix(self, m: str, shape: tuple[int, int]) -> tuple[int, str]:
        """Record the matrix kind's shape, k and SVD method; returns (k, method)."""
        config = self.config
        k = min(min(shape), config.k) if config.k else G.k_for(shape, config.k_fraction)
        method = G.svd_method(shape, config.svd)
        meta = self.meta
        meta["k"][m], meta["shape"][m], meta["svd"][m] = k, list(shape), method
        meta["random_share"][m] = k * k / (shape[0] * shape[1])
        meta["random_left_share"][m], meta["random_right_share"][m] = k / shape[0], k / shape[1]
        return k, method

    def add_precision(self, name: str, m: str, layer: int, c: dict) -> None:
        """One variant's :func:`_precision` counts of one matrix."""
        self.compared_in[name].add(c["compared_in"])
        n = c["n"]
        self.per["exact_zero_fraction"][name][m][layer] = c["exact_zero"] / n
        self.per["bf16_invisible_fraction"][name][m][layer] = c["bf16_invisible"] / n
        total = self.totals[name]
        total["n"] += n
        total["exact_zero"] += c["exact_zero"]
        total["bf16_invisible"] += c["bf16_invisible"]
        for t, key in zip(self.config.tolerances, self.tol_keys, strict=True):
            self.tolerance[key][name][m][layer] = c["tolerance"][t] / n
            total["tolerance"][key] += c["tolerance"][t]
        counts, hist = c["counts"], self.hist
        hist["zero"][name][m] += c["exact_zero"]
        hist["below"][name][m] += int(counts[0])
        hist["above"][name][m] += int(counts[-1])
        hist["total"][name][m] += n
        hist["counts"][name][m] += counts[1:-1]

    def add_geometry(self, name: str, m: str, layer: int, geo: dict) -> None:
        self.meta["dw_spectrum"][m] = geo["dw_spectrum"]
        for key in SPECTRAL:
            self.per[key][name][m][layer] = geo[key]

    def result(self) -> dict:
        config, hist = self.config, dict(self.hist)
        hist["counts"] = {v: {m: c.tolist() for m, c in ms.items()}
                          for v, ms in hist["counts"].items()}
        out = {"matrices": self.matrices, "n_layers": self.n_layers, **self.per,
               "tolerance_fraction": self.tolerance, "tolerances": self.tol_keys,
               "histograms": {"edges": SPARSITY_EDGES.tolist(), **hist},
               "overall": {v: {"exact_zero_fraction": t["exact_zero"] / t["n"],
                               "bf16_invisible_fraction": t["bf16_invisible"] / t["n"],
                               "tolerance_fraction": {k: c / t["n"]
                                                      for k, c in t["tolerance"].items()}}
                           for v, t in self.totals.items()},
               "compared_in": {v: ",".join(sorted(s)) for v, s in self.compared_in.items()},
               "k_fraction": None if config.k else config.k_fraction,
               "seconds": self.seconds, **self.meta}
        if not config.spectral:
            for key in ("svd", "dw_spectrum"):
                out.pop(key)
        return out


@contextmanager
def _timed(seconds: dict, key: str):
    """Adds the seconds the block takes to ``seconds[key]``."""
    t0 = time.perf_counter()
    yield
    seconds[key] += time.perf_counter() - t0


def measure(base: Path, variants: dict[str, Path], config: Config, progress=None) -> dict:
    """Every measure for every (layer, matrix) of ``base`` against each of ``variants``."""
    cfg = load_config(base)
    family = family_for(cfg)
    tally = Tally(list(variants), list(family.matrices), n_layers(cfg), config)
    refs = matrix_refs(family, cfg)
    with ExitStack() as stack, task("update geometry", len(refs)) as advance:
        base_reader = stack.enter_context(CheckpointReader(base))
        readers = {n: stack.enter_context(CheckpointReader(f)) for n, f in variants.items()}
        for layer, m, ref in refs:
            with _timed(tally.seconds, "read"):
                b = ref.take(base_reader.get(ref.name))
            shape = tuple(b.shape)
            k, method = tally.matrix(m, shape)
            base_svd = None
            if config.spectral:
                with _timed(tally.seconds, "base_svd"):
                    base_svd = G.top_svd(b, k, method)
            for name, reader in readers.items():
                with _timed(tally.seconds, "read"):
                    v = ref.take(reader.get(ref.name))
                if tuple(v.shape) != shape:
                    raise CorruptCheckpoint(f"{ref.name} has shape {tuple(v.shape)} in {name} but "
                                            f"{shape} in the base", "compare the same architecture")
                with _timed(tally.seconds, "precision"):
                    tally.add_precision(name, m, layer, _precision(b, v, config.tolerances))
                if base_svd is not None:
                    with _timed(tally.seconds, "variant_geometry"):
                        wide = G.compare_dtype(b.dtype, v.dtype)
                        tally.add_geometry(name, m, layer,
                                           G.update_geometry(base_svd, v, v.to(wide) - b.to(wide)))
                del v
            (progress or advance)()
    return tally.result()


def _precision(b: torch.Tensor, v: torch.Tensor, tolerances: list[float]) -> dict:
    """:func:`~mechinterp.analysis.geometry.sparsity_counts` over row chunks of about
    :data:`~mechinterp.analysis.weights.CHUNK_ELEMENTS` entries (its temporaries stay a few
    chunks), merged, with the |dW|/|W| bin counts of the nonzero updates (``counts``: below
    1e-8, the 100 bins, at or above 1)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, b[0].numel() if b.ndim > 1 else 1))
    out = {"n": 0, "exact_zero": 0, "bf16_invisible": 0, "tolerance": dict.fromkeys(tolerances, 0),
           "counts": np.zeros(SPARSITY_BINS + 2, np.int64)}
    for i in range(0, b.shape[0], rows):
        c = G.sparsity_counts(b[i:i + rows], v[i:i + rows], tolerances)
        for key in ("n", "exact_zero", "bf16_invisible"):
            out[key] += c[key]
        for t in tolerances:
            out["tolerance"][t] += c["tolerance"][t]
        out["compared_in"] = c["compared_in"]
        d, bb = c["d_nonzero"], c["b_nonzero"]
        if d.numel():
            finite = bool(torch.isfinite(d).all() and torch.isfinite(bb).all())
            out["counts"] += torch.bincount(_bin_ratios(d, bb, finite).long(),
                                            minlength=SPARSITY_BINS + 2).numpy()
    return out


# ----- figures -------------------------------------------------------------------------------------

def _mean(data: dict, measure: str, name: str) -> float:
    """Mean over layers and matrices; the share as a ratio to the random share, per matrix."""
    vals = []
    for m in data["matrices"]:
        xs = np.array(none_nan(data[measure][name][m]), float)
        if measure == "on_principal_share":
            xs = xs / data["random_share"][m]
        vals.append(xs)
    arr = np.concatenate(vals)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def _ylabel(measure: str) -> str:
    return ("on-principal share / a random update's" if measure == "on_principal_share"
            else LABELS[measure])


def trajectory_figure(data: dict, runs: dict, kinds: dict, x_axis: str = "step",
                      kl: dict | None = None):
    """One panel per measure: its mean over layers and matrices per checkpoint, one line per run
    (line style by run kind), against step, fraction of training or KL reached (``kl``:
    ``{checkpoint: KL}`` from a kl-drift result)."""
    measures = [m for m in FIGURE_MEASURES if m in data]
    styles = run_styles(runs, kinds)
    fig, axes = panel_grid(len(measures), 4, (3.4, 2.8), margin=1.5)
    ok_all = True
    for ax, meas in zip(axes.ravel(), measures):
        for run, names in runs.items():
            xs, ok = checkpoint_x(names, data["steps"], x_axis, kl)
            ok_all &= ok
            ax.plot(xs, [_mean(data, meas, n) for n in names], linestyle=styles[run],
                    marker="o", markersize=3, label=f"{run} ({kinds.get(run) or 'kind unknown'})")
        if meas == "on_principal_share":
            ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_title(_ylabel(meas), fontsize=9)
        ax.grid(True, alpha=0.3)
    for ax in axes.ravel():
        ax.set_xlabel(x_label(x_axis, ok_all), fontsize=8)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle("Update geometry over training (mean over layers and matrices)")
    return fig


def by_matrix_figure(data: dict, finals: list[str], kinds: dict):
    """SFT vs GRPO side by side: per measure, the mean over layers per matrix kind, one marker
    series per final model."""
    measures = [m for m in FIGURE_MEASURES if m in data]
    matrices = data["matrices"]
    fig, axes = panel_grid(len(measures), 4, (3.4, 2.8), margin=1.5)
    x = np.arange(len(matrices))
    for ax, meas in zip(axes.ravel(), measures):
        for j, v in enumerate(finals):
            ys = []
            for m in matrices:
                xs = np.array(none_nan(data[meas][v][m]), float)
                if meas == "on_principal_share":
                    xs = xs / data["random_share"][m]
                ys.append(np.nanmean(xs) if np.isfinite(xs).any() else np.nan)
            ax.plot(x + 0.1 * (j - (len(finals) - 1) / 2), ys, marker="os^Dv<>"[j % 7],
                    linestyle="none", label=v)
        if meas == "on_principal_share":
            ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_xticks(x, matrices)
        ax.set_title(_ylabel(meas), fontsize=9)
        ax.grid(True, alpha=0.3)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle("Update geometry per matrix kind, final models (mean over layers)")
    return fig


def precision_figure(data: dict, finals: list[str]):
    """Per final model: the fraction of entries per |dW|/|W| bin, one line per matrix kind, with
    exact zeros drawn as a bar of their own at the left."""
    h, matrices = data["histograms"], data["matrices"]
    edges = np.asarray(h["edges"], float)
    centres = np.sqrt(edges[:-1] * edges[1:])
    zero_x = edges[0] / 10
    fig, axes = panel_grid(len(finals), 3, (5.0, 3.6), ylabel="fraction of entries", sharey=True)
    for ax, v in zip(axes.ravel(), finals):
        for m in matrices:
            total = max(1, h["total"][v][m])
            (line,) = ax.step(centres, np.asarray(h["counts"][v][m], float) / total, where="mid",
                              linewidth=1.1, label=m)
            ax.plot([zero_x], [h["zero"][v][m] / total], marker="s", color=line.get_color())
        ov = data["overall"][v]
        tol = ", ".join(f"<= {t}: {100 * f:.1f}%" for t, f in ov["tolerance_fraction"].items())
        ax.set_title(f"{v}\nexact 0: {100 * ov['exact_zero_fraction']:.2f}%, bf16-invisible: "
                     f"{100 * ov['bf16_invisible_fraction']:.1f}%, {tol}", fontsize=8)
        ax.axvline(2.0**-8, color="0.4", linewidth=0.8, linestyle=":")  # half a bf16 ulp, relative
        ax.set_xscale("log")
        ax.set_xlim(zero_x / 3, edges[-1])
        ax.set_xlabel(r"$|\Delta W| / |W_{base}|$ (square at left: exactly 0)")
        ax.grid(True, alpha=0.3)
    axes.ravel()[0].legend(fontsize=7, loc="upper center", ncols=2)  # zeros sit at the left
    compared = ", ".join(sorted(set(data.get("compared_in", {}).values())))
    fig.suptitle(f"Update precision (compared in {compared}; dotted: 2^-8, about half a bf16 ulp "
                 "relative to the weight)", fontsize=10)
    return fig


# ----- the report's key numbers ---------------------------------------------------------------------

def final_means(data: dict, name: str) -> dict[str, float]:
    """One model's headline numbers: spectral measures averaged over layers and matrices (the
    share as a multiple of a random update's, the effective rank as a fraction of min(m, n)),
    precision fractions over all matrix entries."""
    out = {}
    for meas in ("on_principal_share", "rotation_left", "rotation_right", "spectral_drift",
                 "stable_rank"):
        if meas in data:
            out[meas] = _mean(data, meas, name)
    if "effective_rank" in data:
        vals = [np.nan if x is None else x / min(data["shape"][m])
                for m in data["matrices"] for x in data["effective_rank"][name][m]]
        out["effective_rank"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else np.nan
    ov = data["overall"][name]
    out |= {"exact_zero_fraction": ov["exact_zero_fraction"],
            "bf16_invisible_fraction": ov["bf16_invisible_fraction"],
            **{f"tolerance_fraction.{t}": f for t, f in ov["tolerance_fraction"].items()}}
    return out


def summary_lines(study, data: dict) -> list[str]:
    """Per kind of run (SFT, GRPO, ...; every variant of unknown kind on its own): the final
    models' on-/off-principal share, rotation, spectral drift, ranks and apparent sparsity per
    precision; with several seeds of a kind, the mean and a Student-t 95% interval over seeds."""
    groups: dict[str, list[str]] = {}
    for name, info in study.variants.items():
        kind = info.kind
        if kind is None or name not in study.replicates(kind):
            groups[name] = [name]
        else:
            groups.setdefault(kind, study.replicates(kind))
    models = set(data.get("variants") or [])
    lines = []
    k = data.get("k") or {}
    if k:
        how = ", ".join(sorted(set((data.get("svd") or {}).values()))) or "no SVD"
        lines.append(f"k per matrix: {', '.join(f'{m} {k[m]}' for m in data['matrices'])} "
                     f"({how} SVD); compared in "
                     f"{', '.join(sorted(set(data['compared_in'].values())))}")
    fmt = {"on_principal_share": ("on-principal share (two-sided, x a random update's)", ".2f"),
           "rotation_left": ("left rotation (deg)", ".3g"),
           "rotation_right": ("right rotation (deg)", ".3g"),
           "spectral_drift": ("spectral drift", ".3g"),
           "effective_rank": ("effective rank / min(m,n)", ".3f"),
           "stable_rank": ("stable rank", ".3g"),
           "exact_zero_fraction": ("exactly unchanged", ".4%"),
           "bf16_invisible_fraction": ("unchanged in bf16", ".2%")}
    for label, names in groups.items():
        finals = [study.final_name(n, "update-geometry") for n in names]
        finals = [f for f in finals if f in models]
        if not finals:
            continue
        per = [final_means(data, f) for f in finals]
        parts = []
        for key in per[0]:
            name, spec = fmt.get(key, (f"|dW| <= {key.split('.', 1)[-1]}", ".2%"))
            vals = [p.get(key, np.nan) for p in per]
            mean, lo, hi = t_interval(vals)
            text = f"{name} {mean:{spec}}" if mean == mean else f"{name} n/a"
            if len(finals) > 1 and lo == lo:
                text += f" [{lo:{spec}}, {hi:{spec}}]"
            parts.append(text)
        seeds = f" ({len(finals)} seeds, mean [95% t-interval])" if len(finals) > 1 else ""
        lines.append(f"{label}{seeds}: " + "; ".join(parts))
    return lines


PLAIN = ("The update's precision and geometry per layer and matrix: the share of entries exactly "
         "unchanged, unchanged once stored in bf16, or within a tolerance (what 'RL updates are "
         "sparse' depends on); how far the top-k singular subspaces rotated, how much the top-k "
         "singular values moved, how much of ||dW||^2 lies in the base's top-k subspace against a "
         "random update's share, and the effective / stable rank of dW.")


def summary(result: Result, study) -> list[str]:
    """The report's key numbers: :func:`summary_lines` of the result's data."""
    return summary_lines(study, result.data)


PROBE = declare(UpdateGeometry(), plain=PLAIN, summary=summary,
                model_names=listed_models("variants"))

__all__ = ["PROBE", "X_AXES", "final_means", "measure", "summary_lines", "trajectory_figure"]
