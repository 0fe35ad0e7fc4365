"""Causal tracing: fast packed engine vs. the naive per-cell loop, on the default model.

    python benchmarks/causal_trace.py --facts 20 --samples 10 --threads 1

The fast engine traces every fact in full. The naive loop (one full forward of the N noised rows
per (kind, token, layer) cell) costs minutes per fact, so it is timed on ``--naive-cells`` random
cells of each of the first ``--naive-facts`` facts, right after that fact's fast trace (same
load), and extrapolated per cell (every naive cell of a fact costs one full forward of the same
rows; the fixed clean and corrupted forwards are timed apart and added once per fact). Per
naive-timed fact the ratio naive/fast is printed; the headline is their median and
range, and the pooled ratio (naive extrapolated per cell-token to all facts). The timed cells are
compared with the fast result (max abs difference).

FLOPs are those of the work each method does, counted from the weight matrices it multiplies (2
per weight per token; attention scores are left out: < 1% here): the fast engine's recording run,
one-token MLPs of the attention-window rows, blocks from each row's entry on, keys/values only in
the last block except the last position, and one unembedded position per row. All times are CPU seconds
of the process (``time.process_time``; one torch thread), which on a loaded shared machine measure
the work itself rather than the share of the cores the process got. A large matrix
product ([4096 x d] @ [d x 4d]) is timed before every fact to give the machine's GEMM rate under
the same load; GFLOP/s of the engine is compared with its median.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch


def clock() -> float:
    """CPU seconds of this process: with one torch thread, the work done whatever else the
    machine runs (wall times of a 2-core machine shared by a dozen jobs swing several-fold)."""
    return time.process_time()


def gemm_rate(d: int, reps: int = 4) -> float:
    a, w = torch.randn(4096, d), torch.randn(d, 4 * d)
    a @ w
    t = clock()
    for _ in range(reps):
        a @ w
    return reps * 2 * 4096 * d * 4 * d / (clock() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--naive-facts", type=int, default=4)
    ap.add_argument("--naive-cells", type=int, default=12, help="naive cells timed per fact")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is far faster on a loaded 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mechinterp.analysis.tracing import (
        KINDS,
        embedding_std,
        make_noise,
        prepare_fact,
        trace_fact,
        trace_fact_naive,
        windows,
    )
    from mechinterp.data import DataSource, load_knowns
    from mechinterp.data.subset import seeded_subset as select
    from mechinterp.models import DEFAULT_MODEL, load

    model = load(DEFAULT_MODEL, device="cpu", dtype="float32")
    n, N = model.n_layers, args.samples
    facts = select(load_knowns(DataSource.from_option(None)), args.facts, args.seed)
    inputs = [prepare_fact(model.tokenizer, f.prompt, f.subject, f.attribute, str(f.known_id))
              for f in facts]
    scale = 3 * embedding_std(model, inputs)
    d = model.hf.get_input_embeddings().weight.shape[1]
    noises = [make_noise(x, N, scale, d, args.seed + i) for i, x in enumerate(inputs)]

    blk = model.hf.get_submodule(model.family.block(0))
    attn = blk.self_attn
    f_layer = 2 * sum(p.numel() for p in blk.parameters())
    f_kv = 2 * (attn.k_proj.weight.numel() + attn.v_proj.weight.numel())
    f_mlp = 2 * sum(p.numel() for p in blk.mlp.parameters())
    f_unembed = 2 * d * model.hf.get_output_embeddings().weight.shape[0]

    def fast_flops(T: int, s: int) -> float:
        total = (1 + N) * (T * n * f_layer + f_unembed)  # recording run
        for t in range(s, T):
            for kind in KINDS:
                for L in range(n):
                    entry = L + 1 if kind == "hidden" else windows(L, n, args.window)[0] + 1
                    row = f_unembed + (f_mlp if kind == "attn" else 0)
                    if entry <= n - 1:
                        row += (n - 1 - entry) * (T - t) * f_layer
                        row += (T - t - 1) * f_kv + f_layer
                    total += N * row
        return total

    rng = random.Random(args.seed)
    rates, t_fast, flops_fast, flops_naive = [], [], 0.0, 0.0
    per_fact_ratio, naive_s, naive_cell_tokens, max_diff, n_timed = [], 0.0, 0, 0.0, 0
    naive_fixed: list[float] = []
    for i, (x, noise) in enumerate(zip(inputs, noises)):
        T = x.n_tokens
        rates.append(gemm_rate(d))
        t = clock()
        tr = trace_fact(model, x, noise, KINDS, args.window)
        t_fast.append(clock() - t)
        flops_fast += fast_flops(T, x.subject[0])
        flops_naive += len(KINDS) * T * n * N * T * (n * f_layer + f_unembed)
        if i < args.naive_facts:
            cells = rng.sample([(k, t_, L) for k in KINDS for t_ in range(T) for L in range(n)],
                               args.naive_cells)
            # two calls (1 cell, then all timed cells) separate the per-fact fixed cost (clean
            # and corrupted forwards) from the per-cell cost
            t = clock()
            trace_fact_naive(model, x, noise, KINDS, args.window, cells=cells[:1])
            t1 = clock() - t
            t = clock()
            ref = trace_fact_naive(model, x, noise, KINDS, args.window, cells=cells)
            tc = clock() - t
            per_cell = (tc - t1) / (len(cells) - 1)
            fixed = max(0.0, t1 - per_cell)
            naive_s += tc - fixed
            naive_fixed.append(fixed)
            naive_cell_tokens += len(cells) * T
            n_timed += len(cells)
            per_fact_ratio.append((fixed + per_cell * len(KINDS) * T * n) / t_fast[-1])
            for k, t_, L in cells:
                max_diff = max(max_diff, abs(ref.scores[k][t_, L] - tr.scores[k][t_, L]))
        print(f"fact {i}: {T} tokens, subject {x.subject}, fast {t_fast[-1]:.1f} s"
              + (f", naive/fast {per_fact_ratio[-1]:.2f}x" if i < args.naive_facts else ""),
              flush=True)
    all_cell_tokens = sum(len(KINDS) * x.n_tokens * n * x.n_tokens for x in inputs)
    naive_est = (naive_s / naive_cell_tokens * all_cell_tokens
                 + statistics.mean(naive_fixed) * len(inputs))
    fast_total = sum(t_fast)
    peak = statistics.median(rates)

    print()
    print(f"causal trace, {DEFAULT_MODEL}, {len(inputs)} facts, {N} noise samples, window "
          f"{args.window}, kinds {','.join(KINDS)}, {args.threads} torch thread(s)")
    print(f"cells (kind x token x layer): {sum(len(KINDS) * x.n_tokens * n for x in inputs)}; "
          f"mean prompt length {np.mean([x.n_tokens for x in inputs]):.1f} tokens")
    print(f"{'method':<46}{'CPU s':>10}{'TFLOP':>9}{'GFLOP/s':>9}")
    print(f"{'naive per-cell loop (EXTRAPOLATED, see below)':<46}{naive_est:>10.1f}"
          f"{flops_naive / 1e12:>9.2f}{flops_naive / naive_est / 1e9:>9.1f}")
    print(f"{'fast packed engine (measured, all cells)':<46}{fast_total:>10.1f}"
          f"{flops_fast / 1e12:>9.2f}{flops_fast / fast_total / 1e9:>9.1f}")
    print(f"GEMM [4096x{d}]@[{d}x{4 * d}] timed before each fact: median "
          f"{peak / 1e9:.1f} GFLOP/s (range {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f}); "
          f"fast engine at {flops_fast / fast_total / peak:.0%} of it")
    print(f"naive/fast per naive-timed fact: median {statistics.median(per_fact_ratio):.2f}x, "
          f"range {min(per_fact_ratio):.2f}-{max(per_fact_ratio):.2f}x over "
          f"{len(per_fact_ratio)} facts; pooled (naive extrapolated per cell-token to all "
          f"{len(inputs)} facts): {naive_est / fast_total:.2f}x; FLOP ratio "
          f"{flops_naive / flops_fast:.2f}x")
    print(f"naive: {n_timed} random cells of the first {len(per_fact_ratio)} facts timed "
          f"({naive_s:.1f} s of cells), each right after the fact's fast trace; fixed cost per "
          f"fact (clean + corrupted forwards) {statistics.mean(naive_fixed):.1f} s, added once "
          "per fact")
    print(f"max |fast - naive| over the timed cells: {max_diff:.2e}")


if __name__ == "__main__":
    main()
