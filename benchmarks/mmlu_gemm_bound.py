"""MMLU scoring against its matrix-product bound: how close the scorer runs to its body's GEMMs.

    OMP_NUM_THREADS=1 python benchmarks/mmlu_gemm_bound.py --limit 200 --repeats 3

For the same stratified items as ``mmlu_vs_lm_eval.py`` (seed 0), one format at a time
(``--formats``, default ``letter-0shot``): the scorer (:func:`mechinterp.evals.mmlu.score_mmlu`,
one worker, one torch thread) is timed ``--repeats`` times; before each run the model's own body
GEMMs (every weight matrix of one block, ``[tokens x in] @ [in x out]`` at the scorer's 512-token
batch) are timed on the same thread, giving the GEMM rate under the same load. The bound is the
body's GEMM FLOPs for the tokens the scorer must run (each shared prefix once, every row's rest,
no padding: 2 per weight per token) at that rate; the ratio scorer time / bound is printed per
repeat with its median and range. The tokens actually run (with padding) are counted with a hook
on the first block. One run under the torch profiler splits the scorer's time by operator class.
Predictions are compared with a float64 reference (one unbatched float32 forward per item,
log-softmax in float64) on the first ``--ref-items`` items.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CLASSES = {  # torch profiler op -> class (self time)
    "aten::mm": "GEMM", "aten::addmm": "GEMM", "aten::bmm": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_log_softmax": "unembed log-softmax",
}


def gemm_seconds(block: torch.nn.Module, tokens: int, reps: int = 3) -> tuple[float, float]:
    """(seconds, FLOPs) of one pass of ``tokens`` tokens through every weight matrix of ``block``."""
    mats = [m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(tokens, w.shape[1]) for w in mats}
    flops = sum(2 * tokens * w.numel() for w in mats)
    for w in mats:
        F.linear(xs[w.shape[1]], w)
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        for w in mats:
            F.linear(xs[w.shape[1]], w)
        best.append(time.perf_counter() - t)
    return statistics.median(best), flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default="letter-0shot")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-items", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from torch.profiler import profile

    from mechinterp.data import DataSource, load_mmlu
    from mechinterp.evals.loglik import build_rows, encode_pair
    from mechinterp.evals.mmlu import MMLUFormat, build_request, score_mmlu, stratified_sample
    from mechinterp.evals.prefix import best_plan, tokens_to_run
    from mechinterp.models import DEFAULT_MODEL, load

    model = load(DEFAULT_MODEL, device="cpu", dtype="float32")
    source = DataSource.from_option(None)
    items = stratified_sample(load_mmlu(source, "test"), args.limit, args.seed)
    dev = load_mmlu(source, "dev", sorted({it.subject for it in items}))
    block = model.hf.get_submodule(model.family.block(0))
    n = model.n_layers
    print(f"{DEFAULT_MODEL}, {len(items)} items (stratified, seed {args.seed}), float32, one "
          f"torch thread, one worker; machine shared with other jobs")

    seen = {"tokens": 0}

    def count(mod, a, kw):
        h = a[0] if a else kw["hidden_states"]
        seen["tokens"] += h.shape[0] * h.shape[1]

    for label in args.formats.split(","):
        fmt = MMLUFormat.parse(label)
        shots = {it.subject: [d for d in dev if d.subject == it.subject][:fmt.shots] for it in items}
        reqs = [build_request(fmt, it, shots[it.subject], model.tokenizer) for it in items]
        rows, _ = build_rows(reqs, model.tokenizer, not fmt.chat)
        need = tokens_to_run(rows, best_plan(rows))
        handle = block.register_forward_pre_hook(count, with_kwargs=True)
        seen["tokens"] = 0
        out = score_mmlu(model, items, dev, fmt, workers=1)
        handle.remove()
        run = seen["tokens"]
        per_tok = 2 * sum(m.weight.numel() for m in block.modules()
                          if isinstance(m, torch.nn.Linear)) * n
        ratios, times, bounds = [], [], []
        for _ in range(args.repeats):
            sec, fl = gemm_seconds(block, 512)
            rate = fl / sec
            t = time.perf_counter()
            score_mmlu(model, items, dev, fmt, workers=1)
            times.append(time.perf_counter() - t)
            bounds.append(need * per_tok / rate)
            ratios.append(times[-1] / bounds[-1])
            print(f"  {label}: GEMM rate {rate / 1e9:.1f} GFLOP/s, scorer {times[-1]:.1f} s, "
                  f"bound {bounds[-1]:.1f} s, ratio {ratios[-1]:.3f}", flush=True)
        with profile() as prof:
            score_mmlu(model, items, dev, fmt, workers=1)
        cls: dict[str, float] = defaultdict(float)
        for ev in prof.key_averages():
            cls[CLASSES.get(ev.key, "other")] += ev.self_cpu_time_total
        total = sum(cls.values())
        # reference predictions
        k = min(args.ref_items, len(items))
        same, worst, last_ids = 0, 0.0, None
        for req, row in zip(reqs[:k], out[:k]):
            pairs = [encode_pair(model.tokenizer, req.context, c, not fmt.chat)
                     for c in req.continuations]
            ref = []
            for ctx, cont in pairs:  # one forward per distinct text (letters: the context once)
                ids = ctx if len(cont) == 1 else ctx + cont
                if not ref or len(cont) > 1 or ids != last_ids:
                    with torch.no_grad():
                        logits = model.hf(input_ids=torch.tensor([ids])).logits[0]
                    lp, last_ids = logits.double().log_softmax(-1), ids
                ref.append(float(sum(lp[len(ctx) - 1 + j, tk] for j, tk in enumerate(cont))))
            same += int(max(range(len(ref)), key=ref.__getitem__) == row["pred"])
            worst = max(worst, max(abs(a - b) for a, b in zip(ref, row["loglik"])))
        print(f"{label}: tokens needed {need} (run with padding {run}, "
              f"{run / need - 1:.1%} padding), body GEMMs {need * per_tok / 1e12:.2f} TFLOP")
        print(f"{label}: scorer / GEMM bound: median {statistics.median(ratios):.3f}, range "
              f"{min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} repeats (scorer median "
              f"{statistics.median(times):.1f} s, bound median {statistics.median(bounds):.1f} s)")
        print(f"{label}: profile (self CPU time): " + ", ".join(
            f"{c} {v / total:.1%}" for c, v in sorted(cls.items(), key=lambda kv: -kv[1])))
        print(f"{label}: predictions equal to the float64 reference on {same}/{k} items; max "
              f"|dll| {worst:.2e}")


if __name__ == "__main__":
    main()
