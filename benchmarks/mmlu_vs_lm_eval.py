"""Our MMLU scorer against lm-evaluation-harness itself, on the same items, several formats in one run.

lm-eval (``pip install "lm-eval==0.4.13"``) gets local tasks built from its own installed templates:
one task per subject, as lm-eval's ``mmlu_<subject>`` tasks are, with the subject's description read
from the installed per-subject yaml and its data read from JSONL files written here from the data
root (no hub): ``test`` holds the sampled items, ``dev`` the subject's dev split in CSV order, so the
template's ``fewshot_config: sampler: first_n`` draws the same shots, in the same order, as
``score_mmlu`` (the first k dev items of the subject). Formats (``--formats``, default all):

  letter-0shot, letter-5shot  ``mmlu/default`` template (acc)
  cloze                       ``mmlu/continuation`` template: the choice texts (acc and acc_norm)
  letter-0shot-chat           our ``-chat`` format against ``apply_chat_template=True``
  letter-0shot-bos            letter 0-shot on a copy of the model folder whose tokenizer adds BOS

Per row: how many prompts render identically (context and continuations, as lm-eval logged them),
agreement of predictions, the largest per-choice log-likelihood difference, both accuracies, both wall
times and our throughput over lm-eval's. Both run float32 on the CPU; lm-eval at batch size 8.

    OMP_NUM_THREADS=1 python benchmarks/mmlu_vs_lm_eval.py --limit 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# format -> (our MMLUFormat label, lm-eval template folder, model folder with a BOS-adding tokenizer)
FORMATS = {
    "letter-0shot": ("letter-0shot", "default", False),
    "letter-5shot": ("letter-5shot", "default", False),
    "cloze": ("cloze", "continuation", False),
    "letter-0shot-chat": ("letter-0shot-chat", "default", False),
    "letter-0shot-bos": ("letter-0shot", "default", True),
}
BOS_NOTE = ("BOS: lm-eval 0.4.13's HFLM with add_bos_token=None passes no add_special_tokens "
            "(models/utils.py _add_special_kwargs returns {}), so the tokenizer's own default decides "
            "(and a context that already starts with the BOS text is encoded without special tokens); "
            "our scorer encodes non-chat formats with add_special_tokens=True (the same default) and "
            "chat prompts with add_special_tokens=False.")


def write_jsonl(path: Path, items) -> None:
    with path.open("w") as fh:
        for it in items:
            fh.write(json.dumps({"question": it.question, "choices": list(it.choices),
                                 "answer": it.answer, "subject": it.subject}) + "\n")


def lm_eval_tasks(template: str, label: str, data: dict[str, dict[str, str]]) -> list[dict]:
    """One task per subject from the installed ``tasks/mmlu/<template>`` yaml files; ``data``
    maps subject -> {"test": jsonl, "dev": jsonl}. The template's fewshot_config is kept."""
    import lm_eval
    import yaml

    folder = Path(lm_eval.__file__).parent / "tasks/mmlu" / template
    base = yaml.safe_load(next(folder.glob("_*_template_yaml")).read_text())
    tasks = []
    for subject, files in data.items():
        cfg = dict(base)
        cfg.update({
            "task": f"bench_{label}__{subject}",
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "test_split": "test",
            "fewshot_split": "dev",
            "description": yaml.safe_load((folder / f"mmlu_{subject}.yaml").read_text())[
                "description"],
        })
        tasks.append(cfg)
    return tasks


def run_lm_eval(lm, tasks: list[dict], items, shots: int, chat: bool, task_manager):
    """lm-eval's samples in item order (matched by subject and doc id) and the wall time of
    ``simple_evaluate`` on tasks built beforehand (their datasets loaded outside the timing)."""
    from lm_eval import simple_evaluate

    built = list(task_manager.load(tasks)["tasks"].values())
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=built, num_fewshot=shots, apply_chat_template=chat,
                          task_manager=task_manager, log_samples=True, verbosity="ERROR")
    wall = time.perf_counter() - t0
    by_key = {(task.split("__")[1], s["doc_id"]): s for task, ss in out["samples"].items()
              for s in ss}
    pos: dict[str, int] = {}
    ordered = []
    for it in items:  # items sorted by subject, each subject's items in file order
        pos[it.subject] = pos.get(it.subject, -1) + 1
        ordered.append(by_key[(it.subject, pos[it.subject])])
    return ordered, wall


def compare(samples, rows, requests, items, pred_key: str, metric: str) -> dict:
    """Prompt identity, prediction agreement, max |d loglik| and both accuracies for one metric
    (``acc``: argmax of the log-likelihoods; ``acc_norm``: divided by the choice's length)."""
    import numpy as np

    same_prompt = same_pred = 0
    diff = 0.0
    for s, r, req, it in zip(samples, rows, requests, items):
        args = [tuple(a) for a in s["arguments"]]
        same_prompt += int(args == [(req.context, c) for c in req.continuations])
        ll = np.array([float(x[0]) for x in s["filtered_resps"]])
        if metric == "acc_norm":
            ll = ll / np.array([float(len(c)) for c in it.choices])
        same_pred += int(int(np.argmax(ll)) == r[pred_key])
        diff = max(diff, max(abs(float(x[0]) - y) for x, y in zip(s["filtered_resps"], r["loglik"])))
    n = len(rows)
    return {"prompt": same_prompt, "pred": same_pred, "n": n, "diff": diff,
            "acc_lm": sum(float(s[metric]) for s in samples) / n,
            "acc_ours": sum(r[pred_key] == r["gold"] for r in rows) / n}


