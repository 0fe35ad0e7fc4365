"""Question/answer items in the paper's think/answer format: the prompt, the reference turn, and
reading the final answer back out of a completion.

SFT trains on :func:`render_target` as the assistant turn; GRPO samples the assistant turn after
:func:`prompt_messages` and scores it with :func:`final_answer`; the in-domain evaluation reads its
greedy answers the same way, so a trained model is scored as it was rewarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .gsm8k import extract_gsm8k_answer, last_number

#: The open-r1 system prompt the paper's runs used (think / answer tags).
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>"
    "<answer> answer here </answer>"
)

#: The exact think/answer layout (the open-r1 regex the paper's format reward used).
FORMAT_PATTERN = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class QAItem:
    question: str
    reasoning: str  # reference reasoning (may be empty when only an answer is known)
    answer: str  # normalised final answer


def render_target(item: QAItem) -> str:
    """The assistant turn SFT learns; it matches :data:`FORMAT_PATTERN` exactly."""
    return f"<think>\n{item.reasoning}\n</think>\n<answer>\n{item.answer}\n</answer>"


def prompt_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def final_answer(text: str) -> str | None:
    """The normalised final answer of a completion: the last number inside the last answer tag
    (None when that tag holds no number), else the GSM8K extraction of the whole text."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:  # the last number: "<answer>5+3=8</answer>" answers 8
        return last_number(tagged[-1])
    return extract_gsm8k_answer(text)
