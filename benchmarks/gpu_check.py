"""Check the numerics of the GPU paths in minutes: bf16 on CUDA (default) or float32 on the CPU.

    python benchmarks/gpu_check.py                                   # --device auto --dtype auto
    python benchmarks/gpu_check.py --device cuda --dtype bfloat16
    python benchmarks/gpu_check.py --device cpu --dtype float32      # the CPU reference run

On the default model (or ``--model SPEC``) it measures, and prints as one table with the
tolerance each must meet:

1. **view parity**: last-position log-probs of the Hugging Face module, the TransformerLens
   bridge and the nnsight view over the same weights, on the tokens that matter (probability
   above 1e-3 under HF). The float64 error of HF itself (same weights in float64 on the CPU) is
   measured too: in low precision the bridge may differ from HF by at most that much (a view is
   no worse than HF itself), and nnsight, which runs the HF module, by at most 1e-4;
2. **KL in float32**: teacher-forced KL(base || variant) per item (the suite's path: the model's
   final hidden states through the output layer and log-softmax in float32) against float64 on
   the same hidden states, within 1e-5 nats (float32 rounding at the logits' scale); the variant
   is the base with a planted 5% change in four layers. For contrast (not a check) the error of a
   log-softmax over the model-dtype logits;
3. **causal tracing equals the naive loop**: the fast batched engine against one full forward per
   (kind, token, layer) cell, on a random subset of cells of one fact;
4. **device map**: the model placed by accelerate (``device_map="auto"`` with ``max_memory``
   halving the room: split over two GPUs when there are two, half offloaded to the CPU on one GPU,
   CPU + disk on a CPU-only machine) gives the one-device logits, clean and patched.

Exit status 1 when a check fails. Tolerances: float32 runs must agree to round-off (1e-5..1e-4);
bf16 runs within the stated multiples of bf16's resolution (2^-8 relative), see each row.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

FACT = ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Paris")
PROMPTS = ["The capital of France is", "The Eiffel Tower is located in the city of",
           "Water boils at a temperature of"]
ITEMS = [("What is 7 + 5?", "7 + 5 = 12. The answer is 12."),
         ("Name the largest planet.", "The largest planet in the solar system is Jupiter."),
         ("What is the opposite of hot?", "The opposite of hot is cold.")]


@dataclass
class Row:
    check: str
    measured: float
    tolerance: float | None  # None: information only
    note: str = ""

    @property
    def ok(self) -> bool | None:
        if self.tolerance is None:
            return None
        return bool(np.isfinite(self.measured)) and self.measured <= self.tolerance


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().double().cpu().log_softmax(-1)


def view_parity(model, ref64, low_precision: bool) -> list[Row]:
    tok = model.tokenizer
    errs = {"bridge": 0.0, "nnsight": 0.0, "hf_vs_f64": 0.0, "kl_floor": 0.0}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            hf = _logprobs(model.hf(ids.to(model.device)).logits[0, -1])
            tl = _logprobs(model.bridge(ids.to(model.device), return_type="logits")[0, -1])
            ref = _logprobs(ref64.hf(ids).logits[0, -1])
        with model.lm.trace(ids.to(model.device)):
            out = model.lm.output.save()
        nn = _logprobs(out.logits[0, -1])
        keep = hf.exp() > 1e-3
        errs["bridge"] = max(errs["bridge"], float((tl - hf)[keep].abs().max()))
        errs["nnsight"] = max(errs["nnsight"], float((nn - hf)[keep].abs().max()))
        errs["hf_vs_f64"] = max(errs["hf_vs_f64"], float((hf - ref)[keep].abs().max()))
        errs["kl_floor"] = max(errs["kl_floor"], float((ref.exp() * (ref - hf)).sum()))
    bridge_tol = max(1e-4, errs["hf_vs_f64"]) if low_precision else 1e-4
    return [
        Row("HF vs float64 reference: max |dlogp|, p>1e-3", errs["hf_vs_f64"],
            None if low_precision else 1e-4,
            "the precision of the run itself" if low_precision else "float32 round-off"),
        Row("  KL(float64 || this run), last position, max", errs["kl_floor"], None,
            "the noise floor of any KL measured at this precision"),
        Row("bridge vs HF: max |dlogp|, p>1e-3", errs["bridge"], bridge_tol,
            "at most HF's own error" if low_precision else "float32 round-off"),
        Row("nnsight vs HF: max |dlogp|, p>1e-3", errs["nnsight"], 1e-4, "the same module"),
    ]


def kl_float32(base, variant) -> list[Row]:
    """Per item, the suite's float32 KL against float64 from the same final hidden states."""
    from mechinterp.analysis.divergence import teacher_forced_kl
    from mechinterp.evals.answers import answer_items
    from mechinterp.models.unembed import final_hidden

    items = answer_items(base.tokenizer, ITEMS)
    suite = teacher_forced_kl(base, variant, items, batch_size=len(ITEMS))
    ref, low = [], []
    with torch.no_grad():
        for _, ids, attn, pred in items.batches(len(ITEMS)):
            lp64, lp_low = [], []
            for m in (base, variant):
                h = final_hidden(m.hf, ids.to(m.device), attn.to(m.device), use_cache=False)
                h = h[pred.to(h.device)].double().cpu()
                w = m.hf.get_output_embeddings().weight.detach().double().cpu()
                logits = h @ w.T
                lp64.append(logits.log_softmax(-1))
                lp_low.append(logits.to(m.dtype).float().log_softmax(-1).double())
            row_item = pred.nonzero()[:, 0]
            for pair, out in ((lp64, ref), (lp_low, low)):
                p = pair[0].exp()
                per_pos = torch.where(p == 0, 0.0, p * (pair[0] - pair[1])).sum(-1)
                sums = torch.zeros(len(ITEMS), dtype=torch.float64).index_add_(0, row_item,
                                                                                per_pos)
                out.extend((sums / torch.bincount(row_item, minlength=len(ITEMS))).tolist())
    ref_t, suite_t = torch.tensor(ref), suite.double()
    err = (suite_t - ref_t).abs()
    rel = float((err / ref_t.abs().clamp_min(1e-12)).max())
    # float32 log-probs carry an absolute rounding error of about eps32 x |logit| (1.2e-7 x ~30
    # = 4e-6 per entry at worst); a KL, a p-weighted mean of their differences, within 1e-5 nats
    rows = [Row("KL float32 path vs float64: max |dKL| (nats)", float(err.max()), 1e-5,
                f"relative {rel:.1e}; KL per item {', '.join(f'{k:.4g}' for k in ref)}")]
    if base.dtype != torch.float32:
        low_err = float((torch.tensor(low) - ref_t).abs().max())
        rows.append(Row(f"  (contrast) log-softmax of {str(base.dtype)[6:]} logits: same",
                        low_err, None, "why the suite unembeds in float32"))
    return rows


