# ruff: noqa: E402, E702, I001  (kept as run: a flat timing script)
"""The two parts the shared-prompt GRPO trainer changes, timed directly in one process, TRL's path
against ours, alternating: the update (``compute_loss`` + backward) on fixed completions and
generation (``_generate_single_turn``), for the cpu-demo shape: 2 prompts of 106 tokens x 4
completions of 32 tokens (``min_new_tokens`` 32 forces full length), SmolLM2-135M, float32, one
torch thread (two threads on a machine loaded far beyond its 2 cores spend their time waiting at
barriers). Companion of ``grpo_step.py`` for a machine too loaded for whole-step runs.

    MECHINTERP_DATA=/work/shared/data python benchmarks/grpo_parts_direct.py
"""
import os
import tempfile
import time

import torch
torch.set_num_threads(1)
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from mechinterp.models import load
from mechinterp.training.grpo_shared import SharedPromptGRPOTrainer
lm = load("smollm2-135m-instruct", device="cpu", dtype="float32"); lm.hf.set_attn_implementation("sdpa")
cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=4, max_completion_length=32,
    temperature=1.0, beta=0.0, loss_type="dr_grpo", use_cpu=True, report_to=[], max_steps=1, gradient_checkpointing=False,
    bf16=False, generation_kwargs={"min_new_tokens": 32})
tr = SharedPromptGRPOTrainer(model=lm.hf, reward_funcs=[lambda completions, **_: [0.0]*len(completions)], args=cfg,
    train_dataset=Dataset.from_list([{"prompt": "x"}]*8), processing_class=lm.tokenizer)
tr.current_gradient_accumulation_steps = 1
g = torch.Generator().manual_seed(0)
P = [torch.randint(100, 40000, (106,), generator=g) for _ in range(2)]
b = {"prompt_ids": torch.stack([P[i // 4] for i in range(8)]), "prompt_mask": torch.ones(8, 106, dtype=torch.long),
     "completion_ids": torch.randint(100, 40000, (8, 32), generator=g), "completion_mask": torch.ones(8, 32, dtype=torch.long),
     "advantages": torch.randn(8, generator=g)}
real = SharedPromptGRPOTrainer._shareable
def upd(shared):
    SharedPromptGRPOTrainer._shareable = (lambda *a, **k: shared) if not shared else real
    tr.model.zero_grad(); tr.model.train()
    t0 = time.perf_counter(); c0 = time.process_time()
    tr.compute_loss(tr.model, dict(b)).backward()
    return time.perf_counter() - t0, time.process_time() - c0
def gen(shared):
    ids = [P[i // 4].tolist() for i in range(8)]
    t0 = time.perf_counter(); c0 = time.process_time()
    f = tr._generate_single_turn if shared else (lambda *a: GRPOTrainer._generate_single_turn(tr, *a))
    out, _ = f(ids, None, {}, 4)
    assert all(len(o) == 32 for o in out), [len(o) for o in out]
    return time.perf_counter() - t0, time.process_time() - c0
for r in range(2):
    for s in (False, True):
        w, c = upd(s); print(f"update {'shared' if s else 'trl   '} round {r}: wall {w:.2f} s cpu {c:.2f} s load {os.getloadavg()[0]:.1f}", flush=True)
for r in range(1):
    for s in (False, True):
        w, c = gen(s); print(f"generate {'shared' if s else 'trl   '} round {r}: wall {w:.2f} s cpu {c:.2f} s load {os.getloadavg()[0]:.1f}", flush=True)
