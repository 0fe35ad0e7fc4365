"""The faster GRPO pass computes what TRL's computes: on fixed completions (two prompts of different
lengths, four completions each, shuffled, some cut short) the per-token log-probs and entropies
match a float64 full-row reference, and TRL's dr_grpo loss and every gradient match TRL's own
full-row pass to float tolerance."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

T = 0.7  # sampling temperature: the log-probs are of logits / T
C = 6  # completion columns


def _batch(vocab: int, pad: int):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (7,), generator=g), torch.randint(3, vocab, (4,), generator=g)]
    width = max(len(p) for p in prompts)
    rows, masks, comps, cmask = [], [], [], []
    for i in range(8):
        p = prompts[i // 4]
        rows.append(torch.cat([torch.full((width - len(p),), pad), p]))  # left padding, as TRL
        masks.append(torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]).long())
        n = C - (i % 3)  # completion lengths 6, 5, 4: right padding after the end
        comps.append(torch.cat([torch.randint(3, vocab, (n,), generator=g),
                                torch.full((C - n,), pad)]))
        cmask.append(torch.cat([torch.ones(n), torch.zeros(C - n)]).long())
    order = torch.randperm(8, generator=g)  # TRL shuffles the generation batch
    stack = lambda xs: torch.stack(xs)[order]  # noqa: E731
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 1.5, 0.0])
    return {"prompt_ids": stack(rows), "prompt_mask": stack(masks),
            "completion_ids": stack(comps), "completion_mask": stack(cmask), "advantages": adv}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig

    from mechinterp.models import load
    from mechinterp.training.grpo_shared import SharedPromptGRPOTrainer

    lm = load("tiny-random-llama", device="cpu", dtype="float32")
    lm.hf.set_attn_implementation("sdpa")  # as in training
    cfg = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=C, temperature=T, beta=0.0,
                     loss_type="dr_grpo", use_cpu=True, report_to=[], max_steps=1,
                     gradient_checkpointing=False, bf16=False)  # float32, as the runner on a CPU
    ds = Dataset.from_list([{"prompt": "What is 1 + 1?"}] * 8)
    tr = SharedPromptGRPOTrainer(model=lm.hf, reward_funcs=[lambda completions, **_: [0.0] * len(
        completions)], args=cfg, train_dataset=ds, processing_class=lm.tokenizer)
    tr.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    return tr, lm


def _reference_logps(model, batch):
    """Float64, the plain HF forward on the full rows, log-softmax of logits / T at each token."""
    import copy

    m64 = copy.deepcopy(model).double()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = m64(input_ids=ids, attention_mask=mask).logits[:, -C - 1:-1] / T
    lsm = torch.log_softmax(logits, -1)
    lp = lsm.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    cm = batch["completion_mask"].double()
    return lp * cm, ent * cm


def test_shared_prompt_logps_match_float64_full_rows(trainer):
    from mechinterp.training.grpo_shared import shared_prompt_logps

    tr, lm = trainer
    batch = _batch(lm.hf.config.vocab_size, lm.tokenizer.pad_token_id or 0)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        lp, ent, _ = shared_prompt_logps(tr.model, ids, mask, C, T, compute_entropy=True)
    ref_lp, ref_ent = _reference_logps(tr.model, batch)
    cm = batch["completion_mask"].bool()
    assert lp.shape == ref_lp.shape
    torch.testing.assert_close(lp.double()[cm], ref_lp[cm], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double()[cm], ref_ent[cm], atol=2e-5, rtol=1e-5)
    assert (lp[~cm] == 0).all() and (ent[~cm] == 0).all()
    # one row of each prompt: nothing to share, so TRL's own pass is used
    firsts = [int((batch["prompt_mask"].sum(1) == n).nonzero()[0]) for n in (7, 4)]
    assert shared_prompt_logps(tr.model, ids[firsts], mask[firsts], C, T) is None


def _loss_and_grads(tr, batch, shared: bool, monkeypatch):
    calls = []
    from mechinterp.training import grpo_shared

    real = grpo_shared.shared_prompt_logps

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(grpo_shared, "shared_prompt_logps", spy)
    monkeypatch.setattr(type(tr), "_shareable", lambda self, *a, **k: shared)
    tr.model.zero_grad(set_to_none=True)
    tr.model.train()
    loss = tr.compute_loss(tr.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters()
             if p.grad is not None}
    monkeypatch.undo()
    assert bool(calls) == shared
    return loss.detach(), grads


def test_dr_grpo_loss_and_gradients_equal_trl_full_rows(trainer, monkeypatch):
    tr, lm = trainer
    batch = _batch(lm.hf.config.vocab_size, lm.tokenizer.pad_token_id or 0)
    loss_trl, g_trl = _loss_and_grads(tr, batch, False, monkeypatch)
    loss_new, g_new = _loss_and_grads(tr, batch, True, monkeypatch)
    # dr_grpo with ratio 1: -sum(A * mask) / (B * max_completion_length), by hand
    by_hand = -(batch["advantages"][:, None] * batch["completion_mask"]).sum() / (8 * C)
    torch.testing.assert_close(loss_trl, by_hand)
    torch.testing.assert_close(loss_new, loss_trl, atol=1e-6, rtol=1e-6)
    assert set(g_new) == set(g_trl) and len(g_trl) == len(list(tr.model.parameters()))
    scale = max(g.abs().max() for g in g_trl.values())
    assert scale > 0
    for name, g in g_trl.items():
        torch.testing.assert_close(g_new[name], g, atol=1e-5 * float(scale), rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_generation_from_the_shared_cache_samples_what_trl_samples(trainer, monkeypatch):
    from trl import GRPOTrainer

    from mechinterp.training import grpo_shared

    tr, lm = trainer
    g = torch.Generator().manual_seed(5)
    vocab = lm.hf.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 4)]
    prompt_ids = [prompts[i % 2] for i in range(8)]  # two prompts of different lengths, 4 each
    calls = []
    real = grpo_shared.shared_prompt_cache
    monkeypatch.setattr(grpo_shared, "shared_prompt_cache",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    ours, _ = tr._generate_single_turn(prompt_ids, None, {}, 4)
    torch.manual_seed(0)
    theirs, _ = GRPOTrainer._generate_single_turn(tr, prompt_ids, None, {}, 4)
    assert calls == [1]
    assert len(ours) == 8 and any(len(c) > 1 for c in ours)
    assert ours == theirs  # same sampling distribution and random stream: the same tokens
    # and the cache it starts from is the cache of all eight rows run in full
    from trl.trainer.utils import pad

    rows = [torch.tensor(p) for p in prompt_ids]
    ids = pad(rows, padding_value=0, padding_side="left")
    mask = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left")
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        shared = real(lm.hf, ids, mask)
        full = lm.hf(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                     use_cache=True).cache
    for a, b in zip(shared.layers, full.layers, strict=True):
        keep = mask[:, :-1].bool()  # padded positions are never attended to
        torch.testing.assert_close(a.keys.transpose(1, 2)[keep], b.keys.transpose(1, 2)[keep])
        torch.testing.assert_close(a.values.transpose(1, 2)[keep], b.values.transpose(1, 2)[keep])
