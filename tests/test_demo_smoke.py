"""The README's main command at the smoke preset, end to end on the real default model: three
trained runs, every probe, claims, report; the claim tests agree with claims.json; a re-run of
compare into the same folder reuses every result; the study notebooks run top to bottom on it.
Without the real model: the demo's run list (seeds and their names), which steps run on which
seeds, and what a finished run keeps on disk (a tiny training run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mechinterp.cli import main

pytestmark = [pytest.mark.xdist_group("smoke-demo")]
slow = pytest.mark.slow  # the tests on the smoke demo's folder (real model, minutes)
STUDY_NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("0[1-9]_*.ipynb"))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, data_source):
    out = tmp_path_factory.mktemp("demo") / "results"
    assert main(["demo", "--preset", "smoke", "--out", str(out)]) == 0
    return out


@slow
def test_demo_trains_three_runs_and_writes_the_report(demo_dir):
    for name, algo in (("sft", "sft"), ("grpo", "grpo"), ("sft-frozen", "sft")):
        run = demo_dir / "models" / name
        summary = json.loads((run / "train-summary.json").read_text())
        assert summary["algorithm"] == algo and summary["steps"] == 2
        assert (run / "config.json").exists() and (run / "training-drift" / "result.json").exists()
    # every run of ours logged its path: coherence from the per-step log, over its noise floor
    from mechinterp.store.results import read_result

    wc = read_result(demo_dir / "weight-change").data
    for names in wc["runs"].values():
        last = names[-1]
        assert wc["coherence_source"][last] == "per-step log", last
        assert 0 < wc["noise_floor"][last]["update_scale"] < 1
        coh = [x for xs in wc["coherence"][last].values() for x in xs if x is not None]
        assert coh and all(0 < x <= 1 + 1e-9 for x in coh)
    claims = json.loads((demo_dir / "claims.json").read_text())
    assert sorted(claims) == [f"C{i}" for i in range(1, 9)]
    assert all(c["held"] in (True, False, None) and c["statement"] for c in claims.values())
    assert all(c["verdict"] in ("held", "not held", "inconclusive", "not measured")
               for c in claims.values())
    # C1 and C3 need only weight-change, which always runs: they must be decided
    assert claims["C1"]["verdict"] != "not measured" and claims["C3"]["verdict"] != "not measured"
    page = (demo_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8
    assert not re.search(r"""(src|href)=["']https?:""", page)
    for probe in ("weight-change", "kl-drift", "task-accuracy", "mmlu", "attention-shift",
                  "mlp-patching", "causal-trace", "damage-attribution"):
        assert (demo_dir / probe / "result.json").exists(), probe
        assert f"<h2 id='{probe}'>" in page


@slow
def test_claim_tests_agree_with_claims_json(demo_dir):
    claims = json.loads((demo_dir / "claims.json").read_text())
    env = dict(os.environ, MECHINTERP_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "probes.claims", "-v",
                           "-p", "no:cacheprovider", "--mi-results", str(demo_dir)],
                          capture_output=True, text=True, env=env, timeout=300)
    outcome = {}
    for line in proc.stdout.splitlines():
        m = re.search(r"test_claim\[c(\d)_\w+\] (PASSED|FAILED|SKIPPED|XFAIL)", line)
        if m:
            outcome[f"C{m.group(1)}"] = m.group(2)
    want = {cid: {"held": "PASSED", "not held": "FAILED", "inconclusive": "XFAIL",
                  "not measured": "SKIPPED"}[c["verdict"]] for cid, c in claims.items()}
    assert outcome == want, proc.stdout[-3000:]


