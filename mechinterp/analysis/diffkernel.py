"""The fused weight-diff kernel (``diffkernel.c``): compiled on first use, called through ctypes.

:func:`fused_chunk_stats` computes, in one read of a (base, variant) chunk, what
``weights.chunk_stats`` computes with several torch passes: the float64 sums of squares, the bitwise
changed count and the sparsity bin counts. It runs the chunk in parts on a small thread pool (ctypes
drops the GIL during the call), so every core works on big chunks.

The C source is compiled once per source version and CPU (``cc -O3 -march=native``) into
``<cache_dir>/kernels/``. Without a C compiler, or with ``MECHINTERP_DIFF_KERNEL=torch``, the
callers fall back to the torch path in ``weights.py`` (same numbers, several times slower);
:func:`kernel_status` says which path is in use and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..paths import cache_dir

_SOURCE = Path(__file__).with_name("diffkernel.c")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11", "-fno-strict-aliasing"]
_FUNCS = {torch.float32: "diff_f32", torch.bfloat16: "diff_bf16", torch.float16: "diff_f16"}
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
N_COUNTS = 102  # below, 100 bins, above
LUT_SHIFT = 13  # table cell = positive float32 bit pattern >> 13 (2^-10 relative width); as in C
MARGIN_ULPS = 2  # a float32 ratio is within half an ulp of the exact one; 2 ulps leave room
MIN_PART = 1 << 18  # entries per thread below which splitting a chunk costs more than it saves

_why_not: str | None = None


def _cpu_tag() -> str:
    """What ``-march=native`` depends on: the CPU model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "\n".join(lines)


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _why_not
    if os.environ.get("MECHINTERP_DIFF_KERNEL", "").lower() == "torch":
        _why_not = "MECHINTERP_DIFF_KERNEL=torch"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _why_not = "no C compiler (cc) on PATH"
        return None
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_tag().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"diffkernel-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                os.unlink(tmp)
                _why_not = f"{cc} failed: {proc.stderr.strip()[-300:]}"
                return None
            os.replace(tmp, out)  # atomic: concurrent processes never load a half-written file
        except OSError as exc:  # read-only cache, compiler not runnable
            _why_not = f"could not build the kernel in {out.parent}: {exc}"
            return None
    lib = ctypes.CDLL(str(out), use_errno=True)
    for name in _FUNCS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.diff_files.restype = ctypes.c_int
    lib.diff_files.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                               ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 5
    return lib


def kernel_status() -> str:
    """``"fused C kernel"`` or why the torch path is used."""
    return "fused C kernel" if _library() is not None else f"torch path ({_why_not})"


def available(dtype: torch.dtype) -> bool:
    return dtype in _FUNCS and _library() is not None


@functools.cache
def bin_table(edges_key: tuple[float, ...]) -> torch.Tensor:
    """The kernel's int8 bin table over positive float32 bit patterns >> :data:`LUT_SHIFT`.

    A cell whose whole range (widened by :data:`MARGIN_ULPS` on each side) falls in one bin holds
    that bin (0 below, 1..100, 101 above; inf and NaN patterns are above); a cell holding edge
    ``e``, or within the margin of it, holds ``-(e + 1)`` and the kernel decides its entries
    exactly: ``bin = e + (ratio >= edges[e])`` in float64. Edges are 20% apart and cells 0.1%
    wide, so no cell is near two edges (checked).
    """
    edges = torch.tensor(edges_key, dtype=torch.float64)
    n = 1 << (31 - LUT_SHIFT)
    keys = torch.arange(n, dtype=torch.int64)
    lo_bits = (keys << LUT_SHIFT) - MARGIN_ULPS
    hi_bits = ((keys + 1) << LUT_SHIFT) - 1 + MARGIN_ULPS
    lo = lo_bits.clamp(0, 0x7F800000).to(torch.int32).view(torch.float32).double()
    hi = hi_bits.clamp(0, 0x7F800000).to(torch.int32).view(torch.float32).double()
    b_lo = torch.bucketize(lo, edges, right=True)
    b_hi = torch.bucketize(hi, edges, right=True)
    if int((b_hi - b_lo).max()) > 1:
        raise AssertionError("a bin table cell spans two edges; lower LUT_SHIFT")
    table = torch.where(b_lo == b_hi, b_lo, -(b_lo + 1))  # edge b_lo lies in (lo, hi]
    exponent = (keys >> (23 - LUT_SHIFT)) & 0xFF
    table[exponent == 0xFF] = N_COUNTS - 1
    return table.to(torch.int8)


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    with _pool_lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="diffkernel")
        return _pools[n]


