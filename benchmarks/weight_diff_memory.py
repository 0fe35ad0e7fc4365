"""Peak memory and wall time of the streaming weight diff on two ~2 GB sharded checkpoints.

Builds two synthetic Llama-shaped float32 checkpoints (default 2 GB each, 4 shards; the variant is
the base plus a dense relative perturbation of ~1e-3 on every entry, the worst case for the
sparsity histogram) in a temporary folder, then, in this order:

1. reads both checkpoints' files once untimed (``cat > /dev/null``) so that every later step finds
   them in the page cache (warm: nothing is dropped, and every timed row reads warm files);
2. times ``cat`` of both checkpoints' files: the read baseline;
3. runs each diff in a fresh child process and reports its wall time (inside the child, after
   imports, and for the whole child) and its peak RSS (``os.wait4`` rusage of that child alone):
   - the child's imports only (the floor every row pays),
   - :func:`weight_diff` relative change only (``sparsity=False``),
   - :func:`weight_diff` with sparsity (what the ``weight-change`` probe runs by default),
   - the previous approach for reference: whole tensors via ``CheckpointReader.get`` (mmap);

and prints a table with ratios to the read time. Targets: peak RSS < 600 MB, diff wall < 2x read.
The temporary folder is deleted at the end (``--keep`` keeps it).

    python benchmarks/weight_diff_memory.py [--size-gb 2] [--shards 4] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, VOCAB = 2048, 5632, 256
RSS_TARGET_MB, WALL_TARGET_RATIO = 600, 2.0


def layer_shapes() -> dict[str, tuple[int, int]]:
    return {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTER),
    }


def write_checkpoints(root: Path, size_gb: float, shards: int, rel: float = 1e-3,
                      dtype: str = "float32") -> int:
    """Write ``root/base`` and ``root/variant``; returns the number of layers.

    ``size_gb`` is the float32 size (a bfloat16 checkpoint of the same shapes is half of it);
    the variant is drawn in float32 and then cast like the base.
    """
    import numpy as np
    import torch
    from safetensors.torch import save_file

    per_layer = sum(a * b for a, b in layer_shapes().values()) * 4
    n_layers = max(1, round(size_gb * 1e9 / per_layer))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": n_layers,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": VOCAB,
              "max_position_embeddings": 512, "torch_dtype": dtype}
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    groups = np.array_split(np.arange(n_layers), min(shards, n_layers))
    for name in ("base", "variant"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for s, layers in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        base, variant = {}, {}
        if s == 0:
            emb = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02
            base["model.embed_tokens.weight"] = variant["model.embed_tokens.weight"] = emb.to(tdtype)
        for layer in layers:
            for key, shape in layer_shapes().items():
                full = f"model.layers.{layer}.{key}"
                b = torch.randn(shape, generator=gen) * 0.02
                base[full] = b.to(tdtype)
                variant[full] = (b + torch.randn(shape, generator=gen) * (rel * b.abs())).to(tdtype)
        save_file(base, str(root / "base" / fname), metadata={"format": "pt"})
        save_file(variant, str(root / "variant" / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in base}
        del base, variant
    index = json.dumps({"metadata": {}, "weight_map": weight_map})
    for name in ("base", "variant"):
        (root / name / "model.safetensors.index.json").write_text(index)
    return n_layers


CHILD = r"""
import json, sys, time
from pathlib import Path
mode, base, variant = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
import torch
if len(sys.argv) > 4:
    torch.set_num_threads(int(sys.argv[4]))
from mechinterp.analysis import weights as W
W.load_config(base)  # transformers' config machinery: part of the floor
t = time.perf_counter()
if mode == "stream-rel":
    W.weight_diff(base, {"v": variant}, sparsity=False)
elif mode == "stream-sparsity":
    W.weight_diff(base, {"v": variant}, sparsity=True)
elif mode == "mmap-whole-tensors":
    cfg = W.load_config(base)
    fam = W.family_for(cfg)
    rb, rv = W.CheckpointReader(base), W.CheckpointReader(variant)
    for layer, m, ref in W.matrix_refs(fam, cfg):
        W.relative_change(ref.take(rb.get(ref.name)), ref.take(rv.get(ref.name)))
    rb.close(); rv.close()