def tracing_vs_naive(model, samples: int, n_cells: int, low_precision: bool) -> list[Row]:
    from mechinterp.analysis.tracing import (
        KINDS,
        embedding_std,
        make_noise,
        prepare_fact,
        trace_fact,
        trace_fact_naive,
    )

    fact = prepare_fact(model.tokenizer, *FACT, "gpu-check")
    d = model.hf.get_input_embeddings().weight.shape[1]
    noise = make_noise(fact, samples, 3 * embedding_std(model, [fact]), d, seed=0)
    t0 = time.perf_counter()
    fast = trace_fact(model, fact, noise, KINDS, window=10)
    t_fast = time.perf_counter() - t0
    cells = [(k, t, L) for k in KINDS for t in range(fact.subject[0], fact.n_tokens)
             for L in range(model.n_layers)]
    cells = random.Random(0).sample(cells, min(n_cells, len(cells)))
    t0 = time.perf_counter()
    naive = trace_fact_naive(model, fact, noise, KINDS, window=10, cells=cells)
    t_naive = time.perf_counter() - t0
    diff = max(abs(fast.scores[k][t, L] - naive.scores[k][t, L]) for k, t, L in cells)
    spread = max(float(np.ptp([naive.scores[k][t, L] for k, t, L in cells])), 0.0)
    # bf16: a probability computed through 30 layers in two batch shapes; 2^-8 relative per op
    tol = 2e-2 if low_precision else 1e-5
    return [
        Row("tracing fast vs naive: max |dp| over cells", diff, tol,
            f"{len(cells)} cells; spread of p over them {spread:.3g}; fast {t_fast:.1f} s for "
            f"all {len(KINDS) * (fact.n_tokens - fact.subject[0]) * model.n_layers}, naive "
            f"{t_naive:.1f} s for these"),
        Row("tracing clean/corrupted p: max |d|",
            max(abs(fast.clean_prob - naive.clean_prob),
                abs(fast.corrupted_prob - naive.corrupted_prob)), tol,
            f"clean {fast.clean_prob:.4f}, corrupted {fast.corrupted_prob:.4f}"),
    ]


