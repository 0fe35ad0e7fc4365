"""Results as one long table and figures in the house style.

``to_frame`` walks the tables each probe declares; checked here on hand-built results against
the numbers put in, intervals included, and on real tiny-model results (every declared table of
every probe gives rows). The style is applied while drawing and while saving: PDFs embed
TrueType (editable) text, legends have no frame, and importing the package switches no backend.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

from mechinterp.store.frames import COLUMNS, to_frame
from mechinterp.store.results import Result, load_results, read_result, write_result


def test_nested_values_and_intervals_land_in_their_columns(tmp_path):
    data = {"recovery": {"sft": {"mlp": {"denoise": [0.1, 0.9]}}},
            "recovery_ci95": {"sft": {"mlp": {"denoise": [[0.0, 0.2], [0.8, 1.0]]}}},
            "runs": {"sft": ["sft"]}}
    df = to_frame(Result("mlp-patching", data))
    assert list(df.columns) == [c for c in COLUMNS if c in df.columns]
    row = df.query("layer == 1").iloc[0]
    assert (row.model, row.site, row.direction, row.metric) == ("sft", "mlp", "denoise", "recovery")
    assert (row.value, row.lo, row.hi) == (0.9, 0.8, 1.0)
    # causal trace: {lo, hi, n} dicts at the token-group level
    ct = {"aie": {"base": {"hidden": {"last": [0.5, math.nan]}}},
          "aie_ci": {"base": {"hidden": {"last": {"lo": [0.4, math.nan], "hi": [0.6, math.nan],
                                                  "n": 3}}}}}
    df = to_frame(Result("causal-trace", ct))
    first = df.query("layer == 0").iloc[0]
    assert (first.component, first.token_group, first.value, first.lo, first.hi, first.n) == \
        ("hidden", "last", 0.5, 0.4, 0.6, 3)
    assert math.isnan(df.query("layer == 1").iloc[0].value)  # NaN kept, not dropped
    # checkpoints: run and step from the names; statistics dicts become dotted metrics
    ta = {"accuracy": {"base": 0.2, "sft@step-8": 0.5}, "ci95": {"base": [0.1, 0.3],
                                                               "sft@step-8": [0.4, 0.6]},
          "paired": {"sft@step-8": {"difference": 0.3, "difference_ci95": [0.1, 0.5]}},
          "runs": {"sft": ["sft@step-8"]}}
    df = to_frame(Result("task-accuracy", ta))
    ck = df.query("model == 'sft@step-8' and metric == 'accuracy'").iloc[0]
    assert (ck.run, ck.step, ck.value, ck.lo, ck.hi) == ("sft", 8, 0.5, 0.4, 0.6)
    assert df.query("metric == 'paired.difference'").value.tolist() == [0.3]
    assert pd.isna(df.query("model == 'base' and metric == 'accuracy'").iloc[0].step)


def test_training_drift_frames_both_shapes_of_its_result(tmp_path):
    """training-drift nests by checkpoint position (a training run's own log, or one block per
    run from the probe): its frame names each checkpoint as a model, with run and step."""
    log = {"algorithm": "sft", "freeze": "mlp@1-2", "matrices": ["q", "up"], "n_layers": 2,
           "steps": [2, 4], "checkpoints": ["step-2", "step-4"],
           "relative_change": {"q": [[0.5, 0.25], [1.5, 1.25]], "up": [[0.0, 0.125], [2.0, 3.0]]},
           "kl": [0.0625, None], "kl_per_item": [[0.0625], None], "history": []}
    write_result(Result("training-drift", log), tmp_path / "log")
    df = read_result(tmp_path / "log").to_frame()
    assert len(df) == 2 * 2 * 2 + 2 and set(df.run) == {"sft frozen mlp@1-2"}
    row = df.query("metric == 'relative_change' and step == 4 and component == 'up' "
                   "and layer == 1").iloc[0]
    assert (row.model, row.value) == ("sft frozen mlp@1-2@step-4", 3.0)
    assert df.query("metric == 'kl' and step == 2").value.item() == 0.0625
    assert math.isnan(df.query("metric == 'kl' and step == 4").value.item())  # no KL logged
    probe_run = {"runs_drift": {"sft": {**log, "checkpoints": ["sft@step-2", "sft@step-4"]},
                                "grpo": {**log, "checkpoints": ["grpo"], "steps": [1],
                                         "relative_change": {"q": [[7.0, 8.0]], "up": [[9.0, 10.0]]},
                                         "kl": [0.5]}}}
    df = to_frame(Result("training-drift", probe_run))
    row = df.query("model == 'sft@step-2' and component == 'q' and layer == 0").iloc[0]
    assert (row.run, row.step, row.value) == ("sft", 2, 0.5)
    grpo = df.query("run == 'grpo' and metric == 'relative_change' and layer == 1")
    assert grpo.set_index("component").value.to_dict() == {"q": 8.0, "up": 10.0}
    assert pd.isna(grpo.step).all()  # a final model's name carries no step
    assert df.query("model == 'grpo' and metric == 'kl'").value.item() == 0.5


def test_parquet_beside_result_json_and_load_results_concatenates(tmp_path):
    a = Result("gsm8k", {"accuracy": {"base": 0.25, "v": 0.5}, "ci95": {"base": [0.1, 0.4],
                                                                       "v": [0.3, 0.7]}})
    b = Result("kl-drift", {"kl": {"v": 0.125}, "kl_sem": {"v": 0.01}})
    write_result(a, tmp_path / "gsm8k")
    write_result(b, tmp_path / "kl-drift")
    assert (tmp_path / "gsm8k" / "result.parquet").is_file()
    back = pd.read_parquet(tmp_path / "gsm8k" / "result.parquet")
    assert sorted(back.value) == [0.25, 0.5]
    df = load_results(tmp_path)
    assert set(df.probe) == {"gsm8k", "kl-drift"} and len(df) == 4
    assert df.query("probe == 'kl-drift' and metric == 'kl'").value.item() == 0.125
    # an unknown probe (no declared tables) writes no parquet and loads as nothing
    write_result(Result("not-a-probe", {"x": 1.0}), tmp_path / "other")
    assert not (tmp_path / "other" / "result.parquet").exists()
    assert len(load_results(tmp_path)) == 4


def test_every_declared_table_of_a_stored_result_gives_rows(tmp_path, data_source, one_thread):
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe
    from mechinterp.models import ModelSet, load
    from mechinterp.models.edit import plant_change

    base = load("tiny-random-llama", device="cpu", dtype="float32")
    folder = plant_change(base, tmp_path / "v", {(1, "down"): 0.3}, seed=0)
    models = ModelSet("tiny-random-llama", {"v": str(folder)}, device="cpu", dtype="float32")
    for name, opts in (("weight-change", {"sparsity": False}),
                       ("mlp-patching", {"prompt_sets": ["knowns"], "limit": 2,
                                         "n_bootstrap": 20}),
                       ("attention-shift", {"n_mmlu": 1, "n_knowns": 1, "max_tokens": 32})):
        probe = get_probe(name)
        res = run_probe(probe, models, data_source, make_config(probe, opts), out=tmp_path / "r",
                        draw=False)
        df = read_result(tmp_path / "r" / name).to_frame()
        for table in probe.frames:
            if table.key not in res.data:  # a mode's own tables (mlp-patching's scan=atp keys)
                continue
            assert (df.metric.str.split(".").str[0] == (table.metric or table.key)).any(), \
                (name, table.key)
        assert len(df) == len(res.to_frame())
    wc = read_result(tmp_path / "r" / "weight-change").to_frame()
    got = wc.query("metric == 'relative_change' and component == 'down' and layer == 1").value
    assert got.item() == pytest.approx(0.3, rel=1e-3)  # the planted 30% change, as planted


def test_pdf_text_is_truetype_and_legends_have_no_frame(tmp_path):
    from mechinterp.store.results import save_figures

    res = Result("gsm8k", {"models": ["base", "v"], "n": 3, "accuracy": {"base": 0.2, "v": 0.4},
                           "ci95": {"base": [0.1, 0.3], "v": [0.3, 0.5]}, "paired": {}})
    figs = res.figures()
    ax = figs["gsm8k_accuracy"].axes[0] if "gsm8k_accuracy" in figs else \
        next(iter(figs.values())).axes[0]
    ax.legend(["x"])  # a legend made after the figure, as probes do: still no frame?
    save_figures(figs, tmp_path)
    pdf = next(tmp_path.glob("*.pdf")).read_bytes()
    # Type 42: TrueType outlines (embedded as /CIDFontType2), never Type 3 bitmaps-in-procedures
    assert b"/Subtype /Type3" not in pdf and (b"/CIDFontType2" in pdf or b"/TrueType" in pdf)


def test_probe_legends_are_frameless():
    res = Result("mlp-patching", {
        "variants": ["v"], "sites": ["mlp"], "n_layers": 2, "n_prompts": 2, "n_tiny": {"v": 0},
        "window": 1, "min_gap": 0.1,
        "recovery": {"v": {"mlp": {"denoise": [0.0, 1.0], "noise": [1.0, 0.0]}}}})
    fig = next(iter(res.figures().values()))
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert legends and not any(lg.get_frame_on() for lg in legends)


def test_importing_the_package_and_probes_switches_no_backend():
    code = ("import matplotlib; matplotlib.use('svg'); import mechinterp, probes; "
            "import mechinterp.plotting, mechinterp.store.results; mechinterp.registry(); "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"


def test_line_style_follows_the_run_kind_not_its_name(tmp_path):
    """A run called 'baseline' that was trained with GRPO is drawn as GRPO; a run called
    'sft-ish' with no training metadata is not guessed to be SFT."""
    import json
    import shutil

    from mechinterp.core.runner import run_kinds
    from mechinterp.models import ModelSet
    from mechinterp.models.zoo import fetch
    from mechinterp.plotting.trajectories import KIND_LINESTYLE, run_styles

    src = fetch("tiny-random-llama")
    for name, cfg in (("baseline", {"algorithm": "grpo"}),
                      ("frozen", {"algorithm": "sft", "freeze_preset": "paper-mid-mlp"})):
        shutil.copytree(src, tmp_path / name / "checkpoints" / "step-1")
        shutil.copytree(src, tmp_path / name / "checkpoints" / "step-2")
        (tmp_path / name / "train-config.json").write_text(json.dumps(cfg))
    shutil.copytree(src, tmp_path / "sft-ish")
    models = ModelSet("tiny-random-llama", {"baseline": f"{tmp_path / 'baseline'}@all",
                                            "frozen": f"{tmp_path / 'frozen'}@all",
                                            "sft-ish": str(tmp_path / "sft-ish")}, device="cpu")
    kinds = run_kinds(models)
    assert kinds == {"baseline": "grpo", "frozen": "sft-frozen", "sft-ish": None}
    styles = run_styles(models.runs, kinds)
    assert styles["baseline"] == KIND_LINESTYLE["grpo"]
    assert styles["frozen"] == KIND_LINESTYLE["sft-frozen"]
    assert styles["sft-ish"] not in KIND_LINESTYLE.values()
    two_unknown = run_styles(["a", "b"], {})
    assert two_unknown["a"] != two_unknown["b"]  # unknown runs still tell apart

    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe

    probe = get_probe("weight-change")
    res = run_probe(probe, models, None, make_config(probe, {"sparsity": False}))
    assert res.provenance["run_kinds"] == kinds
    fig = res.figures()["weight_change_trajectory"]
    labels = {h.get_label(): h.get_linestyle() for h in fig.axes[0].get_legend().legend_handles}
    assert labels["baseline (grpo)"] == "-" and labels["frozen (sft-frozen)"] == ":"


def test_tokens_the_font_cannot_draw_are_written_as_escapes(tmp_path):
    """The activation-diff lens table shows tokens; a CJK token must come out as ``\\u7801``, not
    as an empty box (matplotlib warns 'Glyph ... missing' when it draws one)."""
    import warnings

    from mechinterp.plotting.style import token_text
    from mechinterp.store.results import save_figures
    from probes.activation_diff import _lens_figure

    assert token_text("\u7801x") == "'\\u7801x'" and token_text(" caf\u00e9") == "' caf\u00e9'"
    top = [{"token": t, "id": i, "logit": 1.0} for i, t in enumerate(["\u7801", " the", "\u00e9"])]
    fig = _lens_figure({"variants": ["v"], "n_layers": 1,
                        "lens_top": {"v": [{"promoted": top, "suppressed": top[::-1]}]}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph would raise here
        save_figures({"lens_top": fig}, tmp_path)
    texts = [c.get_text().get_text() for c in fig.axes[0].tables[0].get_celld().values()]
    assert any("'\\u7801'" in t for t in texts)
