"""The full MMLU test set on a small CPU: subject batches in parallel worker processes, resumable.

One ``mechinterp eval mmlu`` process uses every core through torch threads, but at batch sizes this
small two single-threaded processes get more from two cores, and a run of hours should survive
an interruption. So:

    python benchmarks/mmlu_full_set.py run --format letter-5shot --workers 2 --out runs/5shot
    python benchmarks/mmlu_full_set.py merge --format letter-5shot --out runs/5shot

``run`` splits the 57 subjects into batches of about equal estimated cost (characters of each
item, weighted by the length of its k-shot context), and lets ``--workers`` processes (one torch
thread each) score them, each batch with ``mechinterp eval mmlu --subjects ...`` into its own
folder. A batch counts as done when its ``result.json`` exists (the probe writes it last), so
running the same command again resumes. ``merge`` checks that the batches ran the same weights and
configuration and cover every test item exactly once, then pools their item rows: each item is
scored on its own, so the pooled rows are the rows one full run writes, and overall and per-subject
accuracy (Wilson intervals) come from the library's ``summarise``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def plan(fmt: str, n_batches: int, subjects: list[str] | None) -> list[list[str]]:
    """``subjects`` (default all) in batches of about equal estimated cost, costliest first."""
    from mechinterp.data import DataSource, load_mmlu
    from mechinterp.evals.mmlu import MMLUFormat, build_request

    parsed = MMLUFormat.parse(fmt)
    f = MMLUFormat(parsed.kind, parsed.shots)  # the chat wrapper adds about the same to every item
    src = DataSource.from_option(None)
    dev = defaultdict(list)
    for d in load_mmlu(src, "dev", subjects) if f.shots else []:
        dev[d.subject].append(d)
    cost: Counter = Counter()
    for it in load_mmlu(src, "test", subjects):
        shots = dev[it.subject][:f.shots]
        ctx = len(build_request(f, it, shots).context)
        own = len(build_request(f, it, []).context)  # the tokens that run per item
        # measured on this CPU: time per item token grows ~1/750 per context token (~4 chars/token)
        cost[it.subject] += own * (1 + ctx / 3000)
    batches: list[list[str]] = [[] for _ in range(n_batches)]
    load = [0.0] * n_batches
    for subject, c in cost.most_common():  # longest-processing-time first
        k = load.index(min(load))
        batches[k].append(subject)
        load[k] += c
    return sorted((b for b in batches if b), key=lambda b: -sum(cost[s] for s in b))


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "plan.json"
    batches = plan(args.format, args.batches, args.subjects)
    if saved.is_file() and json.loads(saved.read_text()) != batches:
        raise SystemExit(f"{out} holds batches of another plan (format, subjects or --batches "
                         "differ): use a new --out")
    saved.write_text(json.dumps(batches, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MECHINTERP_PROGRESS="0")

    def one(k: int) -> str:
        folder = out / f"batch{k:02d}"
        if (folder / "mmlu" / "result.json").is_file():
            return f"batch{k:02d} already done"
        cmd = [sys.executable, "-m", "mechinterp", "eval", "mmlu", "--model", args.model,
               "--format", args.format, "--subjects", ",".join(batches[k]), "--out", str(folder)]
        t0 = time.perf_counter()
        with (out / f"batch{k:02d}.log").open("w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            raise SystemExit(f"batch{k:02d} failed (exit {rc}): see {out}/batch{k:02d}.log")
        return f"batch{k:02d} {len(batches[k])} subjects {time.perf_counter() - t0:.0f} s"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        for msg in pool.map(one, range(len(batches))):
            print(msg, flush=True)
    subjects = f" --subjects {','.join(args.subjects)}" if args.subjects else ""
    print(f"all {len(batches)} batches done in {time.perf_counter() - t0:.0f} s wall; now: "
          f"python {sys.argv[0]} merge --format {args.format} --out {out}{subjects}")


def merge(args) -> None:
    from mechinterp.data import DataSource, load_mmlu
    from mechinterp.evals.mmlu import rows_from_jsonl, summarise

    out = Path(args.out)
    folders = sorted(p.parent.parent for p in out.glob("*/mmlu/result.json"))
    if not folders:
        raise SystemExit(f"no finished batch under {out}: run `run` first")
    rows, shas, configs, walls = [], set(), set(), []
    for folder in folders:
        res = json.loads((folder / "mmlu" / "result.json").read_text())
        prov = res["provenance"]
        shas.add(prov["models"]["base"]["weights_id"])
        configs.add(json.dumps({k: v for k, v in prov["config"].items() if k != "subjects"},
                               sort_keys=True))
        walls.append(prov["wall_time_s"])
        rows += rows_from_jsonl((folder / "mmlu" / f"items_base_{args.format}.jsonl").read_text())
    if len(shas) != 1 or len(configs) != 1:
        raise SystemExit(f"batches differ in weights ({len(shas)}) or configuration "
                         f"({len(configs)}): merge only batches of one run")
    keys = [(r["subject"], r["index"]) for r in rows]
    want = {(it.subject, it.index)
            for it in load_mmlu(DataSource.from_option(None), "test", args.subjects)}
    if len(keys) != len(set(keys)):
        raise SystemExit("an item was scored in two batches")
    if set(keys) != want:
        missing = sorted(want - set(keys))
        raise SystemExit(f"{len(missing)} of {len(want)} test items not scored yet (e.g. "
                         f"{missing[0]}): finish `run` first")
    pred_keys = ["pred"] + (["pred_norm"] if "pred_norm" in rows[0] else [])
    merged = {"format": args.format, "n_items": len(rows), "batches": [str(f) for f in folders],
              "sum_of_batch_wall_time_s": sum(walls), "weights_id": shas.pop()}
    for key in pred_keys:
        overall, per = summarise(rows, key)
        label = args.format if key == "pred" else f"{args.format}-norm"
        merged[label] = {"overall": overall, "by_subject": per,
                         "predicted": dict(sorted(Counter("ABCD"[r[key]] for r in rows).items()))}
        lo, hi = overall["ci95"]
        print(f"{label:<16} {overall['accuracy']:.4f}  [{lo:.4f}, {hi:.4f}]  "
              f"({overall['correct']}/{overall['n']}; predicted {merged[label]['predicted']})")
    print(f"gold: {dict(sorted(Counter('ABCD'[r['gold']] for r in rows).items()))}; "
          f"{len(folders)} batches, {sum(walls):.0f} s of probe time in all")
    (out / f"merged_{args.format}.json").write_text(json.dumps(merged, indent=1))
    print(f"wrote {out / f'merged_{args.format}.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "merge"):
        p = sub.add_parser(name)
        p.add_argument("--format", default="letter-0shot")
        p.add_argument("--out", required=True)
        p.add_argument("--subjects", type=lambda s: s.split(","), default=None,
                       help="comma-separated subjects (default: all 57)")
    sub.choices["run"].add_argument("--model", default="smollm2-135m-instruct")
    sub.choices["run"].add_argument("--workers", type=int, default=os.cpu_count() or 1)
    sub.choices["run"].add_argument("--batches", type=int, default=16)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else merge(args)


if __name__ == "__main__":
    main()
