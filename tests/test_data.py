"""Data loaders on the real files, and malformed input named by file and line."""

import json

import pytest

from mechinterp.data import (
    MMLU_SUBJECTS,
    DataSource,
    extract_gsm8k_answer,
    load_gsm8k,
    load_knowns,
    load_mmlu,
)
from mechinterp.data.mmlu import read_mmlu_csv
from mechinterp.errors import DataError


def test_mmlu_counts(data_source):
    test = load_mmlu(data_source, "test")
    dev = load_mmlu(data_source, "dev")
    assert len(test) == 14042 and len(dev) == 57 * 5
    assert len(MMLU_SUBJECTS) == 57
    by_letter = {k: sum(i.answer_letter == k for i in test) for k in "ABCD"}
    assert by_letter == {"A": 3222, "B": 3462, "C": 3582, "D": 3776}  # README of the data
    first = load_mmlu(data_source, "test", ["abstract_algebra"])[0]
    assert first.choices == ("0", "4", "2", "6") and first.answer_letter == "B"
    assert any(str(p).endswith("abstract_algebra_test.csv") for p in data_source.log.files)


def test_knowns_and_gsm8k(data_source):
    facts = load_knowns(data_source)
    assert len(facts) == 1209 and facts[0].subject == "Vinson Massif"
    assert all(f.subject in f.prompt for f in facts[:50])
    test = load_gsm8k(data_source, "test")
    assert len(test) == 1319 and test[0].answer == "18"
    assert len(load_gsm8k(data_source, "train")) == 7473


@pytest.mark.parametrize("text,want", [
    ("so the total is #### 1,234", "1234"),
    ("The answer is \\boxed{72}.", "72"),
    ("first 3 then 4.50 dollars", "4.5"),
    ("#### -7", "-7"),
    ("she pays $1,000.00 in all", "1000"),
    ("no digits here", None),
    ("so \\boxed{5 + 3 = 8}", "8"),  # the last number inside the box, as in an answer tag
])
def test_gsm8k_answer_extraction(text, want):
    assert extract_gsm8k_answer(text) == want


def test_first_and_last_number():
    from mechinterp.data.gsm8k import last_number, normalise_number

    assert normalise_number("5+3=8") == "5" and last_number("5+3=8") == "8"
    assert last_number("$1,000.00 or -2.50") == "-2.5" and last_number("none") is None


def test_malformed_mmlu_row_names_file_and_line(tmp_path):
    f = tmp_path / "x_test.csv"
    f.write_text('"q1",a,b,c,d,A\n"q2",a,b,c,d,E\n')
    with pytest.raises(DataError, match=r"x_test.csv:2: answer 'E'"):
        read_mmlu_csv(f, "x", "test")
    f.write_text('"q1",a,b,c,d,A\n"q2",a,b,c\n')
    with pytest.raises(DataError, match=r"x_test.csv:2: expected 6 columns"):
        read_mmlu_csv(f, "x", "test")


def test_malformed_gsm8k_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    good = json.dumps({"question": "q", "answer": "a #### 3"})
    (tmp_path / "gsm8k" / "test.jsonl").write_text(good + "\n{broken\n")
    with pytest.raises(DataError, match=r"test.jsonl:2: invalid JSON"):
        load_gsm8k(DataSource(tmp_path), "test")


def test_missing_data_root_and_folders(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        DataSource.from_option(tmp_path / "nope")
    with pytest.raises(DataError, match="has no mmlu/ folder"):
        load_mmlu(DataSource(tmp_path))
    with pytest.raises(DataError, match="unknown MMLU subject 'astrology'"):
        load_mmlu(DataSource(tmp_path), subjects=["astrology"])
