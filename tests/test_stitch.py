"""Module stitching: a recipe's model is exactly its parents' tensors, nothing else.

Everything from one parent is that parent bit for bit (parameters and logits) and shares its
storage; hand-checked recipes take exactly the named tensors (and slices) from the donor; the
working model is its own again afterwards, also after an error; the probe's KL equals a float64
computation on a copy of the recipe built independently (by parameter names), and its accuracies
equal scoring that copy; bad recipes are one-line UserErrors that leave no result behind."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from mechinterp.errors import UserError
from mechinterp.models.stitch import Stitcher, expand_spec, grid, parse_recipe, thirds

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(hf: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy with every parameter moved (so each tensor tells which parent it came from)."""
    out = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            scale = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g) * 0.2 * (scale or 1.0))  # norms: all 1
    return out


@pytest.fixture(params=["tiny-random-llama", "tiny-random-gpt2"])
def pair(request):
    from mechinterp.models import load

    base = load(request.param, device="cpu", dtype="float32")
    return base, _perturbed(base.hf)


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def _logits(module, ids) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 8, 40]])


def test_everything_from_one_parent_is_that_parent_bit_for_bit(pair):
    base, other = pair
    before = _snapshot(base.hf)
    base_logits = _logits(base.hf, IDS)
    other_logits = _logits(other, IDS)
    st = Stitcher({"base": base.hf, "sft": other}, "base")
    sft = dict(other.named_parameters())
    for text in ("base+sft:all", "sft", "base+sft:re:."):
        with st.stitched(parse_recipe(text)) as m:
            for k, p in m.named_parameters():
                assert torch.equal(p, sft[k]), (text, k)
                assert p.data_ptr() == sft[k].data_ptr()  # shared by reference, no copy
            assert torch.equal(_logits(m, IDS), other_logits)
    for text in ("sft+base:all", "base"):
        with st.stitched(parse_recipe(text)) as m:
            assert torch.equal(_logits(m, IDS), base_logits)
    # the working model is its own again, values and storage
    for k, p in base.hf.named_parameters():
        assert torch.equal(p, before[k]) and p.data_ptr() == st.tensors["base"][k].data_ptr()
    assert torch.equal(_logits(base.hf, IDS), base_logits)
    assert torch.equal(_logits(other, IDS), other_logits)  # the donor was never written


def test_hand_checked_recipe_takes_exactly_the_named_tensors(fresh_tiny_llama):
    base = fresh_tiny_llama
    other = _perturbed(base.hf, seed=1)
    st = Stitcher({"base": base.hf, "sft": other}, "base")
    mine, theirs = _snapshot(base.hf), _snapshot(other)
    want_sft = re.compile(r"^model\.layers\.(1|2)\.mlp\.(gate|up|down)_proj\.weight$")
    with st.stitched(parse_recipe("base+sft:mlp@1-2")) as m:
        names = [k for k, _ in m.named_parameters()]
        assert sum(bool(want_sft.match(k)) for k in names) == 6  # 2 layers x gate/up/down
        for k, p in m.named_parameters():
            from_sft = bool(want_sft.match(k))
            assert torch.equal(p, theirs[k] if from_sft else mine[k]), k
            assert not torch.equal(p, mine[k] if from_sft else theirs[k]), k  # they differ
    # the reverse direction with the thirds: SFT with the base's early attention (layer 0 of 4)
    want_base = re.compile(r"^model\.layers\.0\.self_attn\.[qkvo]_proj\.")
    with st.stitched(parse_recipe("sft+base:attn@early")) as m:
        for k, p in m.named_parameters():
            assert torch.equal(p, mine[k] if want_base.match(k) else theirs[k]), k


