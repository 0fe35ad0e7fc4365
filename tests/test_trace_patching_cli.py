"""causal-trace and mlp-patching end to end: tiny models through the runner, the default model
through the CLI (slow), and figures re-drawn from the stored results."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from mechinterp.cli import app
from mechinterp.errors import UserError
from mechinterp.models import load
from mechinterp.models.edit import plant_change
from mechinterp.models.modelset import ModelSet
from mechinterp.core.options import make_config
from mechinterp.core.registry import get_probe
from mechinterp.store.results import read_result
from mechinterp.core.runner import redraw, run_probe


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    model = load("tiny-random-llama", device="cpu", dtype="float32")
    folder = plant_change(model, tmp_path_factory.mktemp("v") / "planted",
                          {(1, "down"): 0.5}, seed=1)
    return ModelSet("tiny-random-llama", {"planted": str(folder)}, device="cpu", dtype="float32")


def test_causal_trace_probe_on_tiny_models(tiny_set, data_source, tmp_path):
    probe = get_probe("causal-trace")
    # a random tiny model knows almost no fact: screening the facts in a seeded order for ones
    # the base knows goes through all 1209 before it finds 2 (it finds 1, by chance), and every
    # fact it selects is one the base knows
    filtered = run_probe(probe, tiny_set, data_source, make_config(probe, {"samples": "2"},
                                                                   seed=0, limit=2))
    f = filtered.data
    assert f["n_selected"] < 2 and f["n_screened"] == 1209
    assert f["n_facts"]["base"] == f["n_selected"]
    assert all(r["correct"] for r in f["facts"]["base"])
    cfg = make_config(probe, {"samples": "2", "window": "2", "keep_wrong": "true",
                              "max_fact_figures": "1"}, seed=0, limit=1)
    result = run_probe(probe, tiny_set, data_source, cfg, out=tmp_path)
    d = result.data
    assert d["n_facts"] == {"base": 1, "planted": 1}
    for name in ("base", "planted"):
        facts = d["facts"][name]
        assert [f["trace_index"] for f in facts] == [0]
        # restoring the final hidden state at the last token is the clean run: AIE there is
        # exactly the mean over facts of clean - corrupted
        expect = np.mean([f["clean_prob"] - f["corrupted_prob"] for f in facts])
        assert d["aie"][name]["hidden"]["last"][-1] == pytest.approx(expect, abs=1e-6)
        assert set(d["aie"][name]) == {"hidden", "mlp", "attn"}
        assert all(len(v) == 4 for v in d["aie"][name]["mlp"].values())
    diff = np.array(d["aie_diff"]["planted"]["hidden"]["last"])
    np.testing.assert_allclose(diff, np.array(d["aie"]["base"]["hidden"]["last"])
                               - np.array(d["aie"]["planted"]["hidden"]["last"]))
    assert d["n_paired"] == {"planted": 1} and d["known_rule"] == "first-token"
    # the variant is corrupted at the base's noise scale, not at its own
    assert d["noise_scale"]["planted"] == d["noise_scale"]["base"] and d["shared_noise"]
    folder = tmp_path / "causal-trace"
    names = {p.stem for p in folder.glob("*.png")}
    assert {"aie_hidden", "aie_mlp", "aie_attn", "aie_diff"} <= names
    assert sum(n.startswith("trace_") for n in names) == 2  # one fact per model
    for png in folder.glob("*.png"):
        png.unlink()
    assert len([p for p in redraw(tmp_path) if p.suffix == ".png"]) == len(names)


def test_base_minus_variant_pairs_the_same_facts():
    """Facts only one model traced (knows) stay out of the difference; the interval is the
    t-interval of the per-fact differences (n = 3: t(0.975, 2) = 4.3027 from the table)."""
    from probes.causal_trace import CausalTrace

    def eff(x):
        return {"hidden": {"last": np.array([x, 2 * x])}}

    effects = {"base": {1: eff(1.0), 2: eff(2.0), 3: eff(4.0), 9: eff(100.0)},
               "v": {1: eff(0.0), 2: eff(1.0), 3: eff(1.0), 7: eff(-50.0)}}
    out = CausalTrace._paired(effects, ["v"], ["hidden"], 2)
    assert out["n_paired"] == {"v": 3}
    per_fact = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_allclose(out["aie_diff"]["v"]["hidden"]["last"], per_fact.mean(0))
    half = 4.3027 * per_fact.std(0, ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(out["aie_diff_ci"]["v"]["hidden"]["last"]["hi"],
                               per_fact.mean(0) + half, rtol=1e-4)
    assert np.isnan(out["aie_diff"]["v"]["hidden"]["first_subject"]).all()  # no such group


def test_strict_known_rule_needs_the_whole_attribute(tiny_set):
    """ROME's rule: greedy decoding must give every token of the attribute. An attribute whose
    tokens are the tiny model's own greedy continuation passes both rules; change its last token
    and it passes only the first-token rule."""
    import torch

    from mechinterp.analysis.tracing import prepare_fact
    from probes.causal_trace import knows

    model = tiny_set.base
    tok = model.tokenizer
    prompt = "Paris is the capital of"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.hf.generate(ids, max_new_tokens=3, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    base_fact = prepare_fact(tok, prompt, "Paris", "France", "own")
    # the attribute's tokens set to the model's own greedy continuation (ids, not text: a byte
    # tokenizer's decode need not re-encode to the same ids)
    fact = type(base_fact)(base_fact.name, base_fact.input_ids, base_fact.subject, gen[0],
                           base_fact.tokens, tuple(gen))
    assert knows(model, fact, "first-token") and knows(model, fact, "strict")
    other = [t for t in range(5, 50) if t != gen[-1]][0]
    wrong = type(fact)(fact.name, fact.input_ids, fact.subject, fact.answer_id, fact.tokens,
                       tuple(gen[:-1]) + (other,))
    assert knows(model, wrong, "first-token") and not knows(model, wrong, "strict")


def test_bad_options_are_user_errors(tiny_set, data_source):
    probe = get_probe("causal-trace")
    with pytest.raises(UserError, match="unknown trace kind"):
        run_probe(probe, tiny_set, data_source, make_config(probe, {"kinds": "hidden,mpl"}))
    probe = get_probe("mlp-patching")
    with pytest.raises(UserError, match="unknown site"):
        run_probe(probe, tiny_set, data_source, make_config(probe, {"sites": "mlp,mlpp"}))


def _run(args, tmp_path):
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path), "--device", "cpu",
                                          "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.slow
def test_cli_causal_trace_default_model(tmp_path):
    from mechinterp.planted import planted_variant

    variant = planted_variant()
    _run(["run", "causal-trace", "--variant", f"planted={variant}", "--limit", "1",
          "--set", "samples=2", "--set", "kinds=hidden,mlp", "--set", "keep_wrong=true"],
         tmp_path)
    d = json.loads((tmp_path / "causal-trace" / "result.json").read_text())["data"]
    assert d["n_facts"] == {"base": 1, "planted": 1}
    fact = d["facts"]["base"][0]
    assert fact["prompt"] == "George Gershwin performs on the"
    assert fact["answer_token"] == " piano"
    assert "".join(fact["tokens"][slice(*fact["subject_range"])]).strip() == "George Gershwin"
    assert d["aie"]["base"]["hidden"]["last"][-1] == pytest.approx(
        fact["clean_prob"] - fact["corrupted_prob"], abs=1e-6)
    assert len(d["aie"]["planted"]["mlp"]["last_subject"]) == 30
    for png in (tmp_path / "causal-trace").glob("*.png"):
        png.unlink()
    res = CliRunner().invoke(app, ["figures", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "causal-trace" / "aie_hidden.png").exists()


@pytest.mark.slow
def test_cli_mlp_patching_default_model(tmp_path):
    from mechinterp.planted import planted_variant

    variant = planted_variant()
    _run(["run", "mlp-patching", "--variant", f"planted={variant}", "--limit", "2",
          "--set", "prompt_sets=knowns", "--set", "min_gap=0"], tmp_path)
    d = json.loads((tmp_path / "mlp-patching" / "result.json").read_text())["data"]
    assert d["n_prompts"] == 2
    rec = d["recovery"]["planted"]
    # base resid_post of the last layer into the variant reproduces the base exactly, and back:
    # (recovery - 1) * gap = m_patched - m_base must vanish item by item
    res = read_result(tmp_path / "mlp-patching")
    gap = res.arrays["planted__knowns__m_base"] - res.arrays["planted__knowns__m_variant"]
    assert np.all(np.abs(gap) > 0)
    den, noi = res.arrays["planted__knowns__resid__denoise"], res.arrays["planted__knowns__resid__noise"]
    np.testing.assert_allclose((den[-1] - 1) * gap, 0, atol=1e-4)
    np.testing.assert_allclose(noi[-1] * gap, 0, atol=1e-4)
    assert all(len(rec[s][x]) == 30 for s in ("mlp", "attn", "resid") for x in ("denoise", "noise"))
    assert not any(math.isnan(v) for v in rec["mlp"]["denoise"])
    res = CliRunner().invoke(app, ["figures", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mlp-patching" / "recovery_per_layer.png").exists()
