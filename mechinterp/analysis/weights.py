"""Weight change between checkpoints, streamed from safetensors in row chunks.

For each (layer, matrix) and variant:

* relative change ``||W_v - W_base||_F / ||W_base||_F``;
* update sparsity: the fraction of entries that changed at all (bitwise), and a histogram of
  ``|dW| / max(|W_base|, 1e-10)`` over 100 log-spaced bins from 1e-8 to 1 (:data:`SPARSITY_EDGES`).

Tensors are never loaded whole, and peak memory is a few buffers whatever the model size. Two
paths give the same numbers:

* float32 / bfloat16 / float16 tensors (and row slices of them): the fused C kernel
  (:mod:`.diffkernel`, compiled on first use) reads both files itself with ``pread`` into two
  128 KiB buffers per thread that stay in cache, and in the same pass forms the difference, the
  float64 sums of squares, the bitwise changed count and the histogram bin counts. Each tensor is
  split over ``torch.get_num_threads()`` threads, so one reads while another computes.
* everything else (float64, column slices such as GPT-2's fused ``c_attn``, no C compiler, or
  ``MECHINTERP_DIFF_KERNEL=torch``): :class:`CheckpointReader` reads row chunks of about
  :data:`CHUNK_ELEMENTS` entries (``pread`` into recycled buffers, a read-ahead thread up to two
  chunks ahead) and :func:`chunk_stats_torch` compares them with torch operations; the base chunk
  is read once for all variants.

Precision: 16-bit weights are widened to float32 (per block of 512 entries in the kernel), where
their difference is exact; float32 weights are subtracted in float32, which is exact whenever the
two entries are within a factor of two of each other (Sterbenz) - every entry a fine-tune moves by
less than 100% - and within one rounding otherwise. Sums of squares: the kernel squares and sums
in float64; the torch path forms float32 sums over blocks of 1024 entries and accumulates them in
float64 (relative error about 1e-6). Histogram bins come from a lookup table on the float32 bit
pattern of the ratio; entries near a bin edge are decided in float64, so bin counts equal a float64
``np.histogram`` with the same edges on both paths. A base and variant stored in different dtypes
(a bf16 base, float32 master-weight checkpoints) are compared in the wider dtype, to which the
narrower one converts exactly (the torch path).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig

from ..errors import CorruptCheckpoint
from ..models.naming import Family, ParamSlice, family_for, n_layers
from ..models.safetensors_io import read_header, tensor_index
from . import diffkernel

CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of about this many entries

#: Sparsity histogram edges: 100 log-spaced bins over [1e-8, 1]. Bins are half-open [e_i, e_i+1);
#: ratios below 1e-8 (unchanged entries included) and at or above 1 are counted apart.
SPARSITY_BINS = 100
SPARSITY_EDGES = np.logspace(-8.0, 0.0, SPARSITY_BINS + 1)
_DENOM_FLOOR = 1e-10

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


# ----- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TensorLoc:
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # byte offset of the tensor data in the file


@dataclass
class CheckpointReader:
    """Random access to the tensors of one checkpoint folder.

    ``get(name)`` returns a whole tensor (memory-mapped by safetensors); ``rows(name, start,
    stop)`` reads only those rows from the file into a reused buffer, which is what the streaming
    diff uses.
    """

    folder: Path

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.index = tensor_index(self.folder)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}
        self._locs: dict[str, _TensorLoc] = {}
        self._buffers: dict[int, bytearray] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}

    # whole tensors (mmap) ------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        path = self._entry(name)[0]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[path].get_tensor(name)

    # row chunks (pread) --------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self._loc(name).shape

    def rows(self, name: str, start: int, stop: int, slot: int = 0) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (dim 0), read from disk into buffer ``slot``.

        The returned tensor is a view of a buffer that the next call with the same ``slot``
        overwrites; copy it if you keep it.
        """
        loc = self._loc(name)
        row_elems = int(np.prod(loc.shape[1:])) if len(loc.shape) > 1 else 1
        itemsize = torch.empty((), dtype=loc.dtype).element_size()
        n_rows = stop - start
        nbytes = n_rows * row_elems * itemsize
        buf = self._buffers.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._buffers[slot] = bytearray(max(nbytes, 1))
        view = memoryview(buf)[:nbytes]
        fd = self._fd(loc.path)
        pos, done = loc.offset + start * row_elems * itemsize, 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise CorruptCheckpoint(f"{loc.path} ended early while reading {name}",
                                        "re-download or re-save the checkpoint")
            done += got
        flat = torch.frombuffer(buf, dtype=loc.dtype, count=n_rows * row_elems) if nbytes \
            else torch.empty(0, dtype=loc.dtype)
        return flat.view(n_rows, *loc.shape[1:])

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # internals -----------------------------------------------------------------------------
    def _entry(self, name: str):
        if name not in self.index:
            raise CorruptCheckpoint(f"{self.folder} has no tensor {name}",
                                    "is it the same architecture as the base?")
        return self.index[name]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _loc(self, name: str) -> _TensorLoc:
        if name not in self._locs:
            path, shape, dtype = self._entry(name)
            if dtype not in _DTYPES:
                raise CorruptCheckpoint(f"{path}: tensor {name} has unsupported dtype {dtype}",
                                        "save the checkpoint in float32, bfloat16 or float16")
            if path not in self._headers:
                with open(path, "rb") as fh:
                    header_len = int.from_bytes(fh.read(8), "little")
                self._headers[path] = (8 + header_len, read_header(path))
            data_start, header = self._headers[path]
            start = data_start + header[name]["data_offsets"][0]
            self._locs[name] = _TensorLoc(path, tuple(shape), _DTYPES[dtype], start)
        return self._locs[name]