def test_slices_of_one_tensor_are_merged_and_fresh(pair):
    """GPT-2's q is a column slice of the fused c_attn (and of its bias); Llama's head 1 of
    layer 2 is rows of q, columns of o and its KV head's rows of k and v."""
    base, other = pair
    st = Stitcher({"base": base.hf, "sft": other}, "base")
    mine, theirs = _snapshot(base.hf), _snapshot(other)
    cfg = base.hf.config
    if cfg.model_type == "gpt2":
        d = cfg.n_embd
        with st.stitched(parse_recipe("base+sft:attn.q@1")) as m:
            w = m.get_parameter("transformer.h.1.attn.c_attn.weight")
            b = m.get_parameter("transformer.h.1.attn.c_attn.bias")
            k = "transformer.h.1.attn.c_attn."
            assert torch.equal(w[:, :d], theirs[k + "weight"][:, :d])
            assert torch.equal(w[:, d:], mine[k + "weight"][:, d:])
            assert torch.equal(b[:d], theirs[k + "bias"][:d]) and torch.equal(b[d:],
                                                                            mine[k + "bias"][d:])
            assert w.data_ptr() not in (st.tensors["base"][k + "weight"].data_ptr(),
                                        st.tensors["sft"][k + "weight"].data_ptr())
            others = [n for n, _ in m.named_parameters() if not n.startswith(k)]
            assert all(torch.equal(m.get_parameter(n), mine[n]) for n in others)
        return
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // \
        cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kv = 1 // group
    with st.stitched(parse_recipe("base+sft:attn.heads@2:1")) as m:
        pre = "model.layers.2.self_attn."
        q = m.get_parameter(pre + "q_proj.weight")
        rows = torch.zeros(q.shape[0], dtype=torch.bool)
        rows[hd:2 * hd] = True
        assert torch.equal(q[rows], theirs[pre + "q_proj.weight"][rows])
        assert torch.equal(q[~rows], mine[pre + "q_proj.weight"][~rows])
        o = m.get_parameter(pre + "o_proj.weight")
        assert torch.equal(o[:, hd:2 * hd], theirs[pre + "o_proj.weight"][:, hd:2 * hd])
        assert torch.equal(o[:, :hd], mine[pre + "o_proj.weight"][:, :hd])
        for mat in ("k_proj", "v_proj"):
            w = m.get_parameter(pre + mat + ".weight")
            sl = slice(kv * hd, (kv + 1) * hd)
            assert torch.equal(w[sl], theirs[pre + mat + ".weight"][sl])
            rest = torch.ones(w.shape[0], dtype=torch.bool)
            rest[sl] = False
            assert torch.equal(w[rest], mine[pre + mat + ".weight"][rest])


def test_the_working_model_is_restored_after_an_error(fresh_tiny_llama):
    base = fresh_tiny_llama
    other = _perturbed(base.hf)
    st = Stitcher({"base": base.hf, "sft": other}, "base")
    before = _snapshot(base.hf)
    with pytest.raises(RuntimeError, match="boom"), st.stitched(parse_recipe("base+sft:mlp")):
        raise RuntimeError("boom")
    assert all(torch.equal(p, before[k]) for k, p in base.hf.named_parameters())


def test_thirds_and_the_grid():
    assert thirds(30) == {"early": (0, 9), "mid": (10, 19), "late": (20, 29)}
    assert thirds(4) == {"early": (0, 0), "mid": (1, 2), "late": (3, 3)}
    assert expand_spec("mlp@mid,attn.q@late", 30) == "mlp@10-19,attn.q@20-29"
    assert expand_spec("all", 30) == "re:."
    recipes = [r.label for r in grid(["sft"])]
    assert len(recipes) == 12 and recipes[0] == "base+sft:attn@early"
    assert recipes[-1] == "sft+base:mlp@late"
    r = parse_recipe("grpo:attn.q,attn.k")  # host omitted: the base
    assert (r.host, r.donor, r.spec) == ("base", "grpo", "attn.q,attn.k")
    r = parse_recipe("sft@step-2+base:mlp@1")
    assert (r.host, r.donor, r.spec) == ("sft@step-2", "base", "mlp@1")
    with pytest.raises(UserError, match="third of a 2-layer model is empty"):
        expand_spec("mlp@mid", 2)


@pytest.mark.parametrize("text,match", [
    ("", "empty recipe"),
    ("base+sft", "names no modules"),
    ("sft+sft:mlp", "from itself"),
    ("base+sft:", "empty spec"),
    ("base+s ft:mlp", "not a model name"),
    ("base+sft:mlp@9", "layer 9 is out of range"),
    ("base+sft:bogus", "unknown component"),
    ("base+nope:mlp", "names model 'nope'"),
    ("base+sft:only:re:.", "takes nothing"),
])
def test_bad_recipes_are_user_errors(text, match, fresh_tiny_llama):
    st = Stitcher({"base": fresh_tiny_llama.hf, "sft": _perturbed(fresh_tiny_llama.hf)}, "base")
    with pytest.raises(UserError, match=match) as err:
        st.plan(parse_recipe(text))
    assert "\n" not in str(err.value) and "freeze spec" not in err.value.message  # recipe words


@pytest.fixture(scope="module")
def stitch_set(tmp_path_factory):
    from mechinterp.models import ModelSet, load
    from mechinterp.models.edit import plant_change

    root = tmp_path_factory.mktemp("stitch")
    base = load("tiny-random-llama", device="cpu", dtype="float32")
    plant_change(base, root / "v", {(1, "down"): 0.3, (2, "up"): 0.3, (0, "q"): 0.2}, seed=1)
    return ModelSet("tiny-random-llama", {"sft": str(root / "v")}, device="cpu", dtype="float32")


def _materialised(models, sources: dict[str, str]) -> torch.nn.Module:
    """A separate copy of the recipe: the base's module deep-copied, each parameter loaded from
    the parent ``sources`` names (by parameter name)."""
    out = copy.deepcopy(models.base.hf)
    state = {n: dict(models[n].hf.named_parameters()) for n in set(sources.values())}
    with torch.no_grad():
        for k, p in out.named_parameters():
            p.copy_(state[sources[k]][k])
    return out


