"""Speed-up of compare's probe jobs in 2 local worker processes over 1, on the smoke study.

Needs a trained smoke demo (``mechinterp demo --preset smoke --out DIR``: its ``DIR/models``).
Runs ``compare --preset smoke`` on those models with ``--executor local --workers 1`` and
``--workers 2`` into fresh folders (nothing reused), alternating the two over ``--repeats``, and
prints each wall time, the medians and their ratio, and checks that both runs stored the same
result data. Each worker gets cores / workers torch threads.

    python benchmarks/compare_workers.py --demo DIR [--repeats 2]
"""

from __future__ import annotations

import argparse
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
        same = _data(Path(tmp) / "w1-r0") == _data(Path(tmp) / "w2-r0")
    m1, m2 = statistics.median(times[1]), statistics.median(times[2])
    print(f"median wall: 1 worker {m1:.1f} s, 2 workers {m2:.1f} s; speed-up {m1 / m2:.2f}x; "
          f"same result data: {same}")


if __name__ == "__main__":
    main()
