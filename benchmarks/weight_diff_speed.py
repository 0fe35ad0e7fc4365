"""Wall time of the streaming weight diff against reading both checkpoints, fp32 and bf16.

Builds two pairs of synthetic Llama-shaped sharded checkpoints (the shapes of
``weight_diff_memory.py``; ``--size-gb`` is the float32 size of each checkpoint, the bfloat16 pair
has the same shapes at half the bytes). Variants: float32 base + ~1e-3 relative noise on every
entry, bfloat16 base + ~1e-2 (bf16's step is 2^-8, so a 1e-3 nudge would leave most entries
unchanged): dense updates, the worst case for the sparsity histogram.

Then, per dtype and torch thread count, ONE child process (so imports are paid once and peak RSS
is the child's own) runs ``--repeats`` rounds of, in this order:

    cat both checkpoints > /dev/null | weight_diff(sparsity=False) | weight_diff(sparsity=True)
    | the kernel's reads alone (same threads and blocks, no compute) | cat again

and each round's ratios divide by the mean of that round's two ``cat`` times (same process, same
minute: the load on a shared machine moves both). Page cache: ``warm`` (default) reads every file
once untimed first and keeps it cached; ``cold`` drops both checkpoints' pages from this machine's
page cache (``posix_fadvise(DONTNEED)``) before EVERY timed step, cat included (a hypervisor below
may still cache them). Peak RSS: the child's VmHWM, reset (``/proc/self/clear_refs``) before each
step, so it is that step's peak including the ~300 MB of imports. Not timed: imports, reading
the config, compiling the kernel (first run on a machine) and building its bin table (once per
process).

Optionally (``--torch-path``) one round of the previous torch-only path
(``MECHINTERP_DIFF_KERNEL=torch``) for the before/after ratio.

    python benchmarks/weight_diff_speed.py [--size-gb 1] [--repeats 5] [--threads 1,2]
        [--cache warm,cold] [--torch-path] [--tmp DIR]

Targets: <= 2x the read time without histograms, <= 3x with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REL = {"float32": 1e-3, "bfloat16": 1e-2}
TARGETS = {"rel": 2.0, "hist": 3.0}

CHILD = r"""
import json, os, subprocess, sys, time
from contextlib import closing
from pathlib import Path
base, variant, threads, repeats, cache = (Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]),
                                          int(sys.argv[4]), sys.argv[5])
import torch
torch.set_num_threads(threads)
from mechinterp.analysis import weights as W, diffkernel
cfg = W.load_config(base)
W.family_for(cfg)
status = diffkernel.kernel_status()  # compiles the kernel once if needed: not timed
diffkernel.bin_table(tuple(W.SPARSITY_EDGES.tolist()))  # once per process (~0.1-1 s): not timed
files = sorted(base.glob("*.safetensors")) + sorted(variant.glob("*.safetensors"))

def drop():
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

def cat():
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)

def read_only():  # the kernel's own reads (same threads, same 128 KiB blocks), no compute
    cfg = W.load_config(base)
    with W.CheckpointReader(base) as rb, W.CheckpointReader(variant) as rv:
        for _, _, ref in W.matrix_refs(W.family_for(cfg), cfg):
            lb, lv = rb._loc(ref.name), rv._loc(ref.name)
            diffkernel.fused_file_stats(lb.dtype, (lb.path, lb.offset), (lv.path, lv.offset),
                                        lb.shape[0] * lb.shape[1], W.SPARSITY_EDGES, False,
                                        compute=False)

steps = {"cat": cat,
         "rel": lambda: W.weight_diff(base, {"v": variant}, sparsity=False),
         "hist": lambda: W.weight_diff(base, {"v": variant}, sparsity=True),
         "read": read_only, "cat2": cat}
only = os.environ.get("BENCH_STEPS")
order = only.split(",") if only else list(steps)
if cache == "warm":
    cat()
rounds = []
for _ in range(repeats):
    row = {}
    for name in order:
        if cache == "cold":
            drop()
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        t = time.perf_counter()
        steps[name]()
        dt = time.perf_counter() - t
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        row[name] = (dt, int(hwm[0].split()[1]) / 1024)
    rounds.append(row)
