"""Make variants with known, planted changes - for tests, demos and sanity checks of probes.

``plant_change(base, out, {(layer, matrix): rel})`` adds seeded Gaussian noise to each named
matrix, scaled so that ``||dW||_F / ||W||_F`` equals ``rel`` exactly (up to float32 rounding), and
saves an ordinary checkpoint folder that loads as a spec.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .loaded import LoadedModel


@torch.no_grad()
def plant_change(model: LoadedModel, out: Path, edits: dict[tuple[int, str], float],
                 seed: int = 0) -> Path:
    """Perturb ``model`` in place by ``edits`` and save it to ``out`` (a checkpoint folder)."""
    gen = torch.Generator().manual_seed(seed)
    for (layer, matrix), rel in sorted(edits.items()):
        w = model.weight(layer, matrix)
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        noise *= rel * w.double().norm() / noise.norm()
        w.add_(noise.to(w.dtype).to(w.device))
    out = Path(out)
    model.hf.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    return out
