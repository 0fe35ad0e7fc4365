"""Speed-up of compare's probe jobs in 2 local worker processes over 1, on the smoke study.

Needs a trained smoke demo (``mechinterp demo --preset smoke --out DIR``: its ``DIR/models``).
Runs ``compare --preset smoke`` on those models with ``--executor local --workers 1`` and
``--workers 2`` into fresh folders (nothing reused), alternating the two over ``--repeats``, and
prints each wall time, the medians and their ratio, and compares the result data both runs stored:
every number within a relative tolerance of 1e-4 (each worker gets cores / workers torch threads,
so sums run in another order), timings (keys naming seconds or time) left out, everything else
equal; it prints how many values differ beyond the tolerance, and where.

    python benchmarks/compare_workers.py --demo DIR [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path


def _run(demo: Path, out: Path, workers: int) -> float:
    from mechinterp.study.compare import compare

    variants = {n: str(demo / "models" / n) for n in ("sft", "grpo", "sft-frozen")
                if (demo / "models" / n).is_dir()}
    start = time.perf_counter()
    compare(None, variants, out, preset="smoke", executor="local", workers=workers,
            echo=lambda m: None)
    return time.perf_counter() - start


def _data(folder: Path) -> dict:
    from mechinterp.store.results import find_results, read_result

    return {read_result(d).probe: read_result(d).data for d in find_results(folder)}


#: result keys that hold wall times (differ from run to run by nature)
_TIMING = ("seconds", "time")


def _differences(a, b, path: str = "") -> list[tuple[str, float]]:
    """``(path, relative difference)`` of every leaf of ``a`` and ``b`` that differs beyond a
    relative tolerance of 1e-4 (absolute 1e-6 near zero); inf where the structure differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [(path + "/{keys}", float("inf"))]
        return [d for k in a if not any(t in str(k) for t in _TIMING)
                for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path + "/[len]", float("inf"))]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b) or a == b:
            return []
        rel = abs(a - b) / max(abs(a), abs(b))
        return [] if abs(a - b) <= 1e-6 or rel <= 1e-4 else [(path, rel)]
    return [] if a == b else [(path, float("inf"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a smoke demo folder (holds models/)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                out = Path(tmp) / f"w{workers}-r{r}"
                times[workers].append(_run(args.demo, out, workers))
                print(f"repeat {r}: {workers} worker(s) {times[workers][-1]:.1f} s", flush=True)
        diffs = _differences(_data(Path(tmp) / "w1-r0"), _data(Path(tmp) / "w2-r0"))
    m1, m2 = statistics.median(times[1]), statistics.median(times[2])
    print(f"median wall: 1 worker {m1:.1f} s, 2 workers {m2:.1f} s; speed-up {m1 / m2:.2f}x")
    print(f"result data: {len(diffs)} values differ beyond a relative 1e-4 (timings left out)"
          + "".join(f"\n  {p}: {r:.3g}" for p, r in sorted(diffs, key=lambda d: -d[1])[:10]))


if __name__ == "__main__":
    main()
