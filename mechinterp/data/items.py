"""The question/answer items a ``--data`` option names, for training and the in-domain probes.

Items are question/answer pairs: GSM8K (``mechinterp.data.load_gsm8k``), the synthetic arithmetic
task (:mod:`mechinterp.data.arithmetic`) or any JSONL file with ``question`` and ``answer`` fields
(the answer either a GSM8K solution ending in ``#### N`` or a bare final answer).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ..errors import DataError
from .arithmetic import is_task, parse_task, task_items
from .base import DataSource, read_jsonl
from .gsm8k import load_gsm8k, normalise_number
from .qa import QAItem

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: "48/2 = <<48/2=24>>24"


def _split_solution(solution: str) -> tuple[str, str | None]:
    if "####" in solution:
        reasoning, final = solution.split("####", 1)
        return _CALCULATOR.sub("", reasoning).strip(), normalise_number(final)
    return "", normalise_number(solution)


def load_items(data: str | None, source: DataSource, split: str = "train") -> list[QAItem]:
    """GSM8K ``split`` from the data source (``data`` None or ``"gsm8k"``), the synthetic
    arithmetic task (``arithmetic[:options]``, see :mod:`mechinterp.data.arithmetic`; ``test`` is
    its held-out split), or a JSONL file."""
    if is_task(data):
        return task_items(parse_task(data), "train" if split == "train" else "test")
    if data in (None, "gsm8k"):
        return [QAItem(g.question, _split_solution(g.solution)[0], g.answer)
                for g in load_gsm8k(source, split)]
    path = Path(data).expanduser()
    if not path.is_file():
        raise DataError(f"training data {data!r} is neither 'gsm8k' nor a JSONL file",
                        "pass --data gsm8k or a .jsonl file with question/answer fields")
    source.log.record_file(path)
    items = []
    for line_no, row in read_jsonl(path, {"question": (str,), "answer": (str, int, float)}):
        reasoning, final = _split_solution(str(row["answer"]))
        if final is None:
            raise DataError(f"{path}:{line_no}: the answer has no number",
                            "answers must end in a number (GSM8K style '#### 42' or plain)")
        items.append(QAItem(row["question"], reasoning, final))
    if not items:
        raise DataError(f"{path} has no rows", "pass a non-empty JSONL file")
    return items


def pick(items: list[QAItem], n: int | None, seed: int) -> list[QAItem]:
    """A seeded selection of ``n`` items (all, shuffled, when ``n`` is None)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[: n if n is not None else len(items)]]
