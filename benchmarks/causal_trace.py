"""Causal tracing: fast batched engine vs. the naive per-cell loop, on the default model.

    python benchmarks/causal_trace.py --facts 20 --samples 10 --threads 1

The fast engine traces every fact in full. The naive loop (one full forward of the N noised rows
per (kind, token, layer) cell) costs minutes per fact here, so it is timed on a random subset of
cells of the first ``--naive-facts`` facts and extrapolated per cell-token (its cost is one full
forward of T tokens per cell, so it scales with T); the table says so. The timed cells are also
compared with the fast result (max abs difference).

Work is counted in token-layers (one token through one block) and converted to FLOPs from the
parameter count (2 FLOPs per weight per token; attention scores ignored, they are < 2% here), to
say how far the fast engine is from the arithmetic lower bound of the method.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--naive-facts", type=int, default=2)
    ap.add_argument("--naive-cells", type=int, default=30, help="naive cells timed per fact")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is far faster on a loaded 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mechinterp.analysis.tracing import (
        KINDS,
        _layers_of,
        embedding_std,
        make_noise,
        prepare_fact,
        trace_fact,
        trace_fact_naive,
    )
    from mechinterp.data import DataSource, load_knowns
    from mechinterp.models import DEFAULT_MODEL, load
    from probes.causal_trace import select

    model = load(DEFAULT_MODEL, device="cpu", dtype="float32")
    n = model.n_layers
    facts = select(load_knowns(DataSource.from_option(None)), args.facts, args.seed)
    inputs = [prepare_fact(model.tokenizer, f.prompt, f.subject, f.attribute, str(f.known_id))
              for f in facts]
    scale = 3 * embedding_std(model, inputs)
    d = model.hf.get_input_embeddings().weight.shape[1]
    noises = [make_noise(x, args.samples, scale, d, args.seed + i) for i, x in enumerate(inputs)]
    N = args.samples

    # FLOPs per token-layer and per unembedded token
    block_params = sum(p.numel() for p in model.hf.get_submodule(model.family.block(0)).parameters())
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    f_layer, f_unembed = 2 * block_params, 2 * d * vocab

    a = torch.randn(4096, d)
    w = torch.randn(d, 4 * d)
    t = time.perf_counter()
    for _ in range(10):
        a @ w
    peak = 10 * 2 * 4096 * d * 4 * d / (time.perf_counter() - t)

    # fast, every fact in full
    fast_traces, t_fast = [], 0.0
    fast_flops = bound_flops = naive_flops = 0.0
    total_cells = total_cell_tokens = 0
    for x, noise in zip(inputs, noises):
        t = time.perf_counter()
        fast_traces.append(trace_fact(model, x, noise, KINDS, args.window))
        t_fast += time.perf_counter() - t
        T = x.n_tokens
        total_cells += len(KINDS) * T * n
        total_cell_tokens += len(KINDS) * T * n * T
        naive_flops += len(KINDS) * T * n * N * T * (n * f_layer + f_unembed)
        restore = 0.0
        for t_ in range(x.subject[0], T):
            for kind in KINDS:
                for L in range(n):
                    first = L + 1 if kind == "hidden" else _layers_of(kind, L, n, args.window)[0]
                    restore += N * ((n - first) * (T - t_) * f_layer + f_unembed)
        bound_flops += restore
        fast_flops += restore + (1 + N) * T * (n * f_layer) + (1 + N) * f_unembed

    # naive, on a subset of cells
    rng = random.Random(args.seed)
    t_naive, timed_cell_tokens, max_diff, n_timed = 0.0, 0, 0.0, 0
    for x, noise, tr in list(zip(inputs, noises, fast_traces))[: args.naive_facts]:
        T = x.n_tokens
        all_cells = [(k, t_, L) for k in KINDS for t_ in range(T) for L in range(n)]
        cells = rng.sample(all_cells, min(args.naive_cells, len(all_cells)))
        t = time.perf_counter()
        ref = trace_fact_naive(model, x, noise, KINDS, args.window, cells=cells)
        t_naive += time.perf_counter() - t
        timed_cell_tokens += len(cells) * T
        n_timed += len(cells)
        for k, t_, L in cells:
            max_diff = max(max_diff, abs(ref.scores[k][t_, L] - tr.scores[k][t_, L]))
    naive_est = t_naive / timed_cell_tokens * total_cell_tokens

    print(f"causal trace, {DEFAULT_MODEL}, {len(inputs)} facts, {N} noise samples, window "
          f"{args.window}, kinds {','.join(KINDS)}, {args.threads} torch thread(s)")
    print(f"cells (kind x token x layer): {total_cells}; mean prompt length "
          f"{np.mean([x.n_tokens for x in inputs]):.1f} tokens")
    print()
    print(f"{'method':<44}{'wall s':>10}{'TFLOP':>9}{'GFLOP/s':>9}")
    print(f"{'naive per-cell loop (EXTRAPOLATED, see below)':<44}{naive_est:>10.1f}"
          f"{naive_flops / 1e12:>9.2f}{naive_flops / naive_est / 1e9:>9.1f}")
    print(f"{'fast batched engine (measured, all cells)':<44}{t_fast:>10.1f}"
          f"{fast_flops / 1e12:>9.2f}{fast_flops / t_fast / 1e9:>9.1f}")
    print(f"{'arithmetic lower bound (restore work only)':<44}{'':>10}{bound_flops / 1e12:>9.2f}")
    print()
    print(f"speed-up fast vs naive: {naive_est / t_fast:.1f}x   (FLOP ratio naive/fast "
          f"{naive_flops / fast_flops:.1f}x)")
    print(f"fast vs lower bound: {fast_flops / bound_flops:.3f}x the FLOPs; at the measured "
          f"matmul peak ({peak / 1e9:.0f} GFLOP/s, [4096x{d}]@[{d}x{4 * d}]) the bound would take "
          f"{bound_flops / peak:.1f} s, i.e. fast is {t_fast / (bound_flops / peak):.1f}x off it")
    print(f"naive: {n_timed} random cells of the first {args.naive_facts} facts timed "
          f"({t_naive:.1f} s), extrapolated by cell x prompt-token to all {total_cells} cells")
    print(f"max |fast - naive| over the timed cells: {max_diff:.2e}")


if __name__ == "__main__":
    main()