print(json.dumps({"status": status, "rounds": rounds}))
"""


def run_child(base: Path, variant: Path, threads: int, repeats: int, cache: str,
              env_extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               MECHINTERP_PROGRESS="0", **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(base), str(variant), str(threads),
                           str(repeats), cache], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="float32 size of each checkpoint")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure")
    ap.add_argument("--cache", default="warm,cold", help="page cache states: warm, cold")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--torch-path", action="store_true",
                    help="also one warm round of the previous torch-only path")
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent
    root = Path(tempfile.mkdtemp(prefix="weight-diff-speed-", dir=args.tmp))
    results = []
    try:
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            writer = subprocess.run(
                [sys.executable, "-c",
                 "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                 "from weight_diff_memory import write_checkpoints as w; "
                 "print(w(Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), "
                 "float(sys.argv[5]), sys.argv[6]))",
                 str(here), str(root / dtype), str(args.size_gb), str(args.shards),
                 str(REL[dtype]), dtype], capture_output=True, text=True, check=True)
            n_layers = int(writer.stdout.strip().splitlines()[-1])
            files = list((root / dtype).glob("*/*.safetensors"))
            size = sum(f.stat().st_size for f in files)
            print(f"{dtype}: wrote 2 x {size / 2e9:.2f} GB ({n_layers} layers, {args.shards} "
                  f"shards each, variant = base + {REL[dtype]:g} relative noise) in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            base, variant = root / dtype / "base", root / dtype / "variant"
            for cache in args.cache.split(","):
                for threads in map(int, args.threads.split(",")):
                    load0 = os.getloadavg()[0]
                    got = run_child(base, variant, threads, args.repeats, cache)
                    results.append((dtype, cache, threads, size, got, load0, os.getloadavg()[0]))
                    print(f"  {cache}, {threads} thread(s): {json.dumps(got)}", flush=True)
            if args.torch_path:
                load0 = os.getloadavg()[0]
                got = run_child(base, variant, 2, 1, "warm", {"MECHINTERP_DIFF_KERNEL": "torch",
                                                             "BENCH_STEPS": "cat,rel,hist,cat2"})
                results.append((dtype, "warm", "torch path, 2", size, got, load0,
                                os.getloadavg()[0]))
                print(f"  torch path: {json.dumps(got)}", flush=True)
            shutil.rmtree(root / dtype, ignore_errors=True)  # keep the disk footprint to one pair
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nmachine: {os.cpu_count()} CPUs (shared), load average now "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}; median [min, max] over "
          f"{args.repeats} rounds; ratios to the mean of the same round's two cat times\n")
    head = ("| dtype | cache | threads | GB read | cat s | no hist s | x read | with hist s | "
            "x read | kernel reads alone x read | peak RSS MB (hist) | load |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    verdicts = []
    for dtype, cache, threads, size, got, load0, load1 in results:
        rounds = got["rounds"]
        cat = [(r["cat"][0] + r["cat2"][0]) / 2 for r in rounds]
        col = {k: [r[k][0] if k in r else float("nan") for r in rounds]
               for k in ("rel", "hist", "read")}
        ratio = {k: [x / c for x, c in zip(col[k], cat, strict=True)] for k in col}
        rss = max(r["hist"][1] for r in rounds)
        print(f"| {dtype} | {cache} | {threads} | {size / 1e9:.2f} | {spread(cat)} | "
              f"{spread(col['rel'])} | {spread(ratio['rel'])} | {spread(col['hist'])} | "
              f"{spread(ratio['hist'])} | {spread(ratio['read'])} | {rss:.0f} | "
              f"{load0:.1f}-{load1:.1f} |")
        if isinstance(threads, int):
            for k, target in TARGETS.items():
                med = statistics.median(ratio[k])
                verdicts.append(f"{dtype} {cache} {threads} thread(s) "
                                f"{'no hist' if k == 'rel' else 'with hist'}: {med:.2f}x read "
                                f"(target <= {target:g}x: {'met' if med <= target else 'MISSED'})")
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
