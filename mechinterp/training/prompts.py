"""One prompt format for SFT and GRPO: the paper's think/answer system prompt through the chat template.

Items are question/answer pairs: GSM8K train (``mechinterp.data.load_gsm8k``) or any JSONL file with
``question`` and ``answer`` fields (the answer either a GSM8K solution ending in ``#### N`` or a bare
final answer). SFT trains on the rendered reference solution as the assistant turn; GRPO samples the
assistant turn and scores it against the final answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..data import DataSource, load_gsm8k
from ..data.base import read_jsonl
from ..data.gsm8k import normalise_number
from ..errors import DataError

#: The open-r1 system prompt the paper's runs used (think / answer tags).
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>"
    "<answer> answer here </answer>"
)

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: "48/2 = <<48/2=24>>24"


@dataclass(frozen=True)
class QAItem:
    question: str
    reasoning: str  # reference reasoning (may be empty when only an answer is known)
    answer: str  # normalised final answer


def render_target(item: QAItem) -> str:
    """The assistant turn SFT learns; it matches :data:`rewards.FORMAT_PATTERN` exactly."""
    return f"<think>\n{item.reasoning}\n</think>\n<answer>\n{item.answer}\n</answer>"


def prompt_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def _split_solution(solution: str) -> tuple[str, str | None]:
    if "####" in solution:
        reasoning, final = solution.split("####", 1)
        return _CALCULATOR.sub("", reasoning).strip(), normalise_number(final)
    return "", normalise_number(solution)


def load_items(data: str | None, source: DataSource, split: str = "train") -> list[QAItem]:
    """GSM8K ``split`` from the data source (``data`` None or ``"gsm8k"``), the synthetic
    arithmetic task (``arithmetic[:options]``, see :mod:`mechinterp.data.arithmetic`; ``test`` is
    its held-out split), or a JSONL file."""
    from ..data.arithmetic import is_task, parse_task, task_items

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


def sft_rows(items: list[QAItem]) -> list[dict]:
    """Conversational prompt/completion rows (TRL trains on the completion only)."""
    return [{"prompt": prompt_messages(it.question),
             "completion": [{"role": "assistant", "content": render_target(it)}]} for it in items]


def grpo_rows(items: list[QAItem]) -> list[dict]:
    """Conversational prompts; ``answer`` reaches the reward functions as a keyword column."""
    return [{"prompt": prompt_messages(it.question), "answer": it.answer} for it in items]
