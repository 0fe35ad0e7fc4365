"""How many weight updates bf16-only AdamW would round away: for each matrix entry of a checkpoint,
is an Adam step of size ``lr`` below half a bf16 step at that weight?

bf16 keeps 8 significant bits, so at ``w`` (rounded to bf16) the spacing is ``2**(floor(log2|w|) - 7)``
and ``w + d`` rounds back to ``w`` when ``|d| < 2**(floor(log2|w|) - 8)``. Adam's first step moves
every entry with a non-negligible gradient by exactly ``lr``; later steps are of that order. The
fraction printed is what AdamW on bf16 weights could not move in one step - why ``train`` keeps
float32 master weights under bf16 autocast (docs/training.md, Precision).

    python benchmarks/bf16_roundaway.py [SPEC] [--lr 1e-6 --lr 1e-5 ...]
"""

from __future__ import annotations

import argparse

import torch

from mechinterp.models import DEFAULT_MODEL, resolve
from mechinterp.models.safetensors_io import iter_tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--lr", type=float, action="append")
    args = ap.parse_args()
    lrs = args.lr or [1e-6, 1e-5, 2e-5]
    folder = resolve(args.spec).path
    total, n_mats, lost = 0, 0, dict.fromkeys(lrs, 0)
    for _, t in iter_tensors(folder):
        if t.ndim != 2:
            continue
        w = t.to(torch.bfloat16).float().abs().flatten()
        nz = w > 0
        half = torch.zeros_like(w)  # zero weights: any step survives
        half[nz] = torch.exp2(torch.floor(torch.log2(w[nz])) - 8)
        total += w.numel()
        n_mats += 1
        for lr in lrs:
            lost[lr] += int((lr < half).sum())
    print(f"{args.spec}: {n_mats} matrices, {total:,} entries")
    for lr in lrs:
        print(f"  lr {lr:g}: {100 * lost[lr] / total:.2f}% of entries: an Adam step rounds away in bf16")


if __name__ == "__main__":
    main()