inner = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"inner_s": inner, "vmhwm_kb": int(hwm[0].split()[1]) if hwm else None}))
"""


def run_child(mode: str, base: Path, variant: Path, threads: int | None) -> dict:
    """Run one diff in a fresh process; peak RSS from the child's own VmHWM (and wait4).

    The parent never imports torch or holds tensors: Linux carries a parent's peak RSS into a
    forked child's ``ru_maxrss``, so a big parent would inflate every row.
    """
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               MECHINTERP_PROGRESS="0")
    start = time.perf_counter()
    extra = [str(threads)] if threads else []
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(base), str(variant), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed ({proc.returncode}):\n{err[-2000:]}")
    got = json.loads(out.strip().splitlines()[-1])
    return {"inner_s": got["inner_s"], "total_s": total, "rss_mb": got["vmhwm_kb"] / 1024,
            "maxrss_mb": usage.ru_maxrss / 1024}


def cat_time(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of each checkpoint")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--skip-mmap", action="store_true", help="skip the whole-tensor mmap row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the children")
    ap.add_argument("--write-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_only is not None:  # runs in a child so that the parent stays small
        print(write_checkpoints(args.write_only, args.size_gb, args.shards))
        return

    root = Path(tempfile.mkdtemp(prefix="weight-diff-bench-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        writer = subprocess.run([sys.executable, __file__, "--write-only", str(root),
                                 "--size-gb", str(args.size_gb), "--shards", str(args.shards)],
                                capture_output=True, text=True, check=True)
        n_layers = int(writer.stdout.strip().splitlines()[-1])
        files = sorted((root / "base").glob("*.safetensors")) + \
            sorted((root / "variant").glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        print(f"wrote 2 x {size / 2e9:.2f} GB ({n_layers} layers, {args.shards} shards each) in "
              f"{time.perf_counter() - t0:.0f} s under {root}")
        cat_time(files)  # warm-up read: every timed row below reads page-cached files
        read = cat_time(files)
        rows = [("cat both checkpoints > /dev/null (warm)", read, read, None)]
        modes = ["import-only", "stream-rel", "stream-sparsity"]
        modes += [] if args.skip_mmap else ["mmap-whole-tensors"]
        labels = {"import-only": "child: imports + config only (floor)",
                  "stream-rel": "weight_diff, relative change only",
                  "stream-sparsity": "weight_diff + sparsity (probe default)",
                  "mmap-whole-tensors": "old path: whole tensors via mmap get()"}
        for mode in modes:
            r = run_child(mode, root / "base", root / "variant", args.threads)
            rows.append((labels[mode], r["inner_s"], r["total_s"], r["rss_mb"]))
            if abs(r["maxrss_mb"] - r["rss_mb"]) > 50:
                print(f"note: {mode}: wait4 ru_maxrss {r['maxrss_mb']:.0f} MB vs VmHWM "
                      f"{r['rss_mb']:.0f} MB")
        load = os.getloadavg()
        print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f}; "
              f"torch threads {args.threads or 'default'}; files {size / 1e9:.2f} GB in all, page cache warm\n")
        head = (f"| {'what':<44} | {'wall s (work)':>13} | {'x read':>6} | "
                f"{'wall s (child)':>14} | {'peak RSS MB':>11} |")
        print(head)
        print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
        for label, inner, total, rss in rows:
            rss_s = f"{rss:.0f}" if rss is not None else "-"
            print(f"| {label:<44} | {inner:>13.2f} | {inner / read:>6.1f} | {total:>14.2f} | "
                  f"{rss_s:>11} |")
        by = {label: (inner, rss) for label, inner, _, rss in rows}
        floor = by[labels["import-only"]][1]
        for mode in ("stream-rel", "stream-sparsity"):
            inner, rss = by[labels[mode]]
            print(f"{labels[mode]}: {rss - floor:.0f} MB above the import floor")
            print(f"target check, {labels[mode]}: peak RSS {rss:.0f} MB "
                  f"({'<' if rss < RSS_TARGET_MB else '>='} {RSS_TARGET_MB}: "
                  f"{'met' if rss < RSS_TARGET_MB else 'MISSED'}), wall {inner / read:.1f}x read "
                  f"({'met' if inner / read < WALL_TARGET_RATIO else 'MISSED'} "
                  f"< {WALL_TARGET_RATIO}x)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
