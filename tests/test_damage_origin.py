"""Origin vs mediation: damage planted in the mid-layer MLP weights of a tiny 8-layer
Llama whose last MLP writes straight into the logits (its down projection scaled up, in base and
variant alike), plus an unrelated small change of the last layer's MLP weights.

Patching the base's last-layer MLP output into the variant "repairs" most of the damage (it
mediates everything upstream); reverting the last layer's weights gives back nothing; reverting the
mid third's MLP weights gives back all of it (the origin). The damage is planted as one step against
the gradient of the summed gold margin on the probe's own items, so it is directional: the net
damage is significant, and on an unchanged copy its interval holds 0. Numbers are checked against a
naive computation: full forwards of a model whose weights were swapped by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_damage_attribution import SUBJECTS, _config  # the same tiny 8-layer Llama

from mechinterp.data import load_mmlu
from mechinterp.evals.loglik import encode_pair
from mechinterp.evals.mmlu import MMLUFormat, build_request, stratified_sample
from mechinterp.models import load
from mechinterp.models.depth import thirds
from mechinterp.models.modelset import ModelSet
from mechinterp.core.options import make_config
from mechinterp.core.registry import get_probe
from mechinterp.core.runner import run_probe

LIMIT, LAST, MLP = 20, 7, ("gate", "up", "down")
FMT = MMLUFormat.parse("letter-0shot")
pytestmark = pytest.mark.usefixtures("one_thread")


def _items(data_source):
    return stratified_sample(load_mmlu(data_source, "test", SUBJECTS.split(",")), LIMIT, 0)


def _margins(hf, tok, items) -> torch.Tensor:
    """Gold score minus the best other choice per item: full forward per choice (lm-eval's split
    of context and continuation), float32 with gradients where the weights ask for them."""
    out = []
    for it in items:
        req = build_request(FMT, it, [], tok)
        sc = []
        for cont in req.continuations:
            ctx, tail = encode_pair(tok, req.context, cont)
            lp = torch.log_softmax(hf(input_ids=torch.tensor([ctx + tail])).logits[0].float(), -1)
            sc.append(lp[len(ctx) - 1:-1].gather(1, torch.tensor(tail)[:, None]).sum())
        sc = torch.stack(sc)
        out.append(sc[it.answer] - torch.cat([sc[:it.answer], sc[it.answer + 1:]]).max())
    return torch.stack(out)


def _save(m, hf, path):
    hf.save_pretrained(path)
    m.tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, data_source):
    from mechinterp.models.zoo import _tiny

    root = tmp_path_factory.mktemp("origin")
    _tiny(_config)(root / "raw")
    m = load(str(root / "raw"), device="cpu", dtype="float32")
    with torch.no_grad():
        m.weight(LAST, "down").mul_(20.0)  # the last MLP dominates the logits
    _save(m, m.hf, root / "base")
    _save(m, m.hf, root / "same")
    items = _items(data_source)
    for name, layers in (("damaged", list(thirds(8)["mid"])), ("one", [3])):
        v = load(str(root / "base"), device="cpu", dtype="float32")
        _margins(v.hf, v.tokenizer, items).sum().backward()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for la in layers:  # one step against the gold margin: directional damage
                for mat in MLP:
                    w = v.weight(la, mat)
                    w.sub_(w.grad / w.grad.norm() * 0.05 * w.norm())
            for mat in MLP:  # unrelated: small noise in the last MLP
                w = v.weight(LAST, mat)
                noise = torch.randn(w.shape, generator=gen)
                w.add_(noise / noise.norm() * 0.005 * w.norm())
        v.hf.zero_grad()
        _save(v, v.hf, root / name)
    return root


@pytest.fixture(scope="module")
def result(planted, data_source, tmp_path_factory):
    probe = get_probe("damage-attribution")
    models = ModelSet(str(planted / "base"), {v: str(planted / v) for v in ("damaged", "one",
                                                                             "same")},
                      device="cpu", dtype="float32")
    config = make_config(probe, {"subjects": SUBJECTS, "max_failures": "6", "max_damaged": "20",
                                 "n_control": "0", "sites": "mlp_out", "n_bootstrap": "400"},
                         limit=LIMIT)
    return run_probe(probe, models, data_source, config, out=tmp_path_factory.mktemp("r")).data


def _reverted_margins(planted, variant: str, layers, items) -> np.ndarray:
    """The variant with the base's MLP matrices of ``layers`` copied in by hand."""
    base = load(str(planted / "base"), device="cpu", dtype="float32")
    v = load(str(planted / variant), device="cpu", dtype="float32")
    hf = copy.deepcopy(v.hf)
    sd = dict(base.hf.state_dict())
    with torch.no_grad():
        for la in layers:
            for mat in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{la}.mlp.{mat}.weight"
                hf.get_parameter(key).copy_(sd[key])
        return _margins(hf, v.tokenizer, items).numpy()