def default_threads() -> int:
    """Threads per chunk: torch's intra-op setting (what ``torch.set_num_threads`` chose)."""
    return max(1, torch.get_num_threads())


def fused_chunk_stats(b: torch.Tensor, v: torch.Tensor, edges: np.ndarray, sparsity: bool,
                      threads: int | None = None
                      ) -> tuple[float, float, int, np.ndarray | None]:
    """``(sum d^2, sum b^2, n_changed, counts[102] or None)`` of two contiguous 1-D chunks.

    Call only when :func:`available` is true for their dtype.
    """
    lib = _library()
    fn = getattr(lib, _FUNCS[b.dtype])
    parts, bounds, sq, changed, counts = _split(b.numel(), threads, sparsity)
    item = b.element_size()
    bp, vp = b.data_ptr(), v.data_ptr()
    lut_p = bin_table(tuple(edges.tolist())).data_ptr() if sparsity else None
    edges_p = edges.ctypes.data

    def run(k: int) -> None:
        lo, hi = bounds[k], bounds[k + 1]
        fn(bp + lo * item, vp + lo * item, hi - lo, lut_p, edges_p, sq[k].ctypes.data,
           changed[k:].ctypes.data, counts[k].ctypes.data if counts is not None else None)

    if parts == 1:
        run(0)
    else:
        list(_pool(parts).map(run, range(parts)))
    return _merge(sq, changed, counts)


def _split(n: int, threads: int | None, sparsity: bool):
    """``n`` entries in parts of at least ``MIN_PART`` (at most one per thread): ``(parts,
    bounds, sum-of-squares buffers [part, 2], changed counts [part], bin counts [part, 102] or
    None)``, each part's buffers written by its own kernel call and merged by :func:`_merge`."""
    parts = max(1, min(threads or default_threads(), n // MIN_PART))
    bounds = [n * k // parts for k in range(parts + 1)]
    counts = np.zeros((parts, N_COUNTS), np.int64) if sparsity else None
    return parts, bounds, np.zeros((parts, 2), np.float64), np.zeros(parts, np.int64), counts


def _merge(sq: np.ndarray, changed: np.ndarray, counts: np.ndarray | None):
    total = sq.sum(axis=0)
    return (float(total[0]), float(total[1]), int(changed.sum()),
            counts.sum(axis=0) if counts is not None else None)


def fused_file_stats(dtype: torch.dtype, base: tuple[Path, int], variant: tuple[Path, int],
                     n: int, edges: np.ndarray, sparsity: bool, threads: int | None = None,
                     compute: bool = True) -> tuple[float, float, int, np.ndarray | None]:
    """:func:`fused_chunk_stats` of ``n`` entries stored contiguously in two files.

    ``base`` / ``variant``: ``(file, byte offset of the first entry)``. The kernel reads the files
    itself (``pread`` into two 128 KiB buffers per thread, which stay in cache, so the bytes cross
    memory once, as for ``cat``), in ``threads`` disjoint parts at once (each with its own file
    descriptors, so the kernel's read-ahead sees sequential reads): one thread reads while another
    computes. Raises ``OSError`` on a read error and ``EOFError`` when a file ends early.
    ``compute=False`` only reads (zero statistics): the benchmark's read/compute split.
    """
    lib = _library()
    parts, bounds, sq, changed, counts = _split(n, threads, sparsity)
    item = torch.empty((), dtype=dtype).element_size()
    lut_p = bin_table(tuple(edges.tolist())).data_ptr() if sparsity else None
    kind = _KIND[dtype] + (0 if compute else 8)

    def run(k: int) -> None:
        lo, hi = bounds[k], bounds[k + 1]
        fb = os.open(base[0], os.O_RDONLY)
        try:
            fv = os.open(variant[0], os.O_RDONLY)
            try:
                rc = lib.diff_files(kind, fb, base[1] + lo * item, fv, variant[1] + lo * item,
                                    hi - lo, lut_p, edges.ctypes.data, sq[k].ctypes.data,
                                    changed[k:].ctypes.data,
                                    counts[k].ctypes.data if counts is not None else None)
            finally:
                os.close(fv)
        finally:
            os.close(fb)
        if rc == -2:
            raise EOFError(f"{base[0]} or {variant[0]} ended early")
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"reading {base[0]} / {variant[0]}: {os.strerror(err)}")

    if parts == 1:
        run(0)
    else:
        list(_pool(parts).map(run, range(parts)))
    return _merge(sq, changed, counts)