def load_config(folder: Path):
    return AutoConfig.from_pretrained(str(folder))


# ----- per-tensor statistics -------------------------------------------------------------------
@dataclass
class DiffStats:
    """Sufficient statistics of ``variant - base`` over some entries; ``+`` merges them."""

    sq_diff: float = 0.0  # sum (v - b)^2, float64
    sq_base: float = 0.0  # sum b^2, float64
    n_changed: int = 0  # entries whose bits differ
    n_total: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(SPARSITY_BINS, np.int64))
    n_below: int = 0  # ratio < 1e-8 (unchanged entries included)
    n_above: int = 0  # ratio >= 1, or not finite

    @property
    def relative(self) -> float:
        return float(np.sqrt(self.sq_diff) / np.sqrt(self.sq_base)) if self.sq_base > 0 \
            else float("nan")

    @property
    def changed_fraction(self) -> float:
        return self.n_changed / self.n_total if self.n_total else float("nan")

    def __add__(self, other: DiffStats) -> DiffStats:
        return DiffStats(self.sq_diff + other.sq_diff, self.sq_base + other.sq_base,
                         self.n_changed + other.n_changed, self.n_total + other.n_total,
                         self.hist + other.hist, self.n_below + other.n_below,
                         self.n_above + other.n_above)


_EDGES_T = torch.from_numpy(SPARSITY_EDGES)


_LUT_SHIFT = 12  # float32 bit pattern >> 12: table cells of 2^-11 relative width


@functools.cache
def _bin_table() -> torch.Tensor:
    """Bin (0 below, 1..100, 101 above) per cell of float32 bit patterns, -1 where undecided.

    Positive float32 values are ordered like their bit patterns, so ``bits >> 12`` groups them in
    cells of 2^-11 relative width. A cell gets a bin when its whole range falls in one bin; cells
    holding an edge, and their neighbours (a float32 ratio may sit one ulp from the true one), are
    marked -1 and decided exactly in float64.
    """
    n = 1 << (32 - _LUT_SHIFT)
    keys = torch.arange(n, dtype=torch.int64)
    lo = (keys << _LUT_SHIFT).to(torch.int32).view(torch.float32).double()
    hi = (((keys + 1) << _LUT_SHIFT) - 1).to(torch.int32).view(torch.float32).double()
    b_lo = torch.bucketize(lo, _EDGES_T, right=True)
    b_hi = torch.bucketize(hi, _EDGES_T, right=True)
    undecided = b_lo != b_hi
    undecided |= torch.roll(undecided, 1) | torch.roll(undecided, -1)
    table = torch.where(undecided, torch.full_like(b_lo, -1), b_lo)
    exponent = (keys >> (23 - _LUT_SHIFT)) & 0xFF
    table[exponent == 0xFF] = SPARSITY_BINS + 1  # inf / NaN ratios count as above
    return table.to(torch.int16)


