"""benchmarks/mmlu_full_set.py: subject batches in worker processes pool to exactly one run's rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mmlu_full_set.py"
SUBJECTS = "us_foreign_policy,college_physics,astronomy"


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.mark.slow
def test_batches_pool_to_the_rows_of_one_run(tmp_path, data_source):
    from mechinterp.data.mmlu import load_mmlu
    from mechinterp.evals.mmlu import MMLUFormat, score_mmlu, summarise
    from mechinterp.models import load

    out = tmp_path / "fs"
    common = ["--format", "letter-1shot", "--subjects", SUBJECTS, "--out", str(out)]
    done = _script("run", "--model", "tiny-random-llama", "--workers", "2", "--batches", "2",
                   *common)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(json.loads((out / "plan.json").read_text())) == 2
    merged = _script("merge", *common)
    assert merged.returncode == 0, merged.stderr
    got = json.loads((out / "merged_letter-1shot.json").read_text())["letter-1shot"]

    subjects = SUBJECTS.split(",")
    model = load("tiny-random-llama", device="cpu", dtype="float32")
    rows = score_mmlu(model, load_mmlu(data_source, "test", subjects),
                      load_mmlu(data_source, "dev", subjects), MMLUFormat("letter", 1))
    overall, per = summarise(rows)
    assert got["overall"] == overall
    assert got["by_subject"] == per

    # a batch that did not finish: merge refuses, run resumes only that batch
    next(out.glob("batch*/mmlu/result.json")).unlink()
    refused = _script("merge", *common)
    assert refused.returncode != 0 and "not scored yet" in refused.stderr
    again = _script("run", "--model", "tiny-random-llama", "--workers", "2", "--batches", "2",
                    *common)
    assert again.returncode == 0 and again.stdout.count("already done") == 1
    other_plan = _script("run", "--model", "tiny-random-llama", "--batches", "3", *common)
    assert other_plan.returncode != 0 and "another plan" in other_plan.stderr