def spans_range(span: list[int]) -> list[int]:
    return list(range(span[0], span[1] + 1))


@pytest.mark.slow
def test_weight_revert_finds_the_origin_where_patching_finds_the_mediator(planted, result,
                                                                          data_source):
    d = result
    spans = {k: [r.start, r.stop - 1] for k, r in thirds(8).items()}
    win = d["revert_window_recovery"]["damaged"]
    assert {k: w["layers"] for k, w in win.items()} == spans
    # origin: the mid third gives the whole drop back, the other thirds nothing
    assert win["mid"]["mean"] > 0.9 and win["mid"]["ci95"][0] > 0.5
    assert win["early"]["mean"] == 0.0 and abs(win["late"]["mean"]) < 0.05
    rev = d["revert_recovery"]["damaged"]["mlp"]
    assert [rev[la] for la in (0, 1, 5, 6)] == [0.0] * 4  # identical weights: exactly nothing
    # mediation: patching the last layer's MLP output "repairs" most of it; its weights did not
    patched = d["margin_recovery"]["damaged"]["mlp_out"][LAST]
    assert patched > 0.5 and abs(rev[LAST]) < 0.05
    assert len(d["revert_recovery_ci95"]["damaged"]["mlp"]) == 8
    # one planted mid layer: that layer's revert gives it back
    one = d["revert_recovery"]["one"]["mlp"]
    assert int(np.argmax(one)) == 3 and one[3] > 0.9
    # against full forwards of hand-swapped models, on the damaged items the probe used
    items = _items(data_source)
    key = {(it.subject, it.index): it for it in items}
    used = [key[tuple(x)] for x in d["reverted_items"]["damaged"]]
    assert d["n_used"]["damaged"] == len(used) == min(d["n_damaged"]["damaged"], 20) >= 10
    # patching reads the first max_failures of the same order: a subset of the reverted items
    patched = [tuple(x) for x in d["damaged_items"]["damaged"]]
    assert len(patched) == d["n_damaged_used"]["damaged"] == 6
    assert set(patched) <= {tuple(x) for x in d["reverted_items"]["damaged"]}
    with torch.no_grad():
        m_b = _reverted_margins(planted, "base", [], used)
        m_v = _reverted_margins(planted, "damaged", [], used)
    m_r = _reverted_margins(planted, "damaged", spans_range(spans["mid"]), used)
    assert win["mid"]["mean"] == pytest.approx((m_r - m_v).mean() / (m_b - m_v).mean(), abs=2e-3)
    m_7 = _reverted_margins(planted, "damaged", [LAST], used)
    assert rev[LAST] == pytest.approx((m_7 - m_v).mean() / (m_b - m_v).mean(), abs=2e-3)


@pytest.mark.slow
def test_net_damage_is_significant_when_planted_and_holds_zero_on_a_copy(planted, result,
                                                                         data_source):
    d = result
    net = d["net_damage"]["damaged"]
    items = _items(data_source)
    with torch.no_grad():
        drop = (_reverted_margins(planted, "base", [], items)
                - _reverted_margins(planted, "damaged", [], items))
    assert net["n"] == LIMIT and net["mean"] == pytest.approx(drop.mean(), abs=1e-3)
    assert net["ci95"][0] > 0 and net["p"] < 0.01
    same = d["net_damage"]["same"]
    assert same["mean"] == 0.0 and same["ci95"][0] <= 0.0 <= same["ci95"][1] and same["p"] == 1.0
    assert d["n_used"]["same"] == 0


def test_sign_flip_p_against_exact_enumeration():
    from itertools import product

    from mechinterp.evals.stats import sign_flip_p

    x = np.random.default_rng(5).normal(0.4, 1.0, 12)
    obs = abs(x.mean())
    exact = np.mean([abs(np.dot(s, x)) / len(x) >= obs * (1 - 1e-9)
                     for s in product([-1, 1], repeat=len(x))])
    rng = np.random.default_rng(0)
    assert 0.01 < exact < 0.5
    assert sign_flip_p(x, rng) == pytest.approx(exact)  # 2^12 <= n_perm: enumerated
    assert sign_flip_p(x, rng, n_perm=2000) == pytest.approx(exact, abs=0.03)  # sampled
    assert sign_flip_p(np.zeros(50), rng) == 1.0
    assert sign_flip_p(np.full(40, 0.3), rng, n_perm=999) == pytest.approx(1 / 1000)
    assert np.isnan(sign_flip_p(np.array([]), rng))
