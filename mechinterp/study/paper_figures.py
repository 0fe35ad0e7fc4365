"""The paper's figure set from a ``compare`` / ``demo`` folder: ``mechinterp figures DIR --paper``.

Numbered PNG + PDF files in ``DIR/paper/``, one house style: the weight-change heatmap of the final
models, the heatmaps per checkpoint (one colour scale per run), the mean-over-layers trajectory per
matrix (log axis, line style by run kind), per-layer trajectories, update-sparsity histograms, KL
against step, forgetting and the update geometry against KL reached (every checkpoint), a benchmark
table (MMLU cloze, in-domain accuracy and KL per final model, with intervals) and a freezing table
(SFT against SFT with the mid-layer MLPs frozen, paired); then ours: causal-trace panels,
attention shift, damage attribution, the diffing probes' summaries (activation-difference norm,
logit-lens KL, the stitching grid), and the update's geometry per matrix kind and its precision
histograms. Every figure comes from stored results; no model is loaded.
"""

from __future__ import annotations

import fnmatch
import itertools
from pathlib import Path

from ..store.results import save_figures
from .claims import decide_all
from .folder import load_study

#: (probe, figure-name pattern), in the order of the set
PAPER_SET: list[tuple[str, str]] = [
    # the final models side by side: with one checkpoint per run (smoke preset) the only one drawn
    ("weight-change", "weight_change_heatmap"),
    ("weight-change", "weight_change_checkpoints_*"),
    ("weight-change", "weight_change_trajectory"),
    ("weight-change", "weight_change_layers_*"),
    ("weight-change", "sparsity_histograms"),
    ("kl-drift", "kl_drift"),
    ("*by-kl*", "forgetting_vs_kl"),
    ("*by-kl*", "geometry_vs_kl"),
    ("*tables*", "benchmark_table"),
    ("*tables*", "freezing_table"),
    ("causal-trace", "aie_*"),
    ("attention-shift", "attention_shift_layers"),
    ("attention-shift", "attention_js_heatmap"),
    ("damage-attribution", "margin_recovery_*"),
    ("damage-attribution", "recovery_*"),
    ("activation-diff", "diff_norm"),
    ("logit-lens", "lens_kl"),
    ("stitch", "stitch_grid"),
    ("update-geometry", "geometry_by_matrix"),
    ("update-geometry", "precision_histograms"),
]


def _fmt(x) -> str:
    try:
        return "n/a" if x is None or x != x else f"{x:.3f}"
    except TypeError:
        return str(x)