def bos_folder(src: Path, dst: Path) -> Path:
    """A copy of ``src`` (weights linked) whose fast tokenizer prepends the BOS token."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy2(f, dst / f.name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    tok = json.loads((dst / "tokenizer.json").read_text())
    bos = cfg["bos_token"]
    bos_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == bos)
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    cfg["add_bos_token"] = True
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help=f"comma list of {', '.join(FORMATS)}")
    args = ap.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}")

    import lm_eval
    import torch
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from mechinterp.data import DataSource, load_mmlu
    from mechinterp.evals.mmlu import MMLUFormat, build_request, score_mmlu, stratified_sample
    from mechinterp.evals.workers import default_workers
    from mechinterp.models import load
    from mechinterp.models.specs import resolve

    source = DataSource.from_option(None)
    items = stratified_sample(load_mmlu(source, "test"), args.limit, args.seed)
    subjects = sorted({it.subject for it in items})
    dev = load_mmlu(source, "dev", subjects)
    folder = resolve(args.model).path
    tmp = Path(tempfile.mkdtemp(prefix="mmlu-bench-"))
    data = {}
    for s in subjects:
        data[s] = {split: str(tmp / f"{s}_{split}.jsonl") for split in ("test", "dev")}
        write_jsonl(Path(data[s]["test"]), [it for it in items if it.subject == s])
        write_jsonl(Path(data[s]["dev"]), [d for d in dev if d.subject == s])
    items = sorted(items, key=lambda it: it.subject)  # task order: subject, then doc id

    fewshot = yaml.safe_load((Path(lm_eval.__file__).parent
                              / "tasks/mmlu/default/_default_template_yaml").read_text())
    print(f"items: {len(items)} (stratified, seed {args.seed}, {len(subjects)} subjects); model "
          f"{folder}; float32 CPU; torch threads {torch.get_num_threads()}; lm-eval "
          f"{version('lm_eval')} batch 8; our default workers {default_workers(torch.device('cpu'))}")
    print(f"lm-eval mmlu template: fewshot_split {fewshot['fewshot_split']}, fewshot_config "
          f"{fewshot['fewshot_config']}; ours: the first k dev items of the subject, CSV order")
    print(BOS_NOTE)

    task_manager = TaskManager()  # indexes lm-eval's task folder once, outside the timings
    models: dict[bool, tuple] = {}

    def models_for(bos: bool):
        if bos not in models:
            path = bos_folder(folder, tmp / "bos-model") if bos else folder
            ours = load(str(path), device="cpu", dtype="float32")
            ids = AutoTokenizer.from_pretrained(str(path)).encode("Answer:")
            bos_id = ours.tokenizer.bos_token_id
            print(f"{'BOS copy' if bos else 'default'} tokenizer: encode('Answer:') = {ids}, "
                  f"ours {ours.tokenizer.encode('Answer:')}; BOS id {bos_id} added: "
                  f"{ids[0] == bos_id}")
            models[bos] = (HFLM(pretrained=str(path), dtype="float32", batch_size=8,
                                device="cpu"), ours)
        return models[bos]

    header = (f"{'format':<20}{'metric':<10}{'same prompt':>12}{'same pred':>10}{'max |dll|':>10}"
              f"{'acc lm-eval':>12}{'acc ours':>9}{'lm-eval s':>10}{'ours s':>8}{'ratio':>7}")
    lines = []
    for name in formats:
        label, template, bos = FORMATS[name]
        fmt = MMLUFormat.parse(label)
        lm, model = models_for(bos)
        requests = [build_request(fmt, it, [d for d in dev if d.subject == it.subject][:fmt.shots],
                                  model.tokenizer) for it in items]
        t0 = time.perf_counter()
        rows = score_mmlu(model, items, dev, fmt)
        t_ours = time.perf_counter() - t0
        samples, t_lm = run_lm_eval(lm, lm_eval_tasks(template, name, data), items, fmt.shots,
                                    fmt.chat, task_manager)
        metrics = [("pred", "acc")] + ([("pred_norm", "acc_norm")] if fmt.kind == "cloze" else [])
        for pred_key, metric in metrics:
            c = compare(samples, rows, requests, items, pred_key, metric)
            if fmt.chat and c["prompt"] < c["n"]:
                s, req = samples[0], requests[0]
                lines.append(f"{name:<20}not compared: the chat prompts differ "
                             f"({c['prompt']}/{c['n']} identical); lm-eval "
                             f"{s['arguments'][0]!r} vs ours {(req.context, req.continuations[0])!r}")
                continue
            prompt, pred = f"{c['prompt']}/{c['n']}", f"{c['pred']}/{c['n']}"
            lines.append(f"{name:<20}{metric:<10}{prompt:>12}{pred:>10}{c['diff']:>10.2e}"
                         f"{c['acc_lm']:>12.4f}{c['acc_ours']:>9.4f}{t_lm:>10.1f}{t_ours:>8.1f}"
                         f"{t_lm / t_ours:>6.2f}x")
    print(header)
    print("\n".join(lines))
    print("ratio = our throughput / lm-eval's (same items, same process, one run each; "
          "model loading excluded)")


if __name__ == "__main__":
    main()
