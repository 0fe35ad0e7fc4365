"""Freeze specs, rewards, prompts, KL and settings - no training loop (fast)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mechinterp.data.items import load_items
from mechinterp.data.qa import FORMAT_PATTERN, QAItem, final_answer, render_target
from mechinterp.errors import UserError
from mechinterp.evals.answers import TokenisedItems
from mechinterp.models import selectors as sel
from mechinterp.training.drift import answer_logprobs, kl_from_base, kl_per_item
from mechinterp.training.freeze import FrozenState
from mechinterp.training.rewards import correctness, format_reward
from mechinterp.training.settings import checkpoint_steps, resolve_settings

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- freeze specs --------------------------------------------------------------------------------
def _numel(model, names):
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def test_whole_tensor_specs_count_what_they_name(tiny_model):
    hf, fam = tiny_model.hf, tiny_model.family
    params = dict(hf.named_parameters())
    total = sum(p.numel() for p in params.values())
    mlp = [m for m in fam.matrices if m not in ("q", "k", "v", "o")]
    # naive count of MLP layers 1-2 (weights + biases) straight from module attributes
    want = 0
    for layer in (1, 2):
        for m in mlp:
            ref = fam.param(layer, m, hf.config)
            mod = hf.get_submodule(ref.name.rsplit(".", 1)[0])
            want += mod.weight.numel() + (mod.bias.numel() if getattr(mod, "bias", None) is not None else 0)
    p = sel.plan(hf, "mlp@1-2")
    assert p.n_frozen == want and p.n_trainable == total - want
    only = sel.plan(hf, "only:mlp@1-2")
    assert only.n_frozen == total - want
    assert sel.plan(hf, "mlp@1,2").n_frozen == want  # continued layer list


def test_head_and_neuron_slices_hand_counted(tmp_path):
    from mechinterp.models import load

    llama = load("tiny-random-llama", device="cpu", dtype="float32").hf  # d 64, 4 heads, 2 KV, hd 16
    p = sel.plan(llama, "attn.heads@1:0,3")
    # q rows 2x16x64 + o cols 64x2x16; heads 0 and 3 read KV heads 0 and 1 = all of k and v
    assert p.n_frozen == 2048 + 2048 + 2 * 2048
    assert "model.layers.1.self_attn.k_proj.weight" in p.whole
    q = p.partial["model.layers.1.self_attn.q_proj.weight"]
    assert q[0:16].all() and q[48:64].all() and not q[16:48].any()
    o = p.partial["model.layers.1.self_attn.o_proj.weight"]
    assert o[:, 0:16].all() and not o[:, 16:48].any()
    assert any("KV heads [0, 1]" in n for n in p.notes)
    one = sel.plan(llama, "attn.heads@2:1")  # head 1 reads KV head 0 only
    k = one.partial["model.layers.2.self_attn.k_proj.weight"]
    assert k[0:16].all() and not k[16:].any()
    idx = tmp_path / "neurons.txt"
    idx.write_text("0 1 2\n3, 4 7\n")
    n = sel.plan(llama, f"mlp.neurons@2:{idx}")
    up = n.partial["model.layers.2.mlp.up_proj.weight"]
    down = n.partial["model.layers.2.mlp.down_proj.weight"]
    assert up[[0, 1, 2, 3, 4, 7]].all() and int(up.sum()) == 6 * 64
    assert down[:, [0, 1, 2, 3, 4, 7]].all() and int(down.sum()) == 6 * 64
    gpt2 = load("tiny-random-gpt2", device="cpu", dtype="float32").hf  # fused c_attn (64, 192)
    g = sel.plan(gpt2, "attn.heads@1:2")
    w = g.partial["transformer.h.1.attn.c_attn.weight"]
    for part in range(3):  # q, k, v columns of head 2
        assert w[:, part * 64 + 32: part * 64 + 48].all()
    assert int(w.sum()) == 3 * 64 * 16
    b = g.partial["transformer.h.1.attn.c_attn.bias"]
    assert int(b.sum()) == 48 and b[32:48].all()
    o = g.partial["transformer.h.1.attn.c_proj.weight"]  # Conv1D (in, out): head rows
    assert o[32:48].all() and int(o.sum()) == 16 * 64
    qk = sel.plan(gpt2, "attn.q,attn.k")
    w = qk.partial["transformer.h.0.attn.c_attn.weight"]
    assert w[:, :128].all() and not w[:, 128:].any()


@pytest.mark.parametrize("spec, words", [
    ("mlp.foo", "unknown component 'mlp.foo'"),
    ("attn.z", "unknown component"),
    ("ffn@3", "unknown component 'ffn'"),
    ("mlp@2-9", "layer 4 is out of range"),
    ("attn@7", "layer 7 is out of range"),
    ("attn.heads@1:9", "head index 9 out of range"),
    ("attn.heads:1", "cannot read item"),
    ("embed@2", "has no layers"),
    ("mlp.neurons@1:/no/such/file", "not found"),
    ("re:[", "bad regex"),
    ("re:nothing_like_this", "matches no parameter"),
    ("only:", "names nothing"),
    ("mlp@3-1", "empty range"),
    ("mlp,,attn", "empty item"),
    ("3,mlp", "nothing to continue"),
])
def test_bad_specs_are_user_errors(fresh_tiny_llama, spec, words):
    with pytest.raises(sel.FreezeSpecError, match=words.replace("[", r"\[").replace("(", r"\(")):
        sel.plan(fresh_tiny_llama.hf, spec)


def test_paper_mid_mlp_freezes_the_mid_layers_the_claims_test():
    # the middle third by hand: [n // 3, 2n // 3)
    for n_layer, span in ((3, "1-1"), (12, "4-7"), (30, "10-19"), (32, "10-20"), (64, "21-41")):
        assert sel.preset_spec("paper-mid-mlp", n_layer) == f"mlp@{span}"
    with pytest.raises(UserError, match="unknown freeze preset"):
        sel.preset_spec("paper-everything", 30)


def test_hooks_and_restore_keep_slices_bit_identical_under_adamw(fresh_tiny_llama):
    """Gradient hooks alone do not protect against weight decay; restore() does."""
    hf = fresh_tiny_llama.hf
    hf.train()
    spec = "attn.heads@1:1,mlp.neurons@2:0-9,norm@0"
    p = sel.plan(hf, spec)
    params = dict(hf.named_parameters())
    before = {n: t.detach().clone() for n, t in params.items()}
    state = FrozenState(hf, p)
    opt = torch.optim.AdamW([t for t in hf.parameters() if t.requires_grad], lr=1e-2,
                            weight_decay=0.5)
    ids = torch.randint(0, 200, (2, 12))
    drifted = False
    for _ in range(3):
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        for name, mask in p.partial.items():  # the hook zeroed exactly the frozen entries
            g = params[name].grad
            assert torch.count_nonzero(g[mask]) == 0 and torch.count_nonzero(g[~mask]) > 0
        opt.step()
        for name, mask in p.partial.items():  # weight decay moved them before restore
            drifted |= not torch.equal(params[name].detach()[mask], before[name][mask])
        state.restore()
        opt.zero_grad()
    assert drifted, "weight decay should have moved frozen slices before restore()"
    for name, t in params.items():
        now = t.detach()
        if name in p.whole:
            assert torch.equal(now, before[name]), name
        elif name in p.partial:
            m = p.partial[name]
            assert torch.equal(now[m], before[name][m]), name
            assert not torch.equal(now[~m], before[name][~m]), name
        else:
            assert not torch.equal(now, before[name]), name
    state.remove()


# ----- rewards and prompts -------------------------------------------------------------------------
def test_rewards_hand_cases():
    good = "<think>\n2 + 2 = 4\n</think>\n<answer>\n4\n</answer>"
    assert FORMAT_PATTERN.match(render_target(QAItem("q", "2 + 2 = 4", "4")))
    comps = [[{"role": "assistant", "content": c}] for c in (
        good, "<answer>$1,234.50</answer>", "so the total is 17 apples", "<think>x</think><answer>4</answer>",
        "<answer>five</answer> 4")]
    assert correctness(None, comps, answer=["4", "1234.5", "17", "4", "4"]) == [1, 1, 1, 1, 0]
    assert format_reward(None, comps) == [1, 0, 0, 0, 0]
    assert format_reward(None, [good + "\nextra"]) == [0]
    assert final_answer("#### 72") == "72" and final_answer("no number") is None


def test_final_answer_is_the_last_number_of_the_last_answer_tag():
    assert final_answer("<answer>5+3=8</answer>") == "8"  # was "5", the first number
    assert final_answer("<answer>1</answer> then <answer>\n2 * 3 = 6 apples\n</answer>") == "6"
    assert final_answer("<answer>$1,234.50, i.e. 1,234.5</answer>") == "1234.5"
    assert final_answer("<answer>-4 + 1 = -3</answer>") == "-3"
    assert final_answer("<answer>five</answer> 4") is None  # the tag decides; no number in it
    assert correctness(None, ["<answer>5+3=8</answer>"], answer=["8"]) == [1.0]
    assert correctness(None, ["<answer>5+3=8</answer>"], answer=["5"]) == [0.0]


def test_load_items_gsm8k_and_jsonl(data_source, tmp_path):
    items = load_items("gsm8k", data_source, "train")
    assert len(items) == 7473
    assert "<<" not in items[0].reasoning and items[0].answer == "72"
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "x", "answer": "a\\n#### 3,000"}\n')
    got = load_items(str(f), data_source)
    assert [(i.reasoning, i.answer) for i in got] == [("", "2"), ("a", "3000")]
    f.write_text('{"question": "1+1?"}\n')
    with pytest.raises(UserError, match="qa.jsonl:1"):
        load_items(str(f), data_source)
    with pytest.raises(UserError, match="neither 'gsm8k' nor a JSONL"):
        load_items(str(tmp_path / "missing.jsonl"), data_source)


# ----- KL ------------------------------------------------------------------------------------------
def test_kl_matches_float64_reference(fresh_tiny_llama):
    from mechinterp.models import load

    base = load("tiny-random-llama", device="cpu", dtype="float32").hf
    tuned = fresh_tiny_llama.hf
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, 300, (n,), generator=g) for n in (9, 14, 6)]
    spans = [(4, 9), (10, 14), (1, 6)]
    held = TokenisedItems([x.tolist() for x in ids], [a for a, _ in spans])
    per = kl_per_item(answer_logprobs(base, held, batch_size=2), answer_logprobs(tuned, held))
    ref = []
    base64, tuned64 = base.double(), tuned.double()
    for x, (a, b) in zip(ids, spans):  # one sequence at a time, no padding, float64, naive loops
        with torch.no_grad():
            lb = torch.log_softmax(base64(input_ids=x[None]).logits[0], -1)
            lf = torch.log_softmax(tuned64(input_ids=x[None]).logits[0], -1)
        vals = []
        for t in range(a, b):  # answer token t is predicted at position t - 1
            pb = lb[t - 1].exp()
            vals.append(float(sum(pb[v] * (lb[t - 1, v] - lf[t - 1, v]) for v in range(lb.shape[-1]))))
        ref.append(sum(vals) / len(vals))
    assert per == pytest.approx(ref, rel=1e-4, abs=1e-7)
    assert min(ref) > 0
    assert kl_from_base(answer_logprobs(base, held), answer_logprobs(tuned, held)) == \
        pytest.approx(sum(ref) / 3, rel=1e-4)
    same = answer_logprobs(base, held)
    assert kl_from_base(same, same) == 0.0


# ----- settings ------------------------------------------------------------------------------------
def test_settings_precedence_and_validation():
    paper = resolve_settings("grpo", None, {})
    assert (paper.learning_rate, paper.num_generations, paper.temperature, paper.beta,
            paper.max_completion_length, paper.loss_type, paper.max_grad_norm,
            paper.correctness_weight, paper.format_weight, paper.checkpoints) == \
        (1e-6, 28, 0.6, 0.0, 1500, "dr_grpo", 0.2, 1.0, 0.2, 20)
    smoke = resolve_settings("grpo", "cpu-smoke", {"max_steps": 9})
    assert smoke.max_steps == 9 and smoke.num_generations == 4
    with pytest.raises(UserError, match="not a multiple of --num-generations"):
        resolve_settings("grpo", "cpu-smoke", {"per_device_train_batch_size": 6})
    # TRL needs whole groups in the global batch only: 2 per device x 2 processes = one group of 4
    from mechinterp.training.settings import validate

    s2 = dataclasses.replace(smoke, per_device_train_batch_size=2)
    validate(s2, world=2)
    validate(dataclasses.replace(s2, gradient_accumulation_steps=2), world=1)
    with pytest.raises(UserError, match=r"global batch 2 \(batch size 2 x 1 process"):
        validate(s2, world=1)
    with pytest.raises(UserError, match="unknown preset"):
        resolve_settings("sft", "gpu-huge", {})
    assert checkpoint_steps(571, 20)[:3] == [29, 57, 86] and checkpoint_steps(571, 20)[-1] == 571
    assert checkpoint_steps(12, 3) == [4, 8, 12] and checkpoint_steps(5, 5) == [1, 2, 3, 4, 5]
    assert all(math.isclose(s, round(i * 571 / 20)) for i, s in enumerate(checkpoint_steps(571, 20), 1))


def test_default_checkpoints_fit_a_short_run_but_an_asked_number_is_checked():
    """``--max-steps 3`` with the paper's default 20 checkpoints used to stop with an error."""
    short = resolve_settings("sft", None, {"max_steps": 3})
    assert short.checkpoints == 3
    assert resolve_settings("sft", None, {"max_steps": 100}).checkpoints == 20
    with pytest.raises(UserError, match="--checkpoints 5 must be between 1 and --max-steps 3"):
        resolve_settings("sft", None, {"max_steps": 3, "checkpoints": 5})


def test_cli_rejects_bad_input_before_training(tmp_path, capsys):
    from mechinterp.cli import main

    out = tmp_path / "run"
    assert main(["train", "sft", "--base", "tiny-random-llama", "--out", str(out),
                 "--freeze", "mlp@9"]) == 2
    assert "layer 9 is out of range" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "grpo", "--base", "tiny-random-llama", "--out", str(out),
                 "--use-vllm"]) == 2
    assert "vLLM" in capsys.readouterr().err
    assert main(["train", "sft", "--out", str(out), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert main(["train", "sft", "--base", "tiny-random-llama", "--out", str(out),
                 "--freeze", "only:attn", "--freeze-preset", "paper-mid-mlp"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    # the tiny byte-level tokenizer makes every GSM8K chat prompt longer than the smoke preset's
    # 320 tokens: TRL would drop every row and fail in its data loader
    assert main(["train", "sft", "--base", "tiny-random-llama", "--preset", "cpu-smoke",
                 "--max-steps", "2", "--checkpoints", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "leaves no answer token" in err and "--max-length 320" in err and "Traceback" not in err
    assert not out.exists()