def _kl64(parent, recipe, items) -> list[float]:
    """Per item, float64, one item at a time, an explicit loop over answer positions."""
    vals = []
    for ids, start in zip(items.input_ids, items.answer_start):
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(parent(input_ids=x).logits[0].double(), -1)
            lr = torch.log_softmax(recipe(input_ids=x).logits[0].double(), -1)
        terms = [float((lp[t].exp() * (lp[t] - lr[t])).sum()) for t in range(start - 1,
                                                                             len(ids) - 1)]
        vals.append(sum(terms) / len(terms))
    return vals


@pytest.mark.slow
def test_probe_kl_and_accuracy_match_an_independent_copy(stitch_set, data_source, tmp_path):
    """~10 s: one recipe plus the two parents on 3 items per set."""
    from mechinterp.evals.mmlu import score_mmlu
    from mechinterp.evals.task import score_task
    from mechinterp.core.options import make_config
    from mechinterp.core.registry import get_probe
    from mechinterp.core.runner import run_probe
    from probes.stitch import CLOZE, Stitch

    probe = get_probe("stitch")
    config = make_config(probe, {"recipes": "base+sft:mlp@1-2", "limit": 3,
                                 "max_new_tokens": 6, "max_length": 512, "n_bootstrap": 50})
    res = run_probe(probe, stitch_set, data_source, config, out=tmp_path, draw=False)
    rows = {r["recipe"]: r for r in res["rows"]}
    assert list(rows) == ["base", "sft", "base+sft:mlp@1-2"]
    row = rows["base+sft:mlp@1-2"]
    assert row["spec"] == "mlp@1-2"
    names = [k for k, _ in stitch_set.base.hf.named_parameters()]
    pick = re.compile(r"^model\.layers\.(1|2)\.mlp\.")
    sources = {k: "sft" if pick.match(k) else "base" for k in names}
    recipe = _materialised(stitch_set, sources)
    sizes = dict((k, p.numel()) for k, p in stitch_set.base.hf.named_parameters())
    assert row["donor_fraction"] == pytest.approx(
        sum(sizes[k] for k in names if sources[k] == "sft") / sum(sizes.values()), rel=1e-12)
    items = Stitch._kl_items(stitch_set.base, data_source, config, 2)
    for parent in ("base", "sft"):
        want = _kl64(stitch_set[parent].hf, recipe, items)
        assert min(want) > 1e-4  # the recipe differs from both parents
        np.testing.assert_allclose(res.arrays["kl_items"][2, ["base", "sft"].index(parent)],
                                   want, rtol=1e-4, atol=1e-7)
        assert row["kl"][parent] == pytest.approx(np.mean(want), rel=1e-4)
    assert rows["base"]["kl"]["base"] == 0.0 and rows["sft"]["kl"]["sft"] == 0.0
    assert rows["base"]["kl"]["sft"] == pytest.approx(
        np.mean(_kl64(stitch_set["sft"].hf, stitch_set.base.hf, items)), rel=1e-4)
    # accuracies: scoring the materialised copy on the same items gives the same rows
    from mechinterp.data.items import load_items
    from mechinterp.data.mmlu import load_mmlu
    from mechinterp.data.subset import seeded_subset
    from mechinterp.evals.mmlu import stratified_sample

    twin = copy.copy(stitch_set.base)
    twin.hf = recipe
    mmlu = stratified_sample(load_mmlu(data_source, "test"), 3, 0)
    m_rows = score_mmlu(twin, mmlu, [], CLOZE)
    assert res.arrays["mmlu_correct"][2].tolist() == [int(r["pred"] == r["gold"]) for r in m_rows]
    t_rows = score_task(twin, seeded_subset(load_items("arithmetic", data_source, "test"), 3, 0),
                        6, 16)
    assert res.arrays["task_correct"][2].tolist() == [int(r["correct"]) for r in t_rows]
    assert row["task_accuracy"] == np.mean([r["correct"] for r in t_rows])
    # and the working model is the base again
    fresh = _materialised(stitch_set, dict.fromkeys(names, "base"))
    assert all(torch.equal(p, dict(fresh.named_parameters())[k])
               for k, p in stitch_set.base.hf.named_parameters())


def test_bad_recipe_in_the_probe_writes_nothing(stitch_set, data_source, tmp_path):
    import mechinterp as mi

    with pytest.raises(UserError, match="layer 99 is out of range"):
        mi.run("stitch", stitch_set, data=data_source, out=tmp_path,
               recipes="base+sft:mlp@1; base+sft:mlp@99", limit=2)
    assert not (tmp_path / "stitch").exists()
    with pytest.raises(UserError, match="names model 'grpo'"):
        mi.run("stitch", stitch_set, data=data_source, out=tmp_path, recipes="grpo:mlp")
    assert not (tmp_path / "stitch").exists()
