"""One GRPO step at the demo preset, split into its parts, against another tree of the code.

The demo preset (``mechinterp train grpo --preset cpu-demo``): 2 prompts x 4 completions of up to
32 tokens sampled from the 135M default model, then one update. Each measurement is a child
process that trains ``--steps`` steps with ``PYTHONPATH`` set to one tree (this one, and
``--baseline`` for the code to compare with), timing inside TRL's GRPOTrainer:

    generation   ``_generate`` (tokenise prompts, HF ``generate``, decode)
    reward       ``_calculate_rewards``
    no-grad fwd  forward passes under ``torch.no_grad`` (reference model, old-policy log-probs)
    score rest   the rest of ``_generate_and_score_completions`` (advantages, padding, metrics)
    loss fwd     ``compute_loss`` (the policy's forward pass with gradients, and the loss)
    backward     the rest of ``training_step`` (``accelerator.backward``)
    optimizer    ``on_pre_optimizer_step`` .. ``on_optimizer_step`` (clipping, AdamW)
    step         ``on_step_begin`` .. ``on_step_end`` (all of the above and the Trainer's glue)
    step cpu     CPU seconds of this process over the step (all threads): less sensitive to other
                 jobs on a shared machine than the wall times above

The first step (warm-up: allocations, first-call overheads) is left out; each child reports the
median of the rest. Children alternate baseline / this tree over ``--repeats`` rounds so that a
noisy, shared machine slows both alike; the table gives medians over rounds and the ratio.

    git worktree add /tmp/grpo-base 8a0e49f
    MECHINTERP_DATA=/work/shared/data python benchmarks/grpo_step.py --baseline /tmp/grpo-base
    python benchmarks/grpo_step.py --child --steps 4          # one child: this tree only, JSON
    python benchmarks/grpo_step.py --baseline /tmp/grpo-base --side-by-side --repeats 1
    python benchmarks/grpo_step.py --baseline /tmp/grpo-base --use-vllm   # on a GPU (colocate)
    python benchmarks/grpo_step.py --child --steps 3 --precision mixed-bf16  # one scheme's split
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("generation", "reward", "no-grad fwd", "score rest", "loss fwd", "backward", "optimizer",
         "step", "step cpu")
HERE = Path(__file__).resolve().parents[1]


# ----- child: one training run in this process, with timers around TRL's methods --------------------
def _child(a: argparse.Namespace) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from mechinterp.training.runner import train
    from mechinterp.training.settings import resolve_settings

    acc: dict[str, float] = dict.fromkeys(PARTS, 0.0)
    steps: list[dict[str, float]] = []

    depth: dict[str, int] = {}

    def timed(name: str, part, fn):
        def wrapper(*args, **kw):
            outer = depth.get(name, 0) == 0  # a subclass calling super(): time the outer call
            depth[name] = depth.get(name, 0) + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                depth[name] -= 1
                key = part(*args, **kw) if callable(part) else part
                if key and outer:
                    acc[key] += time.perf_counter() - t0
        wrapper.__name__ = name
        return wrapper

    try:  # the trainer class of this tree, if it has its own (timed like TRL's)
        from mechinterp.training.grpo_shared import SharedPromptGRPOTrainer
        classes = [GRPOTrainer, SharedPromptGRPOTrainer]
    except ImportError:
        classes = [GRPOTrainer]
    parts = {"_generate": "generation", "_calculate_rewards": "reward",
             "_get_per_token_logps_and_entropies":
                 lambda *a, **k: None if torch.is_grad_enabled() else "no-grad fwd",
             "_generate_and_score_completions": "score rest", "compute_loss": "loss fwd",
             "training_step": "backward"}
    for cls in classes:
        for meth, part in parts.items():
            if meth in vars(cls):
                setattr(cls, meth, timed(meth, part, vars(cls)[meth]))

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            acc.update(dict.fromkeys(PARTS, 0.0))
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            acc["optimizer"] += time.perf_counter() - self.t_opt

        def on_step_end(self, args, state, control, **kw):
            acc["step"] = time.perf_counter() - self.t0
            acc["step cpu"] = time.process_time() - self.c0
            rec = dict(acc)
            # nested timers -> exclusive parts
            rec["score rest"] -= rec["generation"] + rec["reward"] + rec["no-grad fwd"]
            rec["backward"] -= rec["loss fwd"] + acc["score rest"]
            steps.append(rec)

    over = dict(max_steps=a.steps, n_heldout=0, checkpoints=1, seed=a.seed, base=a.base)
    if a.precision:
        over["dtype"] = a.precision
    if a.use_vllm:
        over |= dict(use_vllm=True, vllm_mode="colocate")
    s = resolve_settings("grpo", a.preset, over)
    with tempfile.TemporaryDirectory() as tmp:
        train(s, Path(tmp) / "run", echo=lambda *_: None, callbacks=(Clock(),), record=False,
              skip_disk_check=True)
    rest = steps[1:] or steps
    return {"parts": {p: statistics.median(r[p] for r in rest) for p in PARTS},
            "steps": [r["step"] for r in steps], "threads": torch.get_num_threads()}


# ----- parent: alternate the trees, medians and the ratio --------------------------------------------
def _start_child(tree: Path, a: argparse.Namespace) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--steps", str(a.steps),
           "--seed", str(a.seed), "--base", a.base, "--preset", a.preset,
           *(["--precision", a.precision] if a.precision else []),
           *(["--use-vllm"] if a.use_vllm else [])]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(tree))


def _result(proc: subprocess.Popen, tree: Path) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"child for {tree} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _rev(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "mechinterp"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "?") + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="tree of the code to compare with (a worktree)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of baseline + this tree")
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first is left out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--use-vllm", action="store_true", help="vLLM colocate generation (a GPU)")
    ap.add_argument("--precision", help="the training --precision (default: the preset's; e.g. "
                    "mixed-bf16, pure-bf16 as the precision contrast trains)")
    ap.add_argument("--log", type=Path, help="append each run's JSON here as it finishes")
    ap.add_argument("--side-by-side", action="store_true",
                    help="run the two trees at the same time in each round (on a machine whose "
                    "load swings within minutes; each then has part of the cores)")
    ap.add_argument("--table", type=Path, nargs=2, metavar=("BASELINE_JSON", "THIS_JSON"),
                    help="print the table of two child outputs (--child ... > FILE) and stop")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a)))
        return
    trees = {"this": HERE} if a.baseline is None else {"baseline": a.baseline.resolve(),
                                                        "this": HERE}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    if a.table:
        runs = {k: [json.loads(f.read_text().strip().splitlines()[-1])]
                for k, f in zip(("baseline", "this"), a.table, strict=True)}
        trees = {"baseline": a.baseline.resolve() if a.baseline else Path("?"), "this": HERE}
    for i in range(0 if a.table else a.repeats):
        groups = [list(trees.items())] if a.side_by_side else [[kv] for kv in trees.items()]
        for group in groups:
            t0 = time.perf_counter()
            procs = [(name, tree, _start_child(tree, a)) for name, tree in group]
            for name, tree, proc in procs:
                runs[name].append(_result(proc, tree))
                if a.log:
                    with open(a.log, "a") as f:
                        f.write(json.dumps({"tree": name, "rev": _rev(tree), **runs[name][-1]})
                                + "\n")
                print(f"round {i + 1}/{a.repeats} {name}: step "
                      f"{runs[name][-1]['parts']['step']:.2f} s (run {time.perf_counter() - t0:.0f}"
                      f" s; load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    med = {k: {p: statistics.median(r["parts"][p] for r in v) for p in PARTS}
           for k, v in runs.items()}
    how = "side by side" if a.side_by_side else "alternating"
    print(f"GRPO step, preset {a.preset}, {a.base}, {a.steps} steps per run (first left out), "
          f"{len(runs['this'])} {how} rounds, torch threads {runs['this'][0]['threads']}"
          + (", vLLM colocate" if a.use_vllm else ""))
    heads = [f"{k} ({_rev(t)})" for k, t in trees.items()]
    print(f"  {'part (median s)':<14}" + "".join(f"{h:>22}" for h in heads)
          + ("   ratio" if len(trees) == 2 else ""))
    for p in PARTS:
        vals = [med[k][p] for k in trees]
        ratio = f"   {vals[1] / vals[0]:.2f}x" if len(vals) == 2 and vals[0] > 1e-3 else ""
        print(f"  {p:<14}" + "".join(f"{v:>22.3f}" for v in vals) + ratio)
    for k, v in runs.items():
        print(f"  {k} step per round: " + ", ".join(f"{r['parts']['step']:.2f}" for r in v))


if __name__ == "__main__":
    main()