def _bin_ratios(d: torch.Tensor, b: torch.Tensor, finite: bool) -> torch.Tensor:
    """Bin index per entry of ``|d| / max(|b|, 1e-10)``: 0 below 1e-8, 1..100 the bins, 101 above.

    ``finite``: no NaN/inf in ``d`` and ``b``; otherwise NaN ratios (inf/inf gives a NaN with the
    sign bit set) are made positive first so that every bit pattern indexes the table.
    """
    ratio = d.abs().div_(b.abs().clamp_min_(_DENOM_FLOOR))
    if ratio.dtype != torch.float32:
        ratio = ratio.float()
    if not finite:
        ratio.abs_()
    idx = _bin_table().index_select(0, ratio.view(torch.int32).bitwise_right_shift_(_LUT_SHIFT))
    undecided = (idx < 0).nonzero().squeeze(1)
    if undecided.numel():
        # exact decision in float64 against the float64 edges (np.histogram semantics)
        d64 = d.index_select(0, undecided).to(torch.float64)
        b64 = b.index_select(0, undecided).to(torch.float64)
        r64 = d64.abs() / b64.abs().clamp_min(_DENOM_FLOOR)
        exact = torch.bucketize(r64, _EDGES_T, right=True)
        exact[~torch.isfinite(r64)] = SPARSITY_BINS + 1
        idx[undecided] = exact.to(idx.dtype)
    return idx


_SQ_BLOCK = 1024


def _sum_squares(x: torch.Tensor) -> float:
    """Sum of squares of a flat tensor: per-block dot products, summed in float64."""
    m = x.numel() // _SQ_BLOCK * _SQ_BLOCK
    total = 0.0
    if m:
        blocks = x[:m].view(-1, _SQ_BLOCK)
        total += float(torch.einsum("ij,ij->i", blocks, blocks).sum(dtype=torch.float64))
    if m < x.numel():
        total += float(x[m:].double().square().sum())
    return total


