"""weight-change on planted variants: exact sizes, GPT-2 slices, and the CLI end to end."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mechinterp.analysis.weights import weight_change
from mechinterp.models import load, resolve
from mechinterp.models.edit import plant_change


def _direct(base_dir, var_dir, model):
    """Independent reference: whole state dicts in float64, explicit slicing."""
    b = {k: v.double() for f in sorted(base_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    v = {k: t.double() for f in sorted(var_dir.glob("*.safetensors")) for k, t in load_file(f).items()}
    out = {}
    for m in model.matrices:
        vals = []
        for layer in range(model.n_layers):
            ref = model.param_slice(layer, m)
            wb, wv = ref.take(b[ref.name]), ref.take(v[ref.name])
            vals.append(float(torch.linalg.norm(wv - wb) / torch.linalg.norm(wb)))
        out[m] = vals
    return out


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_planted_change_is_measured_exactly(tmp_path, name):
    model = load(name, device="cpu")
    first, last = model.matrices[0], model.matrices[-1]
    edits = {(1, first): 0.05, (3, last): 0.2, (2, "k"): 1e-3}
    var = plant_change(model, tmp_path / "v", edits, seed=3)
    base_dir = resolve(name).path
    matrices, n_layers, rel = weight_change(base_dir, {"v": var})
    ref = _direct(base_dir, var, model)
    for m in matrices:
        np.testing.assert_allclose(rel["v"][m], ref[m], rtol=1e-6, atol=1e-12)  # float32 diffs
        for layer in range(n_layers):
            want = edits.get((layer, m), 0.0)
            if want == 0.0:
                assert rel["v"][m][layer] == 0.0
            else:  # planted size, up to float32 rounding of the stored weights
                assert abs(rel["v"][m][layer] - want) / want < 1e-3


def test_gpt2_slices_do_not_leak(tmp_path):
    """Editing only GPT-2's v third of c_attn must show up in v, not in q or k."""
    model = load("tiny-random-gpt2", device="cpu")
    var = plant_change(model, tmp_path / "v", {(0, "v"): 0.1})
    _, _, rel = weight_change(resolve("tiny-random-gpt2").path, {"v": var})
    assert rel["v"]["q"][0] == 0.0 and rel["v"]["k"][0] == 0.0
    assert abs(rel["v"]["v"][0] - 0.1) < 1e-4


def test_cli_weight_change_end_to_end(tmp_path):
    """`mechinterp run weight-change` writes result.json + heatmap; `figures` re-draws it."""
    from mechinterp.cli import main

    model = load("tiny-random-qwen2", device="cpu")
    var = plant_change(model, tmp_path / "var", {(2, "up"): 0.1})
    out = tmp_path / "out"
    assert main(["run", "weight-change", "--base", "tiny-random-qwen2", "--variant",
                 f"x={var}", "--out", str(out)]) == 0
    res = json.loads((out / "weight-change" / "result.json").read_text())
    assert abs(res["data"]["relative_change"]["x"]["up"][2] - 0.1) < 1e-4
    prov = res["provenance"]
    assert prov["probe"] == "weight-change" and prov["models"]["x"]["weights_id"]
    assert prov["models"]["base"]["spec"] == "tiny-random-qwen2"
    png = out / "weight-change" / "weight_change_heatmap.png"
    assert png.stat().st_size > 0
    png.unlink()
    assert main(["figures", str(out)]) == 0
    assert png.exists() and (out / "weight-change" / "weight_change_heatmap.pdf").exists()
