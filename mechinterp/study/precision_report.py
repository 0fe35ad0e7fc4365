"""The report's "precision gate" section, read from a precision contrast's stored results
(``OUT/precision``, written by :func:`mechinterp.study.precision.run_contrast`).

Per run kind (SFT, GRPO) and scheme (pure bf16, float32 master weights): the apparent sparsity of
the stored update - the fraction of entries exactly unchanged in the stored dtype, unchanged once
rounded to bf16, and within 1e-5 - over all matrix entries, with its spread over the layer x
matrix cells (median and 5th-95th percentile of the per-matrix fractions) and, with several seeds,
a Student-t 95% interval over seeds. Nothing here loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..evals.stats import t_interval
from ..store.results import read_result
from .document import Bullets, Figure, Heading, Paragraph

CONTRAST_DIR = "precision"  # mechinterp.study.precision writes here
CONTRAST_FILE = "contrast.json"
PROBE = "update-geometry"
TITLE = "Precision gate"
_WORDS = {"exact_zero_fraction": "exactly unchanged (stored dtype)",
          "bf16_invisible_fraction": "unchanged in bf16"}


def load_contrast(out: Path | str) -> tuple[dict, dict] | None:
    """``(contrast.json, update-geometry's result data)`` of ``out/precision``, or None when
    ``out`` holds no finished contrast."""
    folder = Path(out) / CONTRAST_DIR
    if not (folder / CONTRAST_FILE).is_file() or not (folder / PROBE / "result.json").is_file():
        return None
    return json.loads((folder / CONTRAST_FILE).read_text()), read_result(folder / PROBE).data


def _cells(data: dict, key: str, name: str, tol: str | None = None) -> list[float]:
    table = data["tolerance_fraction"][tol] if tol else data[key]
    return [float(x) for m in data["matrices"] for x in table[name][m] if x is not None]


def _overall(data: dict, key: str, name: str, tol: str | None = None) -> float:
    ov = data["overall"][name]
    return float(ov["tolerance_fraction"][tol] if tol else ov[key])


def gate_rows(meta: dict, data: dict) -> list[dict]:
    """One row per (kind, scheme): ``{"kind", "scheme", "runs", "measures": {label: {"overall",
    "lo", "hi", "median", "p5", "p95", "n_cells"}}}`` (``lo``/``hi``: t-interval over seeds,
    NaN with one seed)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, r in meta["runs"].items():
        if name in data.get("variants", []):
            groups.setdefault((r["kind"], r["scheme"]), []).append(name)
    measures = [(w, k, None) for k, w in _WORDS.items()] + [
        (f"|dW| <= {t}", None, t) for t in data.get("tolerances", [])]
    rows = []
    for (kind, scheme), names in groups.items():
        row = {"kind": kind, "scheme": scheme, "runs": names, "measures": {}}
        for label, key, tol in measures:
            per_seed = [_overall(data, key, n, tol) for n in names]
            cells = np.array([c for n in names for c in _cells(data, key, n, tol)], float)
            mean, lo, hi = t_interval(per_seed)
            p5, med, p95 = (np.percentile(cells, [5, 50, 95]) if cells.size
                            else (np.nan, np.nan, np.nan))
            row["measures"][label] = {"overall": mean, "lo": lo, "hi": hi, "median": float(med),
                                      "p5": float(p5), "p95": float(p95),
                                      "n_cells": int(cells.size)}
        rows.append(row)
    return rows


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.2f}%"


def _cell_text(m: dict, n_seeds: int) -> str:
    text = _pct(m["overall"])
    if n_seeds > 1 and m["lo"] == m["lo"]:
        text += f" [{_pct(m['lo'])}, {_pct(m['hi'])}]"
    return (text + f" (per matrix: median {_pct(m['median'])}, 5-95% {_pct(m['p5'])}-"
            f"{_pct(m['p95'])})")


