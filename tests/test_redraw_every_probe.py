"""Draw == redraw for every built-in probe: the figures drawn from the result a probe
returns and those drawn from the stored ``result.json`` (``mechinterp figures``) are the same
pixels. Runs each probe on a tiny random Llama and a planted two-checkpoint run, where many
numbers are NaN (no fact is known, no MMLU item is failed, Spearman over constants): before the
result store restored NaN, a redraw saw ``None`` where the first draw saw NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mechinterp.core.options import make_config
from mechinterp.core.registry import registry
from mechinterp.core.runner import run_probe
from mechinterp.store.results import read_result

#: small options per probe; a new built-in probe must be added here
OPTIONS: dict[str, dict] = {
    "weight-change": {},
    "training-drift": {"limit": 2, "heldout_max_length": 64},
    "kl-drift": {"items": "arithmetic", "limit": 3, "max_length": 512},
    "task-accuracy": {"items": "arithmetic", "limit": 3, "max_new_tokens": 4},
    "mmlu": {"formats": ["cloze"], "limit": 3},
    "gsm8k": {"limit": 2, "max_new_tokens": 4},
    "attention-shift": {"n_mmlu": 2, "n_knowns": 2, "max_tokens": 48},
    "mlp-patching": {"prompt_sets": ["knowns"], "limit": 2},
    "causal-trace": {"limit": 2, "samples": 2, "keep_wrong": True, "max_fact_figures": 1},
    "damage-attribution": {"format": "cloze", "limit": 3, "max_failures": 2, "n_control": 1,
                           "sites": ["mlp_out"], "n_bootstrap": 20},
    "activation-diff": {"n_texts": 4, "n_heldout": 3, "max_length": 16, "n_bootstrap": 20},
    "logit-lens": {"prompt_sets": ["knowns"], "limit": 3, "n_bootstrap": 20},
    "stitch": {"limit": 2, "max_new_tokens": 4, "n_bootstrap": 20},
    "update-geometry": {"k_fraction": 0.1, "tolerances": [1e-5, 1e-3]},
}


def _pixels(figures: dict) -> dict[str, np.ndarray]:
    import matplotlib.pyplot as plt

    out = {}
    for name, fig in figures.items():
        fig.canvas.draw()
        out[name] = np.asarray(fig.canvas.buffer_rgba()).copy()
        plt.close(fig)
    return out


def _has_nan(obj) -> bool:
    if isinstance(obj, float):
        return math.isnan(obj)
    if isinstance(obj, dict):
        return any(_has_nan(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_nan(v) for v in obj)
    return False


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mechinterp.models import ModelSet, load
    from mechinterp.models.edit import plant_change

    root = tmp_path_factory.mktemp("redraw")
    base = load("tiny-random-llama", device="cpu", dtype="float32")
    for step, rel in ((1, 0.05), (2, 0.2)):
        plant_change(base, root / "run" / f"step-{step}",
                     {(1, "down"): rel, (0, "q"): rel / 2}, seed=step)
    return ModelSet("tiny-random-llama", {"sft": f"{root / 'run'}@all"}, device="cpu",
                    dtype="float32")


def test_every_builtin_probe_is_covered():
    builtin = {n for n, p in registry().items() if type(p).__module__.startswith("probes.")}
    assert set(OPTIONS) == builtin


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_draw_equals_redraw(name, models, data_source, tmp_path, one_thread):
    probe = registry()[name]
    opts = dict(OPTIONS[name])
    config = make_config(probe, opts)
    result = run_probe(probe, models, data_source, config, out=tmp_path, draw=False)
    first = _pixels(probe.plot(result))
    stored = read_result(tmp_path / name)
    assert _has_nan(stored.data) == _has_nan(result.data)  # NaN comes back as NaN, not None
    again = _pixels(probe.plot(stored))
    assert set(again) == set(first)
    for fig in first:
        assert again[fig].shape == first[fig].shape, fig
        assert np.array_equal(again[fig], first[fig]), f"{name}: figure {fig} differs on redraw"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_frame_rows_are_the_numbers_in_result_json(name, models, data_source, tmp_path,
                                                   one_thread):
    """Every declared table of every probe gives rows, and rows read back to the number at their
    place in ``result.json`` (navigated here by the row's own columns)."""
    import json

    probe = registry()[name]
    run_probe(probe, models, data_source, make_config(probe, dict(OPTIONS[name])), out=tmp_path,
              draw=False)
    raw = json.loads((tmp_path / name / "result.json").read_text())["data"]
    df = read_result(tmp_path / name).to_frame()
    # the probe's story: plain words for the report, and the models its result covers (every
    # model a row names is one of them)
    assert probe.plain and probe.plain != probe.description
    covered = probe.model_names(raw)
    if "model" in df.columns:
        assert covered and set(df.model) <= set(covered), (name, set(df.model), covered)
    if name == "training-drift":  # nested by checkpoint position: read through each run's list
        for metric in ("relative_change", "kl"):
            rows = df[df.metric == metric]
            assert len(rows), metric
            for _, row in rows.head(3).iterrows():
                block = raw["runs_drift"][row.run]
                i = block["checkpoints"].index(row.model)
                node = block["kl"][i] if metric == "kl" else \
                    block[metric][row.component][i][int(row.layer)]
                want = math.nan if node is None else float(node)  # NaN is stored as null
                assert (math.isnan(want) and math.isnan(row.value)) or want == row.value, metric
        return
    tables = [t for t in getattr(probe, "frames", ()) if t.key in raw]
    assert tables
    for t in tables:
        base_metric = t.metric or t.key
        rows = df[df.metric.str.split(".").str[0] == base_metric]
        assert len(rows), (name, t.key)
        for _, row in rows.head(3).iterrows():
            node = raw[t.key]
            for axis in t.axes:
                key = row["metric"].split(".", 1)[1] if axis == "metric" else row[axis]
                node = node[int(key)] if isinstance(node, list) else node[str(key)]
            want = math.nan if node is None else float(node)
            assert (math.isnan(want) and math.isnan(row.value)) or want == row.value, (name, t.key)