def _widen(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def chunk_stats(b: torch.Tensor, v: torch.Tensor, sparsity: bool = True,
                base_prepared: tuple[torch.Tensor, float] | None = None) -> DiffStats:
    """Statistics of ``v - b`` for two same-shaped chunks of any float dtype.

    float32 / bfloat16 / float16 chunks go through the fused C kernel (:mod:`.diffkernel`: one
    read of both chunks, split over the cores) when it is available; float64 chunks, or machines
    without a C compiler, take the torch path (:func:`chunk_stats_torch`), which gives the same
    changed and bin counts. ``base_prepared``: see :func:`chunk_stats_torch` (the kernel path
    does not need it).
    """
    b = b.reshape(-1)
    v = v.reshape(-1)
    if b.dtype != v.dtype or not diffkernel.available(b.dtype):  # the torch path widens a mix
        return chunk_stats_torch(b, v, sparsity, base_prepared if b.dtype == v.dtype else None)
    sq_diff, sq_base, n_changed, counts = diffkernel.fused_chunk_stats(
        b.contiguous(), v.contiguous(), SPARSITY_EDGES, sparsity)
    stats = DiffStats(sq_diff=sq_diff, sq_base=sq_base, n_changed=n_changed, n_total=b.numel())
    if counts is not None:
        stats.n_below, stats.n_above = int(counts[0]), int(counts[-1])
        stats.hist = counts[1:-1].astype(np.int64)
    return stats


def chunk_stats_torch(b: torch.Tensor, v: torch.Tensor, sparsity: bool = True,
                      base_prepared: tuple[torch.Tensor, float] | None = None) -> DiffStats:
    """:func:`chunk_stats` with torch operations only (several passes over the chunk).

    ``base_prepared``: ``(_widen(b), sum of squares of b)`` when the caller compares one base
    chunk with several variants (computed once instead of per variant).
    """
    b = b.reshape(-1)
    v = v.reshape(-1)
    if b.dtype != v.dtype:  # e.g. a bf16 base against float32 (master-weight) checkpoints:
        wide = torch.promote_types(b.dtype, v.dtype)  # compare in the wider dtype, exact for both
        b, v = b.to(wide), v.to(wide)
    ints = _INT_VIEW[b.element_size()]
    changed = v.view(ints) != b.view(ints)
    n_changed = int(torch.count_nonzero(changed))
    bw, sq_base = base_prepared if base_prepared is not None else (_widen(b), None)
    d = _widen(v) - bw
    stats = DiffStats(
        sq_diff=_sum_squares(d), sq_base=_sum_squares(bw) if sq_base is None else sq_base,
        n_changed=n_changed, n_total=b.numel())
    if sparsity:
        finite = bool(np.isfinite(stats.sq_diff) and np.isfinite(stats.sq_base))
        n_same = 0
        if finite and n_changed < b.numel() // 2:
            # sparse update: bitwise-equal entries have ratio 0 (below); bin only the others
            keep = changed.nonzero().squeeze(1)
            d, bw, n_same = d.index_select(0, keep), bw.index_select(0, keep), b.numel() - n_changed
        counts = torch.bincount(_bin_ratios(d, bw, finite), minlength=SPARSITY_BINS + 2).numpy()
        counts[0] += n_same
        stats.n_below, stats.n_above = int(counts[0]), int(counts[-1])
        stats.hist = counts[1:-1].astype(np.int64)
    return stats


def _row_chunks(t: torch.Tensor):
    rows = max(1, CHUNK_ELEMENTS // max(1, t[0].numel() if t.ndim > 1 else 1))
    for i in range(0, t.shape[0], rows):
        yield slice(i, i + rows)


def tensor_stats(base: torch.Tensor, variant: torch.Tensor, sparsity: bool = True) -> DiffStats:
    """:class:`DiffStats` of two in-memory tensors, chunked over rows."""
    if base.shape != variant.shape:
        raise CorruptCheckpoint(f"shape mismatch: base {tuple(base.shape)}, variant "
                                f"{tuple(variant.shape)}", "compare the same architecture")
    total = DiffStats()
    for sl in _row_chunks(base):
        total = total + chunk_stats(base[sl], variant[sl], sparsity)
    return total


def relative_change(base: torch.Tensor, variant: torch.Tensor) -> float:
    """``||variant - base||_F / ||base||_F`` (float64 sums), chunked over rows."""
    return tensor_stats(base, variant, sparsity=False).relative


def _slice_chunks(reader: CheckpointReader, ref: ParamSlice) -> Iterator[tuple[int, int]]:
    """Row ranges (of the stored tensor) covering ``ref``, about CHUNK_ELEMENTS entries each."""
    shape = reader.shape(ref.name)
    lo, hi = 0, shape[0]
    if ref.dim == 0:
        lo, hi = ref.start, ref.stop or shape[0]
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // max(1, row))
    for i in range(lo, hi, step):
        yield i, min(hi, i + step)


def _take_rows(ref: ParamSlice, chunk: torch.Tensor) -> torch.Tensor:
    return chunk if ref.dim in (None, 0) else ref.take(chunk)


_READ_AHEAD_SLOTS = 3  # buffer sets per reader: one being compared, up to two read ahead


def _check_shapes(base: CheckpointReader, variants: dict[str, CheckpointReader],
                  refs: list[ParamSlice]) -> None:
    for ref in refs:
        b_shape = base.shape(ref.name)
        for name, r in variants.items():
            if r.shape(ref.name) != b_shape:
                raise CorruptCheckpoint(f"{ref.name} has shape {r.shape(ref.name)} in {name} but "
                                        f"{b_shape} in the base", "compare the same architecture")


def _read_ahead(base: CheckpointReader, variants: dict[str, CheckpointReader],
                jobs: list[tuple[int, ParamSlice, int, int]]
                ) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
    """``(job index, base rows, {variant: rows})`` per job ``(ref index, ref, start, stop)``.

    A background thread reads the rows (``pread`` drops the GIL) up to two jobs ahead of the
    caller into :data:`_READ_AHEAD_SLOTS` recycled buffer sets, so reading overlaps comparing and
    memory stays a few chunks. A yielded chunk is valid until the next one is asked for. Close the
    generator (``contextlib.closing``) to stop the thread early.
    """
    free: queue.Queue[int] = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for k in range(_READ_AHEAD_SLOTS):
        free.put(k)
    stopping = threading.Event()

    def read() -> None:
        try:
            for i, (_, ref, start, stop) in enumerate(jobs):
                slot = free.get()
                if stopping.is_set():
                    return
                b = _take_rows(ref, base.rows(ref.name, start, stop, slot=slot))
                vs = {n: _take_rows(ref, r.rows(ref.name, start, stop, slot=slot))
                      for n, r in variants.items()}
                ready.put((i, slot, b, vs))
            ready.put(None)
        except BaseException as exc:  # handed to the caller, raised there
            ready.put(exc)

    thread = threading.Thread(target=read, name="weights-read-ahead", daemon=True)
    thread.start()
    done_slot = None
    try:
        while True:
            if done_slot is not None:
                free.put(done_slot)
                done_slot = None
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            i, done_slot, b, vs = item
            yield i, b, vs
    finally:
        stopping.set()
        free.put(-1)
        thread.join()


def _file_kernel_ok(base: CheckpointReader, variants: dict[str, CheckpointReader],
                    ref: ParamSlice) -> bool:
    """Whether ``ref`` is a contiguous byte range of the files that the fused kernel can read."""
    dtype = base._loc(ref.name).dtype
    return ref.dim in (None, 0) and diffkernel.available(dtype) and all(
        r._loc(ref.name).dtype == dtype for r in variants.values())


def _file_stats(base: CheckpointReader, variant: CheckpointReader, ref: ParamSlice,
                sparsity: bool) -> DiffStats:
    """:class:`DiffStats` of one row range, read and compared by the fused kernel's threads."""
    b_loc, v_loc = base._loc(ref.name), variant._loc(ref.name)
    shape = b_loc.shape
    lo, hi = (ref.start, ref.stop or shape[0]) if ref.dim == 0 else (0, shape[0])
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    skip = lo * row * torch.empty((), dtype=b_loc.dtype).element_size()
    try:
        sq_diff, sq_base, n_changed, counts = diffkernel.fused_file_stats(
            b_loc.dtype, (b_loc.path, b_loc.offset + skip), (v_loc.path, v_loc.offset + skip),
            (hi - lo) * row, SPARSITY_EDGES, sparsity)
    except (OSError, EOFError) as exc:
        raise CorruptCheckpoint(f"reading {ref.name} failed: {exc}",
                                "re-download or re-save the checkpoint") from None
    stats = DiffStats(sq_diff=sq_diff, sq_base=sq_base, n_changed=n_changed,
                      n_total=(hi - lo) * row)
    if counts is not None:
        stats.n_below, stats.n_above = int(counts[0]), int(counts[-1])
        stats.hist = counts[1:-1].astype(np.int64)
    return stats


def _diff_refs(base: CheckpointReader, variants: dict[str, CheckpointReader],
               refs: list[ParamSlice], sparsity: bool,
               progress: Callable[[], None] | None = None) -> list[dict[str, DiffStats]]:
    """Stats of every (sliced) parameter in ``refs`` for every variant, reads overlapped.

    Row ranges of float32/16-bit tensors go to the fused kernel, which reads the files itself;
    the rest (float64, column slices such as GPT-2's fused ``c_attn``, machines without a C
    compiler) are read in chunks by :func:`_read_ahead` and compared by :func:`chunk_stats`.
    """
    _check_shapes(base, variants, refs)
    out = [{name: DiffStats() for name in variants} for _ in refs]
    direct = [_file_kernel_ok(base, variants, ref) for ref in refs]
    for k, ref in enumerate(refs):
        if direct[k]:
            for name, r in variants.items():
                out[k][name] = _file_stats(base, r, ref, sparsity)
            if progress is not None:
                progress()
    jobs = [(k, ref, start, stop) for k, ref in enumerate(refs) if not direct[k]
            for start, stop in _slice_chunks(base, ref)]
    last_job = {k: i for i, (k, *_) in enumerate(jobs)}
    with closing(_read_ahead(base, variants, jobs)) as chunks:
        for i, b, vs in chunks:
            k = jobs[i][0]
            prepared = None
            if not diffkernel.available(b.dtype):
                bw = _widen(b)
                prepared = (bw, _sum_squares(bw))
            for name, v in vs.items():
                out[k][name] = out[k][name] + chunk_stats(b, v, sparsity, prepared)
            if progress is not None and last_job[k] == i:
                progress()
    return out


# ----- whole checkpoints -----------------------------------------------------------------------
def matrix_refs(family: Family, config) -> list[tuple[int, str, ParamSlice]]:
    return [(layer, m, family.param(layer, m, config))
            for layer in range(n_layers(config)) for m in family.matrices]


@dataclass
class WeightDiff:
    """Per variant, matrix and layer :class:`DiffStats` of a streamed comparison."""

    matrices: list[str]
    n_layers: int
    stats: dict[str, dict[str, list[DiffStats]]]  # [variant][matrix][layer]

    def relative(self) -> dict[str, dict[str, list[float]]]:
        return {v: {m: [s.relative for s in per] for m, per in mats.items()}
                for v, mats in self.stats.items()}

    def by_matrix(self, variant: str, matrix: str) -> DiffStats:
        """Stats of one matrix kind summed over layers."""
        total = DiffStats()
        for s in self.stats[variant][matrix]:
            total = total + s
        return total


def weight_diff(base_folder: Path, variant_folders: dict[str, Path], sparsity: bool = True,
                progress: Callable[[], None] | None = None) -> WeightDiff:
    """Stream every (layer, matrix) of the base against each variant."""
    config = load_config(base_folder)
    family = family_for(config)
    refs = matrix_refs(family, config)
    L = n_layers(config)
    stats = {n: {m: [DiffStats()] * L for m in family.matrices} for n in variant_folders}
    with ExitStack() as stack:
        base = stack.enter_context(CheckpointReader(Path(base_folder)))
        readers = {n: stack.enter_context(CheckpointReader(Path(f)))
                   for n, f in variant_folders.items()}
        per_ref = _diff_refs(base, readers, [ref for _, _, ref in refs], sparsity, progress)
        for (layer, matrix, _), got in zip(refs, per_ref, strict=True):
            for name, st in got.items():
                stats[name][matrix][layer] = st
    return WeightDiff(list(family.matrices), L, stats)


def weight_change(base_folder: Path, variant_folders: dict[str, Path],
                  progress=None) -> tuple[list[str], int, dict[str, dict[str, list[float]]]]:
    """Relative change per variant, matrix and layer: ``out[variant][matrix][layer]``."""
    diff = weight_diff(base_folder, variant_folders, sparsity=False, progress=progress)
    return diff.matrices, diff.n_layers, diff.relative()


@torch.no_grad()
def live_weight_change(base_folder: Path, model: torch.nn.Module, family: Family,
                       config, dtypes: set | None = None) -> dict[str, list[float]]:
    """Relative change of an in-memory ``model`` (training's live weights) from the checkpoint in
    ``base_folder``, per matrix and layer: ``out[matrix][layer]`` (:func:`relative_change`). A base
    stored in another dtype is compared in the wider of the two; ``dtypes`` (when given) collects
    the ``(base dtype, live dtype)`` pairs that met."""
    out = {m: [float("nan")] * n_layers(config) for m in family.matrices}
    with CheckpointReader(Path(base_folder)) as reader:
        for layer, m, ref in matrix_refs(family, config):
            live = ref.take(model.get_parameter(ref.name).detach()).cpu()
            base = ref.take(reader.get(ref.name))
            if dtypes is not None:
                dtypes.add((base.dtype, live.dtype))
            out[m][layer] = relative_change(base, live)
    return out