def _settings(meta: dict) -> str:
    """Steps, learning rate and scheme of the runs, read from their train-config.json."""
    seen = {}
    for r in meta["runs"].values():
        cfg_path = Path(r["folder"]) / "train-config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            seen.setdefault(r["kind"], (cfg.get("max_steps"), cfg.get("learning_rate")))
    return "; ".join(f"{k}: {s} steps at lr {lr:g}" for k, (s, lr) in seen.items()
                     if isinstance(lr, (int, float)))


def gate_lines(out: Path | str) -> list[str]:
    """The section's statements, one per (kind, scheme), then one finding line per kind; [] when
    ``out`` holds no contrast."""
    found = load_contrast(out)
    if found is None:
        return []
    meta, data = found
    rows = gate_rows(meta, data)
    n_seeds = max((len(r["runs"]) for r in rows), default=1)
    compared = ", ".join(sorted(set(data.get("compared_in", {}).values())))
    lines = [f"base {meta['base']} rounded to bf16; {_settings(meta)}; "
             f"the same seed{'s' if n_seeds > 1 else ''}, prompts and steps for both schemes; "
             f"compared in {compared}; "
             + (f"{n_seeds} seeds: mean [95% t-interval over seeds]" if n_seeds > 1
                else "one seed")
             + "; per matrix: over the layer x matrix cells"]
    for r in rows:
        lines.append(f"{r['kind']}, {meta['schemes'].get(r['scheme'], r['scheme'])}: "
                     + "; ".join(f"{label} {_cell_text(m, n_seeds)}"
                                 for label, m in r["measures"].items()))
    by_kind: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], {})[r["scheme"]] = r["measures"]
    zero, hidden = _WORDS["exact_zero_fraction"], _WORDS["bf16_invisible_fraction"]
    for kind, s in by_kind.items():
        if {"pure-bf16", "mixed-bf16"} <= set(s):
            pure, master = s["pure-bf16"], s["mixed-bf16"]
            lines.append(f"{kind}: exactly unchanged entries {_pct(pure[zero]['overall'])} in pure "
                         f"bf16 against {_pct(master[zero]['overall'])} with float32 master "
                         f"weights; rounded to bf16 the master-weight update would hide "
                         f"{_pct(master[hidden]['overall'])}")
    return lines


#: the contrast's figures the section shows: (file in OUT/precision/update-geometry, caption)
FIGURES = (("precision_histograms.png", "precision gate: |dW|/|W| per run, exact zeros at left"),
           ("geometry_exact_zero_fraction_heatmap.png",
            "precision gate: exactly unchanged entries per layer and matrix"))


def gate_figures(out: Path | str) -> list[tuple[str, Path]]:
    """``(caption, path)`` of the contrast's figures that exist."""
    folder = Path(out) / CONTRAST_DIR / PROBE
    return [(cap, folder / f) for f, cap in FIGURES if (folder / f).is_file()]


def gate_blocks(study, claims: list[dict]) -> list:
    """The report section (a :data:`~mechinterp.study.report.SECTIONS` entry): heading, plain
    words, one statement per (kind, scheme) and the figures; [] when the study's folder holds no
    contrast."""
    lines = gate_lines(study.out)
    if not lines:
        return []
    return [Heading(2, TITLE, anchor=True), Paragraph((_PLAIN,)), Bullets(tuple(lines)),
            *(Figure(path, cap, f"{CONTRAST_DIR}/{PROBE}/{path.name}")
              for cap, path in gate_figures(study.out))]


_PLAIN = ("SFT and GRPO trained twice from the same base (rounded to bf16), seed, prompts and "
          "steps: in pure bf16 (bf16 weights, AdamW updating them, as a naive GPU run does) and "
          "with float32 master weights (bf16 autocast; the matrix products run in bf16 both "
          "times). The apparent sparsity of each stored update: entries exactly unchanged, "
          "unchanged once rounded to bf16, within a tolerance - what the claim that RL updates "
          "are sparse depends on.")
