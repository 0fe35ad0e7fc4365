"""GSM8K (``gsm8k/{train,test}.jsonl`` or ``openai/gsm8k``) and answer extraction."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DataError
from .base import DataSource, read_jsonl

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class GSM8KItem:
    question: str
    solution: str  # the reference solution text, ending with "#### <answer>"
    answer: str  # normalised final answer
    index: int = 0
    split: str = "test"


def normalise_number(text: str) -> str | None:
    """The FIRST number of ``text``, normalised: ``"$1,234.50"`` -> ``"1234.5"``; None when there
    is no number. For a final answer that may show its working (``"5+3=8"``) use
    :func:`last_number`."""
    m = _NUMBER.search(text)
    return _normalise(m.group(0)) if m else None


def last_number(text: str) -> str | None:
    """The LAST number of ``text``, normalised as :func:`normalise_number` does; None if none."""
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def _normalise(number: str) -> str:
    s = number.replace(",", "").replace("$", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def extract_gsm8k_answer(text: str) -> str | None:
    """Final answer from model output: the first number after the ``####`` marker, else the last
    number in the last ``\\boxed{}``, else the last number of the text."""
    if "####" in text:
        got = normalise_number(text.split("####", 1)[1])
        if got is not None:
            return got
    boxed = _BOXED.findall(text)
    if boxed:
        got = last_number(boxed[-1])
        if got is not None:
            return got
    return last_number(text)


def load_gsm8k(source: DataSource, split: str = "test") -> list[GSM8KItem]:
    if split not in ("train", "test"):
        raise DataError(f"unknown GSM8K split {split!r}", "use train or test")
    folder = source.folder("gsm8k")
    if folder is None:
        rows = [(i + 1, dict(r)) for i, r in enumerate(source.hub_dataset("openai/gsm8k", "main", split))]
        where = f"openai/gsm8k:{split}"
    else:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} is missing", "the data root must hold gsm8k/{train,test}.jsonl")
        source.log.record_file(path)
        rows = read_jsonl(path, {})
        where = str(path)
    items = []
    for line_no, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                or not isinstance(row.get("answer"), str) or "####" not in row["answer"]:
            raise DataError(f"{where}:{line_no}: expected question and answer fields, the answer "
                            "ending in '#### <number>'", "fix or re-download the file")
        answer = normalise_number(row["answer"].split("####", 1)[1])
        if answer is None:
            raise DataError(f"{where}:{line_no}: no number after '####'", "fix the row")
        items.append(GSM8KItem(row["question"], row["answer"], answer, len(items), split))
    return items
