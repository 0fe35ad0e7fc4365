"""Bad input gives one line on stderr, exit 2 and nothing half-written, or it works and says what it
did. Each case raised a bare exception, wrote a silent result or drew a
broken figure before its fix."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mechinterp.cli import main
from mechinterp.errors import UserError


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mechinterp: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def data_root(tmp_path, data_source):
    """A data root of our own to damage: MMLU anatomy cut to 12 questions, and the known facts."""
    root = tmp_path / "data"
    (root / "mmlu" / "test").mkdir(parents=True)
    src = data_source.root / "mmlu" / "test" / "anatomy_test.csv"
    lines = src.read_bytes().splitlines(keepends=True)[:12]
    (root / "mmlu" / "test" / "anatomy_test.csv").write_bytes(b"".join(lines))
    shutil.copytree(data_source.root / "knowns", root / "knowns")
    return root


def _mmlu_cli(root: Path, out: Path, *extra: str) -> int:
    return main(["eval", "mmlu", "-m", "tiny-random-llama", "--subjects", "anatomy", "-f", "cloze",
                 "--data-dir", str(root), "--out", str(out), "--device", "cpu", *extra])


# ----- data files -----------------------------------------------------------------------------

def test_mmlu_csv_with_bytes_that_are_not_utf8(data_root, tmp_path, capsys):
    path = data_root / "mmlu" / "test" / "anatomy_test.csv"
    raw = path.read_bytes()
    second = raw.index(b"\n") + 1  # a bad byte on line 2
    path.write_bytes(raw[:second + 5] + b"\xff\xfe" + raw[second + 5:])
    assert _mmlu_cli(data_root, tmp_path / "out") == 2
    _one_error_line(capsys, "anatomy_test.csv:2: not UTF-8 text (byte 0xff", "UTF-8")
    assert not (tmp_path / "out").exists()


def test_jsonl_with_bytes_that_are_not_utf8(tmp_path):
    from mechinterp.data.base import read_jsonl

    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"question": "a", "answer": 1}\n{"question": "\xe9", "answer": 2}\n')
    with pytest.raises(UserError, match=r"items.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(path, {"question": (str,)})


def test_an_empty_mmlu_subject_file_is_refused_not_scored(data_root, tmp_path, capsys):
    (data_root / "mmlu" / "test" / "anatomy_test.csv").write_bytes(b"")
    assert _mmlu_cli(data_root, tmp_path / "out") == 2  # was: exit 0, 0 items, accuracy null
    _one_error_line(capsys, "anatomy_test.csv holds no questions")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value,kind", [("subject", 5, "str"), ("prompt", None, "str"),
                                              ("known_id", "7", "int"), ("known_id", True, "int")])
def test_known_fact_with_a_field_of_the_wrong_type(data_root, field, value, kind):
    from mechinterp.data import DataSource
    from mechinterp.data.knowns import load_knowns

    path = data_root / "knowns" / "known_1000.json"
    rows = json.loads(path.read_text())
    rows[3][field] = value
    path.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=rf"fact #3 has {field}={value!r}, not a {kind}"):
        load_knowns(DataSource(data_root))


def test_known_fact_with_a_non_string_subject_on_the_cli(data_root, tmp_path, capsys):
    path = data_root / "knowns" / "known_1000.json"
    rows = json.loads(path.read_text())
    rows[0]["subject"] = 5
    path.write_text(json.dumps(rows))
    out = tmp_path / "out"
    assert main(["run", "causal-trace", "-b", "tiny-random-llama", "--data-dir", str(data_root),
                 "--limit", "2", "--out", str(out), "--device", "cpu"]) == 2  # was: TypeError
    _one_error_line(capsys, "fact #0 has subject=5, not a str")
    assert not out.exists()


# ----- weight files ---------------------------------------------------------------------------

@pytest.mark.parametrize("header,what", [(b'{"x":5}', "entry 'x' is 5, not an object"),
                                         (b"[1,2]", "a JSON list, not an object"),
                                         (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}',
                                          "tensor 'w' has no valid data_offsets"),
                                         (b'{"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}',
                                          "tensor 'w' has no valid shape")])
def test_safetensors_header_that_is_not_a_table_of_tensors(tmp_path, capsys, header, what):
    from mechinterp.models.zoo import fetch

    bad = tmp_path / "bad"
    shutil.copytree(fetch("tiny-random-llama"), bad)
    for f in bad.glob("*.safetensors"):
        f.write_bytes(struct.pack("<Q", len(header)) + header)
    out = tmp_path / "out"
    assert main(["run", "weight-change", "-b", "tiny-random-llama", "-v", f"bad={bad}",
                 "--out", str(out), "--device", "cpu"]) == 2  # was: TypeError / AttributeError
    _one_error_line(capsys, "malformed safetensors header", what)
    assert not out.exists()


# ----- stored results and runs ----------------------------------------------------------------

def test_figures_on_a_result_json_whose_data_is_not_the_probes(tmp_path, capsys):
    from mechinterp.store.results import Result, write_result

    write_result(Result("weight-change", {"x": 1}), tmp_path / "weight-change")
    assert main(["figures", str(tmp_path)]) == 2  # was: KeyError 'matrices'
    _one_error_line(capsys, "weight-change's figures cannot be drawn from", "KeyError",
                    "re-run the probe")


@pytest.mark.parametrize("text,what", [('{"algorithm": "sft", "base', "cannot read"),
                                       ("[1, 2]", "is a JSON list, not an object"),
                                       ('{"algorithm": 5}', "algorithm=5 is not of type str"),
                                       ('{"algorithm": "sft", "seed": "x"}', "seed='x' is not of type int")])
def test_compare_with_a_damaged_train_config_in_a_variant(tmp_path, capsys, text, what):
    from mechinterp.models.zoo import fetch

    run = tmp_path / "run"
    shutil.copytree(fetch("tiny-random-llama"), run)
    (run / "train-config.json").write_text(text)
    out = tmp_path / "out"
    assert main(["compare", "-b", "tiny-random-llama", "-v", f"sft={run}", "--preset", "smoke",
                 "--only", "weight-change", "--out", str(out), "--device", "cpu"]) == 2
    _one_error_line(capsys, "train-config.json", what)
    assert not out.exists()  # refused before study.json is written


# ----- options --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_non_finite_float_options_are_refused(tmp_path, capsys, value):
    out = tmp_path / "out"
    assert main(["run", "causal-trace", "-b", "tiny-random-llama", "--set", f"noise_mult={value}",
                 "--set", "keep_wrong=true", "--limit", "1", "--out", str(out),
                 "--device", "cpu"]) == 2  # inf was accepted: a result with every AIE null
    _one_error_line(capsys, "noise_mult=")
    assert not out.exists()


def test_non_finite_floats_from_python_are_refused():
    from mechinterp.core.registry import registry

    with pytest.raises(UserError, match="noise_mult=inf of causal-trace must be a finite number"):
        registry()["causal-trace"].Config(noise_mult=math.inf)


def test_a_limit_beyond_the_set_is_said_and_recorded(data_root, tmp_path, capsys):
    """A limit larger than the set (an int no machine word holds) uses every item, says so in one
    line, and the result records it."""
    huge = 99999999999999999999
    out = tmp_path / "out"
    assert _mmlu_cli(data_root, out, "--limit", str(huge)) == 0
    err = capsys.readouterr().err
    note = f"limit {huge} exceeds the set's 12 items; using all 12"
    assert err.count(note) == 1, err
    res = json.loads((out / "mmlu" / "result.json").read_text())
    assert res["data"]["n_items"] == 12
    assert res["provenance"]["notes"] == [note] and res["provenance"]["config"]["limit"] == huge


def test_limit_notices_outside_a_run_are_warnings():
    from mechinterp.data.subset import LimitNotice, seeded_subset, split_limit

    with pytest.warns(LimitNotice, match="limit 5 exceeds the set's 3 items; using all 3"):
        assert seeded_subset([1, 2, 3], 5) == [1, 2, 3]
    with pytest.warns(LimitNotice, match="limit 9 exceeds the set's 5 items"):
        assert split_limit(9, [2, 3]) == [2, 3]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seeded_subset([1, 2, 3], 3) == [1, 2, 3] and split_limit(4, [2, 3]) == [2, 2]


# ----- figures and report ---------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [["$$"], ["$", "^$"], ["$x$", " the"]])
def test_tokens_with_dollar_signs_draw_as_themselves(tmp_path, tokens):
    """matplotlib reads text between two $ as maths: a '$$' token (in SmolLM2's vocabulary)
    failed the activation-diff lens figure, and '$x$' drew as an italic x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mechinterp.plotting.style import token_text
    from mechinterp.store.results import save_figures
    from probes.activation_diff import _lens_figure

    top = [{"token": t, "id": i, "logit": 1.0} for i, t in enumerate(tokens)]
    fig = _lens_figure({"variants": ["v"], "n_layers": 1,
                        "lens_top": {"v": [{"promoted": top, "suppressed": top[::-1]}]}})
    FigureCanvasAgg(fig).draw()
    cells = [c.get_text() for c in fig.axes[0].tables[0].get_celld().values()]
    shown = ", ".join(token_text(t) for t in tokens)
    cell = next(c for c in cells if c.get_text() == shown)
    # what matplotlib draws: the tokens as written, not maths
    assert cell._preprocess_math(cell.get_text()) == (", ".join(map(repr, tokens)), False)
    save_figures({"lens_top": fig}, tmp_path)
    assert (tmp_path / "lens_top.png").stat().st_size > 0
    assert token_text("$x$") == r"'\$x\$'"


def test_causal_trace_fact_figure_with_dollar_tokens(tmp_path):
    import numpy as np

    from mechinterp.store.results import save_figures
    from probes.causal_trace import _fact_figure

    row = {"tokens": ["$$", " costs", " $", "5"], "subject_range": [0, 1], "prompt": "$$ costs $5",
           "answer_token": "$$", "clean_prob": 0.5, "corrupted_prob": 0.1}
    fig = _fact_figure("sft", row, {"hidden": np.full((4, 2), 0.3)})
    save_figures({"fact": fig}, tmp_path)  # was: ParseException
    assert "'$$ costs $5'" in fig._suptitle.get_text().replace("\\$", "$")


def test_report_md_table_cells_are_escaped(tmp_path):
    """A | in a cell (the ||dW|| of a claim statement) ended the cell and broke the verdict table."""
    import re

    from mechinterp.study.claims import decide_all
    from mechinterp.study.document import md_cell
    from mechinterp.study.folder import Study
    from mechinterp.study.report import build_markdown

    claims = decide_all(Study(tmp_path, "b", {}, {}))
    claims[0] = {**claims[0], "statement": "mean ||dW||/||W|| = 0.1\nover layers", "title": "a|b"}
    md = build_markdown(Study(tmp_path, "b", {}, {}), claims)
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| claim"))
    table = [ln for ln in lines if ln.startswith("| **C")]
    assert len(table) == len(claims)
    cells = len(re.split(r"(?<!\\)\|", header))
    for line in table:  # every row has the header's cells: pipes inside cells are escaped
        assert len(re.split(r"(?<!\\)\|", line)) == cells, line
    assert md_cell("||dW||") == r"\|\|dW\|\|" and md_cell("a\nb") == "a b"


# ----- devices ----------------------------------------------------------------------------------

def test_weight_change_records_where_it_computed(tmp_path):
    import torch

    import mechinterp as mi

    res = mi.run("weight-change", base="tiny-random-llama", variants={"a": "tiny-random-llama"},
                 device="auto", out=tmp_path, draw=False)
    assert res.provenance["device"] == "cpu" and res.provenance["dtype"] == "float32"
    stored = json.loads((tmp_path / "weight-change" / "result.json").read_text())
    assert stored["provenance"]["device"] == "cpu"
    if not torch.cuda.is_available():  # it used to record "cuda" here, computed on the CPU
        with pytest.raises(UserError, match="CUDA is not available"):
            mi.run("weight-change", base="tiny-random-llama",
                   variants={"a": "tiny-random-llama"}, device="cuda", out=tmp_path / "c")
        assert not (tmp_path / "c").exists()


# ----- claims on a killed compare -------------------------------------------------------------

def test_claim_tests_fail_on_a_killed_compare_folder(tmp_path):
    """study.json written, some planned results missing: the claim tests fail naming them (they
    reported '8 skipped' and exit 0)."""
    from mechinterp.store.results import Result, write_result
    from mechinterp.study.folder import STUDY_FILE, Study, VariantInfo

    variants = {n: VariantInfo(n, "tiny-random-llama", ["tiny-random-llama"], n, "")
                for n in ("sft", "grpo")}
    study = Study(tmp_path, "tiny-random-llama", variants, {}, "smoke",
                  plan=["weight-change", "kl-drift"])
    (tmp_path / STUDY_FILE).write_text(json.dumps(study.to_json()))
    write_result(Result("weight-change", {"variants": ["sft", "grpo"]}), tmp_path / "weight-change")

    def claims_run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "probes.claims", "-q",
                               "-p", "no:cacheprovider", "-p", "no:randomly", "--mi-results",
                               str(tmp_path)], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)

    proc = claims_run()
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "unfinished compare folder (missing: kl-drift)" in proc.stdout, proc.stdout[-2000:]
    # a folder from before plans were recorded: claims.json (written last) marks a finished run
    meta = json.loads((tmp_path / STUDY_FILE).read_text())
    del meta["plan"]
    (tmp_path / STUDY_FILE).write_text(json.dumps(meta))
    proc = claims_run()
    assert proc.returncode != 0 and "(missing: claims.json)" in proc.stdout, proc.stdout[-2000:]


# ----- GGUF conversion ------------------------------------------------------------------------

_CONVERT = """
import sys, time
from pathlib import Path
from mechinterp.models import specs, zoo

gate = Path(sys.argv[2])
def slow_convert(gguf, folder):  # both processes are inside the conversion before either renames
    (Path(folder) / "config.json").write_text("{}")
    (gate / sys.argv[3]).touch()
    t0 = time.time()
    while len(list(gate.iterdir())) < 2 and time.time() - t0 < 60:
        time.sleep(0.05)
zoo.gguf_to_folder = slow_convert
print(specs._gguf_folder(Path(sys.argv[1])))
"""


def test_two_processes_converting_one_gguf(tmp_path):
    """The second process to finish lost the rename to the first and raised (ENOTEMPTY)."""
    import os

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    gate = tmp_path / "gate"
    gate.mkdir()
    env = dict(os.environ, MECHINTERP_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT, str(gguf), str(gate), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    folders = {o[0].strip() for o in outs}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (folder / "config.json").exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left