def _ci(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""


def _table_figure(title: str, header: list[str], rows: list[list[str]], note: str):
    from ..plotting.style import new_axes  # deferred: matplotlib only when drawing

    fig, ax = new_axes(width=max(6.0, 1.6 * len(header)), height=0.45 * len(rows) + 1.3)
    ax.axis("off")
    table = ax.table(cellText=rows or [["-"] * len(header)], colLabels=header, loc="center",
                     cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.35)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
    ax.set_title(title, fontsize=11)
    fig.text(0.5, 0.01, note, ha="center", fontsize=8, color="0.35", wrap=True)
    return fig


def benchmark_table(study):
    """Final models: MMLU cloze accuracy, in-domain accuracy (Wilson 95%) and KL from the base."""
    mm, ta, kl = (study.results.get(p) for p in ("mmlu", "task-accuracy", "kl-drift"))
    names = ["base"] + list(study.variants)
    rows = []
    for v in names:
        row = [v]
        for res, fmt in ((mm, "cloze"), (ta, None)):
            if res is None:
                row.append("-")
                continue
            key = v if v == "base" else study.final_name(v, res.probe)
            acc = res.data["accuracy"].get(key)
            ci = res.data["ci95"].get(key)
            if fmt is not None and isinstance(acc, dict):
                acc, ci = acc.get(fmt), (ci or {}).get(fmt)
            row.append(f"{_fmt(acc)} {_ci(ci)}")
        if kl is not None and v != "base":
            row.append(_fmt(kl.data["kl"].get(study.final_name(v, "kl-drift"))))
        else:
            row.append("0" if v == "base" else "-")
        rows.append(row)
    n_mmlu = mm.data.get("n_items") if mm is not None else "?"
    n_task = ta.data.get("n_items") if ta is not None else "?"
    return _table_figure("Benchmarks of the final models",
                         ["model", f"MMLU cloze (n={n_mmlu})", f"in-domain (n={n_task})",
                          "KL(base||model)"], rows,
                         "accuracy with Wilson 95% intervals; KL per answer token on held-out "
                         "in-domain items (nats)")


def freezing_table(study):
    """SFT vs SFT with the mid-layer MLPs frozen: paired differences (claim C6's numbers)."""
    c6 = next((c for c in study.claims if c.get("id") == "C6"), None) if study.claims else None
    if c6 is None or not c6.get("numbers"):
        rows = []
        note = "no frozen SFT run in this study (train one with --freeze-preset paper-mid-mlp)"
    else:
        n = c6["numbers"]
        rows = [["MMLU cloze", f"{n.get('mmlu_frozen_minus_sft', float('nan')):+.3f}",
                 _ci(n.get("mmlu_ci95")), str(n.get("mmlu_n"))],
                ["in-domain accuracy", f"{n.get('task_frozen_minus_sft', float('nan')):+.3f}",
                 _ci(n.get("task_ci95")), str(n.get("task_n"))]]
        note = "frozen minus unfrozen SFT on the same items; paired bootstrap 95% intervals"
    return _table_figure("Freezing the mid-layer MLPs during SFT",
                         ["measure", "frozen - SFT", "95% interval", "n items"], rows, note)


def forgetting_vs_kl(study):
    """MMLU change from the base (paired 95% interval) against KL(base || model) reached, every
    checkpoint of every run and seed: does forgetting follow the KL spent (RL's Razor, arXiv
    2509.04259) whatever the algorithm? Colour by run kind, one line per run in step order."""
    from ..plotting.style import PALETTE, new_axes  # deferred: matplotlib only when drawing

    mm, kl = study.results.get("mmlu"), study.results.get("kl-drift")
    if mm is None or kl is None:
        return None
    fmt = mm.data["formats"][0]
    base_acc = mm.data["accuracy"]["base"][fmt]
    kinds = sorted({v.kind or "unknown" for v in study.variants.values()})
    fig, ax = new_axes(6.5, 4.5)
    ax.errorbar([0.0], [0.0], fmt="k*", markersize=9, label="base")
    for run, info in study.variants.items():
        names = [n for n in study.runs.get(run) or [run]
                 if n in mm.data["accuracy"] and kl.data["kl"].get(n) is not None]
        if not names:
            continue
        xs = [kl.data["kl"][n] for n in names]
        ys = [mm.data["accuracy"][n][fmt] - base_acc for n in names]
        cis = [(mm.data.get("paired", {}).get(n, {}).get(fmt) or {}).get("difference_ci95")
               for n in names]
        err = [[y - c[0] if c else 0.0 for y, c in zip(ys, cis)],
               [c[1] - y if c else 0.0 for y, c in zip(ys, cis)]]
        colour = PALETTE[(kinds.index(info.kind or "unknown") + 1) % len(PALETTE)]
        ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, linewidth=0.8, capsize=2,
                    color=colour, alpha=0.85,
                    label=f"{run} ({info.kind or 'kind unknown'}, seed {info.seed})")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel(r"KL(base $\|$ model) reached, nats per in-domain answer token")
    ax.set_ylabel(f"MMLU {fmt} accuracy - base's (n={mm.data.get('n_items')})")
    ax.set_title("Forgetting against the KL spent, every checkpoint (paired 95% intervals)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, alpha=0.3)
    return fig


def kl_figures(study) -> dict:
    """The figures placed by KL reached: forgetting, and the update geometry's trajectories."""
    figs = {"forgetting_vs_kl": forgetting_vs_kl(study)}
    geo, kl = study.results.get("update-geometry"), study.results.get("kl-drift")
    runs = (geo.data.get("runs") or {}) if geo is not None else {}
    if kl is not None and any(len(n) > 1 for n in runs.values()):
        from probes.update_geometry import trajectory_figure  # deferred: imports torch

        figs["geometry_vs_kl"] = trajectory_figure(geo.data, runs,
                                                   geo.provenance.get("run_kinds") or {},
                                                   x_axis="kl", kl=kl.data["kl"])
    return {k: f for k, f in figs.items() if f is not None}


def paper_figures(folder: Path | str) -> list[Path]:
    """Write the paper's figure set (and ours) as numbered PNG + PDF files.

    Args:
        folder: a compare or demo folder; the files go to ``folder/paper/``.

    Returns:
        The files written.
    """
    # deferred: matplotlib only when drawing
    import matplotlib.pyplot as plt

    from ..plotting.style import house_style  # deferred: matplotlib, as above

    study = load_study(Path(folder))
    study.claims = decide_all(study)  # from the stored results, as compare decided them
    kinds = {name: info.kind for name, info in study.variants.items()}
    for res in study.results.values():  # a result that records no run kinds gets the study's
        res.provenance.setdefault("run_kinds", kinds)
    out = Path(folder) / "paper"
    out.mkdir(exist_ok=True)
    written: list[Path] = []
    number = itertools.count(1)
    # entries of one probe are contiguous: draw its figures once, save what the set takes, close
    for probe, entries in itertools.groupby(PAPER_SET, key=lambda e: e[0]):
        with house_style():
            if probe == "*tables*":
                figs = {"benchmark_table": benchmark_table(study),
                        "freezing_table": freezing_table(study)}
            elif probe == "*by-kl*":
                figs = kl_figures(study)
            elif probe in study.results:
                figs = study.results[probe].figures()
            else:
                continue
        taken: dict[str, object] = {}
        for _, pattern in entries:
            for name, fig in figs.items():
                if fnmatch.fnmatch(name, pattern) and name not in taken:
                    taken[name] = fig
        for name, fig in figs.items():
            if name not in taken:
                plt.close(fig)
        written += save_figures({f"{next(number):02d}_{n}": f for n, f in taken.items()}, out)
    return written
