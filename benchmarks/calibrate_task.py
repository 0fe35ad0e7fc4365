"""Calibrate the arithmetic task on a model: can GRPO learn it (reward variance within groups)?

    python benchmarks/calibrate_task.py [--task arithmetic] [--model smollm2-135m-instruct]

Samples ``--group`` completions for each of ``--prompts`` train questions in the training prompt
format at each temperature, scores them with the GRPO correctness reward, and prints the fraction
correct and how many groups have rewards that are not all equal (only those give GRPO a gradient).
Then greedy accuracy on ``--heldout`` held-out items. The task is usable when the base solves 15-60%
at GRPO's temperature (the demo's: 0.6). The default task was chosen with::

    python benchmarks/calibrate_task.py --task arithmetic:ops=+x,min=0,max=19 \
        --temperatures 0.6,1.0 --heldout 32
"""

from __future__ import annotations

import argparse
import time

import torch

from mechinterp.data import DataSource
from mechinterp.evals.stats import accuracy_summary
from mechinterp.evals.task import score_task, task_prompt
from mechinterp.models import DEFAULT_MODEL, load
from mechinterp.data.items import load_items, pick
from mechinterp.training.rewards import correctness


def _op(question: str) -> str:
    """The operator of an arithmetic question (``What is 12 x 7?`` -> ``x``); ``?`` otherwise."""
    parts = question.split()
    return parts[3] if len(parts) == 5 else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperatures", default="0.6", help="comma-separated; the demo's GRPO: 0.6")
    ap.add_argument("--heldout", type=int, default=64,
                    help="held-out items scored greedily (a seeded sample; 0: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load(args.model, device="cpu", dtype="float32")
    tok = model.tokenizer
    items = pick(load_items(args.task, DataSource(None), "train"), args.prompts, 0)
    print(f"task {args.task}: {args.prompts} train prompts x {args.group} samples, "
          f"{args.max_new_tokens} new tokens, model {args.model}")
    tok.padding_side, side = "left", tok.padding_side
    for temp in (float(t) for t in args.temperatures.split(",")):
        t0 = time.perf_counter()
        rewards = []
        with torch.inference_mode():
            for it in items:
                enc = tok([task_prompt(tok, it.question)] * args.group, return_tensors="pt",
                          add_special_tokens=False)
                out = model.hf.generate(**enc, do_sample=True, temperature=temp, top_k=0, top_p=1.0,
                                        max_new_tokens=args.max_new_tokens,
                                        pad_token_id=tok.pad_token_id)
                texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                rewards.append(correctness(None, texts, [it.answer] * args.group))
        flat = [r for g in rewards for r in g]
        varied = sum(len(set(g)) > 1 for g in rewards)
        s = accuracy_summary([r > 0 for r in flat])
        by_op = {}
        for it, g in zip(items, rewards):
            by_op.setdefault(_op(it.question), []).extend(r > 0 for r in g)
        ops = ", ".join(f"{op} {sum(v) / len(v):.2f} (n={len(v)})" for op, v in sorted(by_op.items()))
        print(f"T={temp:g}: correct {s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] "
              f"of {s['n']} samples ({ops}); reward variance in {varied}/{len(rewards)} groups "
              f"({time.perf_counter() - t0:.0f} s)")
    tok.padding_side = side
    held = load_items(args.task, DataSource(None), "test")
    held = pick(held, args.heldout or None, 0)
    rows = score_task(model, held, max_new_tokens=args.max_new_tokens)
    s = accuracy_summary([r["correct"] for r in rows])
    fmt = sum(r["format_ok"] for r in rows)
    print(f"greedy, held-out: {s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] of "
          f"{s['n']} items; exact think/answer format {fmt}/{s['n']}")


if __name__ == "__main__":
    main()