def device_map_parity(model, spec: str, low_precision: bool) -> list[Row]:
    from mechinterp.analysis.patching import Patch, capture, model_logits, run_patched
    from mechinterp.models import load

    n_bytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    half = n_bytes // 2
    if model.device.type == "cuda" and torch.cuda.device_count() >= 2:
        max_memory, where = {0: half, 1: 2 * n_bytes}, "cuda:0 + cuda:1"
    elif model.device.type == "cuda":
        max_memory, where = {0: half, "cpu": 4 * n_bytes}, "cuda:0 + CPU offload"
    else:
        max_memory, where = {"cpu": half}, "CPU + disk offload"
    placed = load(spec, device=str(model.device), dtype=model.dtype, device_map="auto",
                  max_memory=max_memory, name="placed")
    try:
        tok = model.tokenizer
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        ids, mask = enc.input_ids.to(model.device), enc.attention_mask.to(model.device)
        mid = model.n_layers // 2
        _, acts = capture(model, ids, mask, [("resid_post", mid)])
        patch = [Patch("mlp_out", mid, acts[("resid_post", mid)] * 0.5)]
        with torch.no_grad():
            clean = model_logits(placed, ids, mask).cpu() - model_logits(model, ids, mask).cpu()
        patched = (run_patched(placed, ids, mask, patch).cpu()
                   - run_patched(model, ids, mask, patch).cpu())
        devices = sorted(set(placed.placement.values()))
    finally:
        placed.free()
    tol = 1e-1 if low_precision else 1e-5
    note = f"{where}: {', '.join(devices)}"
    return [Row("device map vs one device: max |dlogit|", float(clean.abs().max()), tol, note),
            Row("  same, with a patch at a mid layer", float(patched.abs().max()), tol,
                "patch moved to the hooked layer's device")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the built-in model)")
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N, cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), bfloat16, float32")
    ap.add_argument("--samples", type=int, default=3, help="noise samples of the traced fact")
    ap.add_argument("--cells", type=int, default=12, help="naive tracing cells compared")
    ap.add_argument("--skip", default="", help="comma-separated: views,kl,tracing,device-map")
    args = ap.parse_args()

    from mechinterp.models import DEFAULT_MODEL, load
    from mechinterp.models.edit import plant_change

    spec = args.model or DEFAULT_MODEL
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t_start = time.perf_counter()
    model = load(spec, device=args.device, dtype=args.dtype, name="base")
    low = model.dtype in (torch.bfloat16, torch.float16)
    card = (torch.cuda.get_device_name(model.device) if model.device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} torch threads)")
    from importlib.metadata import version

    versions = {name: version(name) for name in ("transformers", "accelerate")}
    print(f"gpu_check: {spec} on {model.device} [{card}], {str(model.dtype)[6:]}; torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}, transformers "
          f"{versions.get('transformers')}, accelerate {versions.get('accelerate')}")
    rows: list[Row] = []
    if "views" not in skip:
        ref64 = load(spec, device="cpu", dtype="float64", name="float64")
        rows += view_parity(model, ref64, low)
        ref64.free()
    if "kl" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            donor = load(spec, device="cpu", dtype="float32")
            n = donor.n_layers
            edits = {(layer, m): 0.05 for layer in (n // 4, n // 2, 3 * n // 4, n - 1)
                     for m in ("q", donor.matrices[-1])}
            folder = plant_change(donor, f"{tmp}/variant", edits, seed=1)
            donor.free()
            variant = load(str(folder), device=args.device, dtype=args.dtype, name="variant")
            rows += kl_float32(model, variant)
            variant.free()
    if "tracing" not in skip:
        rows += tracing_vs_naive(model, args.samples, args.cells, low)
    if "device-map" not in skip:
        rows += device_map_parity(model, spec, low)

    width = max(len(r.check) for r in rows) + 2
    print(f"\n{'check':<{width}}{'measured':>12}{'tolerance':>12}  result  note")
    for r in rows:
        tol = "-" if r.tolerance is None else f"{r.tolerance:.1e}"
        verdict = {None: "info", True: "ok", False: "FAIL"}[r.ok]
        print(f"{r.check:<{width}}{r.measured:>12.3e}{tol:>12}  {verdict:<6}  {r.note}")
    failed = [r for r in rows if r.ok is False]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows ok or info, {len(failed)} failed; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
