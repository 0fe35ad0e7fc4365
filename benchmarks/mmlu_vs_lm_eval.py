"""Our MMLU scorer against lm-evaluation-harness itself, on the same items, in one run.

lm-eval (``pip install -e .[bench]``) gets a local task built from its own ``mmlu`` template
(``_default_template_yaml`` of the installed package: same ``doc_to_text``, choices, target), with
the dataset read from a JSONL file written here from the data root (no hub), and the description
"The following are multiple choice questions (with answers) about <subject>." rendered per item. Its
HF model loads the same local folder (float32, batch size 8). Prints: agreement of predictions, the
largest per-choice log-likelihood difference, and the throughput of both (items per second) with
the ratio.

    python benchmarks/mmlu_vs_lm_eval.py --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def lm_eval_task(data_file: Path) -> dict:
    import lm_eval
    import yaml

    template = Path(lm_eval.__file__).parent / "tasks/mmlu/default/_default_template_yaml"
    cfg = yaml.safe_load(template.read_text())
    cfg.update({
        "task": "mmlu_local_bench",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "description": "The following are multiple choice questions (with answers) about "
                       "{{subject_pretty}}.\n\n",
    })
    cfg.pop("fewshot_split", None)
    cfg.pop("fewshot_config", None)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from mechinterp.data import DataSource, load_mmlu
    from mechinterp.evals.mmlu import MMLUFormat, score_mmlu, stratified_sample
    from mechinterp.evals.workers import default_workers
    from mechinterp.models import load
    from mechinterp.models.specs import resolve

    items = stratified_sample(load_mmlu(DataSource.from_option(None), "test"), args.limit,
                              args.seed)
    folder = resolve(args.model).path
    tmp = Path(tempfile.mkdtemp(prefix="mmlu-bench-"))
    data_file = tmp / "test.jsonl"
    with data_file.open("w") as fh:
        for it in items:
            fh.write(json.dumps({"question": it.question, "choices": list(it.choices),
                                 "answer": it.answer, "subject": it.subject,
                                 "subject_pretty": it.subject.replace("_", " ")}) + "\n")

    # ---- lm-eval ----
    lm = HFLM(pretrained=str(folder), dtype="float32", batch_size=8, device="cpu")
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[lm_eval_task(data_file)], num_fewshot=0,
                          log_samples=True, verbosity="ERROR")
    t_lm = time.perf_counter() - t0
    samples = sorted(out["samples"]["mmlu_local_bench"], key=lambda s: s["doc_id"])
    lm_ll = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    del lm
    # ---- ours: one pass at a time on all threads, then the default (one worker per thread) ----
    model = load(args.model, device="cpu", dtype="float32")
    runs = {}
    for label, workers in (("1 worker", 1), ("default", None)):
        t0 = time.perf_counter()
        rows = score_mmlu(model, items, [], MMLUFormat("letter", 0), workers=workers)
        runs[label] = (time.perf_counter() - t0, rows)

    acc_lm = out["results"]["mmlu_local_bench"]["acc,none"]
    n = len(items)
    print(f"items: {n} (stratified, seed {args.seed}); model {folder}; torch threads "
          f"{torch.get_num_threads()}; our default workers {default_workers(model.device)}")
    print(f"{'scorer':<24}{'wall s':>8}{'items/s':>9}{'accuracy':>10}{'same pred':>11}"
          f"{'max |dll|':>11}{'ratio':>7}")
    print(f"{'lm-eval (batch 8)':<24}{t_lm:>8.1f}{n / t_lm:>9.2f}{acc_lm:>10.4f}")
    for label, (t, rows) in runs.items():
        same = sum(int(max(range(4), key=a.__getitem__) == r["pred"])
                   for a, r in zip(lm_ll, rows))
        diff = max(abs(a - b) for x, r in zip(lm_ll, rows) for a, b in zip(x, r["loglik"]))
        acc = sum(r["pred"] == r["gold"] for r in rows) / n
        print(f"{'mechinterp, ' + label:<24}{t:>8.1f}{n / t:>9.2f}{acc:>10.4f}"
              f"{f'{same}/{n}':>11}{diff:>11.2e}{t_lm / t:>6.2f}x")
    print("ratio = our throughput / lm-eval's, same items, same process, one run")


if __name__ == "__main__":
    main()
