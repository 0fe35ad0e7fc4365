"""The README's main command at the smoke preset, end to end on the real default model: three
trained runs, every probe, claims, report; the claim tests agree with claims.json; a re-run of
compare into the same folder reuses every result; the study notebooks run top to bottom on it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mechinterp.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smoke-demo")]
STUDY_NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("0[1-9]_*.ipynb"))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, data_source):
    out = tmp_path_factory.mktemp("demo") / "results"
    assert main(["demo", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_demo_trains_three_runs_and_writes_the_report(demo_dir):
    for name, algo in (("sft", "sft"), ("grpo", "grpo"), ("sft-frozen", "sft")):
        run = demo_dir / "models" / name
        summary = json.loads((run / "train-summary.json").read_text())
        assert summary["algorithm"] == algo and summary["steps"] == 2
        assert (run / "config.json").exists() and (run / "training-drift" / "result.json").exists()
    claims = json.loads((demo_dir / "claims.json").read_text())
    assert sorted(claims) == [f"C{i}" for i in range(1, 9)]
    assert all(c["held"] in (True, False, None) and c["statement"] for c in claims.values())
    # C1 and C3 need only weight-change, which always runs: they must be decided
    assert claims["C1"]["held"] is not None and claims["C3"]["held"] is not None
    page = (demo_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8
    assert not re.search(r"""(src|href)=["']https?:""", page)
    for probe in ("weight-change", "kl-drift", "task-accuracy", "mmlu", "attention-shift",
                  "mlp-patching", "causal-trace", "damage-attribution"):
        assert (demo_dir / probe / "result.json").exists(), probe
        assert f"<h2 id='{probe}'>" in page


def test_claim_tests_agree_with_claims_json(demo_dir):
    claims = json.loads((demo_dir / "claims.json").read_text())
    env = dict(os.environ, MECHINTERP_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "probes.claims", "-v",
                           "-p", "no:cacheprovider", "--mi-results", str(demo_dir)],
                          capture_output=True, text=True, env=env, timeout=300)
    outcome = {}
    for line in proc.stdout.splitlines():
        m = re.search(r"test_claim\[c(\d)_\w+\] (PASSED|FAILED|SKIPPED)", line)
        if m:
            outcome[f"C{m.group(1)}"] = m.group(2)
    want = {cid: {True: "PASSED", False: "FAILED", None: "SKIPPED"}[c["held"]]
            for cid, c in claims.items()}
    assert outcome == want, proc.stdout[-3000:]


def test_compare_again_reuses_every_result(demo_dir, capsys):
    variants = [f"--variant={n}={demo_dir / 'models' / n}" for n in ("sft", "grpo", "sft-frozen")]
    assert main(["compare", *variants, "--preset", "smoke", "--out", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    steps = re.search(r"\[compare 1/(\d+)\]", out)
    assert steps and out.count("reusing") == int(steps.group(1)), out


def test_demo_again_in_a_new_process_reuses_every_run_and_result(demo_dir):
    """The README's main command, run a second time: every training run and every result is
    reused, nothing is recomputed or rewritten (it exited 2: train-config.json's run facts,
    precision and processes, were compared as settings)."""
    before = {p: p.read_bytes() for p in demo_dir.rglob("result.json")}
    weights = {p: p.stat().st_mtime_ns for p in (demo_dir / "models").rglob("*.safetensors")}
    env = dict(os.environ, MECHINTERP_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "mechinterp", "demo", "--preset", "smoke",
                           "--out", str(demo_dir)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for name in ("sft", "grpo", "sft-frozen"):
        assert f"{name}: finished run in {demo_dir / 'models' / name}, reused" in out, out
    steps = re.search(r"\[compare 1/(\d+)\]", out)
    assert steps and out.count("reusing") == int(steps.group(1)), out
    assert {p: p.read_bytes() for p in demo_dir.rglob("result.json")} == before
    assert {p: p.stat().st_mtime_ns for p in (demo_dir / "models").rglob("*.safetensors")} == weights


@pytest.mark.parametrize("path", STUDY_NOTEBOOKS, ids=lambda p: p.name)
def test_study_notebook_runs_on_the_demo(path, demo_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MECHINTERP_DEMO_DIR", str(demo_dir))
    monkeypatch.setenv("MECHINTERP_PROGRESS", "0")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue")


def test_there_are_six_study_notebooks():
    assert [p.name[:2] for p in STUDY_NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


def test_paper_figure_set_is_written_and_its_table_reads_the_results(demo_dir):
    from mechinterp.compare import load_study
    from mechinterp.paper_figures import PAPER_SET, benchmark_table

    assert main(["figures", str(demo_dir), "--paper"]) == 0
    files = sorted(p.name for p in (demo_dir / "paper").iterdir())
    pngs = [f for f in files if f.endswith(".png")]
    assert [f[:2] for f in pngs] == [f"{i:02d}" for i in range(1, len(pngs) + 1)]
    assert sorted(f.replace(".png", ".pdf") for f in pngs) == [f for f in files if f.endswith(".pdf")]
    for probe in {p for p, _ in PAPER_SET}:  # every probe that ran has a figure in the set
        if probe == "*tables*" or (demo_dir / probe / "result.json").exists():
            stems = [pat.rstrip("*") for p, pat in PAPER_SET if p == probe]
            assert any(f[3:].startswith(tuple(stems)) for f in pngs), (probe, pngs)
    # the benchmark table's MMLU cell for SFT is the final SFT model's stored accuracy
    mmlu = json.loads((demo_dir / "mmlu" / "result.json").read_text())["data"]
    keys = [k for k in mmlu["accuracy"] if k == "sft" or k.startswith("sft@")]
    final = "sft" if "sft" in keys else max(keys, key=lambda k: int(k.rsplit("-", 1)[1]))
    want = mmlu["accuracy"][final]
    want = want["cloze"] if isinstance(want, dict) else want
    fig = benchmark_table(load_study(demo_dir))
    cells = {(r, c): cell.get_text().get_text()
             for (r, c), cell in fig.axes[0].tables[0].get_celld().items()}
    row = next(r for (r, c), text in cells.items() if c == 0 and text == "sft")
    assert cells[(row, 1)].startswith(f"{want:.3f} [")