@slow
def test_compare_again_reuses_every_result(demo_dir, capsys):
    variants = [f"--variant={n}={demo_dir / 'models' / n}" for n in ("sft", "grpo", "sft-frozen")]
    assert main(["compare", *variants, "--preset", "smoke", "--out", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    steps = re.search(r"\[compare 1/(\d+)\]", out)
    assert steps and out.count("reusing") == int(steps.group(1)), out


@slow
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


@slow
@pytest.mark.parametrize("path", STUDY_NOTEBOOKS, ids=lambda p: p.name)
def test_study_notebook_runs_on_the_demo(path, demo_dir, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MECHINTERP_DEMO_DIR", str(demo_dir))
    if path.name.startswith("07_"):  # the precision gate: its contrast on a tiny model (bf16 training
        # of the real model takes CPU-minutes per step; tests/test_precision_contrast.py checks the
        # numbers of this same contrast)
        from mechinterp.study.precision import run_contrast

        run_contrast(tmp_path, "smoke", base="tiny-random-llama", device="cpu",
                     echo=lambda *_: None,
                     train={"learning_rate": 1e-4, "max_length": 400, "heldout_max_length": 400})
        monkeypatch.setenv("MECHINTERP_DEMO_DIR", str(tmp_path))
    monkeypatch.setenv("MECHINTERP_PROGRESS", "0")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue")


def test_there_are_seven_study_notebooks():
    assert [p.name[:2] for p in STUDY_NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@slow
def test_paper_figure_set_is_written_and_its_table_reads_the_results(demo_dir):
    from mechinterp.study.folder import load_study
    from mechinterp.study.paper_figures import PAPER_SET, benchmark_table

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


# ----- without the real model ----------------------------------------------------------------
def test_demo_runs_name_seeds_and_keep_the_trajectory_of_the_first():
    from mechinterp.study.demo import DEMO_PRESETS, demo_runs

    runs = demo_runs(3)
    assert [(r.name, r.algorithm, r.freeze, r.seed) for r in runs] == [
        ("sft", "sft", None, 0), ("grpo", "grpo", None, 0), ("sft-frozen", "sft", "paper-mid-mlp", 0),
        ("sft-s1", "sft", None, 1), ("grpo-s1", "grpo", None, 1),
        ("sft-frozen-s1", "sft", "paper-mid-mlp", 1),
        ("sft-s2", "sft", None, 2), ("grpo-s2", "grpo", None, 2),
        ("sft-frozen-s2", "sft", "paper-mid-mlp", 2)]
    assert [r.name for r in runs if r.trajectory] == ["sft", "grpo"]
    assert [r.name for r in demo_runs(1)] == ["sft", "grpo", "sft-frozen"]
    assert DEMO_PRESETS["smoke"].seeds == 1
    assert DEMO_PRESETS["default"].seeds >= 3 and DEMO_PRESETS["full"].seeds >= 3
    with pytest.raises(Exception, match="at least one seed"):
        demo_runs(0)


def test_each_seed_trains_with_its_seed_and_compare_reads_it_back(tmp_path):
    """The seed a run is trained with is the one in its train-config.json, which compare's
    describe_variant reads into VariantInfo.seed and Study.replicates orders by."""
    from mechinterp.study.demo import DEMO_PRESETS, demo_runs
    from mechinterp.study.folder import Study, describe_variant
    from mechinterp.models.run_folder import CONFIG_FILE
    from mechinterp.training.settings import resolve_settings, save_settings

    p = DEMO_PRESETS["default"]
    info = {}
    for r in demo_runs(3):
        s = resolve_settings(r.algorithm, p.train_preset, dict(p.train) | {
            "freeze_preset": r.freeze, "seed": r.seed})
        folder = tmp_path / r.name
        folder.mkdir()
        save_settings(s, folder / CONFIG_FILE)
        (folder / "config.json").write_text("{}")
        info[r.name] = describe_variant(r.name, str(folder))
    assert {n: v.seed for n, v in info.items()} == {r.name: r.seed for r in demo_runs(3)}
    study = Study(tmp_path, "base", dict(reversed(info.items())), {})
    assert study.replicates("sft") == ["sft", "sft-s1", "sft-s2"]
    assert study.replicates("grpo") == ["grpo", "grpo-s1", "grpo-s2"]
    assert study.replicates("sft-frozen") == ["sft-frozen", "sft-frozen-s1", "sft-frozen-s2"]


def test_claims_probes_run_on_every_seed_single_model_probes_on_the_first():
    from mechinterp.study.demo import demo_runs
    from mechinterp.study.folder import Study, VariantInfo
    from mechinterp.study.presets import PLANS, step_variants

    variants = {r.name: VariantInfo(r.name, r.name, [r.name], r.algorithm,
                                    "paper-mid-mlp" if r.freeze else "", seed=r.seed)
                for r in demo_runs(3)}
    variants["other"] = VariantInfo("other", "some/model", ["some/model"])  # kind unknown
    study = Study(Path("."), "base", variants, {})
    runs = {s.probe: step_variants(study, s) for s in PLANS["full"]}
    every = list(variants)
    for probe in ("weight-change", "kl-drift", "task-accuracy", "mmlu"):
        assert runs[probe] == every, probe
    assert runs["damage-attribution"] == ["sft", "sft-s1", "sft-s2"]
    for probe in ("attention-shift", "mlp-patching", "causal-trace", "activation-diff",
                  "logit-lens"):
        assert runs[probe] == ["sft", "grpo", "sft-frozen", "other"], probe
    assert runs["stitch"] == ["sft", "grpo"]
    # the default preset runs what the claims read; `full` adds the single-model and the
    # model-diffing probes
    assert {s.probe for s in PLANS["full"]} - {s.probe for s in PLANS["default"]} == {
        "attention-shift", "mlp-patching", "causal-trace", "activation-diff", "logit-lens",
        "stitch"}
    default = {s.probe: step_variants(study, s) for s in PLANS["default"]}
    assert default["damage-attribution"] == ["sft"]
    assert default["update-geometry"] == ["sft", "grpo"]
    assert {s.probe for s in PLANS["smoke"]} == set(runs)  # CI still runs every probe


TINY_DEMO = dict(base="tiny-random-llama", data="arithmetic", max_steps=6, checkpoints=3,
                 per_device_train_batch_size=2, max_length=384, n_heldout=2,
                 heldout_max_length=384, learning_rate=1e-3, lr_scheduler_type="constant",
                 warmup_ratio=0.0)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@slow  # three tiny training runs: about 30 s on a quiet machine
def test_finished_runs_keep_what_the_docstring_says(tmp_path, one_thread):
    """A further seed keeps the final model only (also as checkpoints/step-FINAL, the same inode)
    and the drift log; the first seed keeps every checkpoint; neither keeps the optimizer state;
    --keep-checkpoints keeps everything. A kept earlier checkpoint still loads and holds the
    weights the run had at that step (the drift log's weight change, computed in memory while
    training, equals the one recomputed from the loaded checkpoint)."""
    from mechinterp.analysis.weights import weight_change
    from mechinterp.models import load, resolve
    from mechinterp.store.results import read_result
    from mechinterp.study.demo import DemoPreset, DemoRun, train_one
    from mechinterp.study.folder import describe_variant

    preset = DemoPreset(None, "smoke", TINY_DEMO)
    out = tmp_path / "demo"
    echo = [].append

    def train(name, seed, trajectory, keep=False):
        run = DemoRun(name, "sft", None, seed, trajectory)
        return train_one(run, preset, out, None, "cpu", "float32", echo, keep_checkpoints=keep)

    further = train("sft-s1", 1, False)
    files = _files(further)
    assert not any(f.startswith("trainer-state") for f in files), files
    assert {f.split("/")[1] for f in files if f.startswith("checkpoints/")} == {"step-6"}
    assert {"config.json", "model.safetensors", "train-config.json", "train-summary.json",
            "training-drift/result.json"} <= files
    final, snap = further / "model.safetensors", further / "checkpoints/step-6/model.safetensors"
    assert final.stat().st_ino == snap.stat().st_ino  # one copy on disk
    info = describe_variant("sft-s1", str(further))
    assert info.seed == 1 and info.checkpoints == [f"{further}@step-6"]
    drift = read_result(further / "training-drift").data
    assert drift["steps"] == [2, 4, 6]  # the trajectory of every checkpoint is still logged

    first = train("sft", 0, True)
    assert {f.split("/")[1] for f in _files(first) if f.startswith("checkpoints/")} == {
        "step-2", "step-4", "step-6"}
    assert not (first / "trainer-state").exists()
    d = read_result(first / "training-drift").data
    base = resolve("tiny-random-llama").path
    _, _, ref = weight_change(base, {"step-2": first / "checkpoints" / "step-2"})
    for m in d["matrices"]:
        assert d["relative_change"][m][0] == pytest.approx(ref["step-2"][m], rel=1e-9)
    assert ref["step-2"]["up"][0] > 0
    lm = load(f"{first}@step-2", device="cpu", dtype="float32")
    assert lm.resolved.path == first / "checkpoints" / "step-2"
    # the seed changes the run: seed 0 and seed 1 end at different weights
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(first / "model.safetensors")), load_file(str(final))
    assert any(not torch.equal(a[k], b[k]) for k in a)

    everything = train("sft-s2", 2, False, keep=True)
    names = _files(everything)
    assert {f.split("/")[1] for f in names if f.startswith("checkpoints/")} == {
        "step-2", "step-4", "step-6"}
    assert any(f.startswith("trainer-state/checkpoint-6/optimizer") for f in names), names
    # a finished run is reused as it is, not pruned again
    assert train("sft-s2", 2, False, keep=True) == everything
    assert _files(everything) == names
