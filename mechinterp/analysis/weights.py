"""Weight change between checkpoints, streamed from safetensors one tensor at a time.

For each (layer, matrix): ``||W_variant - W_base||_F / ||W_base||_F`` accumulated in float64 over
row chunks, so peak memory is about one tensor per checkpoint (memory-mapped), never a whole model.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.naming import Family, ParamSlice, family_for, n_layers
from ..models.safetensors_io import tensor_index

CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of about this many entries


@dataclass
class CheckpointReader:
    """Random access to the tensors of one checkpoint folder (files opened lazily, mmap)."""

    folder: Path

    def __post_init__(self):
        self.index = tensor_index(self.folder)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.index[name][0]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


def load_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def _row_chunks(t: torch.Tensor):
    rows = max(1, CHUNK_ELEMENTS // max(1, t[0].numel() if t.ndim > 1 else 1))
    for i in range(0, t.shape[0], rows):
        yield slice(i, i + rows)


def relative_change(base: torch.Tensor, variant: torch.Tensor) -> float:
    """``||variant - base||_F / ||base||_F`` in float64, chunked over rows."""
    num = 0.0
    den = 0.0
    for sl in _row_chunks(base):
        b = base[sl].to(torch.float64)
        v = variant[sl].to(torch.float64)
        num += float(((v - b) ** 2).sum())
        den += float((b**2).sum())
    return float(np.sqrt(num) / np.sqrt(den)) if den > 0 else float("nan")


def matrix_refs(family: Family, config) -> list[tuple[int, str, ParamSlice]]:
    return [(layer, m, family.param(layer, m, config))
            for layer in range(n_layers(config)) for m in family.matrices]


def weight_change(base_folder: Path, variant_folders: dict[str, Path],
                  progress=None) -> tuple[list[str], int, dict[str, dict[str, list[float]]]]:
    """Relative change per variant, matrix and layer: ``out[variant][matrix][layer]``.

    The base tensor is read once per matrix and compared with every variant.
    """
    config = load_config(base_folder)
    family = family_for(config)
    refs = matrix_refs(family, config)
    base = CheckpointReader(Path(base_folder))
    readers = {n: CheckpointReader(Path(f)) for n, f in variant_folders.items()}
    L = n_layers(config)
    out = {n: {m: [float("nan")] * L for m in family.matrices} for n in readers}
    try:
        for layer, matrix, ref in refs:
            b = ref.take(base.get(ref.name))
            for name, reader in readers.items():
                out[name][matrix][layer] = relative_change(b, ref.take(reader.get(ref.name)))
            if progress is not None:
                progress()
    finally:
        base.close()
        for r in readers.values():
            r.close()
    return list(family.matrices), L, out

